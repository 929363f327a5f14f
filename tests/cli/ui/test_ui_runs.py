"""`condiff ui` without a browser: what the tabs run (condiff.cli.ui.runs) and their handlers. The command each
result shows repeats it exactly (the CLI's PNG equals the app's images), the judge's readings are `condiff
eval`'s, one preview frame per solver step, a Stop stops a run at its next step, and every bad input is one
line on the page (never a traceback) after which the handler still works. Few steps on the bundled shapes
model; docs/ui.md."""

import inspect
import json
import shlex
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.cli import common, main
from condiff.cli.ui import runs
from condiff.cli.ui.jobs import Jobs
from condiff.data import labeller
from condiff.data.images import grid_image
from condiff.errors import CondiffError
from condiff.evaluation.evaluate import generate_counted

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"
PROMPT = "large red circle top-left"


@pytest.fixture(scope="module")
def models():
    return runs.Models()


@pytest.fixture(scope="module")
def state(tmp_path_factory, models):
    from condiff.cli.ui.widgets import AppState

    s = AppState(models=models, root=tmp_path_factory.mktemp("ui"))
    yield s
    s.close()


def noop(*args, **kwargs):
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run_shown(command: str, cwd: Path, capsys, monkeypatch, **paths):
    """Run a command the app shows (``condiff ...``) in ``cwd``, with file names replaced by ``paths``."""
    words = shlex.split(command)
    assert words[0] == "condiff"
    argv = [paths.get(w, w) for w in words[1:]]
    monkeypatch.chdir(cwd)
    main(argv)
    capsys.readouterr()


# ---- sample ---------------------------------------------------------------------------------------------------


def test_sample_frames_readings_and_command_repeat_the_cli(models, tmp_path, capsys, monkeypatch):
    """One preview frame per step (each the batch's x0 estimate); the labeller's readings and accuracy are
    condiff.data.labeller's / family.score's on the same images; the command writes exactly these pixels."""
    seen = []
    s = runs.SampleSettings(prompt=PROMPT, solver="dpmpp-2m", steps=6, cfg=3, n=3, seed=5)
    res = runs.sample_images(s, models, step=lambda i, total, x0, nfe: seen.append((i, total, tuple(x0.shape), nfe)))
    r = res.record
    assert [k for k, *_ in seen] == list(range(1, 7)) and r["preview_frames"] == 6 == len(seen)
    assert all(shape == (3, 3, 32, 32) and total == 6 for _, total, shape, _ in seen)
    assert r["nfe"] == 6 and res.images.shape == (3, 3, 32, 32)
    # the same library call, made here: generator draws, labels and the eval score
    family, sol, _, spc, _ = common.sampling_setup("shapes", "dpmpp-2m", 6, 3.0, None, None, None, None, None)
    raw = family.parse_prompt(PROMPT).expand(3, -1)
    m = common.load_model("shapes")
    images, nfe, _ = generate_counted(m, raw, sol, 6, 3.0, torch.Generator().manual_seed(5), spc, 256)
    assert torch.equal(images, res.images)
    assert [row["labels"] for row in r["readings"]["images"]] == labeller.label(images).tolist()
    assert r["readings"]["accuracy"] == family.score(images, family.attribute_targets(raw))
    assert r["readings"]["named"] == ["shape", "color", "size", "position"]
    # the command the page shows, run by the CLI
    assert r["command"].startswith("condiff sample --model shapes --prompt 'large red circle top-left' ")
    run_shown(r["command"], tmp_path, capsys, monkeypatch)
    assert np.array_equal(pixels(tmp_path / "grid.png"), np.asarray(grid_image(res.images, ncols=2)))
    assert json.loads((tmp_path / "grid.json").read_text())["nfe"] == r["nfe"]


def test_sample_guidance_stack_command(models, tmp_path, capsys, monkeypatch):
    """AG + PAG + classifier guidance from the form's fields: the command carries every flag and repeats the
    images; a partial prompt is judged on the attributes it names only."""
    from condiff.cli.ui.sample_tab import settings_of

    fields = ["shapes", "", "small blue square", "dpmpp-2m", 5.0, 3.0, 1.0, 2.0]
    fields += ["0.995", None, " 2 ", "mid", "", "", "", "clean", "2", ""]  # the guidance boxes are text
    s = settings_of(*fields)
    assert s.steps == 5.0 and s.guidance["classifier"] == "clean" and s.guidance["ag_space"] is None
    res = runs.sample_images(s, models)
    r = res.record
    for flag in ("--pag 2.0", "--pag-layers mid", "--ag 0.995", "--classifier clean", "--cg-scale 2.0", "--steps 5"):
        assert flag in r["command"], r["command"]
    run_shown(r["command"], tmp_path, capsys, monkeypatch)
    assert np.array_equal(pixels(tmp_path / "grid.png"), np.asarray(grid_image(res.images, ncols=2)))
    partial = runs.sample_images(runs.SampleSettings(prompt="blue", steps=4, n=2), models).record["readings"]
    assert partial["named"] == ["color"] and set(partial["accuracy"]) == {"color", "all"}
    assert all(set(row["match"]) == {"color"} for row in partial["images"])


