"""Evaluate an exported model on the synthetic task with lm-evaluation-harness (local tasks, offline).

Three zero-shot tasks over the same held-out rows (``test.jsonl`` from ``generate.py``), one
``lm_eval.simple_evaluate`` call:

- ``quality_synth_gen`` (``generate_until``): greedy generation from the project's CoT prompt
  ``<|user|>\\n{prompt}\\n<|rationale|>\\n``, the model writes its own rationale and answer.
  ``exact_match,strict-match`` (the headline, GSM8K-style strict): the number right after the
  first ``<|answer|>\\n`` the model writes; ``exact_match,flexible-extract``: the last number in the
  generation (GSM8K's flexible filter). The harness decodes with ``skip_special_tokens=True``,
  which would hide ``<|answer|>``; ``composer_remask.evaluate.special_tokens_hflm`` keeps them.
- ``quality_synth_answer_ll`` (``loglikelihood``): the log-likelihood of ``\\n{target}`` after
  ``prompt + gold rationale + <|answer|>`` (teacher forcing): ``perplexity`` is exp(-mean
  log-likelihood), ``acc`` whether the gold answer is the greedy continuation.
- ``quality_synth_response_ll`` (``loglikelihood``): the log-likelihood of the whole gold response
  (rationale, ``<|answer|>`` and answer) after the prompt.

    python -m bench.quality_task.lm_eval_task HF_DIR --test runs/quality/synth/test.jsonl --out eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from composer_remask.evaluate import COT_STRICT_ANSWER, cot_prompt_template, special_tokens_hflm

__all__ = ["ANSWER_LL_TASK", "GEN_TASK", "RESPONSE_LL_TASK", "evaluate_export", "special_tokens_hflm",
           "write_tasks"]

GEN_TASK = "quality_synth_gen"
ANSWER_LL_TASK = "quality_synth_answer_ll"
RESPONSE_LL_TASK = "quality_synth_response_ll"
TASKS = (GEN_TASK, ANSWER_LL_TASK, RESPONSE_LL_TASK)

# The project's CoT template (composer_remask.data.formats):
#   <|user|>\n{prompt}\n<|rationale|>\n{rationale}\n<|answer|>\n{answer}<eos>
PROMPT = cot_prompt_template("prompt")
STRICT_ANSWER = COT_STRICT_ANSWER
LAST_NUMBER = r"(-?[0-9]+)"
_EXACT_MATCH = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                "ignore_case": True, "ignore_punctuation": False}


def write_tasks(test_jsonl: str | Path, out_dir: str | Path, max_gen_toks: int = 64) -> Path:
    """Write the three task YAMLs for ``TaskManager(include_path=out_dir)``; return ``out_dir``."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"data_files": {"test": str(Path(test_jsonl).resolve())}}
    common = {"dataset_path": "json", "dataset_kwargs": data, "test_split": "test", "num_fewshot": 0,
              "metadata": {"version": 1.0}}
    tasks = {
        GEN_TASK: {
            "output_type": "generate_until",
            "doc_to_text": PROMPT,
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["<|user|>"], "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": max_gen_toks},
            "metric_list": [_EXACT_MATCH],
            "filter_list": [
                {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": STRICT_ANSWER},
                                                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [
                    {"function": "regex", "regex_pattern": LAST_NUMBER, "group_select": -1},
                    {"function": "take_first"}]},
            ],
        },
        ANSWER_LL_TASK: {
            "output_type": "loglikelihood",
            # The trailing "\n" moves into the continuation (lm-eval's _encode_pair), so the tokens
            # scored are exactly the answer's tokens in training: "\n{target}".
            "doc_to_text": PROMPT + "{{rationale}}\n<|answer|>\n",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        },
        RESPONSE_LL_TASK: {
            "output_type": "loglikelihood",
            "doc_to_text": PROMPT,
            "doc_to_target": "{{rationale}}\n<|answer|>\n{{target}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity"}],
        },
    }
    for name, body in tasks.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **body}, sort_keys=False),
                                          encoding="utf-8")
    return out


def evaluate_export(hf_dir: str | Path, test_jsonl: str | Path, *, device: str = "cpu", limit: int | None = None,
                    batch_size: int = 64, samples_path: str | Path | None = None) -> dict[str, Any]:
    """Run the three tasks on an exported model; return the headline numbers (and lm-eval's own).

    Keys: ``accuracy`` (strict match), ``accuracy_flexible``, ``answer_nll`` (mean negative
    log-likelihood of the answer given prompt and gold rationale, nats per problem),
    ``answer_teacher_forced_acc``, ``response_nll`` (nats per problem), ``n`` (problems), ``lm_eval``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # logits_cache=False: lm-eval reuses one forward pass for requests whose context + continuation
    # are the same tokens, and the two log-likelihood tasks here ask exactly that (prompt + gold
    # response, split at two places); with the cache on, lm-eval 0.4.13 scores one of them with the
    # other's continuation slice (wrong numbers, seen as answer NLL 27 nats with greedy acc 1.0).
    lm = special_tokens_hflm()(pretrained=str(hf_dir), device=device, batch_size=batch_size, dtype="float32",
                               logits_cache=False)
    with tempfile.TemporaryDirectory(prefix="quality-tasks-") as task_dir:
        write_tasks(test_jsonl, task_dir)
        output = simple_evaluate(model=lm, tasks=list(TASKS), num_fewshot=0, limit=limit,
                                 task_manager=TaskManager(include_path=task_dir),
                                 log_samples=samples_path is not None, bootstrap_iters=0)
    results = output["results"]
    gen, answer, response = results[GEN_TASK], results[ANSWER_LL_TASK], results[RESPONSE_LL_TASK]
    report = {
        "accuracy": float(gen["exact_match,strict-match"]),
        "accuracy_flexible": float(gen["exact_match,flexible-extract"]),
        "answer_nll": math.log(float(answer["perplexity,none"])),
        "answer_teacher_forced_acc": float(answer["acc,none"]),
        "response_nll": math.log(float(response["perplexity,none"])),
        "n": int(output.get("n-samples", {}).get(GEN_TASK, {}).get("effective", 0)),
        "lm_eval": {name: {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
                    for name, res in results.items()},
    }
    if samples_path is not None:
        with Path(samples_path).open("w", encoding="utf-8") as handle:
            for sample in output["samples"][GEN_TASK]:
                handle.write(json.dumps({"prompt": sample["doc"]["prompt"], "target": sample["target"],
                                         "generation": sample["resps"][0][0],
                                         "strict": sample["filtered_resps"][0] if sample["filtered_resps"]
                                         else None, "exact_match": sample.get("exact_match")},
                                        default=str) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_task.lm_eval_task",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("--test", required=True, help="held-out rows (test.jsonl)")
    parser.add_argument("--out", required=True, help="write the report here (JSON)")
    parser.add_argument("--samples", help="write the generations here (JSONL)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    report = evaluate_export(args.hf_dir, args.test, device=args.device, limit=args.limit,
                             batch_size=args.batch_size, samples_path=args.samples)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "lm_eval"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
