"""--lora DIR [--lora-scale S] on `sample` and `eval`: a LoRA folder (diffusers' format, written by
condiff.training.lora) is applied to the model's network; at scale 0 the images are the base model's bit for bit,
at scale 1 they differ; misuse is one `error:` line with exit code 2."""

import copy
import json

import pytest
import torch
from PIL import Image

from clikit import ok, one_line_error, run
from condiff.models.base import load_model
from condiff.training.lora import add_lora, save_lora


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    net = copy.deepcopy(load_model("shapes").module["unet"])
    add_lora(net, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return save_lora(net, tmp_path_factory.mktemp("lora") / "style")


def _sample(tmp_path, capsys, name, *extra):
    out = tmp_path / f"{name}.png"
    ok(
        [
            "sample",
            "--model",
            "shapes",
            "--prompt",
            "red circle",
            "--n",
            "2",
            "--steps",
            "4",
            "--out",
            str(out),
            *extra,
        ],
        capsys,
    )
    return torch.tensor(list(Image.open(out).getdata()))


def test_scale_zero_is_the_base_and_scale_one_is_not(lora_dir, tmp_path, capsys):
    base = _sample(tmp_path, capsys, "base")
    zero = _sample(tmp_path, capsys, "zero", "--lora", str(lora_dir), "--lora-scale", "0")
    one = _sample(tmp_path, capsys, "one", "--lora", str(lora_dir))
    assert torch.equal(zero, base) and not torch.equal(one, base)
    side = json.loads((tmp_path / "one.json").read_text())
    assert side["lora"] == [str(lora_dir)] and side["lora_scale"] == [1.0]
    assert f"--lora {lora_dir}" in side["reproduce"]


def test_eval_reports_the_lora(lora_dir, capsys):
    out = ok(["eval", "--model", "shapes", "--n", "4", "--steps", "2", "--lora", str(lora_dir)], capsys)
    assert f"lora=['{lora_dir}']" in out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lora-scale", "0.5"], "--lora-scale goes with --lora"),
        (
            ["--lora", "LORA", "--lora-scale", "1", "--lora-scale", "2"],
            "one --lora-scale for all or one per --lora (1), got 2",
        ),
        (["--lora", "LORA", "--lora-scale", "nan"], "--lora-scale must be finite"),
        (["--lora", "EMPTY"], "holds no pytorch_lora_weights.safetensors"),
        (["--lora", "LORA", "--model", "digits"], "adapter support"),
        (["--lora", "GARBAGE"], "pytorch_lora_weights.safetensors"),
        (["--lora", "NOTLORA"], "holds no LoRA weights"),
    ],
)
def test_misuse_is_one_line(lora_dir, tmp_path, capsys, extra, needle):
    from safetensors.torch import save_file

    folders = {k: tmp_path / k.lower() for k in ("EMPTY", "GARBAGE", "NOTLORA")}
    for f in folders.values():
        f.mkdir()
    (folders["GARBAGE"] / "pytorch_lora_weights.safetensors").write_bytes(bytes(range(100)))
    save_file({"conv.weight": torch.zeros(2)}, str(folders["NOTLORA"] / "pytorch_lora_weights.safetensors"))
    extra = [str(lora_dir) if e == "LORA" else str(folders[e]) if e in folders else e for e in extra]
    argv = ["sample", "--model", "shapes", "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]
    if "--model" in extra:
        argv = argv[:1] + argv[3:]
    code, _, err = run([*argv, *extra], capsys)
    one_line_error(code, err, needle)


def test_edit_takes_a_lora_and_scale_zero_is_the_base(lora_dir, tmp_path, capsys):
    argv = ["edit", "--image", "docs/examples/red_circle.png", "--from", "large red circle top-left"]
    argv += ["--to", "large blue circle top-left", "--method", "ddim", "--steps", "4"]
    ok([*argv, "--out", str(tmp_path / "base.png")], capsys)
    ok([*argv, "--lora", str(lora_dir), "--lora-scale", "0", "--out", str(tmp_path / "zero.png")], capsys)
    ok([*argv, "--lora", str(lora_dir), "--out", str(tmp_path / "one.png")], capsys)
    pix = {k: torch.tensor(list(Image.open(tmp_path / f"{k}.png").getdata())) for k in ("base", "zero", "one")}
    assert torch.equal(pix["zero"], pix["base"]) and not torch.equal(pix["one"], pix["base"])
    assert f"--lora {lora_dir}" in json.loads((tmp_path / "one.json").read_text())["reproduce"]