def test_digits_readings_are_the_scorer(models):
    res = runs.sample_images(runs.SampleSettings(model="digits", prompt="7", steps=4, n=2), models)
    readings = res.record["readings"]
    from condiff.data.digits import scorer

    assert readings["judge"] == "scorer" and readings["named"] == ["class"]
    assert [row["labels"][0] for row in readings["images"]] == scorer().predict(res.images).tolist()


BAD_SAMPLES = [
    ({"prompt": ""}, "--prompt is empty"),
    ({"prompt": "   "}, "--prompt is empty"),
    ({"prompt": "large purple hexagon"}, "purple"),
    ({"steps": 0}, "--steps must be an integer"),
    ({"steps": 2.5}, "--steps must be an integer"),
    ({"n": 100}, "--n must be an integer in [1, 16]"),
    ({"cfg": float("nan")}, "--cfg"),
    ({"seed": -1.5}, "--seed"),
    ({"solver": "nope"}, "unknown solver 'nope'"),
    ({"model": "__empty__"}, "has no condiff.json"),
    ({"model": "no/such/folder"}, "neither a bundled model"),
    ({"guidance": {"ag": 0.9, "cfg_rescale": 0.5}}, "--ag"),
    ({"guidance": {"ag_space": "eps"}}, "--ag-space needs --ag"),
    ({"guidance": {"pag_layers": "mid"}}, "--pag-layers needs --pag"),
    ({"guidance": {"guidance_interval": "800,200"}}, "--guidance-interval"),
    ({"guidance": {"negative_prompt": "purple"}}, "--negative-prompt"),
    ({"guidance": {"classifier": "nope"}}, "nope"),
    ({"pipeline": "__empty__"}, "not a diffusers pipeline folder"),
    ({"pipeline": "__empty__", "guidance": {"classifier": "clean"}}, "--classifier does not combine with --pipeline"),
]


@pytest.mark.parametrize("change, needle", BAD_SAMPLES, ids=[n for _, n in BAD_SAMPLES])
def test_bad_sample_inputs_are_one_line(models, tmp_path, change, needle):
    change = {k: str(tmp_path) if v == "__empty__" else v for k, v in change.items()}  # a folder, not a model
    if "guidance" in change:
        change["guidance"] = {**runs.GUIDANCE_DEFAULTS, **change["guidance"]}
    s = replace(runs.SampleSettings(prompt=PROMPT, steps=4, n=1), **change)
    with pytest.raises(CondiffError) as e:
        runs.sample_images(s, models)
    text = str(e.value)
    assert needle in text and "\n" not in text, text


def test_sample_handler_shows_errors_in_one_line_and_keeps_working(state):
    """The Sample button's generator: a bad input is one 'error: ' status (no traceback, nothing queued), an
    error after loading (EluCD with an off-grid solver) too, and the next request runs with its frames."""
    from condiff.cli.ui import sample_tab

    run = sample_tab.handler(state)

    def fields(prompt=PROMPT, solver="ddim", steps=4, classifier="none"):
        return ["shapes", "", prompt, solver, steps, 3, 0, 2, None, None, None, "", None, "", "", classifier, 1, None]

    def last(*f):
        updates = list(run(*f, request=None, progress=noop))
        return updates, updates[-1]["status"]

    started = state.jobs.started
    updates, status = last(*fields(prompt=""))
    assert status.startswith("error: ") and "prompt is empty" in status and len(updates) == 1
    assert state.jobs.started == started  # refused before the queue
    _, status = last(*fields(prompt="large purple hexagon"))
    assert status.startswith("error: ") and "purple" in status and "Traceback" not in status
    f = fields()
    f[8] = "abc"  # the AG box
    assert last(*f)[1] == "error: --ag must be a number, got 'abc'"
    _, status = last(*fields(solver="edm-sde", classifier="clean"))  # refused by EluCD once the model is loaded
    assert status.startswith("error: ") and "\n" not in status, status
    updates, status = last(*fields())
    assert status.startswith("done: 2 images, 4 NFE"), status
    frames = [u for u in updates if "preview" in u and u["preview"] is not None]
    assert len(frames) == 4 and frames[-1]["frames"].startswith("preview: step 4 of 4")
    assert updates[-1]["command"].startswith("condiff sample --model shapes")
    assert updates[-1]["readings"][0][1] == "large red circle top-left"


