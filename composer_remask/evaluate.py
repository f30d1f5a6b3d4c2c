"""Evaluate an exported model with EleutherAI's lm-evaluation-harness, with the card's settings.

The ReMask-3B card reports GSM8K (strict match, 5-shot) and ARC-Challenge (acc_norm, 25-shot).
One ``simple_evaluate`` call applies one ``num_fewshot`` to every task in it, so tasks are grouped
by their few-shot count and run in separate calls on one loaded model.

Offline, a GSM8K-style task runs from a local JSONL (``--gsm8k-jsonl``): rows in GSM8K's shape
(``question``, ``answer`` ending in ``#### N``) or in the project's CoT shape (``prompt``,
``rationale``, ``target``/``answer``; rows with a non-numeric answer are skipped). Two prompt formats:

- ``gsm8k`` (default): the stock task's ``Question: ...\\nAnswer:`` prompt, few-shot from
  ``--gsm8k-fewshot-jsonl`` (5-shot when given), scored by ``exact_match,strict-match`` on
  ``#### N``, the card's metric;
- ``remask``: the project's CoT prompt (``<|user|>\\n...\\n<|rationale|>\\n``), zero-shot, scored by
  ``exact_match,strict-match``: the number right after the first ``<|answer|>\\n`` the model
  writes (the card's strict GSM8K metric, in the project's format); ``exact_match,last-number``
  (the last number written) is reported too. lm-eval decodes generations without special tokens,
  which hides ``<|answer|>``; :func:`special_tokens_hflm` keeps them.

    remask-eval runs/remask-3b/hf                         # gsm8k 5-shot + arc_challenge 25-shot (hub data)
    remask-eval runs/tiny-cpu/hf --gsm8k-jsonl test.jsonl --prompt-format remask --device cpu --limit 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from composer_remask.batch import ANSWER_TAG, USER_TAG
from composer_remask.checks import blocking_ancestor, finite_number
from composer_remask.data.formats import format_cot_prompt

__all__ = [
    "CARD_TASKS", "COT_STRICT_ANSWER", "LOCAL_GSM8K_TASK", "TaskSetting", "cot_prompt_template", "evaluate",
    "format_report", "main", "special_tokens_hflm", "write_local_gsm8k_task",
]

LOCAL_GSM8K_TASK = "gsm8k_local"
PROMPT_FORMATS = ("gsm8k", "remask")


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """How a task is run and which number is its headline."""

    num_fewshot: int | None
    metric: str | None  # lm-eval result key like "exact_match,strict-match"; None: the first one reported


CARD_TASKS: dict[str, TaskSetting] = {
    "gsm8k": TaskSetting(5, "exact_match,strict-match"),
    "arc_challenge": TaskSetting(25, "acc_norm,none"),
}

_EXACT_MATCH = {
    "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
    "ignore_case": True, "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
# Strict match in the project's CoT format: the number right after the first "<|answer|>\n".
COT_STRICT_ANSWER = re.escape(ANSWER_TAG) + r"\n(-?[0-9]+)"


def cot_prompt_template(field: str) -> str:
    """The CoT generation prompt (``data.formats.format_cot_prompt``) as an lm-eval template of ``field``."""
    return format_cot_prompt("{{" + field + "}}")


def special_tokens_hflm() -> type:
    """lm-eval's ``HFLM`` with generations decoded special tokens included (imported lazily).

    The stock ``HFLM`` decodes with ``skip_special_tokens=True``, so ``<|answer|>`` never reaches
    the strict-match filter; this one keeps it.
    """
    from lm_eval.models.huggingface import HFLM

    class SpecialTokensHFLM(HFLM):
        """``HFLM`` whose generations keep special tokens (``<|answer|>``) when decoded."""

        def tok_decode(self, tokens: Any, skip_special_tokens: bool = False) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=False)

    return SpecialTokensHFLM


# ------------------------------------------------------------------------------ local GSM8K task

_NUMERIC = re.compile(r"-?[$0-9][0-9,]*(\.[0-9]+)?")


def _gsm8k_rows(path: Path) -> list[dict[str, str]]:
    """Rows as ``{question, answer: '... #### N', target: N}`` from either accepted shape.

    CoT rows whose final answer is not a number (yes/no questions, expressions) are skipped:
    GSM8K's metrics compare numbers.
    """
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON: {error}") from None
            if "question" in row and "answer" in row:
                question, answer = str(row["question"]), str(row["answer"])
                if "####" not in answer:
                    raise ValueError(f"{path}:{line_number}: field 'answer' has no '#### <number>' final answer")
                target = answer.split("####")[-1].strip()
            elif "prompt" in row and "rationale" in row and ("target" in row or "answer" in row):
                target = str(row.get("target", row.get("answer"))).strip()
                if not _NUMERIC.fullmatch(target):
                    continue
                question = str(row["prompt"])
                answer = f"{str(row['rationale']).strip()}\n#### {target}"
            else:
                raise ValueError(f"{path}:{line_number}: expected fields question/answer (GSM8K) or "
                                 f"prompt/rationale/target (CoT), got {sorted(row)}")
            rows.append({"question": question.strip(), "answer": answer, "target": target})
    if not rows:
        raise ValueError(f"{path}: no rows with a numeric final answer")
    return rows


def write_local_gsm8k_task(test_jsonl: str | Path, out_dir: str | Path, fewshot_jsonl: str | Path | None = None,
                           prompt_format: str = "gsm8k", task_name: str = LOCAL_GSM8K_TASK) -> TaskSetting:
    """Write an lm-eval task folder (YAML + normalized JSONL) for ``TaskManager(include_path=out_dir)``."""
    import yaml

    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_files = {"test": str((out / f"{task_name}_test.jsonl").resolve())}
    _write_jsonl(Path(data_files["test"]), _gsm8k_rows(Path(test_jsonl)))
    if fewshot_jsonl is not None:
        data_files["train"] = str((out / f"{task_name}_train.jsonl").resolve())
        _write_jsonl(Path(data_files["train"]), _gsm8k_rows(Path(fewshot_jsonl)))
    task: dict[str, Any] = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "output_type": "generate_until",
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    if fewshot_jsonl is not None:
        task.update(training_split="train", fewshot_split="train")
    if prompt_format == "gsm8k":
        num_fewshot = 5 if fewshot_jsonl is not None else 0
        task.update(
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_target="{{answer}}",
            metric_list=[_EXACT_MATCH],
            generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                               "temperature": 0.0},
            filter_list=[
                {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": _NUMBER},
                    {"function": "take_first"}]},
            ],
        )
        metric = "exact_match,strict-match"
    else:
        num_fewshot = 0
        task.update(
            doc_to_text=cot_prompt_template("question"),
            doc_to_target="{{target}}",
            metric_list=[_EXACT_MATCH],
            generation_kwargs={"until": [USER_TAG], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256},
            filter_list=[
                {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": COT_STRICT_ANSWER},
                                                    {"function": "take_first"}]},
                {"name": "last-number", "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": _NUMBER},
                    {"function": "take_first"}]},
            ],
        )
        metric = "exact_match,strict-match"
    task["num_fewshot"] = num_fewshot
    (out / f"{task_name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return TaskSetting(num_fewshot, metric)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ evaluation

def _headline(task_results: Mapping[str, Any], metric: str | None) -> tuple[str, float | None, float | None]:
    if metric is None:
        metric = next((k for k, v in task_results.items()
                       if "," in k and "_stderr" not in k and isinstance(v, (int, float))), None)
        if metric is None:
            return "", None, None
    value = task_results.get(metric)
    name, _, filter_name = metric.partition(",")
    stderr = task_results.get(f"{name}_stderr,{filter_name}")
    return (metric, float(value) if isinstance(value, (int, float)) else None,
            float(stderr) if isinstance(stderr, (int, float)) else None)


def evaluate(
    model: Any,
    tasks: Sequence[str] = ("gsm8k", "arc_challenge"),
    *,
    tokenizer: Any = None,
    include_path: str | Sequence[str] | None = None,
    gsm8k_jsonl: str | Path | None = None,
    gsm8k_fewshot_jsonl: str | Path | None = None,
    prompt_format: str = "gsm8k",
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    device: str | None = None,
    batch_size: int | str = 8,
    dtype: str = "auto",
    max_gen_toks: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval on ``model`` (an HF folder or hub id, an in-memory ``PreTrainedModel`` with
    ``tokenizer``, or an ``lm_eval`` ``LM`` object) and return ``{"model", "tasks": {name: {metric, value, stderr, num_fewshot, all}}}``.

    Known tasks use the card's few-shot counts (``CARD_TASKS``); ``gsm8k_local`` is the local task
    written from ``gsm8k_jsonl``; ``num_fewshot`` overrides every task. ``limit`` caps examples per
    task (a smoke test, not a comparable score); ``max_gen_toks`` caps generated tokens of the
    generative tasks (default 256; it must stay below the model's context). With ``log_samples`` each task also gets
    ``samples`` (prompts and generations).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {name: CARD_TASKS.get(name, TaskSetting(None, None)) for name in tasks}
    include_paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    with tempfile.TemporaryDirectory(prefix="remask-eval-tasks-") as task_dir:
        if LOCAL_GSM8K_TASK in settings:
            if gsm8k_jsonl is None:
                raise ValueError(f"task {LOCAL_GSM8K_TASK!r} needs a local JSONL (gsm8k_jsonl / --gsm8k-jsonl)")
            settings[LOCAL_GSM8K_TASK] = write_local_gsm8k_task(gsm8k_jsonl, task_dir, gsm8k_fewshot_jsonl,
                                                                prompt_format)
            include_paths.append(task_dir)
        task_manager = _task_manager(list(tasks), include_paths)
        lm, model_name = _harness_model(model, tokenizer, prompt_format, device=device, dtype=dtype,
                                        batch_size=batch_size)
        report: dict[str, Any] = {"model": model_name, "limit": limit, "tasks": {}}
        for shots, names in _by_fewshot(settings, num_fewshot).items():
            report["tasks"].update(_run_tasks(lm, names, settings, shots, task_manager, limit=limit,
                                              log_samples=log_samples, max_gen_toks=max_gen_toks))
    return report


def _task_manager(tasks: list[str], include_paths: list[str]) -> Any:
    """lm-eval's ``TaskManager`` that knows ``tasks``; unknown names are a ``ValueError``."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own few thousand task files takes seconds: skip it when local files suffice.
    task_manager = TaskManager(include_path=include_paths, include_defaults=False) if include_paths else None
    if task_manager is None or any(not task_manager.match_tasks([name]) for name in tasks):
        task_manager = TaskManager(include_path=include_paths or None)
    unknown = [name for name in tasks if not task_manager.match_tasks([name])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; add their YAML folder with include_path")
    return task_manager


def _harness_model(model: Any, tokenizer: Any, prompt_format: str, *, device: str, dtype: str,
                   batch_size: int | str) -> tuple[Any, str]:
    """The lm-eval model object for ``model`` and the name the report gives it."""
    from lm_eval.api.model import LM

    # The project's CoT format ends its answer after a special token, which the stock decoding hides.
    hflm = special_tokens_hflm() if prompt_format == "remask" else _stock_hflm()
    if isinstance(model, LM):  # any lm-eval model object, used as it is
        return model, type(model).__name__
    if isinstance(model, (str, Path)):
        return hflm(pretrained=str(model), device=device, dtype=dtype, batch_size=batch_size), str(model)
    lm = hflm(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    return lm, getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)


def _by_fewshot(settings: Mapping[str, TaskSetting], num_fewshot: int | None) -> dict[int | None, list[str]]:
    """Task names grouped by their few-shot count: one ``simple_evaluate`` call applies one count."""
    groups: dict[int | None, list[str]] = {}
    for name, setting in settings.items():
        groups.setdefault(num_fewshot if num_fewshot is not None else setting.num_fewshot, []).append(name)
    return groups


def _run_tasks(lm: Any, names: list[str], settings: Mapping[str, TaskSetting], shots: int | None,
               task_manager: Any, *, limit: int | float | None, log_samples: bool,
               max_gen_toks: int | None) -> dict[str, Any]:
    """One ``simple_evaluate`` call over ``names``; each task's headline metric and all its numbers."""
    import lm_eval

    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=task_manager,
        log_samples=log_samples, bootstrap_iters=1000,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None)
    if output is None:  # non-zero ranks under a distributed harness
        return {}
    entries = {}
    for name in names:
        task_results = output["results"].get(name, {})
        metric, value, stderr = _headline(task_results, settings[name].metric)
        entry = {
            "metric": metric, "value": value, "stderr": stderr,
            "num_fewshot": output.get("n-shot", {}).get(name, shots),
            "all": {k: v for k, v in task_results.items() if isinstance(v, (int, float, str))},
        }
        if log_samples:
            entry["samples"] = output.get("samples", {}).get(name, [])
        entries[name] = entry
    return entries


