"""Steered diffusion's linear projections: each operator's right inverse (A A^+ = I) and projection
idempotence, and the acceptance oracle A x0_hat = y (to 1e-6) at every denoiser evaluation of whole sampling
trajectories for several solvers, on the GMM oracle and on random images, with exact known pixels in the
final inpainting sample."""

import pytest
import torch

from condiff.core.grids import UniformT, make_grid
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.core.schedules import EDM, VPLinear
from condiff.data.gmm import GMM
from condiff.errors import ConfigError
from condiff.guidance.steered import BT601, Colorize, Inpaint, Projection, SuperResolution, inpaint
from condiff.solvers import SOLVERS

F64 = torch.float64
SOLVER_NAMES = ["ddim", "ddpm", "heun", "dpmpp-2m", "dpmpp-3m", "unipc"]


def image_operators():
    g = torch.Generator().manual_seed(3)
    return {
        "inpaint": Inpaint(torch.rand(1, 1, 8, 8, generator=g) > 0.5),
        "inpaint-float": Inpaint((torch.rand(2, 3, 8, 8, generator=g) > 0.3).float()),
        "sr2": SuperResolution(2),
        "sr4": SuperResolution(4),
        "colorize-ycbcr": Colorize(),
        "colorize-orthogonal": Colorize(direction=BT601),
    }


@pytest.mark.parametrize("name", list(image_operators()))
def test_right_inverse_and_idempotent_projection(name):
    """A A^+ y = y on measurements y = A z; P(x) = x - A^+(A x - y) gives A P(x) = y and P(P(x)) = P(x); a
    point already satisfying the measurement is a fixed point."""
    op = image_operators()[name]
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(2, 2, 3, 8, 8, generator=g, dtype=F64)
    y = op(z)
    assert (op(op.pinv(y)) - y).abs().max() < 1e-12
    p = op.project(x, y)
    assert (op(p) - y).abs().max() < 1e-12
    assert (op.project(p, y) - p).abs().max() < 1e-12
    assert (op.project(z, y) - z).abs().max() < 1e-12


