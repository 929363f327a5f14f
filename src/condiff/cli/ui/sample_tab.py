"""The Sample tab: one prompt, a solver and the guidance stack of `condiff sample`, with a live preview of the
guided x0 estimate after every solver step, the judge's reading of every image and the equivalent command."""

from __future__ import annotations

import gradio as gr

from condiff.cli.ui import runs, widgets
from condiff.cli.ui.jobs import message_of
from condiff.cli.ui.runs import SampleSettings

CLASSIFIERS = ["none", "clean", "noisy", "ppap"]
OUTPUTS = ("status", "preview", "frames", "gallery", "readings", "command", "record")


def settings_of(
    model,
    pipeline,
    prompt,
    solver,
    steps,
    cfg,
    seed,
    n,
    ag,
    ag_space,
    pag,
    pag_layers,
    cfg_rescale,
    interval,
    negative,
    classifier,
    cg_scale,
    cg_attribute,
) -> SampleSettings:
    """The form's fields as `condiff sample` options (an empty field: the option is not given)."""
    text, number = runs.optional_text, runs.optional_number
    guidance = dict(runs.GUIDANCE_DEFAULTS)
    guidance.update(
        ag=number(ag, "--ag"),
        ag_space=text(ag_space),
        pag=number(pag, "--pag"),
        pag_layers=text(pag_layers),
        cfg_rescale=number(cfg_rescale, "--cfg-rescale"),
        guidance_interval=text(interval),
        negative_prompt=text(negative),
        classifier=None if text(classifier) in (None, "none") else text(classifier),
        cg_scale=number(cg_scale, "--cg-scale"),
        cg_attribute=text(cg_attribute),
    )
    return SampleSettings(
        model=text(model) or "shapes",
        pipeline=text(pipeline),
        prompt=prompt or "",
        solver=text(solver) or "dpmpp-2m",
        steps=steps,
        cfg=cfg,
        n=n,
        seed=seed,
        guidance=guidance,
    )


def gallery_items(images, readings) -> list:
    """(image, caption) per sample: its number and what the judge read."""
    rows = (readings or {}).get("images") or [None] * images.shape[0]
    out = []
    for k, (img, row) in enumerate(zip(widgets.each(images), rows)):
        caption = f"#{k + 1}"
        if row is not None:
            caption += f": {runs.reading_caption(row)} ({'matches' if row['all'] else 'does not match'})"
        out.append((img, caption))
    return out


def done_text(record: dict) -> str:
    n = record["n"]
    what = f"{n} image{'s' if n != 1 else ''}" if record.get("pipeline") is None else f"a grid of {n}"
    text = f"done: {what}, {record['nfe']} NFE, {record['seconds']:.2f} s"
    summary = widgets.judge_summary(record.get("readings"))
    note = record.get("solver_fallback")
    return widgets.plain(text + (f"; {summary}" if summary else "") + (f". note: {note}" if note else ""))


def handler(state: widgets.AppState):
    """The Sample button's generator (yields dicts of component updates, keyed by OUTPUTS)."""

    def work(settings, report, stop):
        def step(i, total, x0_hat, nfe):
            image = None if x0_hat is None else widgets.tiles(x0_hat.clamp(-1, 1))
            report("step", (i, total, nfe, image))

        workdir = state.workdir() if settings.pipeline else None  # `condiff sample --pipeline` writes files
        return runs.sample_images(settings, state.models, step=step, stop=stop, workdir=workdir)

    def run(*fields, request: gr.Request = None, progress=gr.Progress()):
        try:
            settings = settings_of(*fields)
            if settings.pipeline is None:
                runs.prepare_sample(settings)  # every check before the queue's slot is spent on loading
        except Exception as e:  # noqa: BLE001  one line on the page, never a traceback
            yield {"status": widgets.error_text(message_of(e))}
            return
        yield {"status": "running ...", "frames": "", "preview": None}
        gate, step, total = widgets.FrameGate(), 0, settings.steps
        for kind, payload in state.jobs.run(widgets.session_of(request), work, settings):
            if kind == "step":
                step, total, nfe, image = payload
                if gate.admit(step, total):
                    progress((step, total), desc="sampling", unit="steps")
                    frames = f"preview: step {step} of {total} (NFE {nfe}); {gate.shown} frames shown"
                    yield {"frames": frames, "preview": image}
            elif kind == "done":
                r = payload.record
                images = payload.images
                yield {
                    "status": done_text(r),
                    "gallery": gallery_items(images, r.get("readings")),
                    "readings": widgets.readings_rows(r.get("readings")),
                    "command": r["command"],
                    "record": widgets.pretty(r),
                    "frames": f"preview: {gate.shown} frames shown for {r['steps']} solver steps"
                    if r.get("pipeline") is None
                    else "no live preview for a diffusers pipeline",
                }
            elif kind == "error":
                yield {"status": widgets.error_text(payload)}
            else:
                yield {"status": widgets.stopped_text(f"after step {step} of {total}")}

    return run