def _stock_hflm() -> type:
    from lm_eval.models.huggingface import HFLM

    return HFLM


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"model {report['model']}" + (f"  (limit {report['limit']}: not comparable)" if report.get("limit") else "")]
    for name, entry in report["tasks"].items():
        value = "n/a" if entry["value"] is None else f"{entry['value']:.4f}"
        stderr = "" if entry["stderr"] is None else f" ± {entry['stderr']:.4f}"
        lines.append(f"  {name:<16} {entry['num_fewshot']}-shot  {entry['metric']:<28} {value}{stderr}")
    return "\n".join(lines)


def _positive_limit(text: str) -> float:
    try:
        return finite_number(text, "--limit", low=0.0, low_open=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--limit: ")) from None


DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def _dtype_arg(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[text]


def _whole_number(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text) or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {low}")
        return int(text)

    return parse


def _batch_size_arg(text: str) -> int | str:
    if re.fullmatch(r"auto(:\d+)?", text):
        return text
    return _whole_number(1)(text)


def _device_arg(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _output_path(text: str) -> Path:
    """Checked before the evaluation runs: its results are never computed only to be lost."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give the JSON file's path")
    existing = blocking_ancestor(path.parent)
    if existing is not None:
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a writable folder")
    return path


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remask-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hugging Face model folder (e.g. the export of a run) or hub id")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-eval tasks (default: gsm8k,arc_challenge; "
                             f"{LOCAL_GSM8K_TASK} when --gsm8k-jsonl is given)")
    parser.add_argument("--include-path", action="append", default=[], help="folder of extra lm-eval task YAMLs")
    parser.add_argument("--gsm8k-jsonl", help=f"local test rows for the {LOCAL_GSM8K_TASK} task")
    parser.add_argument("--gsm8k-fewshot-jsonl", help="local rows to draw few-shot examples from")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="gsm8k")
    parser.add_argument("--num-fewshot", type=_whole_number(0), default=None,
                        help="override every task's few-shot count (0 included)")
    parser.add_argument("--limit", type=_positive_limit, default=None,
                        help="examples per task, or a fraction of each task below 1 (smoke test)")
    parser.add_argument("--device", type=_device_arg, default=None,
                        help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--batch-size", type=_batch_size_arg, default=8, help="an int or 'auto'")
    parser.add_argument("--dtype", type=_dtype_arg, default="auto",
                        help="auto, bfloat16 (bf16), float16 (fp16), float32 (fp32)")
    parser.add_argument("--max-gen-toks", type=_whole_number(1), default=None,
                        help="cap on generated tokens (default 256; below the model's context length)")
    parser.add_argument("--output", type=_output_path, help="write the results as JSON here (default: "
                                                            "MODEL/eval_results.json when MODEL is a folder)")
    args = parser.parse_args(argv)

    tasks = args.tasks.split(",") if args.tasks else (
        [LOCAL_GSM8K_TASK] if args.gsm8k_jsonl else list(CARD_TASKS))
    limit = None if args.limit is None else (int(args.limit) if float(args.limit).is_integer() else args.limit)
    output = args.output if args.output is not None else (
        Path(args.model) / "eval_results.json" if Path(args.model).is_dir() else None)
    try:
        report = evaluate(args.model, [t.strip() for t in tasks if t.strip()], include_path=args.include_path,
                          gsm8k_jsonl=args.gsm8k_jsonl, gsm8k_fewshot_jsonl=args.gsm8k_fewshot_jsonl,
                          prompt_format=args.prompt_format, num_fewshot=args.num_fewshot, limit=limit,
                          device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                          max_gen_toks=args.max_gen_toks)
    except (ValueError, FileNotFoundError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if output is not None:
        _write_json(output, report)
    print(format_report(report))
    if output is not None:
        print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
