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
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.utils import dist
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from composer_remask.checkpoints import load_composer_checkpoint
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
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


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


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded folder, or a run's ``save_folder`` (its latest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ".metadata").is_file():
            return path
        latest = path / LATEST_CHECKPOINT
        if latest.exists():
            return latest.resolve()
        candidates = sorted((p for p in path.glob("*.pt")), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
        raise FileNotFoundError(f"{path}: no Composer checkpoint in this folder ({LATEST_CHECKPOINT} or *.pt)")
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
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, args.trust_checkpoint_pickle)
    except (FileNotFoundError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
