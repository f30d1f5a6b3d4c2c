"""The package's layers (docs/CONVENTIONS.md#layers): no module imports a unit it may not use.

Read from the source with ``ast`` (imports inside functions included), so a lazy import that
crosses a layer is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "composer_remask"

# Unit -> module prefixes (relative to composer_remask); the longest matching prefix wins.
UNITS = {
    "contract": ("arguments", "batch", "runtime", "numbers"),
    "method": ("masking", "loss", "divergence", "lean_path", "normalization", "prepared_batch", "algorithm"),
    "optim": ("optim",),
    "data_build": ("data", "data.formats", "data.sources", "data.pipeline", "data.tokenizer", "data.shards",
                   "data.writer", "data.inspection", "data.cli", "data.fixtures"),
    "data_load": ("data.collator", "data.dataset", "data.shared_memory"),
    "integration": ("", "train", "export", "evaluate", "foundry", "pretrained", "configs"),
}
ALLOWED = {
    "contract": {"contract"},
    "method": {"contract", "method"},
    "optim": {"contract", "optim"},
    "data_build": {"contract", "data_build"},
    "data_load": {"contract", "data_build", "data_load"},
    "integration": set(UNITS),
}


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


def package_imports(path: Path) -> set[str]:
    """Modules of composer_remask that ``path`` imports, relative to the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "composer_remask" or name.startswith("composer_remask."):
                relative = name.removeprefix("composer_remask").removeprefix(".")
                if (PACKAGE / (relative.replace(".", "/") + ".py")).exists() or \
                        (PACKAGE / relative.replace(".", "/") / "__init__.py").exists():
                    found.add(relative)
    return found


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


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
