"""Atomic, safe file output: every file is written to a temporary sibling, fsynced, then renamed, so a
crash or a full disk never leaves a half-written file under the final name. Loading uses safetensors
and JSON only (never pickle)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CondiffError, InputFileError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CondiffError(f"output path {str(path)!r} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise CondiffError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CondiffError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    _fsync_dir(parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse anything else (a pickle renamed .safetensors included)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"file not found: {str(path)!r}")
    if path.is_dir():
        raise InputFileError(f"expected a .safetensors file, got a directory: {str(path)!r}")
    data = path.read_bytes()
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises several types for bad headers
        raise InputFileError(f"{str(path)!r} is not a valid safetensors file ({type(e).__name__})") from None


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"JSON file not found: {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{str(path)!r} is not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory under a temporary name and rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
