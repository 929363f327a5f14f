"""Ctrl-C and SIGTERM in a real terminal: `condiff sample`, `eval` and `train` run in a pseudo-terminal (their
controlling terminal, in the foreground), get the terminal's interrupt character once their progress bar shows
steps, and must exit 130 (143 for SIGTERM) with one `error:` line saying what was kept, leaving no output file and
no temporary file. typer turns Python's KeyboardInterrupt into a silent return, which made Ctrl-C exit 0."""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from condiff.cli import main
from condiff.cli.train import train_recipe
from condiff.training.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_digits.toml"
CONDIFF = Path(sys.executable).with_name("condiff")
START = [str(CONDIFF)] if CONDIFF.is_file() else [sys.executable, "-m", "condiff.cli"]


def _controlling_terminal():
    """In the child: a session of its own with the pty as its controlling terminal, and SIGINT at its default (a
    test run started in the background inherits an ignored SIGINT, which condiff rightly keeps ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_in_terminal(args, cwd, ready: re.Pattern, send="interrupt", timeout=180.0):
    """Run `condiff ARGS` with a pseudo-terminal (100 columns) as its stdin, stdout, stderr and controlling
    terminal; once the output matches ``ready``, type the terminal's interrupt character (``send="interrupt"``) or
    send SIGTERM (``send="term"``). Returns (exit code, everything the terminal received, as text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    intr = termios.tcgetattr(slave)[6][termios.VINTR]  # Ctrl-C, as the terminal defines it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    proc = subprocess.Popen(
        START + list(args), stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, preexec_fn=_controlling_terminal
    )
    os.close(slave)
    out, sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process and the terminal are gone
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and ready.search(out.decode(errors="replace")):
                if send == "interrupt":
                    os.write(master, intr)
                else:
                    proc.send_signal(signal.SIGTERM)
                sent = True
        else:
            pytest.fail(f"`condiff {' '.join(args)}` did not end in {timeout:.0f}s: {out[-500:]!r}")
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert sent, f"the command ended before it showed {ready.pattern!r}: {out[-800:]!r}"
    return code, out.decode(errors="replace")


def shown_lines(text: str) -> list[str]:
    """The terminal's lines as they end up (a progress bar redraws its line after each carriage return)."""
    return [seg.rsplit("\r", 1)[-1] for seg in text.split("\r\n")]


def the_error_line(text: str) -> str:
    """The one `error:` line, which is the last line, with no traceback."""
    lines = shown_lines(text)
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-2:] == [errors[0], ""], text[-1500:]
    assert "Traceback" not in text and "Aborted" not in text
    return errors[0]


def error_lines(err: str) -> list[str]:
    """The `error:` lines of a captured stderr (beside the progress bars), which must end it."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: "), err
    return [line for line in lines if "error" in line.lower()]


def temporaries(*folders: Path) -> list[Path]:
    return [p for d in folders if d.is_dir() for p in d.glob(".*.tmp")]


def steps_shown(total: int, at_least: int = 1) -> re.Pattern:
    """A progress bar past ``at_least`` of ``total`` steps."""
    return re.compile(rf"\|\s*([{at_least}-9]|[1-9]\d+)/{total} ")


def test_ctrl_c_during_sample_exits_130_and_writes_nothing(tmp_path):
    code, text = run_in_terminal(
        ["sample", "--model", "digits", "--prompt", "3", "--n", "8", "--steps", "1000", "--out", "x.png"],
        tmp_path,
        steps_shown(1000),
    )
    assert code == 130, text[-1500:]
    assert the_error_line(text) == "error: interrupted (SIGINT): no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_during_eval_exits_130_and_writes_nothing(tmp_path):
    code, text = run_in_terminal(
        ["eval", "--model", "digits", "--n", "8", "--steps", "1000", "--json", "e.json"], tmp_path, steps_shown(1000)
    )
    assert code == 130, text[-1500:]
    assert the_error_line(text) == "error: interrupted (SIGINT): no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_sample_exits_143_and_writes_nothing(tmp_path):
    code, text = run_in_terminal(
        ["sample", "--model", "digits", "--n", "8", "--steps", "1000", "--out", "x.png"],
        tmp_path,
        steps_shown(1000),
        send="term",
    )
    assert code == 143, text[-1500:]
    assert the_error_line(text) == "error: interrupted (SIGTERM): no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_during_train_keeps_a_checkpoint_that_resume_continues_from(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(RECIPE), "--steps", "2000", "--out", str(out)]
    code, text = run_in_terminal(args, tmp_path, steps_shown(2000, at_least=6))  # step 4 is checkpointed by then
    assert code == 130, text[-1500:]
    line = the_error_line(text)
    m = re.fullmatch(
        r"error: interrupted \(SIGINT\): kept checkpoint (\S+) \(step (\d+)\); "
        r"the same command with --resume continues from it",
        line,
    )
    assert m, line
    kept, step = Path(m[1]), int(m[2])
    assert step >= 4 and step % 4 == 0 and kept == out / "checkpoints" / f"step-{step:08d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == kept.name  # the newest one
    assert temporaries(out, out / "checkpoints") == [] and not (out / "model").exists()
    # --resume continues from it: one more step, from exactly that step
    tr = train_recipe(load_recipe(RECIPE), out, steps=2000, resume=True, progress=False, stop_after=1)
    assert (tr.start_step, tr.step) == (step, step + 1)


def test_sigterm_before_the_first_checkpoint_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    """A real SIGTERM, to this process, during the first training step (in-process: the fast SIGTERM case)."""
    from condiff.training.trainer import Trainer

    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(Trainer, "train_step", terminated)
    with pytest.raises(SystemExit) as e:
        main(["train", str(RECIPE), "--out", str(tmp_path / "run")])
    assert e.value.code == 143
    assert error_lines(capsys.readouterr().err) == [
        "error: interrupted (SIGTERM): nothing was written (the first checkpoint comes at step 4); nothing to resume"
    ]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put the handlers back
    assert list(tmp_path.iterdir()) == []


def test_sample_interrupted_between_its_two_files_names_the_one_written(tmp_path, capsys, monkeypatch):
    """The PNG is in place, its JSON sidecar is not: the line says so (and no temporary file stays)."""
    from condiff.core import files
    from condiff.errors import Interrupted

    def interrupted(path, obj):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(files, "atomic_write_json", interrupted)
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", "digits", "--n", "2", "--steps", "2", "--out", str(out)])
    assert e.value.code == 143
    assert error_lines(capsys.readouterr().err) == [
        f"error: interrupted (SIGTERM): only {out} had been written; the rest was not"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
