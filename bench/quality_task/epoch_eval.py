"""Held-out generative exact match and exposure-bias measures, after every epoch of a training run.

A Composer callback (``callbacks: {quality_epoch_eval: {...}}`` with this file in the recipe's
``code_paths``) that evaluates the model being trained at the start of training and at the end of
every epoch, on the validation and the test rows, and appends one JSON line per evaluation to
``out``. The multi-epoch regime of bench/quality.py needs the whole curve (SFT's held-out accuracy
should peak and fall) and chooses epochs and settings on the validation rows only.

Per split and evaluation:

- ``accuracy``: greedy generation from ``<|user|>\\n{prompt}\\n<|rationale|>\\n`` (the project's CoT
  template, as in lm_eval_task.py), the number right after the first ``<|answer|>\\n`` equals the
  target (GSM8K-style strict match); ``accuracy_flexible``: the last number of the generation;
- ``accuracy_by_length`` / ``accuracy_flexible_by_length``: the same by chain length (operations
  in the problem);
- ``correct`` / ``correct_flexible``: per row, 1 or 0 (the paired analysis compares methods row by
  row over the same problems);
- ``step_acc_teacher_forced``: the share of rationale steps whose result the model predicts
  (greedy, every token) given the prompt and the *gold* rationale before it;
  ``predicted_by_length``: ``step_acc_teacher_forced ** L``, the accuracy at chain length L if
  steps failed independently with the teacher-forced rate. Free-running accuracy below that
  prediction, growing with L, is exposure bias: the model conditioned on its own earlier steps does
  worse than on gold ones.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from composer_remask.data.formats import format_cot_prompt
from composer_remask.evaluate import COT_STRICT_ANSWER

ANSWER = "\n<|answer|>\n"
STRICT = re.compile(COT_STRICT_ANSWER)
NUMBER = re.compile(r"-?[0-9]+")
RESULT = re.compile(r"= (-?[0-9]+)\.")
ANSWER_WRITTEN = re.compile(r"\n-?[0-9]+[^0-9]")  # after the tag: a whole number, then anything else

__all__ = ["EpochEval", "evaluate_rows", "load_rows"]


def load_rows(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


class StopAfterAnswer:
    """Ends a row's generation once it has written ``<|answer|>`` and a whole number after it.

    Greedy generation of a batch runs until every row is done, and a model early in fine-tuning
    rarely writes EOS: without this every batch ran to ``max_new_tokens``. What is cut off comes
    after the strict answer, so strict accuracy is unchanged; the flexible score (the last number
    written) then reads the answer too.
    """

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER.strip())
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i, row in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if self.answer_id in row:
                tail = self.tokenizer.decode(row[row.index(self.answer_id) + 1:], skip_special_tokens=False)
                done[i] = ANSWER_WRITTEN.match(tail) is not None
        return done.to(input_ids.device)


def _generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              device: torch.device) -> list[str]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            stop = StoppingCriteriaList([StopAfterAnswer(tokenizer, batch["input_ids"].shape[1])])
            output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                    stopping_criteria=stop)
            for row in output[:, batch["input_ids"].shape[1]:]:
                ids = [int(i) for i in row if int(i) != pad_id and int(i) != tokenizer.eos_token_id]
                texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    finally:
        tokenizer.padding_side = side
    return texts


def _teacher_forced_steps(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, str]], batch_size: int,
                          device: torch.device) -> list[list[bool]]:
    """Per row, per rationale step: is every token of the step's result the greedy next token?"""
    results: list[list[bool]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            texts = [format_cot_prompt(r["prompt"]) + r["rationale"] + ANSWER + r["target"] for r in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                              return_offsets_mapping=True)
            offsets = batch.pop("offset_mapping")
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            greedy = logits.argmax(-1).cpu()
            for i, row in enumerate(chunk):
                base = len(format_cot_prompt(row["prompt"]))
                steps = []
                for match in RESULT.finditer(row["rationale"]):
                    lo, hi = base + match.start(1), base + match.end(1)
                    positions = [t for t, (a, b) in enumerate(offsets[i].tolist())
                                 if b > a and a < hi and b > lo and batch["attention_mask"][i, t]]
                    steps.append(bool(positions) and all(
                        t > 0 and int(greedy[i, t - 1]) == int(batch["input_ids"][i, t]) for t in positions))
                results.append(steps)
    finally:
        tokenizer.padding_side = side
    return results


def evaluate_rows(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, str]], *, max_new_tokens: int = 80,
                  batch_size: int = 64, device: str | torch.device | None = None) -> dict[str, Any]:
    """The headline numbers of one split (see the module docstring); ``model`` is a HF causal LM."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            generations = _generate(model, tokenizer, [format_cot_prompt(r["prompt"]) for r in rows],
                                    max_new_tokens, batch_size, device)
        forced = _teacher_forced_steps(model, tokenizer, rows, batch_size, device)
    finally:
        model.train(was_training)
    by_length: dict[int, list[bool]] = defaultdict(list)
    flexible_by_length: dict[int, list[bool]] = defaultdict(list)
    strict, flexible = [], []
    for row, text in zip(rows, generations):
        match = STRICT.search(text)
        numbers = NUMBER.findall(text)
        ok = match is not None and match.group(1) == row["target"]
        strict.append(ok)
        flexible.append(bool(numbers) and numbers[-1] == row["target"])
        by_length[row["rationale"].count("=")].append(ok)
        flexible_by_length[row["rationale"].count("=")].append(flexible[-1])
    step_flags = [flag for steps in forced for flag in steps]
    step_acc = sum(step_flags) / max(1, len(step_flags))
    return {
        "n": len(rows),
        "accuracy": sum(strict) / max(1, len(strict)),
        "accuracy_flexible": sum(flexible) / max(1, len(flexible)),
        "accuracy_by_length": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())},
        "accuracy_flexible_by_length": {str(k): sum(v) / len(v) for k, v in sorted(flexible_by_length.items())},
        "count_by_length": {str(k): len(v) for k, v in sorted(by_length.items())},
        "correct": [int(ok) for ok in strict],
        "correct_flexible": [int(ok) for ok in flexible],
        "step_acc_teacher_forced": step_acc,
        "predicted_by_length": {str(k): step_acc ** k for k in sorted(by_length)},
        "examples": [{"prompt": r["prompt"], "target": r["target"], "generation": g}
                     for r, g in list(zip(rows, generations))[:3]],
    }


try:  # the callback needs Composer (present wherever train.py runs)
    from composer.core import Callback, State
    from composer.loggers import Logger

    from composer_remask.train import registry

    TEST_AT = ("every_epoch", "val_best_and_last", "never")

    class EpochEval(Callback):
        """Evaluate at fit start and after every epoch; one JSON line per evaluation in ``out``.

        ``test_at="every_epoch"`` evaluates every split each time. ``"val_best_and_last"`` evaluates
        only the ``val`` split each time, keeps a copy of the weights whenever validation ``metric``
        improves (the earliest epoch on ties, as the sweep chooses), and evaluates the ``test`` split
        at fit end on those weights and on the last ones: the two test numbers the analysis uses,
        at a fraction of the cost of a large test split every epoch. ``"never"`` evaluates ``val``
        only (a learning-rate pilot).
        """

        def __init__(self, splits: Mapping[str, str], out: str, limit: int | None = None,
                     max_new_tokens: int = 80, batch_size: int = 64, test_at: str = "every_epoch",
                     metric: str = "accuracy") -> None:
            if test_at not in TEST_AT:
                raise ValueError(f"quality_epoch_eval: test_at must be one of {TEST_AT}, got {test_at!r}")
            self.splits = {name: load_rows(path, limit) for name, path in dict(splits).items()}
            if test_at != "every_epoch" and set(self.splits) != {"val", "test"}:
                raise ValueError(f"quality_epoch_eval: test_at={test_at!r} needs exactly the splits val and test")
            self.out = Path(out)
            self.max_new_tokens = max_new_tokens
            self.batch_size = batch_size
            self.test_at = test_at
            self.metric = metric
            self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (val metric, epoch, weights)

        def _evaluate(self, state: State, logger: Logger, names: Sequence[str]) -> dict[str, Any]:
            model = state.model.model
            tokenizer = state.model.tokenizer
            record: dict[str, Any] = {"epoch": int(state.timestamp.epoch), "batch": int(state.timestamp.batch)}
            for name in names:
                start = time.monotonic()
                record[name] = evaluate_rows(model, tokenizer, self.splits[name], max_new_tokens=self.max_new_tokens,
                                             batch_size=self.batch_size)
                record[name]["seconds"] = round(time.monotonic() - start, 1)
                logger.log_metrics({f"quality/{name}/accuracy": record[name]["accuracy"]})
            return record

        def _write(self, record: Mapping[str, Any]) -> None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        def _evaluate_and_write(self, state: State, logger: Logger) -> None:
            if self.test_at == "every_epoch":
                self._write(self._evaluate(state, logger, list(self.splits)))
                return
            record = self._evaluate(state, logger, ["val"])
            self._write(record)
            score = record["val"][self.metric]
            if self.test_at == "never":
                return
            if record["epoch"] > 0 and (self._best is None or score > self._best[0]):
                weights = {k: v.detach().to("cpu", copy=True) for k, v in state.model.model.state_dict().items()}
                self._best = (score, record["epoch"], weights)

        def fit_start(self, state: State, logger: Logger) -> None:
            if int(state.timestamp.batch) == 0:
                self.out.unlink(missing_ok=True)
                self._evaluate_and_write(state, logger)

        def epoch_end(self, state: State, logger: Logger) -> None:
            self._evaluate_and_write(state, logger)

        def fit_end(self, state: State, logger: Logger) -> None:
            if self.test_at in ("every_epoch", "never"):
                return
            last = self._evaluate(state, logger, ["test"])
            self._write(last)
            if self._best is not None and self._best[1] != last["epoch"]:
                model = state.model.model
                final = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(self._best[2])
                try:
                    record = self._evaluate(state, logger, ["test"])
                finally:
                    model.load_state_dict(final)
                record["epoch"] = self._best[1]
                self._write(record)
            self._best = None

    if "quality_epoch_eval" not in registry.callbacks:
        registry.callbacks.register("quality_epoch_eval", EpochEval)
except ImportError:  # pragma: no cover - evaluation helpers stay usable without Composer
    pass
