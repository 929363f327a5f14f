"""``condiff sample / invert / edit --pipeline DIR`` on folders saved by diffusers, offline (issue 6,
acceptance 3), and their one-line errors."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from clikit import ok, one_line_error, run


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, one thread, and every socket connection refused: any network use fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_sample_pipeline_offline_equals_diffusers_image(tiny_sd_dir, tmp_path, capsys):
    """`condiff sample --pipeline DIR` (DDIM, 20 steps, CFG 7.5, seed 0) writes the PNG that diffusers'
    StableDiffusionPipeline decodes for the same seed (to one uint8 level), with a reproducing sidecar."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "ddim_pipe"  # the same folder with a DDIM scheduler, saved by diffusers
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red cat",
        negative_prompt="blue dog",
        num_inference_steps=20,
        guidance_scale=7.5,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    out = tmp_path / "grid.png"
    text = ok(
        [
            "sample",
            "--pipeline",
            str(folder),
            "--prompt",
            "a red cat",
            "--negative-prompt",
            "blue dog",
            "--height",
            "16",
            "--width",
            "16",
            "--solver",
            "ddim",
            "--steps",
            "20",
            "--cfg",
            "7.5",
            "--seed",
            "0",
            "--n",
            "1",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert "wrote" in text
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert ours.shape == (16, 16, 3)  # --n 1: the image itself, no grid frame
    assert int(np.abs(ours - np.round(ref * 255).astype(int)).max()) <= 1
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["nfe"] == 20 * 1 and side["grid"][0] == 951.0 and side["grid"][-1] == 0.0
    assert "--pipeline" in side["reproduce"] and "--negative-prompt" in side["reproduce"]


def test_sample_pipeline_pag_and_dit(tiny_sd_dir, tiny_dit_dir, tmp_path, capsys):
    """--pag and other solvers work on the SD folder; a DiT folder samples by class name (4 images)."""
    ok(
        [
            "sample",
            "--pipeline",
            str(tiny_sd_dir),
            "--prompt",
            "red cat",
            "--solver",
            "dpmpp-2m",
            "--steps",
            "4",
            "--cfg",
            "3",
            "--pag",
            "2",
            "--n",
            "2",
            "--out",
            str(tmp_path / "p.png"),
        ],
        capsys,
    )
    assert json.loads((tmp_path / "p.json").read_text())["pag"] == 2.0
    ok(
        [
            "sample",
            "--pipeline",
            str(tiny_dit_dir),
            "--prompt",
            "square",
            "--solver",
            "unipc",
            "--steps",
            "3",
            "--n",
            "4",
            "--spacing",
            "uniform-logsnr",
            "--out",
            str(tmp_path / "d.png"),
            "--out-dir",
            str(tmp_path / "each"),
        ],
        capsys,
    )
    assert Image.open(tmp_path / "d.png").size == (2 + 2 * 18, 2 + 2 * 18)
    files = json.loads((tmp_path / "each" / "samples.json").read_text())["files"]  # --out-dir: one PNG per sample
    assert [f["file"] for f in files] == [f"sample_00{i}.png" for i in range(4)] and files[3]["caption"] == "square"
    grid = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))
    one = np.asarray(Image.open(tmp_path / "each" / "sample_003.png").convert("RGB"))
    assert one.shape == (16, 16, 3) and np.array_equal(one, grid[20:36, 20:36])  # the grid's fourth tile


