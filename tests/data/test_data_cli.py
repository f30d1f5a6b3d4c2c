"""`remask-data build` / `inspect` end to end, and the fixture generator with its committed tokenizer."""

from __future__ import annotations

import json

import pytest

from composer_remask.batch import REMASK_SPECIAL_TOKENS
from composer_remask.data.cli import main
from composer_remask.data.sources import SourceSpec
from composer_remask.data.writer import build_corpus
from composer_remask.tools.fixtures import (
    TINY_TOKENIZER_VOCAB_SIZE,
    build_tiny_tokenizer,
    write_source_fixtures,
)
from composer_remask.tools.fixtures import main as fixtures_main
from tests.helpers.assets import TINY_TOKENIZER


def test_build_then_inspect_shows_each_span_with_its_role(fixture_files, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["build", "--source", f"tinycot={fixture_files['tinycot']}",
                   "--source", f"chat=oasst2:{fixture_files['oasst2']}", "--tokenizer", str(TINY_TOKENIZER),
                   "--max-seq-len", "256", "--out", str(out), "--limit", "chat=5", "--mix", "chat=repeat:2",
                   "--no-progress"])
    assert status == 0
    summary = capsys.readouterr().out
    assert summary.splitlines()[0].split() == ["source", "read", "written", "skipped", "truncated", "tokens"]
    assert summary.splitlines()[2].split()[:4] == ["chat", "24", "5", "19"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["mix"] == {"chat": {"repeat": 2.0}}

    assert main(["inspect", str(out), "--n", "1", "--source", "tinycot"]) == 0
    report = capsys.readouterr().out
    first = json.loads(fixture_files["tinycot"].read_text().splitlines()[0])
    expected_block = "\n".join([
        "context   | <|user|>\\n",
        f"          | {first['prompt']}\\n",
        "          | <|rationale|>\\n",
        f"rationale | {first['rationale']}\\n",
        "answer    | <|answer|>\\n",
        f"          | {first['target']}<|endoftext|>",
    ])
    assert expected_block in report
    assert "tinycot: 24 of 24 rows written (skipped: none; truncated 0)" in report
    assert "--- tinycot #0:" in report and "chat #0" not in report and "WARNING" not in report


def test_inspect_warns_when_the_tokenizer_is_not_the_one_used(fixture_files, tmp_path, tiny_tokenizer, capsys):
    out = tmp_path / "out"
    build_corpus([SourceSpec("reddit", "reddit", str(fixture_files["reddit"]))], str(TINY_TOKENIZER), str(out),
                 progress=False)
    other = tmp_path / "other-tokenizer"
    tiny_tokenizer.save_pretrained(str(other))
    assert main(["inspect", str(out), "--n", "1", "--tokenizer", str(other)]) == 0
    assert "WARNING: this tokenizer's vocabulary differs" in capsys.readouterr().out


def test_build_errors_name_file_line_and_field_and_exit_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "rationale": "b", "target": "1"}\n{"prompt": "a", "rationale": "b", "target": 7}\n')
    args = ["build", "--source", f"tinycot={bad}", "--tokenizer", str(TINY_TOKENIZER), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"remask-data: error: {bad}, line 2, field 'target': expected a string, got int")
    assert not (tmp_path / "o").exists()
    assert main([*args, "--on-error", "skip"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["sources"]["tinycot"]["rows_skipped"] == {"wrong_type": 1}
    assert main([*args, "--on-error", "skip"]) == 2  # the folder now exists
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-1], "--mix", "tinycot=weight:3", "--overwrite"])
    assert exit_info.value.code == 2
    assert "stream weight 'weight:3'" in capsys.readouterr().err


def test_fixture_files_are_deterministic_and_build_cleanly(tmp_path):
    a = write_source_fixtures(tmp_path / "a", rows=300, seed=0)
    b = write_source_fixtures(tmp_path / "b", rows=300, seed=0)
    c = write_source_fixtures(tmp_path / "c", rows=300, seed=1)
    for key in a:
        if key != "oasst2_parquet":  # parquet metadata names the writer version; rows compared below
            assert a[key].read_bytes() == b[key].read_bytes()
            assert a[key].read_bytes() != c[key].read_bytes()
    tinycot = [json.loads(line) for line in a["tinycot"].read_text().splitlines()]
    assert {row["source"] for row in tinycot} == {"gsm8k", "math", "strategyqa"}
    chats = [json.loads(line)["messages"] for line in a["oasst2"].read_text().splitlines()]
    assert any(turns[0]["role"] == "system" for turns in chats) and any(len(turns) >= 4 for turns in chats)
    manifest = build_corpus([SourceSpec("tinycot", "tinycot", str(a["tinycot"])),
                             SourceSpec("oasst2", "oasst2", str(a["oasst2_parquet"])),
                             SourceSpec("reddit", "reddit", str(a["reddit"])),
                             SourceSpec("generic", "jsonl", str(a["generic"]))],
                            str(TINY_TOKENIZER), str(tmp_path / "out"), max_seq_len=256, progress=False)
    for stats in manifest["sources"].values():
        assert stats["rows_read"] == stats["rows_written"] == 300 and stats["rows_truncated"] == 0


def test_fixtures_command_writes_files(tmp_path, capsys):
    assert fixtures_main([str(tmp_path / "fx"), "--rows", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "fx").iterdir()) == [
        "generic.jsonl", "oasst2.jsonl", "oasst2.parquet", "reddit.jsonl", "tinycot.jsonl"]
    assert len((tmp_path / "fx" / "reddit.jsonl").read_text().splitlines()) == 3
    for bad in ([], [str(tmp_path / "fx"), "--rows", "-1"], [str(tmp_path / "fx" / "reddit.jsonl" / "sub")]):
        with pytest.raises(SystemExit) as exit_info:
            fixtures_main(bad)
        assert exit_info.value.code == 2
        assert ": error:" in capsys.readouterr().err


def test_committed_tiny_tokenizer_is_small_reproducible_and_good_at_numbers(asset_tokenizer, tmp_path):
    assert sum(p.stat().st_size for p in TINY_TOKENIZER.iterdir()) < 1_000_000
    assert len(asset_tokenizer) == TINY_TOKENIZER_VOCAB_SIZE + len(REMASK_SPECIAL_TOKENS)
    assert asset_tokenizer.pad_token_id == asset_tokenizer.eos_token_id is not None
    rebuilt = tmp_path / "rebuilt"
    build_tiny_tokenizer().save_pretrained(str(rebuilt))
    assert (rebuilt / "tokenizer.json").read_bytes() == (TINY_TOKENIZER / "tokenizer.json").read_bytes()

    def encode(text: str) -> list[int]:
        return asset_tokenizer.encode(text, add_special_tokens=False)

    for digit in "0123456789":
        assert len(encode(digit)) == 1
    for number in range(1000):
        assert asset_tokenizer.decode(encode(str(number))) == str(number)
        assert len(encode(str(number))) <= 2
    equation = "48 + 24 = 72. 12 * 7 = 84. 96 / 8 = 12. 100 - 37 = 63."
    assert asset_tokenizer.decode(encode(equation)) == equation
    assert len(encode(equation)) <= 24