def test_frame_gate_shows_every_step_of_a_short_run():
    from condiff.cli.ui.widgets import LIVE_STEPS, FrameGate

    gate = FrameGate()
    assert all(gate.admit(i, LIVE_STEPS) for i in range(1, LIVE_STEPS + 1)) and gate.shown == LIVE_STEPS
    gate = FrameGate()  # a long, fast run: the first and last steps, and a few in between
    shown = [i for i in range(1, 5001) if gate.admit(i, 5000)]
    assert shown[0] == 1 and shown[-1] == 5000 and len(shown) < 100


def test_unexpected_errors_are_one_line(state, monkeypatch):
    """A bug is one line naming its type (the traceback goes to the server's stderr), never a stack trace."""
    from condiff.cli.ui import sample_tab

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(runs, "sample_images", boom)
    run = sample_tab.handler(state)
    f = ["shapes", "", PROMPT, "ddim", 4, 3, 0, 1, None, None, None, "", None, "", "", "none", None, None]
    status = list(run(*f, request=None, progress=noop))[-1]["status"]
    assert status.startswith("error: internal error (ZeroDivisionError: division by zero\\\\nsecond line)"), status


# ---- stop ---------------------------------------------------------------------------------------------------


def test_stop_ends_a_run_at_its_next_step(models):
    """Jobs.stop sets the session's stop event: the sampling loop raises at its next step, the run reports
    'stopped' and the lock is free for the next run; a generator dropped by gradio stops its run too."""
    jobs = Jobs()
    s = runs.SampleSettings(prompt=PROMPT, solver="ddim", steps=400, n=1)

    def work(settings, report, stop):
        return runs.sample_images(settings, models, step=lambda i, *a: report("step", i), stop=stop)

    events = []
    for kind, payload in jobs.run("a", work, s):
        events.append((kind, payload))
        if kind == "step" and payload == 3:
            assert jobs.stop("a")
    assert events[-1] == ("stopped", None) and len(events) < 20
    assert not jobs.stop("a")  # no run left
    gen = jobs.run("b", work, s)
    assert next(gen)[0] == "step"
    gen.close()  # what gradio's cancellation does
    with jobs.lock:  # the worker stopped and let go of the lock
        pass
    kinds = [k for k, _ in jobs.run("c", work, replace(s, steps=3))]
    assert kinds == ["step", "step", "step", "done"]


def test_stoppable_stops_any_network_call(models):
    m = models.get("shapes")
    stop = threading.Event()
    stop.set()
    with runs.stoppable(m.module, stop), pytest.raises(runs.Stopped):
        m.denoiser(torch.zeros(1, 3, 32, 32), torch.tensor([500.0]), m.condition(torch.tensor([[1, 2, 3, 4]])))
    m.denoiser(torch.zeros(1, 3, 32, 32), torch.tensor([500.0]), m.condition(torch.tensor([[1, 2, 3, 4]])))


# ---- compare ------------------------------------------------------------------------------------------------


def test_compare_rows_are_read_as_sample_options():
    base = runs.SampleSettings(prompt=PROMPT, seed=3, n=2)
    rows = runs.parse_rows("--solver ddim --steps 8\n# a comment\n\n--steps 6 --ag 0.995 --pag 2 --cfg 4", base)
    (l1, s1), (l2, s2) = rows
    assert (s1.solver, s1.steps, s1.cfg, s1.seed, s1.n) == ("ddim", 8, 3.0, 3, 2)
    assert (s2.solver, s2.steps, s2.cfg, s2.guidance["ag"], s2.guidance["pag"]) == ("dpmpp-2m", 6, 4.0, 0.995, 2.0)
    assert l2 == "--steps 6 --ag 0.995 --pag 2 --cfg 4"


