"""Run every command of README.md and docs/*.md as written, in a scratch copy of the working tree, and check
the results the docs state.

What counts as a command. Fenced code blocks only (prose in backticks is not run):

- ``bash`` / ``sh`` / ``shell`` blocks: every line, with ``\\`` continuations joined. A line whose first word
  (after ``VAR=value`` prefixes) is ``condiff``, ``python`` or ``make`` is a *command* (a row of the report);
  ``VAR=value``, ``export ...`` and ``. .venv/bin/activate`` lines are *state*, prepended to every later step of
  the same page (so ``SD=tiny_sd`` reaches the commands below it); any other line (``cp``, ``echo``) is a
  *setup* step that runs just before the next command. Comment lines (``# error: ...``) are illustration.
- blocks without a language (or ``console``): the lines that start with ``$ `` (a transcript: the other lines
  are the output shown).
- ``python`` blocks: the whole block is one command, ``python - <<'PY' ... PY``.

Where it runs. Once per run the tracked and untracked, not-ignored files of the working tree are copied to a
temporary directory, the entries of ``.venv`` are linked into it with a fresh install stamp (so ``make demo``
takes the venv as built and never reinstalls into it),
and every step runs there with ``bash -c``, the venv's ``bin`` first on ``PATH``, ``OMP_NUM_THREADS=1`` and
the Hugging Face offline switches. So relative paths such as ``docs/examples/*.png`` resolve as in a fresh
clone, and whatever a command writes (``--grid docs/editing_grid.png``, ``scripts/bundle_model.py``) lands in
the copy, never in the repository.

Chains. A step reads what an earlier step of the same page wrote when it names a path (a token with a ``/``
or a file extension) that does not exist in the fresh copy and that the earlier step also names (or a folder
above it): ``--ems ems.safetensors`` after ``--out ems.safetensors``, ``--model runs/digits/model`` after
``--out runs/digits``. Such steps form one chain, run in order in the same directory; every other command is
a chain of its own. A chain is the unit of the pytest test (tests/test_docs_commands.py).

Expected results. A trailing ``# expect: CHECKS`` on a command line (after any other comment text:
``# 37% fewer network evaluations; expect: all == 0.994``), or ``<!-- expect: CHECKS -->`` on the lines
before a block (for the block's last command; ``<!-- expect(2): CHECKS -->`` for its second). CHECKS,
comma-separated:

- ``KEY OP NUMBER`` with OP one of ``==`` (equal at the number's printed decimals), ``>=``, ``<=``, ``~``
  (within 0.02, or ``~ 0.5 +- 0.1``). KEY is looked up in the command's ``--json`` file (a dotted path such as
  ``accuracy.all``, ``best.5.ratio``, or a key that occurs once anywhere in it), else in the lines it prints as
  ``label   number`` (``class accuracy``, ``Frechet distance``; also by its first word: ``frechet``); ``all``
  also finds ``all attributes right``;
- ``exit N``: the exit code (default 0);
- ``"text"``: the text occurs in the command's stdout or stderr.

Interrupts. A command whose comment says to press Ctrl-C gets a SIGINT once its progress bar shows, and must
stop as docs/reliability.md says (exit code 130, ``interrupted (SIGINT)`` on stderr).

Tiers. The ``fast`` chains (``DEFAULT_RUN`` below: the README's first commands and library example, the other
library examples, the transcripts whose output the docs show) run in the default ``make test``, 50-55 s in all
on one thread of a loaded 2-core machine. Every other chain is ``slow`` and runs with ``make test-slow``: most take
5-10 s (condiff starting), too many for the default run's minute; ``TIERS`` gives the timeouts of those that
take minutes to hours (training recipes, benchmarks, ``--n 512`` evaluations).

    OMP_NUM_THREADS=1 python scripts/docs_commands.py --list               # every command, its chain and tier
    OMP_NUM_THREADS=1 python scripts/docs_commands.py                      # run the fast chains: table + JSON
    OMP_NUM_THREADS=1 python scripts/docs_commands.py --tier slow --match 'eval' --json outputs/docs.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
COMMAND_WORDS = ("condiff", "python", "python3", "make")
SHELL_LANGS = ("bash", "sh", "shell")
TRANSCRIPT_LANGS = ("", "console", "text")
FAST_TIMEOUT = 120.0

# The chains the default `make test` runs (page, regex on the command): the README's first commands and library
# example, the other library examples, and the transcripts whose output the docs show; 50-55 s in all on one
# thread of the loaded 2-core machine (each condiff command spends 4-8 s starting). Every other chain is slow.
DEFAULT_RUN: list[tuple[str, str]] = [
    ("README.md", r"^condiff models$"),
    ("README.md", r"^condiff solvers$"),
    ("README.md", r"^condiff recipes$"),
    ("README.md", r"^python <<PY"),
    ("docs/guidance.md", r"^python <<PY"),
    ("docs/editing.md", r"--image astronaut\.png"),
    ("docs/reliability.md", r"--model pickled-digits"),
]
SLOW_TIMEOUT = 300.0
# Timeouts of the slow chains that take more than a few minutes (page, regex on the command and its comment,
# timeout in seconds, the time it took or is documented to take): the first match wins.
TIERS: list[tuple[str, str, float, str]] = [
    ("*", r"^make test\b", 1200, "the whole suite, ~5 min"),
    ("*", r"^make demo\b", 900, "~2-4 min"),
    ("*", r"condiff train shapes ", 4 * 3600, "~2 h"),
    ("*", r"condiff train shapes-noisy-classifier ", 2 * 3600, "~45 min"),
    ("*", r"condiff train digits[_a-z]* (--fast )?--out", 3600, "~10-20 min"),
    ("*", r"condiff grid search", 1800, "~4-8 min"),
    ("*", r"condiff train (chars|captions|dna|seq2seq)-", 3600, "a token recipe, ~3-30 min"),
    ("*", r"condiff train (lotus|dense-eps|unicon|diffmatch) ", 3600, "a perception recipe, ~20-30 min"),
    ("*", r"condiff train (rddm|ddpm-restore|diffusevae|sr|tsdiff)-?", 3600, "a task recipe, 1-40 min"),
    ("*", r"condiff train (rrcm|noise)-digits", 900, "~2-5 min"),
    ("*", r"condiff train shapes-dit-", 3600, "a DiT recipe, ~20-40 min"),
    ("*", r"condiff (sr search|adapt|certify --method (densepure|rrcm))", 1800, "1-10 min"),
    ("*", r"python benchmarks/", 2 * 3600, "a benchmark, minutes to an hour"),
    ("*", r"condiff train digits --steps", 900, "~2-4 min"),
    ("*", r"condiff train tests/fixtures/tiny_digits\.toml --steps 2000", 1800, "2000 steps of the tiny recipe"),
    ("*", r"condiff ems compute", 3600, "~15 min"),
    ("*", r"condiff finetune", 3600, "one fine-tuning recipe, ~5-15 min"),
    ("*", r"condiff dc search", 600, "~1-2 min"),
    ("*", r"condiff bench edit", 3600, "~16 min"),
    ("*", r"condiff bench solvers --model", 1800, "~6-8 min"),
    ("*", r"condiff bench solvers", 600, "~1 min"),
    ("*", r"condiff guidance (fit-linear-ag|fit-minority|train-ppap)", 1800, "20 s to 14 min"),
    ("*", r"condiff eval ", 900, "30 s to 2 min at --n 512"),
    ("*", r"scripts/bundle_model\.py", 3600, "training, then two --n 512 evaluations"),
    ("*", r"scripts/check_wheel\.py", 1800, "~3 min: build, install in a fresh venv, demo"),
]

# A command whose comment says to press Ctrl-C gets a SIGINT once its progress bar shows (or after
# INTERRUPT_WAIT seconds), and must then stop as docs/reliability.md says: exit code 130, "interrupted (SIGINT)".
INTERRUPT = re.compile(r"Ctrl-C")
INTERRUPT_WAIT = 60.0


# ---- parsing -----------------------------------------------------------------------------------------------


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: the comment starts at the first ``#`` outside quotes that follows
    whitespace (or starts the line)."""
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quote != "'":
            i += 2  # an escaped character
            continue
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
        i += 1
    return line.rstrip(), ""


