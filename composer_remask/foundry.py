"""What llm-foundry finds through this package's entry points (no ``code_paths`` needed).

Installing ``composer-remask`` next to ``llm-foundry`` registers, in llm-foundry's registries:

* ``algorithms: {remask: {...}}`` -> :class:`composer_remask.ReMask` (group ``llmfoundry_algorithms``);
* ``train_loader: {name: remask_mds, dataset: {...}}`` -> :func:`build_remask_dataloader`, the
  project's MDS loader (batches carry ``token_roles``, so ReMask-CoT's label rules apply; group
  ``llmfoundry_dataloaders``);
* ``tokenizer: {name: remask_tokenizer, kwargs: {pretrained_model_name_or_path: ...}}`` ->
  :class:`RemaskTokenizer`: any Hugging Face tokenizer plus ``<|mask|>`` and the structural tags,
  keeping the tokenizer's own special tokens (group ``llmfoundry_tokenizers``). Pair it with the
  model's ``allow_embedding_resizing: true``.

Nothing here imports llm-foundry: it calls these with keyword arguments from the YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from composer_remask.data.manifest import CorpusMismatchError, check_corpus_manifest, corpus_manifests
from composer_remask.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from composer.core import DataSpec

__all__ = ["DATALOADER_KEYS", "RemaskTokenizer", "build_remask_dataloader", "load_remask_tokenizer"]

# torch DataLoader settings: next to `dataset:` in an llm-foundry loader section, as in its own loaders.
DATALOADER_KEYS = ("num_workers", "drop_last", "pin_memory", "persistent_workers", "prefetch_factor", "timeout")


def build_remask_dataloader(
    tokenizer: PreTrainedTokenizerBase | None,
    device_batch_size: int | float,
    dataset: Mapping[str, Any],
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    timeout: float = 0,
) -> DataSpec:
    """llm-foundry's dataloader interface over the project's MDS corpus (``remask-data`` output).

    ``dataset`` holds what the project's own recipes put in a loader section (``streams`` or
    ``local``/``remote``, ``max_seq_len``, ``pad_to``, ``shuffle``, ``shuffle_seed``, streaming
    settings); the DataLoader settings sit next to it. The DataSpec counts loss-generating tokens
    with ``composer_remask.batch.batch_loss_tokens``, as ReMask's loss does, so llm-foundry's
    ``accumulate_train_batch_on_tokens: true`` weighs microbatches exactly.

    The corpus's ``manifest.json`` is checked first, as ``train.py`` checks it: a corpus built with
    another tokenizer, or a ``dataset.max_seq_len`` shorter than the corpus's (rows would be cut), is
    refused with the YAML key to change.
    """
    from composer_remask.data.dataset import build_dataloader

    where = "train_loader (name: remask_mds)"
    if tokenizer is None:
        raise ValueError(f"{where}: needs the run's `tokenizer:` section (the one the corpus was tokenized with)")
    if float(device_batch_size) != int(device_batch_size):
        raise ValueError(f"{where}: the device batch size must be a whole number of samples, got {device_batch_size}")
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{where}: `dataset:` must be a mapping, got {type(dataset).__name__}")
    misplaced = sorted(key for key in dataset if key in DATALOADER_KEYS)
    if misplaced:
        raise ValueError(f"{where}: dataset.{misplaced[0]} is a DataLoader setting; put it next to `dataset:`")
    for manifest in corpus_manifests(dataset):
        try:
            check_corpus_manifest(
                manifest, tokenizer, dataset.get("max_seq_len"), tokenizer_name=str(tokenizer.name_or_path),
                seq_key="train_loader.dataset.max_seq_len",
                tokenizer_hint=" (tokenizer: {name: remask_tokenizer, kwargs: {pretrained_model_name_or_path: "
                               "<the tokenizer the corpus was built with>}})")
        except CorpusMismatchError as error:
            raise ValueError(f"{where}: {error}") from error
    loader_cfg = {**dict(dataset), "num_workers": num_workers, "drop_last": drop_last, "pin_memory": pin_memory,
                  "persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor, "timeout": timeout}
    try:
        return build_dataloader(loader_cfg, tokenizer, int(device_batch_size))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def load_remask_tokenizer(pretrained_model_name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` plus ReMask's special tokens, added to the existing ones.

    ``model_max_length`` is honoured as given (like llm-foundry does for hub tokenizers).
    """
    tokenizer = load_tokenizer(pretrained_model_name_or_path, kwargs)
    if "model_max_length" in kwargs:
        tokenizer.model_max_length = int(kwargs["model_max_length"])
    return tokenizer


class RemaskTokenizer(PreTrainedTokenizerBase):
    """Registered as llm-foundry's ``remask_tokenizer``: builds the loaded tokenizer, not an instance.

    llm-foundry only constructs registered tokenizers that are ``PreTrainedTokenizerBase``
    subclasses, by calling them with the YAML's ``kwargs``; ``__new__`` returns the tokenizer of
    :func:`load_remask_tokenizer` (a ``PreTrainedTokenizerFast`` or slow tokenizer as the model
    ships it), so this class is never instantiated itself.
    """

    def __new__(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:  # type: ignore[misc]
        return load_remask_tokenizer(pretrained_model_name_or_path, **kwargs)
