"""``condiff ui``: the local web app (condiff.cli.ui.app). gradio is imported only when the command runs."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
import time

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, Interrupted, check_int

LOOPBACK = ("localhost",)


def is_local(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse, before gradio is imported, a host this machine cannot bind or a port already in use."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can serve on ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            raise ConfigError(
                f"cannot serve on {host}:{port}: {e.strerror or e} (another server, or another condiff ui, uses it; "
                "give another --port)"
            ) from None


def ui_cmd(
    port: int = typer.Option(7860, help="the port to serve on, 1-65535"),
    host: str = typer.Option(
        "127.0.0.1", help="the address to bind (default: this machine only; the app has no login)"
    ),
    threads: ThreadsOpt = None,
):
    """A local web app: sample (live preview), compare, edit and restore in the browser; Ctrl-C stops it.

    Binds to 127.0.0.1 (no share link, no analytics); one run computes at a time, the rest wait in a queue."""
    check_int("--port", port, 1, 65535)
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"--host must be an address such as 127.0.0.1, got {host!r}")
    threads = common.use_threads(threads)
    check_port(host, port)
    try:
        from condiff.cli.ui.app import build_app, launch
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "gradio":
            raise
        raise ConfigError(
            "condiff ui needs gradio: pip install 'condiff[ui]' (in a checkout: pip install -r requirements.txt)"
        ) from None
    if not is_local(host):
        typer.echo(
            f"warning: --host {host} serves the app beyond this machine; it has no login, anyone who can reach "
            "the port can run it",
            err=True,
        )
    demo = build_app()
    try:
        url = launch(demo, host, port)
        typer.echo(f"condiff ui: serving on {url} ({threads} thread{'s' if threads != 1 else ''}); Ctrl-C stops it")
        while True:
            time.sleep(0.5)
    except Interrupted as e:
        e.kept = "the web app stopped (it keeps no files)"
        raise
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "Closing server running on port: ..."
            demo.close()
        demo.condiff_state.close()
