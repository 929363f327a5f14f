"""The web app: a gr.Blocks with the Sample, Compare, Edit and Restore tabs, its queue, and its launch on a
local address (no share link, no analytics)."""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: local only, no telemetry

import gradio as gr  # noqa: E402

from condiff.cli.ui import compare_tab, edit_tab, restore_tab, sample_tab, widgets  # noqa: E402
from condiff.errors import ConfigError  # noqa: E402

QUEUE_SIZE = 16  # requests waiting at most; more are refused with gradio's "queue is full" message
CACHE = (600, 3600)  # every 10 min, gradio deletes the files it served that are over an hour old

INTRO = (
    "# condiff\n"
    "Conditional diffusion on your machine: **Sample** with any solver and guidance stack (a live preview of "
    "the x0 estimate at each step), **Compare** settings side by side, **Edit** an image from one caption to "
    "another, **Restore** (inpaint a painted mask, super-resolve, colorize). Each result shows the `condiff` "
    "command that repeats it. One run computes at a time; the others wait in the queue. Local only."
)


def build_app(state: widgets.AppState | None = None) -> gr.Blocks:
    """The app's Blocks with its queue (``default_concurrency_limit=1``, ``max_size=QUEUE_SIZE``); every run
    event shares one concurrency slot (``concurrency_id="compute"``)."""
    state = widgets.AppState() if state is None else state
    with gr.Blocks(title="condiff", analytics_enabled=False, delete_cache=CACHE) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Tabs(elem_id="tabs"):
            sample_tab.build(state)
            compare_tab.build(state)
            edit_tab.build(state)
            restore_tab.build(state)
    demo.condiff_state = state
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def launch(demo: gr.Blocks, host: str, port: int) -> str:
    """Serve ``demo`` on host:port without blocking; returns the local URL. A port in use is a ConfigError."""
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            prevent_thread_lock=True,
            quiet=True,
            show_error=False,
            ssr_mode=False,
            footer_links=[],
            mcp_server=False,
            pwa=False,
        )
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port}: {' '.join(str(e).split())} (give another --port)") from None
    return f"http://{host}:{port}"
