"""Atomic writes and safe loading."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from condiff.core.files import atomic_dir, atomic_write_bytes, load_json, load_tensors, save_tensors
from condiff.errors import CondiffError, InputFileError

SRC = Path(__file__).resolve().parents[2] / "src"


def test_round_trip(tmp_path):
    t = {"a": torch.arange(5.0), "b": torch.ones(2, 2, dtype=torch.int64)}
    save_tensors(tmp_path / "x.safetensors", t)
    back = load_tensors(tmp_path / "x.safetensors")
    assert all(torch.equal(t[k], back[k]) for k in t)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputFileError, match="not a valid safetensors"):
        load_tensors(p)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_missing_files(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(100)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError):
        load_tensors(tmp_path / "t.safetensors")
    with pytest.raises(InputFileError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    with pytest.raises(InputFileError, match="directory"):
        load_tensors(tmp_path)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InputFileError, match="not valid JSON"):
        load_json(tmp_path / "bad.json")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CondiffError, match="No space left"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x"


def test_no_unsafe_torch_load_or_pickle_in_src():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), path


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~old


def test_an_interrupt_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """SIGINT or SIGTERM (the CLI raises Interrupted, a BaseException) while the bytes are written or while a
    folder replaces an older one: no `.*.tmp` entry stays, and the older folder stays in place."""
    from condiff.core import files
    from condiff.errors import Interrupted

    def interrupted(*args):
        raise Interrupted(2)

    with monkeypatch.context() as m:
        m.setattr(files.os, "fsync", interrupted)
        with pytest.raises(Interrupted):
            atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # the rename of the new folder into place is interrupted (after the old one moved)
        if Path(dst) == tmp_path / "d" and Path(src).name.endswith(".tmp"):
            raise Interrupted(15)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", replace)
        with pytest.raises(Interrupted):
            with atomic_dir(tmp_path / "d") as tmp:
                (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (tmp_path / "d" / "f").read_text() == "old"


def test_log_writes_names_what_was_put_in_place(tmp_path):
    from condiff.core.files import log_writes

    with log_writes() as written:
        atomic_write_bytes(tmp_path / "a.bin", b"a")
        with atomic_dir(tmp_path / "d") as tmp:
            atomic_write_bytes(tmp / "inner.bin", b"i")
    atomic_write_bytes(tmp_path / "after.bin", b"x")
    assert [p for p in written if p.exists()] == [tmp_path / "a.bin", tmp_path / "d"]
