"""Runs of the web app: each in a worker thread, one at a time, stoppable, reported as a stream of events.

A tab's handler is a generator (gradio streams what it yields to the page). ``Jobs.run`` starts the work in a
daemon thread and yields what the work reports (``("step", ...)``, ``("phase", ...)``) and then one final
event: ``("done", result)``, ``("error", one line)`` or ``("stopped", None)``. The work takes a ``report``
function and a ``stop`` event: ``report`` raises ``Stopped`` once the run is stopped, and the networks of a
model check ``stop`` on every call (``runs.stoppable``), so a run stops at its next solver step or network
call. A run is stopped by ``Jobs.stop(session)`` (the page's Stop button) or when gradio drops its generator
(cancelled, or the page closed).

One lock serialises the work itself, whatever gradio's queue does: at most one run computes at a time, so
memory stays bounded (gradio's queue holds the waiting requests; ``app.QUEUE_SIZE``)."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Callable, Iterator

from condiff.cli.ui.runs import Stopped
from condiff.errors import CondiffError, one_line

FINAL = ("done", "error", "stopped")


def message_of(e: BaseException) -> str:
    """The one line a page shows for a failed run: a user error's own message; for anything else (a bug) its
    type and first line, with the traceback on the server's stderr."""
    if isinstance(e, CondiffError):
        return one_line(str(e))
    if hasattr(e, "format_message"):  # a click usage error
        return one_line(e.format_message())
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    text = one_line(str(e))
    text = text[:200] + ("..." if len(text) > 200 else "")
    return f"internal error ({type(e).__name__}: {text}); the server's log has the details"


class Jobs:
    """The runs of one app: a stop event per browser session, one lock for the work."""

    def __init__(self):
        self.lock = threading.Lock()
        self.flags: dict[str, threading.Event] = {}
        self.started = 0  # runs started, for tests and the log
        self.finished = 0

    def stop(self, session: str) -> bool:
        """Stop the session's run, if one is going; True when there was one."""
        flag = self.flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def run(self, session: str, work: Callable, *args) -> Iterator[tuple[str, object]]:
        """``work(*args, report=..., stop=...)`` in a worker thread; yields its events (module docstring)."""
        stop = threading.Event()
        previous = self.flags.get(session)
        if previous is not None:  # a new run of the same session stops the old one
            previous.set()
        self.flags[session] = stop
        events: queue.Queue = queue.Queue()

        def report(kind: str, payload=None):
            if stop.is_set():
                raise Stopped()
            events.put((kind, payload))

        def target():
            try:
                with self.lock:
                    if stop.is_set():
                        raise Stopped()
                    result = work(*args, report=report, stop=stop)
                events.put(("done", result))
            except Stopped:
                events.put(("stopped", None))
            except BaseException as e:  # noqa: BLE001  every failure becomes the page's one line
                events.put(("error", message_of(e)))
            finally:
                self.finished += 1

        self.started += 1
        threading.Thread(target=target, name="condiff-ui-run", daemon=True).start()
        try:
            while True:
                kind, payload = events.get()
                yield kind, payload
                if kind in FINAL:
                    return
        finally:  # also when gradio closes the generator: the work stops at its next step
            stop.set()
            if self.flags.get(session) is stop:
                del self.flags[session]
