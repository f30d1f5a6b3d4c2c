"""Mistakes in a recipe fail before the data or the model are built, naming the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from composer_remask.train import load_config
from composer_remask.train import run as run_module
from composer_remask.train.config import ConfigError
from composer_remask.train.preflight import validate_recipe
from tests.helpers.recipes import TINY_RECIPE, tiny_overrides


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if training gets as far as building the data or the model."""

    def reached(*args, **kwargs):
        raise AssertionError("the data or the model was built before the recipe was rejected")

    monkeypatch.setattr(run_module, "build_loaders", reached)
    monkeypatch.setattr(run_module, "build_model", reached)


def rejected(capsys, recipe, overrides) -> str:
    assert run_module.main([str(recipe), *overrides]) == 2
    return capsys.readouterr().err


BAD_VALUES = [
    # (override, what the message must name)
    ("algorithms.remask.mask_prob=1.5", "algorithms.remask.mask_prob"),
    ("algorithms.remask.weight=-1", "algorithms.remask.weight"),
    ("algorithms.remask.divergence=kl_forward", "algorithms.remask.divergence"),
    ("optimizer.lr=-0.001", "optimizer.lr"),
    ("max_duration='3 epochs'", "max_duration"),
    ("save_interval=soon", "save_interval"),
    ("max_seq_len=0", "max_seq_len"),
    ("max_seq_len=-4", "max_seq_len"),
    ("max_seq_len=1", "max_seq_len"),
    ("run_name=../../x", "run_name"),
    ("run_name=a/b", "run_name"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("algorithms.remask.weight=.nan", "algorithms.remask.weight"),
    ("scheduler.pct_start=-.inf", "scheduler.pct_start"),
    ("tokenizer.name=./no-such-tokenizer", "tokenizer.name"),
    ("code_paths=[./no_such_plugin.py]", "code_paths"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("seed=abc", "seed"),
    ("seed=1.5", "seed"),
    ("algorithms.remask.mask_token_id=999999", "algorithms.remask.mask_token_id"),
    ("algorithms.remask.mask_token_id=2053", "algorithms.remask.mask_token_id"),  # len(tiny tokenizer)
    ("load_path=./no-such-checkpoint.pt", "load_path"),
    ("precision=bf16", "precision"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_value_fails_before_data_and_model(override, key, sample_corpus, tmp_path, capsys, nothing_heavy,
                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = rejected(capsys, TINY_RECIPE, [*tiny_overrides(sample_corpus, tmp_path / "run"), override])
    assert "Traceback" not in err
    assert str(TINY_RECIPE) in err and key in err, err


def test_mixed_precision_on_cpu_says_to_use_fp32():
    from composer_remask.train.builders import validate_sections

    for precision in ("amp_bf16", "amp_fp16"):
        cfg = load_config(TINY_RECIPE, [f"precision={precision}"])
        with pytest.raises(ConfigError, match=r"precision: .*on CPU set precision: fp32"):
            validate_sections(cfg, cuda_available=False)
        validate_sections(cfg, cuda_available=True)
    with pytest.raises(ConfigError, match=r"precision: 'bf16' is not a precision .*amp_bf16"):
        validate_sections(load_config(TINY_RECIPE, ["precision=bf16"]), cuda_available=True)


@pytest.mark.parametrize("key", ["save_folder", "export_folder"])
def test_output_folder_that_is_a_file_is_refused(key, sample_corpus, tmp_path, capsys, nothing_heavy):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "below"):
        err = rejected(capsys, TINY_RECIPE, [*tiny_overrides(sample_corpus, tmp_path / "run"), f"{key}={folder}"])
        assert "Traceback" not in err
        assert f"{TINY_RECIPE}" in err and f"{key}: " in err and "is a file" in err, err


def test_nan_written_in_yaml_names_the_file_and_key(tmp_path, capsys, sample_corpus, nothing_heavy):
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["algorithms"]["remask"]["weight"] = "NAN_PLACEHOLDER"
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("NAN_PLACEHOLDER", ".nan"))
    err = rejected(capsys, path, tiny_overrides(sample_corpus, tmp_path / "run"))
    assert f"{path}: algorithms.remask.weight: must be a finite number, got nan" in err


def test_every_float_is_checked_for_finiteness_wherever_it_sits():
    with pytest.raises(ConfigError, match=r"train_loader\.streams\.tinycot\.proportion: must be a finite number"):
        load_config(TINY_RECIPE, ["train_loader.streams.tinycot.proportion=.inf"])
    with pytest.raises(ConfigError, match=r"command line override 'dist_timeout'.*must be a finite number"):
        load_config(TINY_RECIPE, ["dist_timeout=.nan"])


def test_construction_checks_run_in_validation():
    cfg = load_config(TINY_RECIPE, ["algorithms.remask.mask_prob=1.5"])
    with pytest.raises(ConfigError, match=r"tiny_cpu\.yaml.*algorithms\.remask\.mask_prob: .*1\.5"):
        validate_recipe(cfg)
    validate_recipe(load_config(TINY_RECIPE))  # the shipped recipe passes


def test_corpus_built_with_another_tokenizer_is_refused(sample_corpus, tmp_path, tiny_tokenizer, capsys,
                                                        nothing_heavy):
    other = tmp_path / "other-tokenizer"
    tiny_tokenizer.save_pretrained(other)
    err = rejected(capsys, TINY_RECIPE, [*tiny_overrides(sample_corpus, tmp_path / "run"), f"tokenizer.name={other}"])
    manifest = json.loads((sample_corpus["train"] / "manifest.json").read_text())
    corpus_hash = manifest["tokenizer"]["vocab_sha256"]
    assert "tokenizer.name" in err and corpus_hash in err and str(other) in err
    recipe_hash = err.split("vocabulary sha256 ")[1].split(",")[0]
    assert len(recipe_hash) == 64 and recipe_hash != corpus_hash


def test_recipe_shorter_than_the_corpus_is_refused(sample_corpus, tmp_path, capsys, nothing_heavy):
    err = rejected(capsys, TINY_RECIPE, [*tiny_overrides(sample_corpus, tmp_path / "run"), "max_seq_len=48"])
    assert f"{TINY_RECIPE}" in err and "max_seq_len: 48 is shorter than the max_seq_len 256" in err
    err = rejected(capsys, TINY_RECIPE, [*tiny_overrides(sample_corpus, tmp_path / "run"),
                                         "train_loader.max_seq_len=64"])
    assert "train_loader.max_seq_len: 64 is shorter than the max_seq_len 256" in err


def test_a_corpus_without_manifest_is_not_compared(sample_corpus, tmp_path, capsys, monkeypatch):
    """Corpora written by other tools have no manifest: nothing to compare, training goes on."""
    copy = tmp_path / "corpus"
    shutil.copytree(sample_corpus["train"], copy)
    (copy / "manifest.json").unlink()
    built = []
    monkeypatch.setattr(run_module, "build_loaders", lambda *args: built.append("data") or (_ for _ in ()).throw(
        ConfigError("stop here")))
    overrides = [*tiny_overrides({**sample_corpus, "train": copy}, tmp_path / "run"), "max_seq_len=48",
                 "~eval_loader"]
    assert run_module.main([str(TINY_RECIPE), *overrides]) == 2
    assert built == ["data"]


@pytest.mark.parametrize("recipe", sorted((TINY_RECIPE.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_pass_the_construction_checks(recipe, monkeypatch):
    from composer_remask.train.run import import_code_paths

    monkeypatch.chdir(TINY_RECIPE.parents[1])
    cfg = load_config(recipe)
    import_code_paths(cfg.code_paths or [])
    validate_recipe(cfg, cuda_available=True)
