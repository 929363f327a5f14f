"""Bad inputs to the library entry points are one-line condiff errors that name the mismatch, not PyTorch errors
from deep inside a network: condition batch sizes (``batch_cond``, under every guidance method that batches
branches), x's channels and dtype (``WrappedDenoiser``), x itself (``sample``, ``invert``), and any other forward
PyTorch refuses (``NetworkInputError``, with the shapes involved)."""

import pytest
import torch
from torch import nn

from condiff.core.denoiser import ROWS_HINT, wrap
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import VPCosine
from condiff.errors import CondiffError, ConfigError, NetworkInputError
from condiff.guidance import CFG, batch_cond
from condiff.guidance.interval import GuidanceInterval
from condiff.guidance.negative import Negation
from condiff.inversion import FeatureInjection, invert
from condiff.models.base import load_model
from condiff.solvers import DDIM

SCH = VPCosine()


def one_line_error(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg.splitlines() == [msg] and isinstance(info.value, CondiffError)
    return msg


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


def setup(model, n=8, rows=None, seed=0):
    """(grid, x with n samples, cond with ``rows`` rows (default n)) for a bundled model."""
    raw, _ = model.family.random_conditions(rows or n, torch.Generator().manual_seed(seed))
    grid = make_grid(model.schedule, 2)
    x = initial_noise(model.schedule, float(grid[0]), (n, *model.family.image_shape), torch.Generator().manual_seed(1))
    return grid, x, model.condition(raw)


# ---- condition batch sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,key", [("digits", "class_labels"), ("shapes", "encoder_hidden_states")])
def test_cfg_with_a_one_row_condition_and_eight_images(request, name, key):
    """Was "The size of tensor a (16) must match the size of tensor b (2)" from inside the network."""
    model = request.getfixturevalue(name)
    grid, x, cond = setup(model, n=8, rows=1)
    with torch.no_grad():
        msg = one_line_error(ConfigError, sample, CFG(model.denoiser, 3.0), DDIM(), grid, x, cond)
    assert msg == f"condition {key!r} has 1 row but x has 8 ({ROWS_HINT})"


def test_the_null_condition_is_named_when_only_it_has_the_wrong_rows(digits):
    grid, x, cond = setup(digits, n=8)
    cond["null"] = {"class_labels": torch.full((3,), 10)}
    with torch.no_grad():
        msg = one_line_error(ConfigError, sample, CFG(digits.denoiser, 3.0), DDIM(), grid, x, cond)
    assert msg == f"null condition 'class_labels' has 3 rows but x has 8 ({ROWS_HINT})"


def test_unguided_shapes_with_a_one_row_condition_names_it(shapes):
    """Without guidance the condition reaches the network as it is; its refusal is re-raised naming the
    condition (the digits UNet instead broadcasts a 1-row class label, which is left to work)."""
    grid, x, cond = setup(shapes, n=8, rows=1)
    with torch.no_grad():
        msg = one_line_error(NetworkInputError, sample, shapes.denoiser, DDIM(), grid, x, cond)
    assert msg.startswith(
        "the network refused x (a float32 tensor of shape (8, 3, 32, 32)) with cond "
        "{'encoder_hidden_states': (1, 4, 64) float32, 'pooled': (1, 64) float32}: The size of tensor"
    )
    assert msg.endswith(f"; condition 'encoder_hidden_states' has 1 row but x has 8 ({ROWS_HINT})")


def test_unguided_digits_broadcast_a_one_row_label(digits):
    grid, x, _ = setup(digits, n=8)
    with torch.no_grad():
        one = sample(digits.denoiser, DDIM(), grid, x, {"class_labels": torch.tensor([3])}).x
        rows = sample(digits.denoiser, DDIM(), grid, x, {"class_labels": torch.full((8,), 3)}).x
    torch.testing.assert_close(one, rows, rtol=0, atol=1e-5)


class Scaled(nn.Module):
    """eps = conv(x) * y per sample (y of shape (n,) or 0-d): a plain module with a per-sample condition."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        out = self.conv(x)
        return out if y is None else out * torch.as_tensor(y, dtype=out.dtype).reshape(-1, 1, 1, 1)


def test_plain_module_condition_rows_with_and_without_cfg():
    net = Scaled()
    den, grid, x = wrap(net, SCH, "eps"), make_grid(SCH, 2), torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        cfg = CFG(den, 2.0)
        msg = one_line_error(
            ConfigError, sample, cfg, DDIM(), grid, x, {"y": torch.ones(1), "null": {"y": torch.zeros(1)}}
        )
        assert msg == f"condition 'y' has 1 row but x has 8 ({ROWS_HINT})"
        msg = one_line_error(NetworkInputError, sample, den, DDIM(), grid, x, {"y": torch.ones(3)})
    assert msg == (
        "the network refused x (a float32 tensor of shape (8, 3, 8, 8)) with cond {'y': (3,) float32}: The size of "
        f"tensor a (8) must match the size of tensor b (3) at non-singleton dimension 0; condition 'y' has 3 rows "
        f"but x has 8 ({ROWS_HINT})"
    )
    assert isinstance(NetworkInputError("m"), RuntimeError)  # code that caught PyTorch's error still catches it


def test_other_guidance_batches_check_the_same_rows():
    den, x, t = wrap(Scaled(), SCH, "eps"), torch.randn(4, 3, 8, 8), torch.full((4,), 0.5)
    y, null = torch.ones(4), {"y": torch.zeros(4)}
    with torch.no_grad():
        msg = one_line_error(ConfigError, Negation(den, 3.0), x, 0.5, {"y": y, "null": null, "negative": {"y": y[:3]}})
        assert msg == f"negative condition 'y' has 3 rows but x has 4 ({ROWS_HINT})"
        interval = GuidanceInterval(den, 3.0, t_lo=0.4, t_hi=0.6)
        msg = one_line_error(ConfigError, interval, x, t, {"y": y, "null": {"y": torch.zeros(2)}})
        assert msg == f"null condition 'y' has 2 rows but x has 4 ({ROWS_HINT})"
        msg = one_line_error(ConfigError, interval, x, 0.5, {"y": y[:1], "null": null})
        assert msg == f"condition 'y' has 1 row but x has 4 ({ROWS_HINT})"
    grid = make_grid(SCH, 2)
    source = [torch.zeros(2, 3, 8, 8)] * 3
    msg = one_line_error(ConfigError, FeatureInjection, den, [], grid, source, {"y": torch.ones(3)}, 1)
    assert msg == f"source condition 'y' has 3 rows but the source latent has 2 ({ROWS_HINT})"


def test_batch_cond_shares_0d_tensors_and_names_missing_keys():
    y, yn = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    same = batch_cond([{"y": yn, "s": torch.tensor(5.0)}, {"y": y, "s": torch.tensor(5.0)}], 2)
    assert torch.equal(same["y"], torch.tensor([0.0, 0.0, 1.0, 2.0])) and torch.equal(same["s"], torch.tensor(5.0))
    differ = batch_cond([{"s": torch.tensor(0.0)}, {"s": torch.tensor(5.0)}], 2)
    assert torch.equal(differ["s"], torch.tensor([0.0, 0.0, 5.0, 5.0]))
    names = ("null condition", "condition")
    msg = one_line_error(ConfigError, batch_cond, [{"y": yn}, {"y": y, "z": y}], 2, names)
    assert msg == "null condition has no 'z' (condition has it; the branches need the same tensor keys)"
    msg = one_line_error(ConfigError, batch_cond, [{"y": yn}, {"y": [1.0, 2.0]}], 2, names)
    assert msg == "condition 'y' is list [1.0, 2.0] but null condition 'y' is a tensor"
    extras = batch_cond([{"y": yn, "note": "null"}, {"y": y, "negative": {"y": y}, "note": "cond"}], 2, names)
    assert extras.keys() == {"y", "note"} and extras["note"] == "null"
    msg = one_line_error(ConfigError, batch_cond, [{"y": yn[:, None]}, {"y": torch.ones(2, 3)}], 2, names)
    assert (
        msg == "condition 'y' has a different shape per branch beyond its rows: null condition (2, 1), condition (2, 3)"
    )


# ---- channels ---------------------------------------------------------------------------------------------


def test_channels_of_the_bundled_models(digits, shapes):
    """Was "Given groups=1, weight of size [32, 12, 3, 3], expected input[16, 4, 16, 16] to have 12 channels, but
    got 4 channels instead" (shapes pixel-unshuffles 3 channels into its UNet's 12)."""
    grid, x, cond = setup(shapes, n=8)
    with torch.no_grad():
        msg = one_line_error(ConfigError, sample, CFG(shapes.denoiser, 3.0), DDIM(), grid, x[:, :1], cond)
        assert msg == "x has 1 channel but the network expects 3 (x's shape after its batch dimension is (1, 32, 32))"
        grid, x, cond = setup(digits, n=8)
        msg = one_line_error(ConfigError, sample, digits.denoiser, DDIM(), grid, x.expand(8, 3, 16, 16), cond)
        assert msg == "x has 3 channels but the network expects 1 (x's shape after its batch dimension is (3, 16, 16))"
        msg = one_line_error(ConfigError, sample, digits.denoiser, DDIM(), grid, x[0], cond)  # no batch dimension
        assert msg == "x has 16 channels but the network expects 1 (x's shape after its batch dimension is (16, 16))"


def test_channels_of_a_wrapped_diffusers_model_come_from_its_config():
    """A diffusers model's ``config.in_channels`` is checked before the forward runs."""
    from condiff.interop.tiny import tiny_unet

    unet = tiny_unet(in_channels=4)
    calls = []

    def call(net, x, t_in, cond):
        calls.append(x.shape)
        return net(x, t_in, encoder_hidden_states=torch.zeros(x.shape[0], 2, 32)).sample

    den = wrap(unet, SCH, "eps", call=call)
    assert den.channels == 4
    with torch.no_grad():
        msg = one_line_error(ConfigError, den, torch.randn(2, 3, 8, 8), 0.5)
        assert msg == "x has 3 channels but the network expects 4 (x's shape after its batch dimension is (3, 8, 8))"
        assert calls == []
        assert den(torch.randn(2, 4, 8, 8), 0.5).shape == (2, 4, 8, 8)
    assert wrap(unet, SCH, "eps", call=call, channels=3).channels == 3  # a call that changes the channels says so
    assert one_line_error(ConfigError, wrap, unet, SCH, "eps", channels=0) == "channels must be an integer >= 1, got 0"


def test_a_plain_module_forward_refusal_names_the_shapes():
    """Was "Given groups=1, weight of size [3, 3, 3, 3], expected input[8, 1, 8, 8] to have 3 channels, ..."
    raised from inside the module: channels of a plain module are not known before its forward."""
    den, grid = wrap(Scaled(), SCH, "eps"), make_grid(SCH, 2)
    with torch.no_grad():
        msg = one_line_error(
            NetworkInputError, sample, den, DDIM(), grid, torch.randn(8, 1, 8, 8), {"y": torch.ones(8)}
        )
    assert msg.startswith(
        "the network refused x (a float32 tensor of shape (8, 1, 8, 8)) with cond {'y': (8,) float32}: "
    )
    assert "expected input[8, 1, 8, 8] to have 3 channels, but got 1 channels instead" in msg


def test_an_output_that_does_not_fit_x():
    den = wrap(lambda x, t: torch.zeros(x.shape[0], 2, 5), SCH, "eps")
    msg = one_line_error(NetworkInputError, den, torch.randn(3, 4, 5), 0.5)
    assert msg.startswith(
        "the network's output (a float32 tensor of shape (3, 2, 5)) does not fit x "
        "(a float32 tensor of shape (3, 4, 5)): "
    )


@pytest.mark.parametrize("kind", [torch.OutOfMemoryError, NotImplementedError])
def test_out_of_memory_and_missing_kernels_pass_through(kind):
    def net(x, t):
        raise kind("raised by the network")

    with pytest.raises(kind) as info:
        wrap(net, SCH, "eps")(torch.randn(2, 3), 0.5)
    assert type(info.value) is kind


# ---- dtype and x itself -----------------------------------------------------------------------------------

F64_MESSAGE = (
    "x is float64 but the network's weights are float32 "
    "(cast x with x.to(torch.float32), or the network with .to(torch.float64))"
)


def test_float64_x_with_a_float32_network_is_an_error_not_a_cast(digits, shapes):
    """Was "Input type (double) and bias type (float) should be the same" (digits) and "mat1 and mat2 must have
    the same dtype, but got Double and Float" (shapes). Decision: an error naming both dtypes, never a cast."""
    for model in (digits, shapes):
        grid, x, cond = setup(model, n=4)
        with torch.no_grad():
            assert (
                one_line_error(ConfigError, sample, CFG(model.denoiser, 3.0), DDIM(), grid, x.double(), cond)
                == F64_MESSAGE
            )
            assert one_line_error(ConfigError, invert, model.denoiser, DDIM(), grid, x.double(), cond) == F64_MESSAGE


def test_plain_module_dtype_follows_its_weights_when_they_are_cast():
    net = Scaled()
    den, x = wrap(net, SCH, "eps"), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert one_line_error(ConfigError, den, x.double(), 0.5) == F64_MESSAGE
        assert net.calls == 0
        den(x, 0.5)  # the weight is looked up and kept
        net.double()
        assert den(x.double(), 0.5).dtype == torch.float64
        msg = one_line_error(ConfigError, den, x, 0.5)
        assert msg.startswith("x is float32 but the network's weights are float64")
        net.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts on purpose: no dtype check
            assert den(x.bfloat16(), 0.5).shape == x.shape


@pytest.mark.parametrize(
    "x,described",
    [
        (torch.zeros(4, 1, 16, 16, dtype=torch.long), "an int64 tensor of shape (4, 1, 16, 16)"),
        (torch.tensor(1.0), "a float32 tensor of shape ()"),
        ([[0.0]], "list [[0.0]]"),
    ],
)
def test_sample_and_invert_need_a_floating_tensor_with_a_batch_dimension(digits, x, described):
    grid, _, cond = setup(digits, n=4)
    want = f"x must be a floating-point tensor with a batch dimension, got {described}"
    assert one_line_error(ConfigError, sample, digits.denoiser, DDIM(), grid, x, cond) == want
    assert one_line_error(ConfigError, invert, digits.denoiser, DDIM(), grid, x, cond) == want


def test_a_shared_0d_condition_goes_through_cfg_as_each_branch_value():
    """A 0-d tensor is shared by every sample: CFG's batch gives the null rows the null's value and the
    conditional rows the condition's, the same as two separate forwards."""
    den, x = wrap(Scaled(), SCH, "eps"), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        guided = CFG(den, 2.5)(x, 0.5, {"y": torch.tensor(2.0), "null": {"y": torch.tensor(0.5)}})
        cond, null = den(x, 0.5, {"y": torch.full((4,), 2.0)}), den(x, 0.5, {"y": torch.full((4,), 0.5)})
    torch.testing.assert_close(guided, null + 2.5 * (cond - null), rtol=0, atol=1e-6)
