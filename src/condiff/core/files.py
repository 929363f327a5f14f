"""Atomic, safe file output: every file is written to a temporary sibling, fsynced, then renamed, so a
crash or a full disk never leaves a half-written file under the final name. Loading uses safetensors
and JSON only (never pickle): ``refuse_pickles`` refuses a user-supplied file or folder that holds pickled
weights before anything in it is read, and ``load_tensors`` / ``load_json`` run it on every file they read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condiff.errors import InputFileError, OutputFileError

_UMASK = os.umask(0)
os.umask(_UMASK)


_WRITE_LOGS: list[list[Path]] = []


@contextlib.contextmanager
def log_writes():
    """Collect, in order, the paths the atomic writers put in place inside the block (a file, or an ``atomic_dir``
    folder): the CLI names them when a command is interrupted. Paths written inside an ``atomic_dir`` are listed
    too; they no longer exist once the folder is renamed into place."""
    written: list[Path] = []
    _WRITE_LOGS.append(written)
    try:
        yield written
    finally:
        _WRITE_LOGS.pop()


def _logged(path: Path) -> Path:
    for log in _WRITE_LOGS:
        log.append(path)
    return path


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
        raise OutputFileError(f"output path {str(path)!r} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OutputFileError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a failed write, or an interrupt (SIGINT, SIGTERM): no temporary file stays
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputFileError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        raise
    _fsync_dir(parent)
    return _logged(path)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a write would have to create things)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(path, kind: str = "file") -> Path:
    """Refuse, before any work is done, an output ``path`` (a ``file`` or a ``dir``) that cannot be
    written: the wrong kind of thing already there, a path under a regular file, or a read-only location.
    Probes with a temporary file that is removed at once; creates nothing else."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputFileError(f"output path {str(path)!r} is a directory; give a file name")
    if kind == "file" and os.path.lexists(path) and not path.is_file():
        raise OutputFileError(f"output path {str(path)!r} exists and is not a regular file")
    if kind == "dir" and os.path.lexists(path) and not path.is_dir():
        raise OutputFileError(f"output path {str(path)!r} exists and is not a directory")
    base = _nearest_existing(path if kind == "dir" else path.parent)
    if not base.is_dir():
        raise OutputFileError(f"cannot write {str(path)!r}: {str(base)!r} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".condiff-probe.", suffix=".tmp", dir=base)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputFileError(
            f"cannot write {str(path)!r}: {str(base)!r} is not writable ({e.strerror or e})"
        ) from None
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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_SUFFIXES = (".safetensors", ".json")  # where a file's first bytes are checked for a pickle header
SCAN_DEPTH = 4  # folder levels refuse_pickles looks into
SCAN_ENTRIES = 10_000  # entries it looks at, at most
_NEVER = "condiff reads only safetensors and JSON files, never pickles"


def _pickle_header(path: Path) -> str | None:
    """What ``path``'s first bytes say it is when they are a pickle (protocol 2+) or a zip archive as torch.save
    writes; None for anything else (a real safetensors file whose header length starts like a pickle included)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return None  # the loader reports an unreadable file itself
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's format)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
            return None  # a safetensors header: its length, then JSON
        return "pickle data (torch.save / pickle.dump)"
    return None


def _unsafe(path: Path, checked_header: bool) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return f"is a pickle-format file ({suffix}); {_NEVER} (remove it, or convert it to .safetensors)"
    if checked_header:
        kind = _pickle_header(path)
        if kind is not None:
            want = "valid JSON" if suffix == ".json" else "a valid safetensors file"
            return f"is not {want}: it holds {kind}; {_NEVER}"
    return None


def refuse_pickles(path, what: str | None = None) -> Path:
    """Refuse a user-supplied file or folder (``what`` names the option, e.g. ``--model``) that holds pickled
    weights, before anything in it is read: a file named ``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl`` or
    ``.pickle``, or a file that starts with a pickle or torch.save zip header. A file is checked whatever its
    name (callers pass the file they expect to be safetensors or JSON); a folder is searched ``SCAN_DEPTH`` levels
    deep, ``SCAN_ENTRIES`` entries at most, by name, and by header for its ``.safetensors`` and ``.json`` files.
    The first offending file (in name order) is named in a one-line InputFileError. A path that does not exist
    passes: the loader that follows reports it. Returns ``path``."""
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if path.is_file():
        why = _unsafe(path, checked_header=True)
        if why:
            raise InputFileError(f"{prefix}{str(path)!r} {why}")
        return path
    if not path.is_dir():
        return path
    seen = 0
    pending = [(path, 0)]
    while pending:
        folder, depth = pending.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable sub-folder: nothing is read from it either
        for entry in entries:
            seen += 1
            if seen > SCAN_ENTRIES:
                return path
            p = Path(entry.path)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                continue
            if is_dir:
                if depth + 1 < SCAN_DEPTH:
                    pending.append((p, depth + 1))
                continue
            if is_file:
                why = _unsafe(p, checked_header=p.suffix.lower() in SAFE_SUFFIXES)
                if why:
                    raise InputFileError(f"{prefix}{str(p)!r} {why}")
    return path


def load_tensors(path, what: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse anything else (a pickle renamed .safetensors included). ``what`` (an
    option name) prefixes a refusal of pickled data."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"file not found: {str(path)!r}")
    if path.is_dir():
        raise InputFileError(f"expected a .safetensors file, got a directory: {str(path)!r}")
    refuse_pickles(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises several types for bad headers
        raise InputFileError(f"{str(path)!r} is not a valid safetensors file ({type(e).__name__})") from None


def load_json(path, what: str | None = None) -> dict:
    """Read a JSON file (any JSON value; callers check its shape). ``what`` (an option name) prefixes a refusal of
    pickled data."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"expected a JSON file, got a directory: {str(path)!r}")
    if not path.is_file():
        raise InputFileError(f"JSON file not found: {str(path)!r}")
    refuse_pickles(path, what)
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise InputFileError(f"{str(path)!r} is not valid JSON ({e})") from None
    except RecursionError:
        raise InputFileError(f"{str(path)!r} is not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise InputFileError(f"cannot read {str(path)!r}: {e.strerror or e}") from None


def remove_dir(path) -> None:
    """Delete a directory so that a crash never leaves it half-deleted under its own name: rename it to a
    temporary ``.NAME.*.tmp`` sibling first (what ``remove_stale_temps`` clears), then delete that."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{time.time_ns()}.deleting.tmp")
    os.replace(path, tmp)
    try:
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:  # an interrupt: finish deleting, so no temporary folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory) -> list[Path]:
    """Delete the ``.*.tmp`` entries that interrupted atomic writes left in ``directory``. Only for a
    directory this process owns (a run directory being resumed): another writer's temporaries would go too."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory under a temporary name and rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    old, moved = path.with_name(path.name + ".old"), False
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            moved = True
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:  # a failure or an interrupt: no temporary folder stays, and what PATH held stays there
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not os.path.lexists(path):
            os.replace(old, path)
        elif moved:
            shutil.rmtree(old, ignore_errors=True)
        raise
    _logged(path)