def test_a_compare_row_repeats_at_the_command_line(models, tmp_path, capsys, monkeypatch):
    """A row with options the Sample tab does not show (--t-start, --centre-subpixels, --spacing): the command
    writes the app's image (one image: sample.png, the image itself)."""
    from condiff.data.images import to_uint8

    row = "--solver euler --steps 4 --spacing karras --t-start max --centre-subpixels"
    s = runs.parse_row(row, runs.SampleSettings(prompt="small green square", n=1, seed=4))
    res = runs.sample_images(s, models)
    assert "--spacing karras --out sample.png --t-start max --centre-subpixels" in res.record["command"]
    run_shown(res.record["command"], tmp_path, capsys, monkeypatch)
    assert np.array_equal(pixels(tmp_path / "sample.png"), to_uint8(res.images)[0].numpy())


BAD_ROWS = [
    ("--solver ddim", "needs 2 to 8 settings"),
    ("--solver ddim\n--solver nope", "unknown solver 'nope'"),
    ("--solver ddim\n--seed 3", "--seed is set above the settings"),
    ("--solver ddim\n--prompt red --n 2", "--prompt, --n are set above"),
    ("--solver ddim\n--frobnicate", "No such option: --frobnicate"),
    ("--solver ddim\n--steps many", "Invalid value for '--steps'"),
    ("--solver ddim\n--ag 0.9 --cfg-rescale 0.5", "--ag"),
    ("--solver ddim\n--solver 'ddim", "setting"),
    ("--solver ddim\n--help", "--help"),
]


@pytest.mark.parametrize("rows, needle", BAD_ROWS, ids=[n for _, n in BAD_ROWS])
def test_bad_compare_rows_are_one_line(rows, needle):
    with pytest.raises(CondiffError) as e:
        runs.parse_rows(rows, runs.SampleSettings(prompt=PROMPT))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    if "many" in rows:
        assert str(e.value).endswith(", got 'many'")


def test_compare_handler(state):
    from condiff.cli.ui import compare_tab

    run = compare_tab.handler(state)
    updates = list(run("shapes", PROMPT, 0, 1, "--solver ddim --steps 3\n--solver euler --steps 3", progress=noop))
    done = updates[-1]
    assert done["status"].startswith("done: 2 settings"), done["status"]
    assert len(done["gallery"]) == 2 and "NFE 3" in done["gallery"][0][1]
    assert [row[1] for row in done["table"]] == [3, 3]
    assert done["commands"].count("condiff sample") == 2
    bad = list(run("shapes", PROMPT, 0, 1, "--solver ddim", progress=noop))[-1]["status"]
    assert bad.startswith("error: a comparison needs 2 to 8 settings")


# ---- edit ---------------------------------------------------------------------------------------------------


def test_edit_command_repeats_the_edit(models, tmp_path, capsys, monkeypatch):
    """The app's edit equals `condiff edit` run with the command it shows: the same written file, the same
    reconstruction PSNR and labeller readings."""
    image = EXAMPLES / "red_circle.png"
    s = runs.EditSettings(str(image), PROMPT, "large blue circle top-left", "edit-friendly", 6, 0)
    work = tmp_path / "app"
    work.mkdir()
    phases = []
    res = runs.edit_image(s, models, work, phase=lambda name, k, n: phases.append(name))
    r = res.record
    assert phases == ["inverting", "reconstructing", "editing"]
    assert r["command"] == (
        "condiff edit --model shapes --image red_circle.png --from 'large red circle top-left' --to "
        "'large blue circle top-left' --method edit-friendly --steps 6 --seed 0 --out edited.png --threads 1"
    )
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "red_circle.png").write_bytes(image.read_bytes())
    run_shown(r["command"], cli, capsys, monkeypatch)
    assert np.array_equal(pixels(cli / "edited.png"), pixels(res.output))
    sidecar = json.loads((cli / "edited.json").read_text())
    assert sidecar["reconstruction_psnr"] == r["reconstruction_psnr"]
    assert sidecar["labels"] == r["labels"] and r["labels"]["edited"]["color"] == "blue"


BAD_EDITS = [
    ({"image": None}, "no image was given"),
    ({"image": "__text__"}, "--image"),
    ({"source": ""}, "--from is empty"),
    ({"target": "large purple circle"}, "--to"),
    ({"method": "nope"}, "unknown editing method 'nope'"),
    ({"method_opt": ["frobnicate=1"]}, "frobnicate"),
    ({"steps": 0}, "--steps must be an integer in [1, 1000]"),
]