def build(state: widgets.AppState):
    """The tab's components and events (inside a gr.Blocks)."""
    from condiff.models.base import BUNDLED
    from condiff.solvers import DESCRIPTIONS

    with gr.Tab("Sample", id="sample", elem_id="tab-sample"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(
                    list(BUNDLED),
                    value="shapes",
                    allow_custom_value=True,
                    label="model",
                    info="a bundled model, or the path of a condiff model folder",
                    elem_id="sample-model",
                )
                pipeline = gr.Textbox(
                    label="diffusers pipeline folder (instead of the model)",
                    placeholder="path/to/stable-diffusion-folder",
                    elem_id="sample-pipeline",
                )
                prompt = gr.Textbox(value=runs.EXAMPLE_PROMPT, label="prompt", elem_id="sample-prompt")
                with gr.Row():
                    solver = gr.Dropdown(list(DESCRIPTIONS), value="dpmpp-2m", label="solver", elem_id="sample-solver")
                    steps = gr.Number(20, label="steps", elem_id="sample-steps")
                    cfg = gr.Number(3.0, label="CFG scale", elem_id="sample-cfg")
                with gr.Row():
                    seed = gr.Number(0, label="seed", elem_id="sample-seed")
                    n = gr.Number(4, label=f"batch size (1-{runs.MAX_IMAGES} images)", elem_id="sample-n")
                with gr.Accordion("guidance (on top of CFG; empty = off)", open=False, elem_id="sample-guidance"):
                    with gr.Row():
                        ag = gr.Textbox(label="AG gamma (--ag)", placeholder="off", elem_id="sample-ag")
                        ag_space = gr.Radio(["x0", "eps"], value=None, label="AG space (--ag-space)")
                    with gr.Row():
                        pag = gr.Textbox(label="PAG scale (--pag)", placeholder="off", elem_id="sample-pag")
                        pag_layers = gr.Textbox(label="PAG layers (--pag-layers)", placeholder="mid")
                    with gr.Row():
                        rescale = gr.Textbox(
                            label="CFG rescale (--cfg-rescale)", placeholder="off", elem_id="sample-rescale"
                        )
                        interval = gr.Textbox(
                            label="interval LO,HI (--guidance-interval)",
                            placeholder="200,800",
                            elem_id="sample-interval",
                        )
                    negative = gr.Textbox(label="negative prompt (--negative-prompt)", elem_id="sample-negative")
                    with gr.Row():
                        classifier = gr.Dropdown(
                            CLASSIFIERS, value="none", label="classifier (--classifier)", elem_id="sample-classifier"
                        )
                        cg_scale = gr.Textbox(
                            label="classifier scale (--cg-scale)", placeholder="1", elem_id="sample-cg-scale"
                        )
                        cg_attribute = gr.Dropdown(
                            ["color", "shape", "size", "position"], value=None, label="attribute (--cg-attribute)"
                        )
                with gr.Row():
                    go = gr.Button("Sample", variant="primary", elem_id="sample-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="sample-stop")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="sample-status")
                with gr.Row():
                    preview = gr.Image(
                        label="live preview: x0 estimate at each step",
                        format="png",
                        interactive=False,
                        height=300,
                        elem_id="sample-preview",
                    )
                    gallery = gr.Gallery(
                        label="samples",
                        format="png",
                        object_fit="contain",
                        columns=2,
                        height=300,
                        elem_id="sample-gallery",
                    )
                frames = gr.Markdown("", elem_id="sample-frames")
                readings = gr.Dataframe(
                    headers=widgets.READING_HEADERS,
                    label="the judge's reading of each image (condiff eval's labeller / scorer)",
                    interactive=False,
                    wrap=True,
                    column_widths=["10%", "35%", "15%", "40%"],
                    elem_id="sample-readings",
                )
                command = gr.Textbox(
                    label="the same run at the command line",
                    buttons=["copy"],
                    interactive=False,
                    elem_id="sample-command",
                )
                with gr.Accordion("run record (JSON)", open=False, elem_id="sample-record-box"):
                    record = gr.Textbox(show_label=False, lines=4, max_lines=16, elem_id="sample-record")
    inputs = [model, pipeline, prompt, solver, steps, cfg, seed, n, ag, ag_space, pag, pag_layers, rescale]
    inputs += [interval, negative, classifier, cg_scale, cg_attribute]
    outputs = dict(
        status=status,
        preview=preview,
        frames=frames,
        gallery=gallery,
        readings=readings,
        command=command,
        record=record,
    )

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