@dataclass
class Check:
    text: str
    kind: str  # "number", "exit", "text"
    key: str = ""
    op: str = ""
    value: float = math.nan
    tol: float = 0.0
    decimals: int = 0


def parse_checks(spec: str) -> list[Check]:
    """``all == 0.994, exit 2, "error: --model"`` -> checks (ValueError on anything else)."""
    out, parts, quote, cur = [], [], None, ""
    for ch in spec:  # split on commas outside quotes
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part[0] in "'\"" and part[-1] == part[0] and len(part) > 1:
            out.append(Check(part, "text", value=math.nan, key=part[1:-1]))
            continue
        m = re.fullmatch(r"exit\s+(\d+)", part)
        if m:
            out.append(Check(part, "exit", value=float(m.group(1))))
            continue
        m = re.fullmatch(r"(.+?)\s*(==|>=|<=|~)\s*(-?[\d.]+(?:e-?\d+)?)(?:\s*\+-\s*([\d.]+(?:e-?\d+)?))?", part)
        if not m:
            raise ValueError(f'cannot read the check {part!r} (KEY == NUMBER, KEY >= NUMBER, exit N, "text")')
        key, op, num, tol = m.groups()
        decimals = len(num.split(".")[1]) if "." in num and "e" not in num else 0
        out.append(
            Check(part, "number", key=key.strip(), op=op, value=float(num), tol=float(tol or 0.02), decimals=decimals)
        )
    return out


