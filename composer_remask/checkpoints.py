"""Checkpoints that load without running code from the file, and a save folder that a crash cannot wedge.

Composer 0.32.1 reads its checkpoints with ``torch.load(weights_only=False)`` (full pickle: a crafted
``.pt`` runs code on load) and reads a sharded folder's ``.metadata`` with ``pickle.load``. It calls
an optional validation hook (environment variable ``CHECKPOINT_VALIDATION_FUNCTION``) on every
checkpoint file just before it unpickles it. :func:`install_safe_loading` points that hook at
:func:`check_before_composer_load`, which loads the file first with ``weights_only=True`` and the
short list of globals a Composer checkpoint needs (:data:`SAFE_CHECKPOINT_GLOBALS`); a file that needs
anything else is refused before Composer unpickles it. ``trust_checkpoint_pickle: true`` (recipe)
or ``--trust-checkpoint-pickle`` (``remask-export``) turns the check off for files you trust.

A run killed while Composer writes ``ep*-ba*-rank0.pt`` leaves a truncated file that makes the next
autoresume fail (Composer refuses a save folder holding a "future" checkpoint).
:func:`recover_save_folder` moves unreadable checkpoints aside (``NAME.partial-<time>``) and points
``latest-rank0.pt`` at the newest readable one, before the Trainer looks at the folder.

:func:`load_composer_checkpoint` reads a whole checkpoint (a ``.pt`` file or a sharded folder) the
same safe way, for ``remask-export``. Training (``train/``) and the export both build on this module.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import pickle
import re
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from composer_remask._private_api import load_sharded_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "SAFE_CHECKPOINT_GLOBALS", "UnsafeCheckpointError",
    "check_before_composer_load", "install_safe_loading", "load_checkpoint_file", "load_composer_checkpoint",
    "read_dcp_metadata", "recover_save_folder",
]

VALIDATION_ENV = "CHECKPOINT_VALIDATION_FUNCTION"  # read by composer.utils.checkpoint at every load
HOOK = f"{__name__}.check_before_composer_load"
TRUST_HINT = ("if you trust the file, set trust_checkpoint_pickle: true in the recipe "
              "(remask-export: --trust-checkpoint-pickle)")
LATEST_NAME = "latest-rank0.pt"
# Composer's default save_filename "ep{epoch}-ba{batch}-rank{rank}.pt" (a folder for sharded checkpoints).
CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank0(\.pt)?$")


def _numpy_globals() -> list[Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
                     if name.endswith("DType") and name != "ObjectDType"]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


# What a Composer checkpoint of this project holds besides tensors and plain containers: numpy and
# Python RNG states (numpy arrays), wall-clock timestamps (timedelta), the torch version in the metadata.
SAFE_CHECKPOINT_GLOBALS: list[Any] = [datetime.timedelta, TorchVersion, *_numpy_globals()]


class CheckpointError(ValueError):
    """A checkpoint that must not be (or cannot be) loaded; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary unpickling (it references globals a safe load does not run)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty or otherwise unreadable (for example a save cut short by a crash)."""


# -------------------------------------------------------------------------------- safe loading

def check_archive(path: str | Path, *, check_crc: bool = False) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is a complete ``torch.save`` zip archive.

    Cheap by default (the central directory and the member extents, which a truncated write never
    has); ``check_crc`` also reads every byte and compares the stored CRC-32s.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not members:
                raise CorruptCheckpointError(f"{path}: empty checkpoint archive")
            for member in members:
                if member.header_offset + member.compress_size > size:
                    raise CorruptCheckpointError(f"{path}: truncated checkpoint ({member.filename} ends past "
                                                 f"the end of the file)")
            if check_crc:
                bad = archive.testzip()
                if bad is not None:
                    raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({bad} fails its CRC check)")
    except CorruptCheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable or truncated checkpoint ({error})") from error


def load_checkpoint_file(path: str | Path, *, trusted: bool = False, mmap: bool = False,
                         check_crc: bool = False) -> Any:
    """``torch.load`` a checkpoint file without running code from it (unless ``trusted``).

    ``weights_only=True`` with :data:`SAFE_CHECKPOINT_GLOBALS` allowed; a file that needs other
    globals raises :class:`UnsafeCheckpointError` naming them, an unreadable one
    :class:`CorruptCheckpointError`. ``mmap`` maps the tensors instead of reading them (a check).
    """
    path = Path(path)
    check_archive(path, check_crc=check_crc)
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: refused to unpickle this checkpoint: it references objects a safe "
                                    f"load does not create ({_unsupported(str(error))}); {TRUST_HINT}") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint ({_first_line(str(error))})") from error


def _unsupported(message: str) -> str:
    """The line of torch's weights-only error that names the refused global."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` ``.metadata`` file: its own dataclasses only."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (
                module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
            return getattr(importlib.import_module(module), name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or value is torch.Size:
                return value
        if (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not part of checkpoint metadata")


def read_dcp_metadata(path: str | Path) -> Any:
    """The ``Metadata`` of a sharded checkpoint (``FOLDER/.metadata``), read without running code."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: refused to unpickle this sharded-checkpoint metadata ({error}); "
                                    f"{TRUST_HINT}") from error
    except (OSError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable sharded-checkpoint metadata ({error})") from error


def load_composer_checkpoint(path: Path, trusted: bool = False) -> dict[str, Any]:
    """The checkpoint's state dict, read without running code from the file unless ``trusted``.

    A ``.pt`` file loads with ``weights_only=True`` (CRC-checked first, so a damaged file is an
    error, not a silently wrong export); a sharded folder's ``.metadata`` is read by an unpickler
    that only creates torch's checkpoint-metadata classes, and its data files load with
    ``weights_only=True`` as well.
    """
    if not path.is_dir():
        return load_checkpoint_file(path, trusted=trusted, check_crc=True)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self) -> Any:
            if trusted:
                return super().read_metadata()
            return read_dcp_metadata(Path(self.path) / ".metadata")

    if not trusted:
        read_dcp_metadata(path / ".metadata")  # refused here with its own message, not wrapped by DCP
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return load_sharded_checkpoint(SafeMetadataReader(path))
    except CheckpointException as error:
        raise CorruptCheckpointError(f"{path}: cannot read this sharded checkpoint: {error}") from error


def check_before_composer_load(path: str | Path, specs: Sequence[tuple[int, int]] | None = None) -> bool:
    """Composer's ``CHECKPOINT_VALIDATION_FUNCTION``: raise unless ``path`` loads safely.

    ``specs`` (offset, length pairs) come with the data files of a sharded checkpoint, which torch
    reads with ``weights_only=True`` itself: only their extents are checked.
    """
    previous = os.environ.get(_PREVIOUS_ENV)
    if previous and not _call_hook(previous, path, specs):
        return False
    path = Path(path)
    if specs is not None:
        size = path.stat().st_size
        if any(offset + length > size for offset, length in specs):
            raise CorruptCheckpointError(f"{path}: truncated sharded-checkpoint file")
        return True
    if path.name == ".metadata":
        read_dcp_metadata(path)
        return True
    load_checkpoint_file(path, mmap=True)
    return True


_PREVIOUS_ENV = "REMASK_CHAINED_CHECKPOINT_VALIDATION_FUNCTION"


def _call_hook(dotted: str, path: str | Path, specs: Sequence[tuple[int, int]] | None) -> bool:
    module, _, name = dotted.rpartition(".")
    return bool(getattr(importlib.import_module(module), name)(path, specs))


def install_safe_loading(trusted: bool = False) -> None:
    """Make Composer's checkpoint loads in this process safe (or, if ``trusted``, as Composer ships them).

    A validation function the user set already keeps running, before the safety check.
    """
    current = os.environ.get(VALIDATION_ENV)
    if current and current != HOOK:
        os.environ[_PREVIOUS_ENV] = current
    previous = os.environ.get(_PREVIOUS_ENV)
    if trusted:
        if previous:
            os.environ[VALIDATION_ENV] = previous
        else:
            os.environ.pop(VALIDATION_ENV, None)
    else:
        os.environ[VALIDATION_ENV] = HOOK


# ------------------------------------------------------------------------ crash-safe save folder

def _checkpoints_newest_first(folder: Path) -> list[Path]:
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.match(entry.name)
        if match and not entry.is_symlink():
            found.append(((int(match["epoch"]), int(match["batch"])), entry))
    return [entry for _, entry in sorted(found, key=lambda item: item[0], reverse=True)]


def _check_checkpoint(entry: Path, check_crc: bool) -> None:
    if entry.is_dir():  # sharded: torch.distributed.checkpoint writes .metadata last
        metadata = entry / ".metadata"
        if not metadata.is_file() or metadata.stat().st_size == 0:
            raise CorruptCheckpointError(f"{entry}: sharded checkpoint without its .metadata (an interrupted save)")
        read_dcp_metadata(metadata)
        return
    check_archive(entry, check_crc=check_crc)


def _move_aside(entry: Path, reason: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = entry.with_name(f"{entry.name}.partial-{stamp}")
    counter = 1
    while target.exists():
        target = entry.with_name(f"{entry.name}.partial-{stamp}-{counter}")
        counter += 1
    entry.rename(target)
    warnings.warn(f"moved the unreadable checkpoint {entry} aside to {target.name} ({reason})", stacklevel=3)
    return target


def recover_save_folder(save_folder: str | Path) -> Path | None:
    """Prepare a local save folder for autoresume after a crash; return the checkpoint to resume from.

    Checkpoints that are not complete (a save cut short by ``kill -9`` or a full disk) are renamed
    ``NAME.partial-<time>`` with a warning, so Composer neither loads them nor refuses the folder;
    ``latest-rank0.pt`` then points at the newest complete checkpoint (CRC-checked), or is removed
    when none is left. Other files are untouched.
    """
    folder = Path(save_folder)
    if not folder.is_dir():
        return None
    good: Path | None = None
    for entry in _checkpoints_newest_first(folder):
        try:
            _check_checkpoint(entry, check_crc=good is None)
        except UnsafeCheckpointError:
            raise
        except CorruptCheckpointError as error:
            _move_aside(entry, str(error).removeprefix(f"{entry}: "))
            continue
        if good is None:
            good = entry
    latest = folder / LATEST_NAME
    points_at = Path(os.readlink(latest)) if latest.is_symlink() else None
    if good is None:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
            warnings.warn(f"{folder}: no complete checkpoint left; training starts from the beginning", stacklevel=2)
        return None
    if points_at is None or (folder / points_at).resolve() != good.resolve():
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(good.name)
        if points_at is not None:
            log.warning("%s now points at %s (was %s)", latest, good.name, points_at)
    return good


@contextlib.contextmanager
def safe_loading(trusted: bool = False) -> Iterator[None]:
    """:func:`install_safe_loading` for a block; the environment is restored afterwards (tests, notebooks)."""
    saved = {key: os.environ.get(key) for key in (VALIDATION_ENV, _PREVIOUS_ENV)}
    install_safe_loading(trusted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
