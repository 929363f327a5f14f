"""The Edit tab: an uploaded image edited from one caption to another with one of `condiff edit`'s methods;
source, reconstruction and edit side by side, the reconstruction PSNR, the labeller's reading of each and the
equivalent command."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from condiff.cli.ui import runs, widgets
from condiff.cli.ui.jobs import message_of
from condiff.cli.ui.runs import EditSettings

EXAMPLES = Path(__file__).resolve().parents[4] / "docs" / "examples"  # in a source checkout


def settings_of(image, source, target, method, steps, seed, method_opt, model="shapes") -> EditSettings:
    return EditSettings(
        model=runs.optional_text(model) or "shapes",
        image=image,
        source=source or "",
        target=target or "",
        method=runs.optional_text(method) or "",
        steps=steps,
        seed=seed,
        method_opt=runs.method_items(method_opt),
    )


def handler(state: widgets.AppState):
    def work(settings, report, stop):
        def phase(name, k, count):
            report("phase", (name, k, count))

        return runs.edit_image(settings, state.models, state.workdir(), phase=phase, stop=stop)

    def run(*fields, request: gr.Request = None, progress=gr.Progress()):
        settings = settings_of(*fields)
        yield {"status": "running ..."}
        for kind, payload in state.jobs.run(widgets.session_of(request), work, settings):
            if kind == "phase":
                name, k, count = payload
                progress((k, count), desc=name, unit="phases")
                yield {"status": f"{name} ..."}
            elif kind == "done":
                r = payload.record
                labels = r["labels"] or {}
                captions = {k: f" (labeller: {runs.reading_caption({'read': v})})" for k, v in labels.items()}
                psnr = r["reconstruction_psnr"]
                gallery = [
                    (widgets.tiles(payload.source), f"before: {r['from']}" + captions.get("source", "")),
                    (
                        widgets.tiles(payload.reconstruction),
                        f"reconstruction, {psnr:.2f} dB" + captions.get("reconstruction", ""),
                    ),
                    (widgets.tiles(payload.edited), f"after: {r['to']}" + captions.get("edited", "")),
                ]
                text = (
                    f"done: {r['method_label']}, reconstruction PSNR {psnr:.2f} dB, {r['seconds']:.2f} s"
                    + (
                        f"; labeller reads the edit as '{runs.reading_caption({'read': labels['edited']})}'"
                        if labels
                        else ""
                    )
                    + (f". note: {r['notice']}" if r.get("notice") else "")
                )
                yield {
                    "status": widgets.plain(text),
                    "gallery": gallery,
                    "psnr": f"reconstruction PSNR: {psnr:.2f} dB",
                    "file": str(payload.output),
                    "command": r["command"],
                    "record": widgets.pretty(r),
                }
            elif kind == "error":
                yield {"status": widgets.error_text(payload)}
            else:
                yield {"status": widgets.stopped_text()}

    def guarded(*args, request: gr.Request = None, progress=gr.Progress()):
        try:
            yield from run(*args, request=request, progress=progress)
        except Exception as e:  # noqa: BLE001  one line on the page, never a traceback
            yield {"status": widgets.error_text(message_of(e))}

    return guarded


def build(state: widgets.AppState):
    from condiff.inversion.methods import METHODS
    from condiff.models.base import BUNDLED

    with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    list(BUNDLED), value="shapes", allow_custom_value=True, label="model", elem_id="edit-model"
                )
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="image to edit (other sizes are centre-cropped and resized to the model's)",
                    height=256,
                    elem_id="edit-image",
                )
                source = gr.Textbox(label="source prompt (--from: what the image shows)", elem_id="edit-from")
                target = gr.Textbox(label="target prompt (--to)", elem_id="edit-to")
                with gr.Row():
                    method = gr.Dropdown(list(METHODS), value="edit-friendly", label="method", elem_id="edit-method")
                    steps = gr.Number(50, label="steps", elem_id="edit-steps")
                    seed = gr.Number(0, label="seed", elem_id="edit-seed")
                method_opt = gr.Textbox(
                    label="method options (--method-opt KEY=VALUE, comma-separated)",
                    placeholder="cfg=5, skip=10",
                    elem_id="edit-method-opt",
                )
                with gr.Row():
                    go = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
                if (EXAMPLES / "red_circle.png").is_file():
                    gr.Examples(
                        [[str(EXAMPLES / "red_circle.png"), "large red circle top-left", "large blue circle top-left"]],
                        inputs=[image, source, target],
                        label="example",
                    )
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="edit-status")
                gallery = gr.Gallery(
                    label="before | reconstruction | after",
                    format="png",
                    object_fit="contain",
                    columns=3,
                    height=300,
                    elem_id="edit-gallery",
                )
                psnr = gr.Markdown("", elem_id="edit-psnr")
                file = gr.File(label="the edit at the input's size (edited.png)", elem_id="edit-file")
                command = gr.Textbox(
                    label="the same edit at the command line (run it beside the image)",
                    buttons=["copy"],
                    interactive=False,
                    elem_id="edit-command",
                )
                with gr.Accordion("run record (JSON)", open=False, elem_id="edit-record-box"):
                    record = gr.Textbox(show_label=False, lines=4, max_lines=16, elem_id="edit-record")
    outputs = dict(status=status, gallery=gallery, psnr=psnr, file=file, command=command, record=record)

    inputs = [image, source, target, method, steps, seed, method_opt, model]
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