@pytest.mark.parametrize("change, needle", BAD_EDITS, ids=[n for _, n in BAD_EDITS])
def test_bad_edit_inputs_are_one_line(models, tmp_path, change, needle):
    if change.get("image") == "__text__":
        (tmp_path / "notes.png").write_text("not an image")
        change = {"image": str(tmp_path / "notes.png")}
    s = runs.EditSettings(str(EXAMPLES / "red_circle.png"), PROMPT, "large blue circle top-left", "ddim", 4, 0)
    with pytest.raises(CondiffError) as e:
        runs.edit_image(replace(s, **change), models, tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- restore ------------------------------------------------------------------------------------------------


def test_mask_from_strokes():
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:64, :128, 3] = 255  # the top-left quarter's top half, painted
    layer[200, 200, 3] = 255  # one painted screen pixel: under a quarter of an image pixel
    mask = np.asarray(runs.mask_from_strokes([layer], (32, 32)))
    want = np.zeros((32, 32), np.uint8)
    want[:8, :16] = 255
    assert np.array_equal(mask, want)
    assert runs.mask_from_strokes([np.zeros((256, 256, 4), np.uint8)], (32, 32)) is None
    assert runs.mask_from_strokes([], (32, 32)) is None


def test_restore_command_repeats_the_restoration(models, tmp_path, capsys, monkeypatch):
    image = EXAMPLES / "red_circle.png"
    work = tmp_path / "app"
    work.mkdir()
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:, 128:, 3] = 255
    runs.mask_from_strokes([layer], (32, 32)).save(work / "mask.png")
    s = runs.RestoreSettings("inpaint", str(image), str(work / "mask.png"), steps=5, recurrence=2)
    frames = []
    res = runs.restore_image(s, models, work, step=lambda i, *a: frames.append(i))
    r = res.record
    assert frames == [1, 2, 3, 4, 5] and r["preview_frames"] == 5 and r["measurement_error"] == 0
    assert "--task inpaint --image red_circle.png --mask mask.png" in r["command"]
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "red_circle.png").write_bytes(image.read_bytes())
    (cli / "mask.png").write_bytes((work / "mask.png").read_bytes())
    run_shown(r["command"], cli, capsys, monkeypatch)
    assert np.array_equal(pixels(cli / "restored.png"), pixels(res.output))
    assert np.array_equal(pixels(res.output)[:, :16], pixels(image)[:, :16])  # the known half, kept


def test_sr_and_colorize(models, tmp_path):
    sr = runs.restore_image(
        runs.RestoreSettings("sr", str(EXAMPLES / "red_circle_8x8.png"), steps=3, recurrence=1), models, tmp_path
    )
    assert sr.restored.shape == (1, 3, 32, 32) and sr.record["measurement_error"] < 1e-4
    col = runs.restore_image(
        runs.RestoreSettings("colorize", str(EXAMPLES / "yellow_square_gray.png"), steps=3, recurrence=1),
        models,
        tmp_path,
    )
    assert "--task colorize" in col.record["command"] and "--mask" not in col.record["command"]


BAD_RESTORES = [
    ({"task": "deblur"}, "unknown task 'deblur'"),
    ({"image": None}, "no image was given"),
    ({"mask": None}, "needs a mask"),
    ({"task": "sr", "mask": None}, "--task sr needs a square low-resolution image"),
    ({"recurrence": 0}, "--recurrence must be an integer in [1, 100]"),
    ({"prompt": "large purple circle"}, "--prompt"),
    ({"solver": "nope"}, "unknown solver"),
    ({"mask": "__wrong_size__"}, "--mask"),
]


@pytest.mark.parametrize("change, needle", BAD_RESTORES, ids=[n for _, n in BAD_RESTORES])
def test_bad_restore_inputs_are_one_line(models, tmp_path, change, needle):
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    if change.get("mask") == "__wrong_size__":
        Image.fromarray(mask[:20]).save(tmp_path / "small.png")
        change = {"mask": str(tmp_path / "small.png")}
    s = runs.RestoreSettings("inpaint", str(EXAMPLES / "red_circle.png"), str(tmp_path / "mask.png"), steps=3)
    with pytest.raises(CondiffError) as e:
        runs.restore_image(replace(s, **change), models, tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_restore_handler_mask_from_the_editor(state):
    """The Restore button: the painted layer becomes mask.png at the image's size; nothing painted is one line."""
    from condiff.cli.ui import restore_tab

    image = str(EXAMPLES / "red_circle.png")
    editor = restore_tab.editor_value(image)
    assert editor["background"].size == (256, 256)
    run = restore_tab.handler(state)
    status = list(run("inpaint", image, editor, "", 3, 0, 1, "ddpm", progress=noop))[-1]["status"]
    assert status.startswith("error: ") and "paint the area to fill" in status
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:128, :, 3] = 255
    done = list(run("inpaint", image, {**editor, "layers": [layer]}, "", 3, 0, 1, "ddpm", progress=noop))[-1]
    assert done["status"].startswith("done: inpaint, 3 NFE"), done["status"]
    mask = np.asarray(Image.open(done["files"][1]))
    assert mask.shape == (32, 32) and (mask[:16] == 255).all() and (mask[16:] == 0).all()