def test_invert_and_edit_pipeline(tiny_sd_dir, tmp_path, capsys):
    """invert/edit --pipeline run edit-friendly inversion on the VAE latents: exact maps reconstruct the
    latents, so the reconstruction PSNR is the VAE's own round trip; edit --inversion reuses the saved maps
    (the same edit as in one go) and refuses another image."""
    from condiff.data.images import read_image
    from condiff.evaluation.editbench import psnr
    from condiff.interop import decode, encode, load_pipeline

    img = tmp_path / "in.png"
    Image.fromarray((np.indices((16, 16)).sum(0) * 8).astype(np.uint8)).convert("RGB").save(img)
    text = ok(
        [
            "invert",
            "--pipeline",
            str(tiny_sd_dir),
            "--image",
            str(img),
            "--prompt",
            "red cat",
            "--method",
            "edit-friendly",
            "--steps",
            "5",
            "--out",
            str(tmp_path / "inv.safetensors"),
        ],
        capsys,
    )
    p = load_pipeline(tiny_sd_dir)
    x = read_image(img, (3, 16, 16)).tensor
    ceiling = float(psnr(decode(p, encode(p, x)).clamp(-1, 1), x))
    assert f"PSNR {ceiling:.2f} dB" in text
    recon = tmp_path / "inv_reconstruction.png"
    assert f"its reconstruction {recon}" in text and Image.open(recon).size == (16, 16)
    from condiff.inversion.methods import load_inverted

    meta = load_inverted(tmp_path / "inv.safetensors")[1]
    assert meta["reconstruction"] == str(recon)
    assert meta["reconstruction_psnr_written"] == float(psnr(read_image(recon, (3, 16, 16)).tensor, x).mean())
    ok(
        [
            "edit",
            "--pipeline",
            str(tiny_sd_dir),
            "--image",
            str(img),
            "--from",
            "red cat",
            "--to",
            "blue dog",
            "--method",
            "edit-friendly",
            "--steps",
            "5",
            "--out",
            str(tmp_path / "e.png"),
        ],
        capsys,
    )
    assert Image.open(tmp_path / "e.png").size == (16, 16) and (tmp_path / "e_compare.png").is_file()
    side = json.loads((tmp_path / "e.json").read_text())  # a sidecar like `edit`'s
    assert (side["command"], side["method"], side["from"], side["to"], side["steps"]) == (
        "edit",
        "edit-friendly",
        "red cat",
        "blue dog",
        5,
    )
    assert side["reconstruction_psnr"] == pytest.approx(ceiling, abs=5e-3) and side["inversion"] is None
    assert side["outputs"] == {
        "image": str(tmp_path / "e.png"),
        "compare": str(tmp_path / "e_compare.png"),
        "sidecar": str(tmp_path / "e.json"),
    }
    assert side["reproduce"].startswith(f"condiff edit --pipeline {tiny_sd_dir} --image {img} --from 'red cat'")
    text = ok(
        [
            "edit",
            "--pipeline",
            str(tiny_sd_dir),
            "--image",
            str(img),
            "--inversion",
            str(tmp_path / "inv.safetensors"),
            "--to",
            "blue dog",
            "--out",
            str(tmp_path / "e2.png"),
        ],
        capsys,
    )
    assert f"PSNR {ceiling:.2f} dB" in text  # the saved maps reconstruct as the fresh ones do
    assert (tmp_path / "e2.png").read_bytes() == (tmp_path / "e.png").read_bytes()  # the same edit
    assert json.loads((tmp_path / "e2.json").read_text())["inversion"] == str(tmp_path / "inv.safetensors")
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(other)
    code, _, err = run(
        [
            "edit",
            "--pipeline",
            str(tiny_sd_dir),
            "--image",
            str(other),
            "--inversion",
            str(tmp_path / "inv.safetensors"),
            "--to",
            "blue dog",
            "--out",
            str(tmp_path / "e3.png"),
        ],
        capsys,
    )
    one_line_error(code, err, "another image")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--pipeline", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["--pipeline", "{tmp}", "--prompt", "x"], "no model_index.json"),
        (["--pipeline", "{sd}", "--prompt", "x", "--height", "15"], "--height must be a positive multiple of 2"),
        (["--pipeline", "{sd}"], "--pipeline needs --prompt"),
        (["--pipeline", "{sd}", "--prompt", "x", "--ems", "e.safetensors"], "--ems does not combine with --pipeline"),
        (["--pipeline", "{sd}", "--prompt", "x", "--pag-layers", "mid"], "--pag-layers needs --pag"),
        (["--pipeline", "{sd}", "--prompt", "x", "--pag", "1", "--pag-layers", "nowhere"], "'nowhere'"),
        (["--pipeline", "{dit}", "--prompt", "dragon"], "'dragon'"),
        (["--height", "16"], "--height and --width go with --pipeline"),
    ],
)
def test_pipeline_errors_are_one_line(tiny_sd_dir, tiny_dit_dir, tmp_path, capsys, extra, needle):
    """User errors with --pipeline: one `error:` line, exit code 2."""
    args = [a.format(tmp=tmp_path, sd=tiny_sd_dir, dit=tiny_dit_dir) for a in extra]
    code, _, err = run(["sample", *args, "--steps", "2", "--n", "1", "--out", str(tmp_path / "o.png")], capsys)
    one_line_error(code, err, needle)
