"""remask-export and remask-eval say what they read and write, and check their options and output
paths before the work: a wrong option never costs an evaluation, nor leaves half an output."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from composer import Trainer
from torch.utils.data import DataLoader

from composer_remask.evaluate import _dtype_arg
from composer_remask.evaluate import main as eval_main
from composer_remask.export import main as export_main
from tests.helpers.synthetic import CoTDataset, collate
from tests.helpers.training import build_model


@pytest.fixture(scope="module")
def save_folder(tmp_path_factory, tiny_tokenizer_module):
    """A run's save_folder with checkpoints at batches 1, 2 and 10 (names as Composer writes them)."""
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    model = build_model(tiny_tokenizer_module)
    loader = DataLoader(CoTDataset(tiny_tokenizer_module, 8), batch_size=4, collate_fn=collate)
    Trainer(model=model, train_dataloader=loader, max_duration="2ba", save_folder=str(folder), save_interval="1ba",
            device="cpu", progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=0.1)).fit()
    (folder / "ep0-ba2-rank0.pt").rename(folder / "ep1-ba10-rank0.pt")   # the latest by batch count
    (folder / "latest-rank0.pt").unlink()                                 # lost when copied from a bucket
    os.utime(folder / "ep0-ba1-rank0.pt")                                 # ... and the oldest is the newest file
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    from composer_remask.data.tokenizer import train_tiny_tokenizer
    from tests.helpers.tiny_model import TINY_TEXT

    return train_tiny_tokenizer(TINY_TEXT, vocab_size=400)


def test_export_without_the_latest_link_takes_the_highest_batch_and_says_so(save_folder, tmp_path, capsys):
    assert export_main([str(save_folder), "--out", str(tmp_path / "hf")]) == 0
    assert f"checkpoint {save_folder / 'ep1-ba10-rank0.pt'}" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_export_refuses_when_the_batch_counts_do_not_decide(save_folder, tmp_path, capsys):
    ambiguous = tmp_path / "ckpts"
    ambiguous.mkdir()
    for name in ("ep1-ba10-rank0.pt", "final.pt"):
        (ambiguous / name).symlink_to(save_folder / "ep1-ba10-rank0.pt")
    assert export_main([str(ambiguous), "--out", str(tmp_path / "hf")]) == 2
    assert "batch counts do not say which is the latest (ep1-ba10-rank0.pt, final.pt); name the file" in \
        capsys.readouterr().err


def test_export_targets_are_checked_before_the_checkpoint_is_read(tmp_path, capsys):
    garbage = tmp_path / "ep0-ba1-rank0.pt"
    garbage.write_bytes(b"not a checkpoint")  # reading it would be a different error
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert export_main([str(garbage), "--out", str(a_file)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert export_main([str(garbage), "--out", str(other)]) == 2
    assert "holds something other than an earlier export" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep"


def test_export_over_an_earlier_export_replaces_it_whole(save_folder, tmp_path):
    out = tmp_path / "hf"
    assert export_main([str(save_folder / "ep0-ba1-rank0.pt"), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert export_main([str(save_folder), "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]   # no partial or old folder left


@pytest.mark.parametrize("option, value, message", [
    ("--dtype", "float64", "'float64': choose one of"),
    ("--num-fewshot", "-1", "'-1': expected a whole number >= 0"),
    ("--max-gen-toks", "0", "'0': expected a whole number >= 1"),   # was ignored as falsy
    ("--batch-size", "many", "'many': expected a whole number >= 1"),
    ("--device", "gpu0", "'gpu0': not a device"),
])
def test_eval_options_are_checked_before_the_evaluation(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        eval_main([str(tmp_path), option, value])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_eval_dtype_names_include_the_short_ones():
    assert [_dtype_arg(name) for name in ("fp32", "bf16", "fp16", "float32", "auto")] == \
        ["float32", "bfloat16", "float16", "float32", "auto"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_eval_on_cuda_without_a_gpu_is_refused_up_front(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        eval_main([str(tmp_path), "--device", "cuda"])
    assert stopped.value.code == 2 and "this machine has no CUDA device; use --device cpu" in capsys.readouterr().err


def test_eval_output_is_checked_first_and_its_folder_created(tiny_model_factory, tiny_tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        eval_main([str(tmp_path), "--output", str(tmp_path)])   # a folder, not a file
    assert stopped.value.code == 2 and "is a folder; give the JSON file's path" in capsys.readouterr().err
    model_dir = tmp_path / "model"
    tiny_model_factory().save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    rows = tmp_path / "cot.jsonl"
    rows.write_text(json.dumps({"prompt": "Start with 2. Add 3.", "rationale": "2 + 3 = 5.", "target": "5"}) + "\n")
    output = tmp_path / "missing" / "folder" / "results.json"
    assert eval_main([str(model_dir), "--gsm8k-jsonl", str(rows), "--prompt-format", "remask", "--device", "cpu",
                      "--limit", "1", "--max-gen-toks", "4", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["tasks"] and re.search(f"results: {re.escape(str(output))}",
                                                                 capsys.readouterr().out)
