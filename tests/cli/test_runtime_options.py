"""--compile, --channels-last and --bf16 on sample and eval (condiff.models.runtime): recorded in the sidecar, the
reproduce line and eval's JSON; channels_last gives the eager samples (within float32 round-off); one-line
errors for --pipeline and for a torch.compile that does not work here."""

import json

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.core.fitted import weights_digest
from condiff.core.grids import make_grid
from condiff.core.sampling import sample
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.models import load_model, runtime
from condiff.solvers import get_solver


def samples(m, n=6, steps=4):
    g = torch.Generator().manual_seed(0)
    raw, _ = m.family.random_conditions(n, g)
    grid = make_grid(m.schedule, steps)
    x = m.prior((n, *m.family.image_shape), float(grid[0]), g)
    with torch.no_grad():
        return sample(CFG(m.denoiser, 3.0), get_solver("dpmpp-2m"), grid, x, m.condition(raw)).x


def forwards(eager, fast):
    """(float32 eager forward, the faster network's forward) on 8 random conditions and inputs, at t = 999, 500, 50."""
    g = torch.Generator().manual_seed(0)
    raw, _ = eager.family.random_conditions(8, g)
    cond, x = eager.condition(raw), torch.randn((8, *eager.family.image_shape), generator=g)
    with torch.no_grad():
        for t in (999.0, 500.0, 50.0):
            t_in = torch.full((8,), t)
            want = eager.family.forward(eager.module, eager.model_cfg, x, t_in, cond)
            yield want, fast.family.forward(fast.module, fast.model_cfg, x, t_in, cond)


@pytest.mark.parametrize("model", ["digits", "shapes"])
def test_channels_last_gives_the_eager_samples(model):
    """The network's weights and inputs in channels_last: the same weights (names, values, digest), a forward
    within 1e-5 of eager's (oneDNN's NHWC convolutions sum in another order: measured 2e-6 to 7e-6 on outputs
    of magnitude 1.5 to 7), output back in the default layout, and samples within 1e-4 (measured 4e-5 (digits)
    and 7e-5 (shapes) after these 4 steps, 5e-6 and 1.4e-5 after 20: the eps model's x0 = (x - sigma eps) /
    alpha multiplies the forward's round-off by up to sigma/alpha = 20 at the first step). Applying it twice
    changes nothing more."""
    eager, fast = load_model(model), load_model(model)
    digest = weights_digest(fast.module)
    runtime.use_channels_last(fast)
    runtime.use_channels_last(fast)
    net = runtime.network(fast)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters())
    assert weights_digest(fast.module) == digest
    for want, got in forwards(eager, fast):
        assert got.is_contiguous() and float((got - want).abs().max()) <= 1e-5
    a, b = samples(eager), samples(fast)
    assert b.is_contiguous() and float((a - b).abs().max()) <= 1e-4


def test_bfloat16_is_autocast_of_the_float32_network():
    """use_bfloat16 on a one-layer network: its output is exactly the bfloat16 product of the bfloat16-rounded
    input and weights, cast to float32 (autocast's rule for linear layers); the weights stay float32 and the
    same; applying it twice changes nothing more."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)

    class Tiny:
        module = torch.nn.ModuleDict({"unet": lin})

    w = lin.weight.detach().clone()
    runtime.use_bfloat16(Tiny())
    runtime.use_bfloat16(Tiny())
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = lin(x)
        want = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), lin.bias.detach().bfloat16()).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, w)


def test_bfloat16_keeps_attention_in_float32():
    """A diffusers Attention module as the whole network: under use_bfloat16 its processor runs with autocast off,
    so the output is bit-identical to float32's; on the shapes UNet every Attention module gets that processor."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        want = attn(x, context)

    class Tiny:
        module = torch.nn.ModuleDict({"unet": attn})

    runtime.use_bfloat16(Tiny())
    with torch.no_grad():
        got = attn(x, context)
    assert isinstance(attn.processor, runtime.Float32Attention)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    shapes = runtime.use_bfloat16(load_model("shapes"))
    found = [m for m in runtime.network(shapes).modules() if isinstance(m, Attention)]
    assert found and all(isinstance(m.processor, runtime.Float32Attention) for m in found)


