"""What the tabs share: the app's state (models, runs, work folders), images for the page, and the one-line
status texts. Imports gradio only inside the functions that build components."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from condiff.cli.ui.jobs import Jobs
from condiff.cli.ui.runs import Models

SCALE = 8  # 32x32 images shown at 256x256 (nearest neighbour: the pixels stay visible)
KEEP_WORKDIRS = 16  # the newest run folders kept; older ones are removed
LIVE_STEPS = 200  # runs of up to this many steps show every step's preview frame
FRAME_INTERVAL = 0.2  # longer runs show a frame at most this often (5 a second: at 20 a second a browser on a busy
# 2-core machine fell behind, and clicks waited on it for minutes)


@dataclass
class AppState:
    """One app's shared state: the model cache, the runs, and a temporary folder for what runs write."""

    models: Models = field(default_factory=Models)
    jobs: Jobs = field(default_factory=Jobs)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="condiff-ui-")))
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def workdir(self) -> Path:
        """A fresh folder for one run's files; only the newest KEEP_WORKDIRS are kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=f"run{next(self.counter):05d}-", dir=self.root))
        old = sorted(p for p in self.root.iterdir() if p.is_dir())
        for p in old[:-KEEP_WORKDIRS]:
            shutil.rmtree(p, ignore_errors=True)
        return d

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


class FrameGate:
    """Which preview frames go to the page: every step of a run of up to LIVE_STEPS steps; of a longer one,
    the first, the last, and then at most one per FRAME_INTERVAL seconds (the rest are skipped, not queued)."""

    def __init__(self):
        self.last = -math.inf
        self.shown = 0

    def admit(self, step: int, total: int) -> bool:
        now = time.monotonic()
        if total <= LIVE_STEPS or step in (1, total) or now - self.last >= FRAME_INTERVAL:
            self.last = now
            self.shown += 1
            return True
        return False


def session_of(request) -> str:
    """The browser session of a request (one per page load)."""
    return str(getattr(request, "session_hash", None) or "local")


def tiles(images, scale: int = SCALE, ncols: Optional[int] = None):
    """(B, C, H, W) in [-1, 1] as one PIL grid image, enlarged ``scale`` times (a single image: no border)."""
    from condiff.data.images import grid_image

    b = images.shape[0]
    if b == 1:
        return grid_image(images, ncols=1, scale=scale, pad=0)
    return grid_image(images, ncols=ncols or max(1, math.ceil(math.sqrt(b))), scale=scale)


def each(images, scale: int = SCALE) -> list:
    """Each image of a (B, C, H, W) batch as its own enlarged PIL image."""
    return [tiles(images[k : k + 1], scale) for k in range(images.shape[0])]


_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>#+!|~])")


def plain(text: str) -> str:
    """``text`` escaped for a Markdown component, so it shows as written."""
    return _MARKDOWN.sub(r"\\\1", str(text))


def error_text(message: str) -> str:
    return f"error: {plain(message)}"


def stopped_text(what: str = "") -> str:
    return "stopped" + (f" {plain(what)}" if what else "")


def pretty(record: dict) -> str:
    """A run's record as indented JSON for the page."""
    return json.dumps(record, indent=1, default=str)


def readings_rows(readings: Optional[dict], labels: Optional[list[str]] = None) -> list[list]:
    """The judge's reading of each image as table rows: image, what was read, whether each named attribute
    matches the prompt."""
    from condiff.cli.ui.runs import reading_caption

    if not readings:
        return []
    rows = []
    for k, row in enumerate(readings["images"]):
        named = ", ".join(f"{a} {'yes' if ok else 'no'}" for a, ok in row["match"].items())
        label = labels[k] if labels else f"#{k + 1}"
        rows.append([label, reading_caption(row), "yes" if row["all"] else "no", named or "(the prompt names none)"])
    return rows


READING_HEADERS = ["image", "read", "matches the prompt", "per attribute"]


def judge_summary(readings: Optional[dict]) -> str:
    """'labeller: 3/4 match the prompt (color 1.00, shape 0.75)'."""
    if not readings:
        return ""
    rows = readings["images"]
    right = sum(r["all"] for r in rows)
    per = ", ".join(f"{k} {v:.2f}" for k, v in readings["accuracy"].items() if k != "all")
    return f"{readings['judge']}: {right}/{len(rows)} match the prompt" + (f" ({per})" if per else "")


def wire_stop(gr, button, jobs: Jobs, status, event) -> None:
    """A Stop button: it cancels ``event`` in gradio's queue (``cancels=``: a waiting request leaves the queue,
    a running one stops streaming) and sets the session's stop event, so the run's worker thread stops at its
    next solver step or network call."""

    def stop(request):
        return "stopped: the run ends at its next step" if jobs.stop(session_of(request)) else "stopped"

    stop.__annotations__["request"] = gr.Request  # gradio passes the request to a parameter of this type
    button.click(fn=stop, inputs=None, outputs=[status], cancels=[event], queue=False)


def streamed(gr, run, count: int, outputs: dict):
    """The gradio event function of a tab's handler ``run(*fields, request=, progress=)`` (a generator of
    {output key: value}): ``count`` positional parameters, one per input, then the request and the progress
    tracker, which gradio passes by position (found by the annotation and the default); it yields
    {component: value}."""

    def event(*args):
        *fields, request, progress = args
        for update in run(*fields, request=request, progress=progress):
            yield {outputs[k]: v for k, v in update.items()}

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(f"field{k}", kind) for k in range(count)]
    params.append(inspect.Parameter("request", kind, annotation=gr.Request))
    params.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    event.__signature__ = inspect.Signature(params)
    event.__annotations__ = {"request": gr.Request}
    return event
