"""The lm-eval wrapper: card settings in separate calls, the local GSM8K task, its scoring."""

from __future__ import annotations

import json
import re

import pytest
from lm_eval.api.model import LM

from composer_remask.data.formats import format_cot_prompt
from composer_remask.evaluate import CARD_TASKS, evaluate, main, write_local_gsm8k_task

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = 7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = 30.\n#### 30"},
]
COT_ROWS = [
    {"prompt": "What is 12 * 3 + 1?", "rationale": "12 * 3 = 36. 36 + 1 = 37.", "target": "37", "source": "math"},
    {"prompt": "Is 7 an even number?", "rationale": "7 is odd.", "target": "no", "source": "strategyqa"},
    {"prompt": "Mei earns $9 per hour for 4 hours. How much?", "rationale": "9 * 4 = 36.", "target": "36"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class ScriptedLM(LM):
    """Answers each generation request from ``answers`` (keyed by a substring of the prompt)."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers
        self.prompts: list[str] = []

    def generate_until(self, requests):
        replies = []
        for request in requests:
            prompt = request.args[0]
            self.prompts.append(prompt)
            last = prompt.rsplit("Question:", 1)[-1]
            replies.append(next((reply for key, reply in self.answers.items() if key in last), "no idea"))
        return replies

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_local_task_reads_both_shapes_and_skips_non_numeric_answers(tmp_path):
    write_jsonl(tmp_path / "cot.jsonl", COT_ROWS)
    setting = write_local_gsm8k_task(tmp_path / "cot.jsonl", tmp_path / "task")
    rows = [json.loads(line) for line in (tmp_path / "task" / "gsm8k_local_test.jsonl").read_text().splitlines()]
    assert [row["target"] for row in rows] == ["37", "36"]
    assert rows[0]["answer"] == "12 * 3 = 36. 36 + 1 = 37.\n#### 37"
    assert setting.num_fewshot == 0 and setting.metric == "exact_match,strict-match"
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no final answer"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'answer' has no '#### <number>'"):
        write_local_gsm8k_task(tmp_path / "bad.jsonl", tmp_path / "task2")


def test_gsm8k_format_is_five_shot_and_scores_strict_match(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    fewshot = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS * 3)
    lm = ScriptedLM({"Tom has 3 apples": " 3 + 4 = 7.\n#### 7", "A box holds 6 eggs": " The answer is 30."})
    report = evaluate(lm, ["gsm8k_local"], gsm8k_jsonl=test, gsm8k_fewshot_jsonl=fewshot)
    entry = report["tasks"]["gsm8k_local"]
    assert entry["num_fewshot"] == 5
    assert entry["metric"] == "exact_match,strict-match"
    assert entry["value"] == pytest.approx(0.5)  # "30" without "#### " is not a strict match
    assert entry["all"]["exact_match,flexible-extract"] == pytest.approx(1.0)
    assert all(prompt.count("Question:") == 6 and prompt.endswith("\nAnswer:") for prompt in lm.prompts)


def test_remask_format_uses_the_training_prompt_and_scores_the_tagged_answer(tmp_path):
    test = write_jsonl(tmp_path / "cot.jsonl", COT_ROWS)
    lm = ScriptedLM({"12 * 3 + 1": "12 * 3 = 36, 36 + 1 = 37\n<|answer|>\n37", "$9 per hour": "9 * 4 = 36\n\n36"})
    report = evaluate(lm, ["gsm8k_local"], gsm8k_jsonl=test, prompt_format="remask")
    entry = report["tasks"]["gsm8k_local"]
    assert (entry["metric"], entry["num_fewshot"]) == ("exact_match,strict-match", 0)
    assert entry["value"] == pytest.approx(0.5)  # "36" without "<|answer|>" is not a strict match
    assert entry["all"]["exact_match,last-number"] == pytest.approx(1.0)
    assert sorted(lm.prompts) == sorted(format_cot_prompt(row["prompt"]) for row in COT_ROWS if row["target"] != "no")


def test_card_tasks_run_in_separate_calls_with_their_shots(monkeypatch):
    import lm_eval

    calls = []

    def fake_simple_evaluate(model, tasks, num_fewshot, **kwargs):
        calls.append((tuple(tasks), num_fewshot))
        results = {"gsm8k": {"exact_match,strict-match": 0.279, "exact_match_stderr,strict-match": 0.012,
                             "exact_match,flexible-extract": 0.3},
                   "arc_challenge": {"acc,none": 0.40, "acc_norm,none": 0.4326, "acc_norm_stderr,none": 0.014}}
        return {"results": {t: results[t] for t in tasks}, "n-shot": {t: num_fewshot for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    report = evaluate(ScriptedLM({}), ["gsm8k", "arc_challenge"])
    assert sorted(calls) == [(("arc_challenge",), 25), (("gsm8k",), 5)]
    assert report["tasks"]["gsm8k"]["metric"] == CARD_TASKS["gsm8k"].metric
    assert report["tasks"]["gsm8k"]["value"] == pytest.approx(0.279)
    assert report["tasks"]["arc_challenge"]["value"] == pytest.approx(0.4326)
    assert report["tasks"]["arc_challenge"]["stderr"] == pytest.approx(0.014)


def test_unknown_task_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['gsm9k'\]"):
        evaluate(ScriptedLM({}), ["gsm9k"])
    assert main([str(tmp_path), "--tasks", "gsm8k_local"]) == 2
    assert re.search(r"^remask-eval: error: .*needs a local JSONL", capsys.readouterr().err)


def test_cli_on_an_exported_tiny_model(tiny_model_factory, tiny_tokenizer, tmp_path):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    test = write_jsonl(tmp_path / "cot.jsonl", COT_ROWS)
    assert main([str(tmp_path / "model"), "--gsm8k-jsonl", str(test), "--prompt-format", "remask",
                 "--device", "cpu", "--limit", "2", "--batch-size", "2", "--max-gen-toks", "16"]) == 0
    report = json.loads((tmp_path / "model" / "eval_results.json").read_text())
    assert report["tasks"]["gsm8k_local"]["value"] is not None and report["limit"] == 2