# ---- a diffusers pipeline folder ----------------------------------------------------------------------------


def test_pipeline_folder_instead_of_a_model(state, tmp_path, capsys, monkeypatch):
    """The pipeline box runs `condiff sample --pipeline DIR` itself: one grid, no preview, its command."""
    from condiff.cli.ui import sample_tab
    from condiff.interop.tiny import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "pipe")
    run = sample_tab.handler(state)
    f = ["shapes", str(folder), "a red circle", "ddim", 3, 3, 0, 2, "", None, "", "", "", "", "", "none", "", None]
    updates = list(run(*f, request=None, progress=noop))
    done = updates[-1]
    assert done["status"].startswith("done: a grid of 2, 3 NFE"), done["status"]
    assert done["frames"] == "no live preview for a diffusers pipeline" and len(done["gallery"]) == 1
    assert done["command"].startswith(f"condiff sample --pipeline {folder} --prompt 'a red circle'")
    assert "--out grid.png" in done["command"]
    run_shown(done["command"], tmp_path, capsys, monkeypatch)
    assert (tmp_path / "grid.png").is_file()
    f[15] = "clean"  # classifier guidance is for condiff's own models
    status = list(run(*f, request=None, progress=noop))[-1]["status"]
    assert status == "error: --classifier does not combine with --pipeline (condiff's own models only)"


# ---- the command ----------------------------------------------------------------------------------------------


def test_ui_command_refuses_bad_ports_in_one_line(capsys):
    """`condiff ui` refuses a bad port, and a port in use, before gradio is imported (exit 2, one line)."""
    import socket

    from clikit import one_line_error, run

    code, _, err = run(["ui", "--port", "0"], capsys)
    one_line_error(code, err, "--port must be an integer in [1, 65535], got 0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(["ui", "--port", str(port)], capsys)
    one_line_error(code, err, f"cannot serve on 127.0.0.1:{port}: Address already in use")
    code, _, err = run(["ui", "--threads", "0"], capsys)
    one_line_error(code, err, "--threads must be an integer")


def test_ui_binds_locally_by_default():
    from condiff.cli.ui.command import is_local, ui_cmd

    params = inspect.signature(ui_cmd).parameters
    assert params["host"].default.default == "127.0.0.1" and params["port"].default.default == 7860
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1") and not is_local("0.0.0.0")


def test_ui_without_gradio_is_one_line(monkeypatch, capsys):
    """Installed without the ui extra: one line naming it, before anything is served."""
    import sys

    from clikit import one_line_error, run

    for name in [m for m in sys.modules if m.startswith("condiff.cli.ui.") and m.endswith(("app", "_tab"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gradio", None)
    code, _, err = run(["ui", "--port", str(free_port())], capsys)
    one_line_error(code, err, "condiff ui needs gradio: pip install 'condiff[ui]'")


def test_edit_and_restore_tabs_take_the_model(state):
    """The Edit and Restore tabs' model box reaches the run (and its command): digits here."""
    from condiff.cli.ui import edit_tab, restore_tab

    image = str(EXAMPLES / "red_circle.png")
    done = list(edit_tab.handler(state)(image, "3", "5", "ddim", 3, 0, "", "digits", progress=noop))[-1]
    assert done["status"].startswith("done: "), done["status"]
    assert "--model digits" in done["command"] and "--to 5" in done["command"]
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:128, :, 3] = 255
    editor = {**restore_tab.editor_value(image), "layers": [layer]}
    run = restore_tab.handler(state)
    done = list(run("inpaint", image, editor, "7", 3, 0, 1, "ddpm", "digits", progress=noop))[-1]
    assert done["status"].startswith("done: inpaint"), done["status"]
    assert "--model digits --prompt 7" in done["command"]
