"""What a built corpus records about itself (``OUT/manifest.json``, written by ``data/writer.py``) and
the checks that read it back: a training run (``train.py`` and llm-foundry's ``remask_mds`` loader alike)
refuses a corpus built with another tokenizer or EOS, or a ``max_seq_len`` that would cut its rows.

The manifest's fields are listed in ``data/writer.py``; the ones read here are ``tokenizer``
(``vocab_sha256``, ``eos_token``, ``eos_token_id``, ``name``) and ``max_seq_len``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["MANIFEST_NAME", "CorpusMismatchError", "EOSMismatchError", "check_corpus_manifest", "check_eos_agreement",
           "corpus_manifests", "vocabulary_hash"]

MANIFEST_NAME = "manifest.json"


class EOSMismatchError(ValueError):
    """The tokenizer, the model config and the corpus disagree on the end-of-sequence token."""


class CorpusMismatchError(ValueError):
    """The run's tokenizer or ``max_seq_len`` does not fit the corpus; ``setting`` names what to change:
    ``"tokenizer"``, ``"max_seq_len"``, or ``None`` when the manifest itself cannot be read."""

    def __init__(self, message: str, setting: str | None) -> None:
        super().__init__(message)
        self.setting = setting


def check_corpus_manifest(manifest_path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None, *,
                          tokenizer_name: str, seq_key: str, tokenizer_hint: str = "") -> None:
    """Refuse a corpus whose ``manifest.json`` says it was built with another tokenizer (same ids, other
    tokens) or a longer ``max_seq_len`` than the run's (rows, CoT answers included, would be cut).

    Messages carry no location prefix (the caller adds its own: the recipe file and key, or the
    llm-foundry loader); ``seq_key`` is the YAML key to raise, ``tokenizer_hint`` says how to name the
    corpus's tokenizer on the caller's route.
    """
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorpusMismatchError(f"cannot read the corpus manifest {manifest_path}: {error}", None) from error
    built_with = manifest.get("tokenizer") or {}
    corpus_hash = built_with.get("vocab_sha256")
    if corpus_hash:
        run_hash = vocabulary_hash(tokenizer)
        if corpus_hash != run_hash:
            raise CorpusMismatchError(
                f"the run's tokenizer {tokenizer_name!r} (vocabulary sha256 {run_hash}, {len(tokenizer)} tokens) "
                f"is not the one {manifest_path} was built with ({built_with.get('name')!r}, vocabulary sha256 "
                f"{corpus_hash}, {built_with.get('vocab_size')} tokens): the token ids would mean other tokens. "
                f"Rebuild the corpus with this tokenizer, or train with the corpus's{tokenizer_hint}.", "tokenizer")
    corpus_len = manifest.get("max_seq_len")
    if isinstance(corpus_len, int) and isinstance(max_seq_len, int) and max_seq_len < corpus_len:
        raise CorpusMismatchError(
            f"{max_seq_len} is shorter than the max_seq_len {corpus_len} that {manifest_path} was built with: rows "
            f"would be cut at {max_seq_len} tokens, CoT answers included. Set {seq_key}: {corpus_len} (or more), "
            f"or rebuild the corpus with --max-seq-len {max_seq_len}.", "max_seq_len")


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token -> id map (added tokens included): same hash, same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _eos_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value}
    return {int(value)}


def corpus_manifests(loader_cfg: Mapping[str, Any] | None) -> list[Path]:
    """The ``manifest.json`` files of a loader section's local streams (``OUT/<source>`` -> ``OUT``)."""
    if not loader_cfg:
        return []
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(loader_cfg, DictConfig):
            loader_cfg = OmegaConf.to_container(loader_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    config = dict(loader_cfg)
    streams = config.get("streams")
    locals_: list[str] = []
    if isinstance(streams, Mapping):
        locals_ = [dict(s or {}).get("local") for s in streams.values()]
    elif isinstance(streams, Sequence) and not isinstance(streams, str):
        locals_ = [dict(s or {}).get("local") for s in streams]
    else:
        locals_ = [config.get("local")]
    found: list[Path] = []
    for local in locals_:
        if not local:
            continue
        for folder in (Path(str(local)), Path(str(local)).parent):
            manifest = folder / MANIFEST_NAME
            if manifest.is_file():
                if manifest not in found:
                    found.append(manifest)
                break
    return found


def check_eos_agreement(tokenizer: Any, model_config: Any, manifests: Iterable[Path] = (), where: str = "") -> None:
    """Refuse to train when the tokenizer's EOS is not the model's nor the corpus's.

    - model: ``config.eos_token_id`` (an id or a list of ids; ``None`` is not checked) must contain
      the tokenizer's EOS id: generation stops on the config's EOS, and a pretrained model has only
      learned to produce its own;
    - corpus: ``manifest.json`` records the EOS id every row ends with (``remask-data build``); a
      corpus built with another tokenizer ends its rows in a token the model never stops on.

    Raises :class:`EOSMismatchError` naming both values and the files.
    """
    prefix = f"{where}: " if where else ""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise EOSMismatchError(f"{prefix}the tokenizer has no EOS token")
    described = f"{tokenizer.eos_token!r} (id {eos_id})"
    config_ids = _eos_ids(getattr(model_config, "eos_token_id", None))
    if config_ids and int(eos_id) not in config_ids:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" if i < len(tokenizer) else f"id {i}"
                          for i in sorted(config_ids))
        raise EOSMismatchError(
            f"{prefix}the tokenizer's EOS is {described} but the model config's eos_token_id is {names}; "
            "use the tokenizer saved with the model (for a GGUF base: remask-import-gguf), or set "
            "model.config_overrides.eos_token_id if the config is the one that is wrong")
    for manifest in manifests:
        try:
            recorded = json.loads(Path(manifest).read_text(encoding="utf-8")).get("tokenizer", {})
        except (OSError, json.JSONDecodeError) as error:
            raise EOSMismatchError(f"{manifest}: cannot read the corpus manifest ({error})") from error
        corpus_id = recorded.get("eos_token_id")
        if corpus_id is not None and int(corpus_id) != int(eos_id):
            raise EOSMismatchError(
                f"{manifest}: field tokenizer.eos_token_id: the corpus was built with EOS "
                f"{recorded.get('eos_token')!r} (id {corpus_id}, tokenizer {recorded.get('name')!r}) but training "
                f"uses {described}; rebuild the corpus with the training tokenizer (remask-data build --tokenizer ...)")