@dataclass
class Step:
    page: str
    line: int
    text: str  # the shell text (a python block: a heredoc)
    kind: str  # "command", "setup", "state"
    checks: list[Check] = field(default_factory=list)
    prelude: list[str] = field(default_factory=list)  # state lines of the page before it
    tier: str = "fast"
    timeout: float = FAST_TIMEOUT
    why: str = ""
    shown: str = ""  # the command as the docs show it (python blocks: the first line)
    comment: str = ""  # its trailing comment
    interrupt: bool = False  # send SIGINT while it runs (INTERRUPT)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _is_state(code: str) -> bool:
    assign = r"[A-Za-z_][A-Za-z0-9_]*=(\"[^\"]*\"|'[^']*'|\S*)"
    return bool(
        re.fullmatch(rf"(export\s+)?{assign}(\s+{assign})*", code) or re.fullmatch(r"(\.|source)\s+\S*activate", code)
    )


def _first_word(code: str) -> str:
    try:
        words = shlex.split(code, comments=False)
    except ValueError:
        words = code.split()
    for w in words:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w):
            return w
    return ""


def _blocks(text: str):
    """(language, first content line number, [(line number, line)], annotation lines before the fence)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```+\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        lang, start, body = m.group(1).lower(), i + 1, []
        before = []
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--") and "-->" in lines[k]:
            before.append(lines[k].strip())
            k -= 1
        i += 1
        while i < len(lines) and not re.match(r"^\s*```", lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        yield lang, start + 1, body, before


def _annotation_checks(before: list[str]) -> list[tuple[int, list[Check]]]:
    """(command index in the block, 1-based, 0 = the last; checks) of each ``<!-- expect(N): ... -->``."""
    out = []
    for a in before:
        m = re.fullmatch(r"<!--\s*expect(?:\((\d+)\))?:\s*(.*?)\s*-->", a)
        if m:
            out.append((int(m.group(1) or 0), parse_checks(m.group(2))))
    return out


def _expect_of(comment: str) -> list[Check]:
    m = re.search(r"(?:^|[;(]\s*)expect:\s*(.*)$", comment)
    return parse_checks(m.group(1).rstrip(")")) if m else []


def parse_page(path: Path, rel: str) -> list[Step]:
    steps: list[Step] = []
    state: list[str] = []
    for lang, _, body, before in _blocks(path.read_text()):
        block: list[Step] = []
        if lang == "python":
            code = "\n".join(line for _, line in body)
            first = next((line for _, line in body if line.strip()), "")
            shown = f"python <<PY ({len(body)} lines): {first.strip()}"
            block.append(Step(rel, body[0][0] if body else 0, f"python - <<'PY'\n{code}\nPY", "command", shown=shown))
        elif lang in SHELL_LANGS or lang in TRANSCRIPT_LANGS:
            transcript = lang not in SHELL_LANGS
            joined: list[tuple[int, str]] = []
            pending, pending_line = "", 0
            for no, raw in body:
                line = raw.rstrip()
                if transcript:
                    if not pending and not line.startswith("$ "):
                        continue
                    line = line[2:] if not pending else line
                if not pending:
                    pending_line = no
                if line.endswith("\\"):
                    pending += line[:-1].rstrip() + " "
                    continue
                joined.append((pending_line, (pending + line.strip()) if pending else line.strip()))
                pending = ""
            for no, line in joined:
                code, comment = split_comment(line)
                if not code:
                    continue
                if _is_state(code):
                    block.append(Step(rel, no, code, "state", shown=code))
                    continue
                kind = "command" if _first_word(code) in COMMAND_WORDS else "setup"
                block.append(Step(rel, no, code, kind, _expect_of(comment), shown=code, comment=comment))
        else:
            continue
        commands = [s for s in block if s.kind == "command"]
        for index, checks in _annotation_checks(before):
            if not 0 <= index <= len(commands) or not commands:
                raise ValueError(f"{rel}: an expect annotation names command {index} of a block of {len(commands)}")
            commands[index - 1].checks += checks
        for s in block:
            s.prelude = list(state)
            if s.kind == "state":
                state.append(s.text)
            steps.append(s)
    return steps


def pages(root: Path = ROOT) -> list[tuple[Path, str]]:
    out = []
    for pattern in PAGES:
        for p in sorted(root.glob(pattern)):
            out.append((p, str(p.relative_to(root))))
    return out


# ---- chains and tiers ------------------------------------------------------------------------------------------


_PATHLIKE = re.compile(r"[\w.~/-]*(/[\w.~-]+|\.[A-Za-z][\w]{0,11})")
WRITE_OPTIONS = ("--out", "--json", "--grid", "--plot", "--png")
READ_OPTIONS = (
    *WRITE_OPTIONS,
    "--pipeline",
    "--model",
    "--image",
    "--mask",
    "--inversion",
    "--ems",
    "--dc-ratios",
    "--linear-ag",
    "--minority",
    "--classifier",
    "--ppap",
)


def _expand(text: str, prelude: list[str]) -> str:
    env = {}
    for line in prelude:
        for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S*)", line):
            env[m.group(1)] = m.group(2).strip("'\"")
    for k, v in env.items():
        text = re.sub(rf"\$\{{{k}\}}|\${k}\b", v, text)
    return text


def _words(step: Step) -> list[str]:
    text = _expand(step.text, step.prelude)
    try:
        return shlex.split(text, comments=False)
    except ValueError:
        return text.split()


def _literals(words: list[str]) -> set[str]:
    """Quoted strings inside the words (python -c code, a heredoc's body)."""
    return {m.group(2) for w in words for m in re.finditer(r"(['\"])([^'\"\s]+)\1", w)}


def _is_path(tok: str) -> bool:
    if tok.startswith("-") or re.fullmatch(r"[\d.e+-]+%?", tok) or "://" in tok or "=" in tok:
        return False
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", tok) and "/" not in tok:  # a module or attribute name
        return bool(re.search(r"\.(png|json|safetensors|toml|txt|html|jpg|md|py)$", tok))
    return bool(_PATHLIKE.fullmatch(tok))


def _option_values(words: list[str], options) -> set[str]:
    out = set()
    for i, w in enumerate(words):
        if w in options and i + 1 < len(words):
            out.add(words[i + 1])
        elif "=" in w and w.split("=", 1)[0] in options:
            out.add(w.split("=", 1)[1])
    return out


def writes(step: Step) -> set[str]:
    """What a step may write: the values of the output options, the strings of python code, and the words of a
    setup line (``cp -r A B``)."""
    words = _words(step)
    out = _option_values(words, WRITE_OPTIONS) | _literals(words)
    if re.match(r"python3? (-\s*)?<<", step.text):  # a python block: shlex drops its code's quotes
        out |= {w for w in _literals([step.text]) if _is_path(w)}
    if step.kind == "setup":
        out |= {w for w in words[1:] if not w.startswith("-")}
    if words[:3] == ["condiff", "recipes", "copy"]:  # condiff recipes copy NAME DEST: DEST is written
        out |= {w for w in words[4:5] if not w.startswith("-")}
    return out


def reads(step: Step) -> set[str]:
    """The paths a step names: path-like words (a ``/`` or a file extension), python strings, and the values
    of the options that take a file or folder."""
    words = _words(step)
    return {w for w in words if _is_path(w)} | _literals(words) | _option_values(words, READ_OPTIONS)


def path_tokens(step: Step) -> set[str]:
    return reads(step) | writes(step)


def _related(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _exists(fresh: Path, tok: str) -> bool:
    if tok.startswith(("/", "~")):  # outside the fresh copy: made by an earlier step, if at all
        return False
    return (fresh / tok).exists()


@dataclass
class Chain:
    steps: list[Step]

    @property
    def commands(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "command"]

    @property
    def tier(self) -> str:
        return "fast" if any(s.tier == "fast" for s in self.commands) else "slow"

    @property
    def id(self) -> str:
        c = self.commands[0]
        word = re.sub(r"[^\w.-]+", "-", " ".join(c.shown.split()[:3]))[:40].strip("-")
        return f"{c.where}:{word}"


def tier_of(step: Step) -> tuple[str, float, str]:
    """(tier, timeout, why) of a command: fast where DEFAULT_RUN names it, else slow with TIERS' timeout."""
    text = f"{step.shown}  # {step.comment}"
    if any(page == step.page and re.search(pattern, step.shown) for page, pattern in DEFAULT_RUN):
        return "fast", FAST_TIMEOUT, ""
    for page, pattern, timeout, why in TIERS:
        if page in ("*", step.page) and re.search(pattern, text):
            return "slow", timeout, why
    return "slow", SLOW_TIMEOUT, "seconds, but the default run's budget is spent"


def build_chains(root: Path = ROOT, fresh: Path | None = None) -> list[Chain]:
    """Every page's steps grouped into chains (module docstring). ``fresh``: the tree whose files exist before
    anything runs (default: ``root``)."""
    fresh = fresh or root
    chains: list[Chain] = []
    for path, rel in pages(root):
        steps = parse_page(path, rel)
        for s in steps:
            if s.kind == "command":
                s.tier, s.timeout, s.why = tier_of(s)
                if INTERRUPT.search(s.comment):
                    s.interrupt = True
                    s.checks = [*parse_checks('exit 130, "interrupted (SIGINT)"'), *s.checks]
        parent = list(range(len(steps)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        made = [writes(s) if s.kind != "state" else set() for s in steps]
        missing = [{t for t in reads(s) if not _exists(fresh, t)} if s.kind != "state" else set() for s in steps]
        for j, s in enumerate(steps):
            if s.kind == "state":
                continue
            for i in range(j):
                if steps[i].kind == "state":
                    continue
                if any(_related(a, b) for a in missing[j] for b in made[i]):
                    parent[find(j)] = find(i)
        # a setup line belongs to the next command of its block (the same page, the lines that follow)
        for i, s in enumerate(steps):
            if s.kind == "setup":
                nxt = next((k for k in range(i + 1, len(steps)) if steps[k].kind == "command"), None)
                if nxt is not None:
                    parent[find(nxt)] = find(i)
        reps: dict[int, list[Step]] = {}
        for i, s in enumerate(steps):
            if s.kind != "state":
                reps.setdefault(find(i), []).append(s)
        for members in reps.values():
            if any(m.kind == "command" for m in members):
                chains.append(Chain(members))
                if chains[-1].tier == "fast":  # a chain that DEFAULT_RUN names runs whole in the default run
                    for m in chains[-1].commands:
                        m.tier = "fast"
    return chains


# ---- running -----------------------------------------------------------------------------------------------------


def scratch_copy(dest: Path, root: Path = ROOT) -> Path:
    """Copy the working tree's tracked and untracked, not-ignored files to ``dest`` (keeping their times) and
    link the entries of ``.venv`` (as built: a fresh ``.installed`` stamp, so ``make`` leaves it alone); returns
    ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = root / f.decode()
        if not src.is_file():
            continue
        out = dest / f.decode()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    venv = root / ".venv"
    if venv.is_dir() and not (dest / ".venv").exists():
        # the venv, entry by entry, with a fresh install stamp: `make` sees it built and never reinstalls into it
        (dest / ".venv").mkdir()
        for entry in venv.iterdir():
            if entry.name != ".installed":
                (dest / ".venv" / entry.name).symlink_to(entry)
        (dest / ".venv" / ".installed").touch()
    return dest


def _env(venv_bin: Path, clone: Path | None = None) -> dict:
    """The steps' environment. With ``clone``, its ``src`` comes first on the import path: the venv's editable
    install points at the repository, and a command that writes into the package (``scripts/bundle_model.py``
    writes ``src/condiff/bundled/NAME``) must write into the copy, never into the repository."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("PYTHONPATH", None)
    if clone is not None:
        env["PYTHONPATH"] = str(clone / "src")
    env["CONDIFF_DOCS_COMMANDS"] = "1"
    return env


def _numbers_printed(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][\w ().,/'-]*?)\s{2,}(-?\d+(?:\.\d+)?(?:e-?\d+)?)\b", line)
        if m:
            out.setdefault(m.group(1).strip().lower(), float(m.group(2)))
    return out


def _flatten(obj, prefix="") -> dict[str, object]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def lookup(key: str, data: dict, printed: dict[str, float]):
    """The value of ``key`` (module docstring), or None."""
    flat = _flatten(data)
    if key in flat:
        return flat[key]
    leaves = [v for k, v in flat.items() if k.split(".")[-1] == key]
    if len(leaves) == 1:
        return leaves[0]
    k = key.lower()
    for cand in (k, f"{k} attributes right" if k == "all" else None, f"{k} accuracy"):
        if cand and cand in printed:
            return printed[cand]
    starts = [v for label, v in printed.items() if label.startswith(k + " ")]
    return starts[0] if len(starts) == 1 else None


def evaluate_checks(checks: list[Check], rc: int, stdout: str, stderr: str, json_data: dict) -> list[str]:
    """The failed checks, each as a line naming what was found."""
    failed = []
    want_exit = next((int(c.value) for c in checks if c.kind == "exit"), 0)
    if rc != want_exit:
        failed.append(f"exit code {rc}, expected {want_exit}")
    printed = _numbers_printed(stdout)
    for c in checks:
        if c.kind == "text":
            if c.key not in stdout and c.key not in stderr:
                failed.append(f"{c.text} not in the output")
        elif c.kind == "number":
            got = lookup(c.key, json_data, printed)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                failed.append(f"{c.text}: no number {c.key!r} in the output or the --json file")
                continue
            ok = {
                "==": round(float(got), c.decimals) == round(c.value, c.decimals),
                ">=": got >= c.value,
                "<=": got <= c.value,
                "~": abs(got - c.value) <= c.tol,
            }[c.op]
            if not ok:
                failed.append(f"{c.text}: got {got}")
    return failed


@dataclass
class Result:
    step: Step
    status: str  # pass, fail, timeout, not-run
    seconds: float = 0.0
    rc: int | None = None
    detail: str = ""
    tail: str = ""


def _json_out(step: Step, cwd: Path) -> dict:
    m = re.search(r"--json[ =](\S+)", _expand(step.text, step.prelude))
    if not m:
        return {}
    p = cwd / os.path.expanduser(m.group(1).strip("'\""))
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _communicate(proc: subprocess.Popen, timeout: float, interrupt: bool) -> tuple[str, str]:
    """Wait for ``proc`` (TimeoutExpired after ``timeout`` s); with ``interrupt``, send SIGINT to its group once
    its stderr shows a progress bar (or after INTERRUPT_WAIT s), as a person pressing Ctrl-C would."""
    if not interrupt:
        return proc.communicate(timeout=timeout)
    chunks = {"out": [], "err": []}

    def pump(stream, key):
        for line in iter(lambda: stream.read(256), ""):
            chunks[key].append(line)

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True)]
    threads.append(threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True))
    for t in threads:
        t.start()
    t0, sent = time.monotonic(), False
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        if elapsed > timeout:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        if not sent and ("%|" in "".join(chunks["err"]) or elapsed > INTERRUPT_WAIT):
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=5)
    return "".join(chunks["out"]), "".join(chunks["err"])


def _default_sigint():
    """In the child: SIGINT back to its default, so a runner started in the background (where the shell ignores
    SIGINT, and condiff keeps an ignored SIGINT ignored) still lets the Ctrl-C steps be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(step: Step, cwd: Path, env: dict, timeout: float | None = None) -> Result:
    script = "\n".join([*step.prelude, step.text]) + "\n"
    limit = timeout or step.timeout
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    try:
        out, err = _communicate(proc, limit, step.interrupt)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return Result(step, "timeout", time.perf_counter() - t0, None, f"over {limit:.0f} s")
    secs = time.perf_counter() - t0
    if step.kind != "command":
        ok = proc.returncode == 0
        return Result(step, "pass" if ok else "fail", secs, proc.returncode, "" if ok else "setup failed", err[-2000:])
    failed = evaluate_checks(step.checks, proc.returncode, out, err, _json_out(step, cwd))
    return Result(step, "fail" if failed else "pass", secs, proc.returncode, "; ".join(failed), (out + err)[-2000:])


def run_chain(chain: Chain, cwd: Path, env: dict | None = None, timeout: float | None = None) -> list[Result]:
    """Run a chain's steps in order in ``cwd``; after a failure the rest are ``not-run``."""
    env = env or _env(Path(sys.executable).parent, cwd)
    results, broken = [], False
    for s in chain.steps:
        if broken:
            results.append(Result(s, "not-run", detail="an earlier step of its chain did not pass"))
            continue
        r = run_step(s, cwd, env, timeout)
        results.append(r)
        broken = r.status != "pass"
    return results


# ---- report ------------------------------------------------------------------------------------------------------


def table(results: list[Result], width: int = 90) -> str:
    rows = ["| where | tier | status | s | command | checks / detail |", "|---|---|---|---:|---|---|"]
    for r in results:
        if r.step.kind != "command":
            if r.status in ("pass", "not-run"):
                continue
        cmd = " ".join(r.step.shown.split())
        cmd = cmd if len(cmd) <= width else cmd[: width - 3] + "..."
        checks = ", ".join(c.text for c in r.step.checks)
        detail = "; ".join(x for x in (checks, r.detail) if x)
        cmd, detail = cmd.replace("|", "\\|"), detail.replace("|", "\\|")
        rows.append(f"| {r.step.where} | {r.step.tier} | {r.status} | {r.seconds:.1f} | `{cmd}` | {detail} |")
    return "\n".join(rows)


def to_json(results: list[Result]) -> list[dict]:
    return [
        {
            "where": r.step.where,
            "kind": r.step.kind,
            "tier": r.step.tier,
            "command": r.step.shown,
            "checks": [c.text for c in r.step.checks],
            "status": r.status,
            "seconds": round(r.seconds, 2),
            "exit_code": r.rc,
            "detail": r.detail,
            "output_tail": r.tail,
        }
        for r in results
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=("fast", "slow", "all"), default="fast", help="which chains to run")
    ap.add_argument("--match", default=None, help="run only chains with a command matching this regex")
    ap.add_argument("--skip", default=None, help="leave out the chains with a command matching this regex")
    ap.add_argument("--page", default=None, help="run only the chains of this page (README.md, docs/solvers.md)")
    ap.add_argument("--list", action="store_true", help="list the commands, chains and tiers; run nothing")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--timeout", type=float, default=None, help="per-step timeout (default: the tier's)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    chains = build_chains()
    if args.list:
        for k, ch in enumerate(chains):
            for s in ch.steps:
                tag = s.tier if s.kind == "command" else s.kind
                checks = f"  [expect {', '.join(c.text for c in s.checks)}]" if s.checks else ""
                print(f"{k:3d} {tag:7s} {s.where:24s} {' '.join(s.shown.split())[:100]}{checks}")
        return 0
    chosen = [
        c
        for c in chains
        if (args.tier == "all" or c.tier == args.tier)
        and (args.match is None or any(re.search(args.match, s.shown) for s in c.commands))
        and (args.page is None or c.commands[0].page == args.page)
        and (args.skip is None or not any(re.search(args.skip, s.shown) for s in c.commands))
    ]
    tmp = Path(tempfile.mkdtemp(prefix="condiff-docs-"))
    results: list[Result] = []
    try:
        scratch_copy(tmp / "clone")
        env = _env(Path(sys.executable).parent, tmp / "clone")
        for ch in chosen:
            print(f"chain {ch.id} ({len(ch.commands)} command(s), {ch.tier})", file=sys.stderr, flush=True)
            for r in run_chain(ch, tmp / "clone", env, args.timeout):
                results.append(r)
                if r.step.kind == "command" or r.status not in ("pass", "not-run"):
                    print(f"  {r.status:8s} {r.seconds:7.1f}s {r.step.where} {r.detail}", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"scratch kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results), indent=1) + "\n")
    bad = [r for r in results if r.status in ("fail", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