def test_operator_formulas():
    """Average pooling, nearest upsampling as A^+ (= A^T (A A^T)^-1), luminance, and the YCbCr overwrite
    keeping Cb, Cr unchanged (BT.601 chroma) while the orthogonal variant moves along the weights."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=F64)
    sr = SuperResolution(2)
    assert torch.allclose(sr(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-14)
    a = torch.stack([sr(e.reshape(1, 1, 4, 4)).reshape(-1) for e in torch.eye(16, dtype=F64)], 1)  # (4, 16)
    pinv = torch.stack([sr.pinv(e.reshape(1, 1, 2, 2)).reshape(-1) for e in torch.eye(4, dtype=F64)], 1)
    assert torch.allclose(pinv, torch.linalg.pinv(a), atol=1e-12)
    col = Colorize()
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(col(x)[:, 0], lum, atol=1e-14)
    y = col(torch.randn(1, 3, 4, 4, generator=g, dtype=F64))

    def chroma(v):
        yy = 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]
        return torch.stack([(v[:, 2] - yy) / 1.772, (v[:, 0] - yy) / 1.402])

    assert torch.allclose(chroma(col.project(x, y)), chroma(x), atol=1e-12)
    orth = Colorize(direction=BT601).project(x, y) - x
    w = torch.tensor(BT601, dtype=F64).reshape(1, 3, 1, 1)
    assert torch.allclose(orth, w * (orth / w)[:, :1], atol=1e-12)  # parallel to the weights


def gmm_cases():
    """(gmm, operator, measurement) on vector data: feature inpainting, 1-D pooling, 3-channel luminance."""
    g2 = GMM.random(dim=2, components=4, num_classes=2, seed=0, spread=1.5, var_range=(0.1, 1.0))
    g4 = GMM.random(dim=4, components=3, num_classes=1, seed=1, spread=1.5, var_range=(0.1, 1.0))
    g3 = GMM.random(dim=3, components=3, num_classes=1, seed=2, spread=1.5, var_range=(0.1, 1.0))
    return {
        "inpaint": (g2, Inpaint(torch.tensor([1.0, 0.0])), torch.tensor([0.0, 0.7], dtype=F64)),
        "sr": (g4, SuperResolution(2, dims=1), torch.tensor([0.4, -1.1], dtype=F64)),
        "colorize": (g3, Colorize(channel_dim=-1), torch.tensor([0.3], dtype=F64)),
    }


class Recorder:
    def __init__(self, op, y):
        self.op, self.y, self.errors = op, y, []

    def __call__(self, info):
        self.errors.append(float((self.op(info.x0_hat) - self.y).abs().max()))


@pytest.mark.parametrize("case", list(gmm_cases()))
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_measurement_holds_at_every_step_on_the_gmm(case, solver):
    """Through a whole trajectory, every projected x0_hat (seen by the callbacks) and the final sample
    satisfy A x = y to 1e-6, for single- and multistep, deterministic and stochastic solvers."""
    gmm, op, y = gmm_cases()[case]
    sch = VPLinear()
    grid = make_grid(sch, 12, UniformT())
    g = torch.Generator().manual_seed(0)
    x = initial_noise(sch, float(grid[0]), (64, gmm.dim), g, dtype=F64)
    rec = Recorder(op, y)
    out = sample(Projection(gmm.denoiser(sch), op, y), SOLVERS[solver](), grid, x, None, Gaussian(g), [rec])
    assert len(rec.errors) == 12 and max(rec.errors) < 1e-6
    assert (op(out.x) - y).abs().max() < 1e-6
    unguided = op(
        sample(gmm.denoiser(sch), SOLVERS[solver](), grid, x, None, Gaussian(torch.Generator().manual_seed(0))).x
    )
    assert (unguided - y).abs().max() > 0.1  # the constraint is not met by accident


class RandomImageDenoiser:
    """A fixed random convolutional map standing in for a network (any x0_hat must be projected)."""

    def __init__(self, schedule, dtype=torch.float32, seed=0):
        self.schedule = schedule
        g = torch.Generator().manual_seed(seed)
        self.w = 0.3 * torch.randn(3, 3, 3, 3, generator=g, dtype=dtype)

    def __call__(self, x, t, cond=None):
        s = float(self.schedule.sigma(torch.tensor(float(t), dtype=F64)))
        return torch.tanh(torch.nn.functional.conv2d(x / (1 + s), self.w, padding=1)) * 1.5


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["inpaint", "sr4", "colorize-ycbcr", "colorize-orthogonal"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "unipc", "heun"])
def test_measurement_holds_at_every_step_on_random_images(name, solver, dtype):
    """Images (2, 3, 8, 8) on the EDM schedule: A x0_hat = y to 1e-6 at every step in float32 and float64,
    and in the final sample in float64. (In float32 Heun's final Euler step y - rho (y - D) / rho returns D
    only up to rounding of y, ~1e-5 here, so its float32 final sample is held to 1e-4.)"""
    op = image_operators()[name]
    sch = EDM()
    g = torch.Generator().manual_seed(5)
    y = op(torch.rand(2, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1)
    grid = make_grid(sch, 8, UniformT())
    x = initial_noise(sch, float(grid[0]), (2, 3, 8, 8), g, dtype=dtype)
    rec = Recorder(op, y)
    out = sample(
        Projection(RandomImageDenoiser(sch, dtype), op, y), SOLVERS[solver](), grid, x, None, Gaussian(g), [rec]
    )
    assert len(rec.errors) == 8 and max(rec.errors) < 1e-6
    # Heun's float32 final step rounds y (|y| up to ~80 here) before subtracting it back: float32 eps * 80 ~ 1e-5
    tol = 1e-4 if (dtype == torch.float32 and solver == "heun") else 1e-6
    assert (op(out.x) - y).abs().max() < tol


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp-2m", "unipc"])
def test_inpainting_keeps_known_pixels_exactly(solver):
    """``inpaint(D, mask, known)``: the final sample equals ``known`` bit for bit where mask is 0."""
    sch = VPLinear()
    g = torch.Generator().manual_seed(7)
    known = torch.rand(3, 3, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :, 4:] = True  # fill the right half
    grid = make_grid(sch, 10, UniformT())
    x = initial_noise(sch, float(grid[0]), known.shape, g)
    out = sample(inpaint(RandomImageDenoiser(sch), mask, known), SOLVERS[solver](), grid, x, None, Gaussian(g)).x
    assert torch.equal(out[..., :4], known[..., :4])
    assert not torch.equal(out[..., 4:], known[..., 4:])


def test_gaussian_prior_inpainting_moves_toward_the_exact_posterior_mean():
    """Spec 8(d): N(mu, Sigma) in R^2, observe x[1] = y. The projected sampler (approximate) moves the mean of
    x[0] from the prior mean toward the exact posterior mean mu0 + S01/S11 (y - mu1)."""
    mu = torch.tensor([0.0, 0.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=F64)
    gmm = GMM.gaussian(mu, cov)
    y = torch.tensor([0.0, 2.0], dtype=F64)
    post = float(mu[0] + cov[0, 1] / cov[1, 1] * (y[1] - mu[1]))  # 1.6
    sch = VPLinear()
    grid = make_grid(sch, 50, UniformT())
    g = torch.Generator().manual_seed(0)
    x = initial_noise(sch, float(grid[0]), (4000, 2), g, dtype=F64)
    out = sample(
        inpaint(gmm.denoiser(sch), torch.tensor([1.0, 0.0]), y), SOLVERS["ddpm"](), grid, x, None, Gaussian(g)
    ).x
    m = float(out[:, 0].mean())
    assert abs(m - post) < 0.5 * abs(post - float(mu[0])), (m, post)


def test_sequential_projections_onto_commuting_constraints():
    """Disjoint inpainting masks in sequence equal one projection with the union of known pixels (either
    order); super-resolution and colorization commute, and the pair satisfies both measurements."""
    g = torch.Generator().manual_seed(2)
    z, x = torch.randn(2, 2, 3, 8, 8, generator=g, dtype=F64)
    k1 = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    k1[..., :3, :] = True
    k2 = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    k2[..., 5:, :] = True
    op1, op2, both = Inpaint(~k1), Inpaint(~k2), Inpaint(~(k1 | k2))
    ident = lambda v, t, c=None: v  # noqa: E731
    ident.schedule = None

    def proj(ops):
        return Projection(ident, ops, [op(z) for op in ops])(x, 0.5)

    assert torch.equal(proj([op1, op2]), both.project(x, both(z)))
    assert torch.equal(proj([op2, op1]), both.project(x, both(z)))
    sr, col = SuperResolution(2), Colorize()
    a, b = proj([sr, col]), proj([col, sr])
    assert (a - b).abs().max() < 1e-12
    assert (sr(a) - sr(z)).abs().max() < 1e-12 and (col(a) - col(z)).abs().max() < 1e-12


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="only 0"):
        Inpaint(torch.tensor([0.5, 1.0]))
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        SuperResolution(0)
    with pytest.raises(ConfigError, match=r"divisible by 3, got shape \(1, 3, 8, 8\)"):
        SuperResolution(3)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="expects 3 channels"):
        Colorize()(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="orthogonal"):
        Colorize(weights=(1.0, -1.0), direction=(1.0, 1.0))
    with pytest.raises(ConfigError, match="does not match"):
        SuperResolution(2).project(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ConfigError, match="2 operators and 1 measurements"):
        Projection(None, [SuperResolution(2), Colorize()], [torch.zeros(1)])
    with pytest.raises(ConfigError, match="LinearOperator"):
        Projection(None, "inpaint", torch.zeros(1))
