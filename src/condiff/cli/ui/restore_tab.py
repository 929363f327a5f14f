"""The Restore tab: `condiff restore`'s steered inpainting (the mask painted in the browser),
super-resolution and colorization, with a live preview and the equivalent command."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from condiff.cli.ui import runs, widgets
from condiff.cli.ui.jobs import message_of
from condiff.cli.ui.runs import RestoreSettings
from condiff.errors import ConfigError

SHOWN = {"inpaint": "input (gray: filled)", "sr": "input, enlarged", "colorize": "input's luminance"}
EDITOR_SIDE = 256  # the input is shown this large in the mask editor (nearest neighbour)
TASK_HELP = {
    "inpaint": "inpaint: paint the area to fill on the image below (white brush); the rest is kept exactly",
    "sr": "sr: upload a low-resolution image whose side divides the model's (8x8 for x4 on shapes)",
    "colorize": "colorize: upload an image; its luminance is kept and the colors are sampled",
}


def editor_value(image_path):
    """The mask editor's value for an uploaded input: the image enlarged to about EDITOR_SIDE pixels, no
    strokes yet."""
    if not image_path:
        return None
    from PIL import Image

    try:
        with Image.open(image_path) as im:
            im = im.convert("RGB")
            scale = max(1, EDITOR_SIDE // max(im.size))
            big = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    except Exception:  # noqa: BLE001  the run itself names an unreadable image
        return None
    return {"background": big, "layers": [], "composite": big}


def mask_file(editor, image_path, workdir: Path):
    """The painted strokes as `condiff restore --mask`'s file (white = fill) at the input's size, or None."""
    from PIL import Image

    if not editor or not image_path:
        return None
    try:
        with Image.open(image_path) as im:
            size = im.size
    except Exception:  # noqa: BLE001
        return None
    mask = runs.mask_from_strokes(editor.get("layers"), size)
    if mask is None:
        return None
    path = workdir / "mask.png"
    mask.save(path)
    return str(path)


def handler(state: widgets.AppState):
    def work(settings, workdir, report, stop):
        def step(i, total, x0_hat, nfe):
            image = None if x0_hat is None else widgets.tiles(x0_hat.clamp(-1, 1))
            report("step", (i, total, nfe, image))

        return runs.restore_image(settings, state.models, workdir, step=step, stop=stop)

    def run(
        task,
        image,
        editor,
        prompt,
        steps,
        seed,
        recurrence,
        solver,
        model="shapes",
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        workdir = state.workdir()
        mask = mask_file(editor, image, workdir) if task == "inpaint" else None
        if task == "inpaint" and image and mask is None:
            raise ConfigError("--task inpaint needs a mask: paint the area to fill on the image (white brush)")
        settings = RestoreSettings(
            task=task,
            image=image,
            mask=mask,
            prompt=prompt or "",
            steps=steps,
            seed=seed,
            recurrence=recurrence,
            solver=runs.optional_text(solver) or "ddpm",
            model=runs.optional_text(model) or "shapes",
        )
        yield {"status": "running ...", "preview": None}
        gate = widgets.FrameGate()
        for kind, payload in state.jobs.run(widgets.session_of(request), work, settings, workdir):
            if kind == "step":
                i, total, nfe, img = payload
                if gate.admit(i, total):
                    progress((i, total), desc="restoring", unit="steps")
                    yield {"preview": img}
            elif kind == "done":
                r = payload.record
                reading = (r["labels"] or {}).get("output")
                text = (
                    f"done: {r['task']}, {r['nfe']} NFE, {r['seconds']:.2f} s, "
                    f"max|A x - y| {r['measurement_error']:.1e}"
                    + (f"; labeller reads '{runs.reading_caption({'read': reading})}'" if reading else "")
                    + (f". note: {r['notice']}" if r.get("notice") else "")
                )
                yield {
                    "status": widgets.plain(text),
                    "gallery": [
                        (widgets.tiles(payload.shown.clamp(-1, 1)), SHOWN[r["task"]]),
                        (widgets.tiles(payload.restored.clamp(-1, 1)), "restored"),
                    ],
                    "files": [str(payload.output)] + ([mask] if mask else []),
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
    from condiff.cli.restore import TASKS
    from condiff.models.base import BUNDLED
    from condiff.solvers import DESCRIPTIONS

    with gr.Tab("Restore", id="restore", elem_id="tab-restore"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    list(BUNDLED), value="shapes", allow_custom_value=True, label="model", elem_id="restore-model"
                )
                task = gr.Radio(list(TASKS), value="inpaint", label="task", elem_id="restore-task")
                hint = gr.Markdown(TASK_HELP["inpaint"], elem_id="restore-hint")
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="input image",
                    height=200,
                    elem_id="restore-image",
                )
                editor = gr.ImageEditor(
                    type="numpy",
                    image_mode="RGBA",
                    sources=[],
                    label="mask: paint the area to fill",
                    brush=gr.Brush(default_size=16, colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
                    transforms=(),
                    layers=False,
                    format="png",
                    canvas_size=(EDITOR_SIDE, EDITOR_SIDE),
                    height=EDITOR_SIDE + 120,
                    elem_id="restore-mask",
                )
                prompt = gr.Textbox(label="prompt (empty: unconditional)", elem_id="restore-prompt")
                with gr.Row():
                    steps = gr.Number(50, label="steps", elem_id="restore-steps")
                    seed = gr.Number(0, label="seed", elem_id="restore-seed")
                    recurrence = gr.Number(4, label="self-recurrence", elem_id="restore-recurrence")
                    solver = gr.Dropdown(list(DESCRIPTIONS), value="ddpm", label="solver", elem_id="restore-solver")
                with gr.Row():
                    go = gr.Button("Restore", variant="primary", elem_id="restore-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="restore-stop")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="restore-status")
                with gr.Row():
                    preview = gr.Image(
                        label="live preview", format="png", interactive=False, height=256, elem_id="restore-preview"
                    )
                    gallery = gr.Gallery(
                        label="input | restored",
                        format="png",
                        object_fit="contain",
                        columns=2,
                        height=256,
                        elem_id="restore-gallery",
                    )
                files = gr.File(label="restored.png and mask.png", file_count="multiple", elem_id="restore-files")
                command = gr.Textbox(
                    label="the same restoration at the command line (beside the image and mask.png)",
                    buttons=["copy"],
                    interactive=False,
                    elem_id="restore-command",
                )
                with gr.Accordion("run record (JSON)", open=False, elem_id="restore-record-box"):
                    record = gr.Textbox(show_label=False, lines=4, max_lines=16, elem_id="restore-record")
    task.change(lambda t: TASK_HELP.get(t, ""), inputs=task, outputs=hint, queue=False)
    task.change(lambda t: gr.update(visible=t == "inpaint"), inputs=task, outputs=editor, queue=False)
    image.change(editor_value, inputs=image, outputs=editor, queue=False)
    outputs = dict(status=status, preview=preview, gallery=gallery, files=files, command=command, record=record)

    inputs = [task, image, editor, prompt, steps, seed, recurrence, solver, model]
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
