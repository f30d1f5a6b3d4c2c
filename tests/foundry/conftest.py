"""Fixtures of the llm-foundry tests: its environment (``.venv-foundry``) and the tiny local files its runs train on.

Without the environment the tests skip, except under CI (``CI=true``), where it is a failure
(paths and the subprocess environment: ``tests/helpers/foundry_venv.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory
from tests.helpers.foundry_venv import FOUNDRY_PYTHON, FOUNDRY_VENV, OWN_SPECIAL_TOKEN, REPO, in_ci


@pytest.fixture(scope="session")
def foundry_python() -> Path:
    """``.venv-foundry/bin/python`` with llm-foundry and this package installed."""
    problem = None
    if not FOUNDRY_PYTHON.exists():
        problem = f"{FOUNDRY_VENV} does not exist"
    else:
        check = subprocess.run(
            [str(FOUNDRY_PYTHON), "-c", "import importlib.metadata as m, composer_remask; "
             "print(m.version('llm-foundry'), m.version('composer-remask')); print(composer_remask.__file__)"],
            capture_output=True, text=True, cwd="/")
        if check.returncode != 0:
            problem = f"{FOUNDRY_VENV} lacks llm-foundry or composer-remask: {check.stderr.strip()[-300:]}"
        elif not Path(check.stdout.splitlines()[-1]).resolve().is_relative_to(REPO):
            problem = f"{FOUNDRY_VENV} has composer-remask from elsewhere, not this checkout (pip install -e .)"
    if problem is not None:
        message = f"{problem}; `bash scripts/test.sh` creates it (llm-foundry==0.22.0 + this package)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return FOUNDRY_PYTHON


@pytest.fixture(scope="session")
def foundry_assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer without ReMask's tokens (but with a special token of its own), a tiny Llama whose
    vocabulary fits only that tokenizer, a prompt/response JSONL and an MDS corpus of the same rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from composer_remask.data.sources import parse_source_arg
    from composer_remask.data.tokenizer import train_tiny_tokenizer
    from composer_remask.data.writer import build_corpus
    from composer_remask.foundry import load_remask_tokenizer
    from composer_remask.tools.fixtures import tinycot_rows, tokenizer_training_text, write_jsonl

    clean_unused_streaming_shared_memory()
    root = tmp_path_factory.mktemp("foundry")
    base_tokenizer = train_tiny_tokenizer(tokenizer_training_text(rows=40), vocab_size=512,
                                          with_remask_tokens=False)
    base_tokenizer.add_special_tokens({"additional_special_tokens": [OWN_SPECIAL_TOKEN]})
    tokenizer_dir = root / "tokenizer"
    base_tokenizer.save_pretrained(str(tokenizer_dir))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(base_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=base_tokenizer.bos_token_id, eos_token_id=base_tokenizer.eos_token_id, use_cache=False)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    base_tokenizer.save_pretrained(str(model_dir))

    # 64 distinct chain-of-thought rows: as prompt/response for llm-foundry's loader, as our corpus.
    rows = list({row["prompt"]: row for row in tinycot_rows(80, seed=3)}.values())[:64]
    assert len(rows) == 64
    raw = write_jsonl(root / "raw" / "tinycot.jsonl", rows)
    sft = root / "sft" / "train.jsonl"
    sft.parent.mkdir()
    with open(sft, "w") as f:
        for row in rows:
            response = f" {row['rationale']} The answer is {row['target']}."
            f.write(json.dumps({"prompt": row["prompt"], "response": response}) + "\n")
    corpus = root / "corpus"
    build_corpus([parse_source_arg(f"tinycot={raw}")], load_remask_tokenizer(str(tokenizer_dir)), str(corpus),
                 max_seq_len=128, progress=False)
    return {"root": root, "tokenizer": tokenizer_dir, "model": model_dir, "sft_jsonl": sft, "corpus": corpus}
