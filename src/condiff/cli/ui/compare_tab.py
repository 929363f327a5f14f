"""The Compare tab: one prompt and seed under two or more settings, each row written as `condiff sample`
options (``--solver ddim --steps 8``, ``--solver dpmpp-2m --steps 8 --ag 0.995``), side by side with their NFE,
time and the judge's reading."""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from condiff.cli.ui import runs, widgets
from condiff.cli.ui.jobs import message_of
from condiff.cli.ui.runs import SampleSettings

DEFAULT_ROWS = "--solver ddim --steps 8\n--solver dpmpp-2m --steps 8\n--solver dpmpp-2m --steps 8 --ag 0.995"
TABLE_HEADERS = ["setting", "NFE", "network rows per sample", "seconds", "matches the prompt"]


def settings_of(model, prompt, seed, n, rows_text) -> list[tuple[str, SampleSettings]]:
    base = SampleSettings(model=runs.optional_text(model) or "shapes", prompt=prompt or "", seed=seed, n=n)
    base = runs.check_sample_numbers(replace(base, prompt=runs.check_prompt(base.prompt)))
    return runs.parse_rows(rows_text, base)


def handler(state: widgets.AppState):
    def work(rows, report, stop):
        results = []
        for k, (line, settings) in enumerate(rows):
            report("row", (k, len(rows), line))
            results.append((line, runs.sample_images(settings, state.models, stop=stop)))
        return results

    def run(model, prompt, seed, n, rows_text, request: gr.Request = None, progress=gr.Progress()):
        try:
            rows = settings_of(model, prompt, seed, n, rows_text)
        except Exception as e:  # noqa: BLE001
            yield {"status": widgets.error_text(message_of(e))}
            return
        yield {"status": f"running {len(rows)} settings ..."}
        done = 0
        for kind, payload in state.jobs.run(widgets.session_of(request), work, rows):
            if kind == "row":
                done, total, line = payload
                progress((done, total), desc=line, unit="settings")
                yield {"status": widgets.plain(f"running setting {done + 1} of {total}: {line}")}
            elif kind == "done":
                gallery, table, commands = [], [], []
                for line, res in payload:
                    r = res.record
                    summary = widgets.judge_summary(r["readings"])
                    label = f"{line} | NFE {r['nfe']} | {r['seconds']:.2f} s" + (f" | {summary}" if summary else "")
                    gallery.append((widgets.tiles(res.images), label))
                    right = sum(x["all"] for x in r["readings"]["images"]) if r["readings"] else None
                    table.append(
                        [
                            line,
                            r["nfe"],
                            round(r["network_rows_per_sample"], 2),
                            round(r["seconds"], 3),
                            "-" if right is None else f"{right}/{r['n']}",
                        ]
                    )
                    commands.append(r["command"])
                yield {
                    "status": widgets.plain(f"done: {len(payload)} settings, seed {payload[0][1].record['seed']}"),
                    "gallery": gallery,
                    "table": table,
                    "commands": "\n".join(commands),
                    "record": widgets.pretty([res.record for _, res in payload]),
                }
            elif kind == "error":
                yield {"status": widgets.error_text(payload)}
            else:
                yield {"status": widgets.stopped_text(f"during setting {done + 1}")}

    return run


def build(state: widgets.AppState):
    from condiff.models.base import BUNDLED

    with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    list(BUNDLED), value="shapes", allow_custom_value=True, label="model", elem_id="compare-model"
                )
                prompt = gr.Textbox(value=runs.EXAMPLE_PROMPT, label="prompt (every setting)", elem_id="compare-prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed (every setting)", elem_id="compare-seed")
                    n = gr.Number(1, label="images per setting", elem_id="compare-n")
                rows = gr.Textbox(
                    value=DEFAULT_ROWS,
                    lines=4,
                    max_lines=runs.MAX_ROWS + 2,
                    label=f"settings, one per line as condiff sample options (2 to {runs.MAX_ROWS})",
                    info="e.g. --solver dpmpp-2m --steps 8 --cfg 3 --pag 2; options left out take the CLI's defaults",
                    elem_id="compare-rows",
                )
                with gr.Row():
                    go = gr.Button("Compare", variant="primary", elem_id="compare-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="compare-status")
                gallery = gr.Gallery(
                    label="side by side (setting | NFE | time | judge)",
                    format="png",
                    columns=4,
                    object_fit="contain",
                    height=320,
                    elem_id="compare-gallery",
                )
                table = gr.Dataframe(
                    headers=TABLE_HEADERS,
                    label="each setting: NFE, network rows per sample, seconds, images the judge reads as the prompt",
                    interactive=False,
                    wrap=True,
                    column_widths=["40%", "10%", "20%", "12%", "18%"],
                    elem_id="compare-table",
                )
                commands = gr.Textbox(
                    label="the same runs at the command line",
                    lines=2,
                    buttons=["copy"],
                    interactive=False,
                    elem_id="compare-commands",
                )
                with gr.Accordion("run records (JSON)", open=False, elem_id="compare-record-box"):
                    record = gr.Textbox(show_label=False, lines=4, max_lines=16, elem_id="compare-record")
    outputs = dict(status=status, gallery=gallery, table=table, commands=commands, record=record)

    inputs = [model, prompt, seed, n, rows]
    keyed = widgets.streamed(gr, handler(state), len(inputs), outputs)
    event = go.click(
        keyed,
        inputs=inputs,
        outputs=list(outputs.values()),
        concurrency_id="compute",
        concurrency_limit=1,
        show_progress="minimal",
    )
    widgets.wire_stop(gr, stop, state.jobs, status, event)
    return outputs