@pytest.mark.parametrize("model", ["digits", "shapes"])
def test_bfloat16_forward_is_within_bfloat16_precision(model):
    """The bundled networks under bfloat16 autocast: the same weights (digest), float32 outputs in the default
    layout, and a forward whose relative RMS error against float32 is within 4 u (u = 2^-8, bfloat16's unit
    round-off: each product and convolution rounds its inputs once; measured 0.0029-0.0035 (digits) and
    0.0055-0.0078 (shapes) at t = 999, 500, 50)."""
    eager, fast = load_model(model), load_model(model)
    digest = weights_digest(fast.module)
    runtime.use_bfloat16(fast)
    assert weights_digest(fast.module) == digest
    for want, got in forwards(eager, fast):
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert float((got - want).norm() / want.norm()) <= 4 * 2.0**-8


def test_network_of_a_model_without_one():
    class NoUnet:
        module = torch.nn.ModuleDict({"classifier": torch.nn.Linear(2, 2)})

    with pytest.raises(ConfigError, match="--compile needs a diffusion model with a 'unet' network"):
        runtime.network(NoUnet(), "--compile")


def test_flags_are_recorded(tmp_path, capsys, monkeypatch):
    """sample's sidecar and reproduce line and eval's JSON record both flags (the compile itself is stubbed
    out here: test_compile_matches_eager below runs it, marked slow)."""
    compiled = []
    monkeypatch.setattr(runtime, "compile_network", lambda m, label: compiled.append(label) or m)
    out = tmp_path / "s.png"
    ok(["sample", "--model", "digits", "--n", "2", "--steps", "2", "--out", str(out), "--compile",
        "--channels-last", "--bf16"], capsys)  # fmt: skip
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["compile"] is True and side["channels_last"] is True and compiled == ["--compile"]
    assert side["bf16"] is True and "--compile --channels-last --bf16" in side["reproduce"]
    ok(["sample", "--model", "digits", "--n", "2", "--steps", "2", "--out", str(out)], capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["compile"] is False and side["channels_last"] is False and side["bf16"] is False
    assert all(f not in side["reproduce"] for f in ("--compile", "--channels-last", "--bf16"))
    js = tmp_path / "e.json"
    argv = ["eval", "--model", "digits", "--n", "4", "--steps", "2", "--json", str(js), "--channels-last", "--bf16"]
    text = ok(argv, capsys)
    res = json.loads(js.read_text())
    assert res["channels_last"] is True and res["compile"] is False and "channels_last=True" in text
    assert res["bf16"] is True and "bf16=True" in text


@pytest.mark.parametrize("flag", ["--compile", "--channels-last", "--bf16"])
def test_pipeline_refuses_the_flags(tmp_path, capsys, flag):
    code, _, err = run(["sample", "--pipeline", str(tmp_path), flag, "--out", str(tmp_path / "p.png")], capsys)
    one_line_error(code, err, f"{flag} does not combine with --pipeline")


def test_compile_that_does_not_work_is_one_line(tmp_path, capsys, monkeypatch):
    """A torch.compile that fails (here: made to raise as a build without a C++ compiler does) is one line naming
    the cause, before any sampling, from sample and eval alike."""

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\n...")

    monkeypatch.setattr(torch, "compile", broken)
    for argv in (
        ["sample", "--model", "digits", "--n", "1", "--steps", "2", "--out", str(tmp_path / "c.png")],
        ["eval", "--model", "digits", "--n", "2", "--steps", "2"],
    ):
        code, _, err = run([*argv, "--compile"], capsys)
        one_line_error(code, err, "--compile: torch.compile does not work here (RuntimeError: InvalidCxxCompiler")


@pytest.mark.slow
def test_compile_matches_eager():
    """torch.compile of the digits UNet (inductor, this machine's compiler): samples within 1e-4 of eager (the
    compiled kernels fuse and reorder float32 arithmetic; docs/benchmarks.md has the measured difference)."""
    eager, fast = load_model("digits"), load_model("digits")
    runtime.compile_network(fast)
    a, b = samples(eager), samples(fast)
    assert float((a - b).abs().max()) <= 1e-4
