"""Export a trained model as a Hugging Face folder (weights + config + tokenizer).

From a live Composer model at the end of training (FSDP and DDP included: the full state dict is
gathered on rank 0), or afterwards from a Composer checkpoint: a ``.pt`` file (FSDP
``state_dict_type: full`` writes one), a sharded checkpoint folder, or a run's ``save_folder``
(its latest checkpoint). The folder loads with ``AutoModelForCausalLM.from_pretrained``::

    remask-export runs/remask-3b/checkpoints --out runs/remask-3b/hf
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.utils import dist
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from composer_remask.checkpoints import load_composer_checkpoint
from composer_remask.checks import blocking_ancestor
from composer_remask.runtime import unwrap_ddp

log = logging.getLogger(__name__)

__all__ = ["export_checkpoint", "export_model", "find_checkpoint", "main", "save_hf_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LATEST_CHECKPOINT = "latest-rank0.pt"


def save_hf_folder(config: PretrainedConfig, state_dict: Mapping[str, torch.Tensor], out_dir: str | Path,
                   tokenizer: PreTrainedTokenizerBase | None = None, dtype: str | None = None) -> Path:
    """Write ``state_dict`` (Hugging Face parameter names) with ``config`` and ``tokenizer`` to ``out_dir``.

    The model is built on the meta device and takes the tensors as they are, so no second copy of
    the weights is allocated. Every parameter of the architecture must be present.
    """
    out_dir = Path(out_dir)
    config = copy.deepcopy(config)
    config.use_cache = True  # training turns the KV cache off; generation wants it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing or result.unexpected_keys:
        raise ValueError(f"the weights do not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    if dtype is not None:
        model.to(DTYPES[dtype])
    model.config.torch_dtype = next(model.parameters()).dtype
    check_export_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:  # written beside the target and moved into place: never a half-written folder under its name
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_export_target(out_dir: str | Path) -> None:
    """Refuse, before any work, a target that cannot become the export folder: an existing file, a
    folder holding something other than an earlier export, or a place this process cannot write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export target {out_dir} exists and is not a folder; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"export target {out_dir} is a folder that holds something other than an earlier "
                              "export (no config.json); it is not replaced: choose another path or empty it")
    existing = blocking_ancestor(out_dir)
    if existing is not None:
        raise PermissionError(f"export target {out_dir}: {existing} is not a writable folder")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an earlier export there is replaced only once the new one is whole."""
    previous = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            previous = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            out_dir.rename(previous)
        else:
            out_dir.rmdir()
    staging.chmod(0o755)
    staging.rename(out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _hf_weights(composer_state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Composer ``HuggingFaceModel`` state dict keeps the HF model under ``model.``."""
    return {key[len("model."):]: value for key, value in composer_state_dict.items() if key.startswith("model.")}


def export_model(composer_model: torch.nn.Module, out_dir: str | Path, dtype: str | None = None) -> Path | None:
    """Export a live (possibly DDP/FSDP-wrapped) Composer ``HuggingFaceModel``.

    Call it on every rank: under FSDP the full weights are gathered collectively; rank 0 writes the
    folder and returns its path, the other ranks return ``None``.
    """
    from composer.checkpoint import get_model_state_dict

    state_dict = get_model_state_dict(composer_model, sharded_state_dict=False)
    inner = unwrap_ddp(composer_model)
    path = None
    if dist.get_global_rank() == 0:
        path = save_hf_folder(inner.config, _hf_weights(state_dict), out_dir, getattr(inner, "tokenizer", None),
                              dtype)
    dist.barrier()
    return path


_BATCH_IN_NAME = re.compile(r"(?:^|[-_])ba(\d+)(?:[-_.]|$)")  # Composer's ep{epoch}-ba{batch}-rank{rank}.pt


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded folder, or a run's ``save_folder``: its ``latest`` link, else the
    checkpoint with the highest batch count in its name (file times change when folders are copied,
    e.g. from object storage, so they never decide)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ".metadata").is_file():
            return path
        latest = path / LATEST_CHECKPOINT
        if latest.exists():
            return latest.resolve()
        candidates = [p for p in path.glob("*.pt") if p.name != LATEST_CHECKPOINT]
        if not candidates:
            raise FileNotFoundError(f"{path}: no Composer checkpoint in this folder ({LATEST_CHECKPOINT} or *.pt)")
        batches = {p: _BATCH_IN_NAME.search(p.stem) for p in candidates}
        unnamed = sorted(p.name for p, match in batches.items() if match is None)
        counts = {p: int(match.group(1)) for p, match in batches.items() if match is not None}
        if unnamed or len(set(counts.values())) != len(counts):
            raise ValueError(f"{path}: no {LATEST_CHECKPOINT} link and the checkpoints' batch counts do not say which "
                             f"is the latest ({', '.join(sorted(p.name for p in candidates))}); name the file")
        return max(counts, key=counts.__getitem__)
    raise FileNotFoundError(f"{path}: no such checkpoint file or folder")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None,
                      trust_checkpoint_pickle: bool = False) -> Path:
    """Export a Composer checkpoint of a ``HuggingFaceModel`` (config and tokenizer are stored in it).

    The checkpoint is read without running code from it; ``trust_checkpoint_pickle`` allows full
    unpickling (Composer's own loader) for a file you trust that holds other Python objects.
    """
    from composer.models import HuggingFaceModel
    from composer.models.huggingface import get_hf_config_from_composer_state_dict

    path = find_checkpoint(checkpoint)
    check_export_target(out_dir)
    log.info("reading checkpoint %s", path)
    state = load_composer_checkpoint(path, trust_checkpoint_pickle)
    try:
        hf_state = state["state"]["integrations"]["huggingface"]
    except KeyError:
        raise ValueError(f"{path}: not a checkpoint of a Composer HuggingFaceModel "
                         "(no state.integrations.huggingface)") from None
    config = get_hf_config_from_composer_state_dict(state)
    weights = _hf_weights(state["state"]["model"])
    if not weights:
        raise ValueError(f"{path}: the checkpoint holds no model weights")
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer may read its files again when saving
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=tmp)
        return save_hf_folder(config, weights, out_dir, tokenizer, dtype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="remask-export", description="Write a Hugging Face folder from a Composer checkpoint.",
        epilog="Checkpoints are read safely: torch.load(weights_only=True) with the few numpy/datetime types a "
               "Composer checkpoint holds, and a sharded folder's .metadata without pickle's code execution. "
               "A file that needs anything else is refused; --trust-checkpoint-pickle unpickles it fully, "
               "which runs any code the file contains: use it only for files you trust. The exported "
               "folder holds safetensors weights only.")
    parser.add_argument("checkpoint", help="checkpoint .pt, sharded checkpoint folder, or a run's save_folder")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    parser.add_argument("--trust-checkpoint-pickle", action="store_true",
                        help="unpickle the checkpoint fully (weights_only=False): runs code from the file")
    args = parser.parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.checkpoint)
        print(f"checkpoint {checkpoint}", flush=True)
        out = export_checkpoint(checkpoint, args.out, args.dtype, args.trust_checkpoint_pickle)
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
