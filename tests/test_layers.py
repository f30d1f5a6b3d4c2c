"""The layers (docs/CONVENTIONS.md#layers): no module imports a unit it may not use, and no import cycle.

Read from the source with ``ast`` (imports inside functions included), so a lazy import that
crosses a layer or closes a cycle is caught too. ``bench/`` is checked with the package: it may
import the package, the package never imports it, and it has no cycle of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "composer_remask"
ROOTS = ("composer_remask", "bench")  # the import roots whose modules form the checked graph

# Unit -> module prefixes (relative to composer_remask); the longest matching prefix wins.
UNITS = {
    "contract": ("arguments", "batch", "runtime", "checks", "_private_api"),
    "method": ("remask",),
    "optim": ("optim",),
    "data_build": ("data", "data.formats", "data.sources", "data.pipeline", "data.tokenizer", "data.shards",
                   "data.writer", "data.manifest", "data.inspection", "data.cli"),
    "data_load": ("data.collator", "data.dataset"),
    "checkpoints": ("checkpoints",),
    "integration": ("", "train", "export", "evaluate", "foundry"),
    "tools": ("tools",),
}
ALLOWED = {
    "contract": {"contract"},
    "method": {"contract", "method"},
    "optim": {"contract", "optim"},
    "data_build": {"contract", "data_build"},
    "data_load": {"contract", "data_build", "data_load"},
    "checkpoints": {"contract", "checkpoints"},
    "integration": set(UNITS) - {"tools"},  # training never depends on scaffolding (GGUF import, fixtures)
    "tools": set(UNITS),
}
# What reaches into Composer's or torch's private code: allowed in composer_remask/_private_api.py only.
PRIVATE_REACH = re.compile(r"f_locals|\b_train_microbatch\b|import _load_state_dict|_EmptyStateDictLoadPlanner")


def unit_of(module: str) -> str:
    """The unit of ``module`` (dotted, relative to the package; ``""`` is the package itself)."""
    best, best_len = None, -1
    for unit, prefixes in UNITS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = unit, len(prefix)
    assert best is not None, f"composer_remask.{module} belongs to no unit: add it to UNITS and to CONVENTIONS"
    return best


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` (``composer_remask.x.y``, ``bench.x``) is a module or package of the checked roots."""
    if dotted.split(".")[0] not in ROOTS:
        return False
    path = REPO / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the checked roots' modules that ``path`` imports (``from m import sub`` is ``m.sub``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if is_module(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if is_module(submodule):
                    found.add(submodule)
                elif is_module(node.module):
                    found.add(node.module)
    return found


def package_imports(path: Path) -> set[str]:
    """Modules of composer_remask that ``path`` imports, relative to the package."""
    return {name.removeprefix("composer_remask").removeprefix(".") for name in imported_modules(path)
            if name.split(".")[0] == "composer_remask"}


def module_files(root: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root`` (a package's ``__init__`` is the package)."""
    out = {}
    for path in sorted((REPO / root).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def modules() -> dict[str, Path]:
    """The package's modules, relative to the package (``""`` is the package itself)."""
    return {name.removeprefix("composer_remask").removeprefix("."): path
            for name, path in module_files("composer_remask").items()}


def import_graph(roots: tuple[str, ...] = ROOTS) -> dict[str, set[str]]:
    return {name: imported_modules(path) - {name} for root in roots for name, path in module_files(root).items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_stays_within_the_allowed_layers():
    crossings = []
    for module, path in modules().items():
        unit = unit_of(module)
        for imported in package_imports(path):
            if unit_of(imported) not in ALLOWED[unit]:
                crossings.append(f"composer_remask.{module} ({unit}) imports composer_remask.{imported} "
                                 f"({unit_of(imported)})")
    assert not crossings, "\n".join(crossings)


def test_build_time_data_code_never_imports_the_training_loader():
    for module, path in modules().items():
        if unit_of(module) == "data_build":
            assert not {"data.dataset", "data.collator"} & package_imports(path), module


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from composer_remask.data.dataset import build_dataloader\n")
    assert "data.dataset" in package_imports(source)


def test_no_import_cycle_between_modules_in_the_package_or_bench():
    found = cycles(import_graph())
    assert not found, "\n".join(" <-> ".join(cycle) for cycle in found)


def test_no_import_cycle_between_the_packages_top_level_parts():
    """``train`` -> ``export`` -> ``train`` is a cycle even when no two modules import each other."""
    def part(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        graph.setdefault(part(name), set()).update(part(t) for t in targets if part(t) != part(name))
    found = cycles(graph)
    assert not found, "\n".join(" <-> ".join(cycle) for cycle in found)


def test_the_package_never_imports_bench_or_scripts():
    for module, path in modules().items():
        outside = {name for name in imported_modules(path) if not name.startswith("composer_remask")}
        assert not outside, f"composer_remask.{module} imports {outside}"


def test_the_cycle_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_private_composer_and_torch_reaches_live_in_one_module():
    hits = sorted(str(path.relative_to(REPO)) for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.md")]
                  if PRIVATE_REACH.search(path.read_text(encoding="utf-8")))
    assert hits == ["composer_remask/_private_api.py"], hits


def test_the_private_api_module_names_the_pinned_versions():
    from composer_remask._private_api import WRITTEN_AGAINST

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(WRITTEN_AGAINST) <= set(dependencies), "update _private_api.py after changing these pins"
