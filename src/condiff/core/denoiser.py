"""The Denoiser protocol, ``wrap``, and ``start_trajectory`` / ``Wrapper`` (the denoiser of one trajectory).

A Denoiser maps (x_t, t, cond) to x0_hat = E[x_0 | x_t, cond] and carries its NoiseSchedule. x0 is the
canonical output: guidance mixes in x0 space and solvers consume x0 (the data-prediction view of
DPM-Solver++, Lu et al. 2022b). ``cond`` is an opaque mapping passed through untouched.

Inputs are checked where they enter, so a bad one is a one-line ConfigError naming the mismatch rather than a
PyTorch error from deep inside a network: ``check_batch`` (x is a floating tensor with a batch dimension),
``check_cond_rows`` (one condition row per sample; ``guidance.cfg.batch_cond`` runs it for every method that
batches conditions), and ``WrappedDenoiser`` (x's channels and dtype against the network's, and a forward that
PyTorch refuses re-raised with the shapes involved).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import torch

from condiff.core import parameterization as P
from condiff.core.schedules import GridTime, NoiseSchedule, alpha_sigma
from condiff.errors import ConfigError, NetworkInputError, check_int, one_line, one_of


@runtime_checkable
class Denoiser(Protocol):
    schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t, cond: Mapping[str, Any] | None) -> torch.Tensor: ...


def start_trajectory(denoiser, memo: dict | None = None):
    """The denoiser to run one trajectory with: ``denoiser.start()`` where it has a ``start`` method (a method
    with per-trajectory state, such as adaptive guidance, or a wrapper around one), else ``denoiser`` itself.
    ``sample`` calls it once per call, and so does every loop that runs a trajectory by hand.

    ``memo`` maps id(object) to the started object while one stack is started, so that an object reached along
    two paths (a ``Tap`` that two wrappers hold) is started once and stays shared inside the trajectory."""
    memo = {} if memo is None else memo
    key = id(denoiser)
    if key not in memo:
        start = getattr(denoiser, "start", None)
        if not callable(start):
            memo[key] = denoiser
        else:
            memo[key] = start(memo) if isinstance(denoiser, Wrapper) else start()
    return memo[key]


class Wrapper:
    """Mixin of a Denoiser -> Denoiser dataclass whose fields named in ``inner`` (default ``denoiser``) hold the
    wrapped denoisers (None allowed). It gives ``schedule`` (the first inner denoiser's) and ``start``: the inner
    denoisers are started with ``start_trajectory`` and ``self`` is returned when none of them changed (a
    stateless stack is not copied), else a copy over the started ones (``dataclasses.replace``, which runs
    ``__post_init__`` again, so objects built there from the inner denoiser are rebuilt over the started one)."""

    inner: ClassVar[tuple[str, ...]] = ("denoiser",)

    @property
    def schedule(self):
        return getattr(self, self.inner[0]).schedule

    def start(self, memo: dict | None = None):
        memo = {} if memo is None else memo
        started = {}
        for name in self.inner:
            d = getattr(self, name)
            s = d if d is None else start_trajectory(d, memo)
            if s is not d:
                started[name] = s
        return replace(self, **started) if started else self


def coefficients(schedule: NoiseSchedule, t, x: torch.Tensor):
    """alpha(t), sigma(t) shaped to broadcast against x (t scalar or per-sample); a ``GridTime`` of this schedule
    gives the values it holds (the same numbers, without evaluating the schedule again)."""
    if isinstance(t, GridTime) and t.schedule is schedule:
        a, s = torch.tensor(t.alpha, dtype=torch.float64), torch.tensor(t.sigma, dtype=torch.float64)
        return a.to(x.dtype), s.to(x.dtype)
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = alpha_sigma(schedule, t)
    shape = (-1,) + (1,) * (x.dim() - 1) if t.dim() == 1 else ()
    return a.reshape(shape).to(x.dtype), s.reshape(shape).to(x.dtype)


class Prediction:
    """What a network outputs: converts an output to x0, and gives the training target.

    ``precondition`` gives the network's inputs (x and time) for x_t at t; it is the identity for all but
    EDM's preconditioning, which scales x by c_in and replaces t by c_noise. ``x0_scale`` is |d x0_hat / d out|
    (a per-sample factor: ||x0_hat - x0||^2 = x0_scale^2 ||out - target||^2), which turns an x0-space loss
    weighting into one on the prediction's own target."""

    name = "?"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def to_x0(self, out, x, a, s, t, schedule):
        raise NotImplementedError

    def target(self, x0, eps, a, s, t, schedule):
        raise NotImplementedError

    def precondition(self, x, t, a, s, schedule):
        """(network input, network time) for x_t at t (t one per sample)."""
        return x, t

    def x0_scale(self, a, s, t, schedule):
        raise NotImplementedError(f"prediction {self.name!r} does not give its x0 error scale")


class Eps(Prediction):
    name = "eps"

    def to_x0(self, out, x, a, s, t, schedule):
        return P.eps_to_x0(x, out, a, s)

    def target(self, x0, eps, a, s, t, schedule):
        return eps

    def x0_scale(self, a, s, t, schedule):
        return s / a


class X0(Prediction):
    name = "x0"

    def to_x0(self, out, x, a, s, t, schedule):
        return out

    def target(self, x0, eps, a, s, t, schedule):
        return x0

    def x0_scale(self, a, s, t, schedule):
        return torch.ones_like(s)


class V(Prediction):
    name = "v"

    def to_x0(self, out, x, a, s, t, schedule):
        return P.v_to_x0(x, out, a, s)

    def target(self, x0, eps, a, s, t, schedule):
        return a * eps - s * x0

    def x0_scale(self, a, s, t, schedule):
        return s / (a * a + s * s)


class FlowVelocity(Prediction):
    """u = dx/dt; derivatives of alpha/sigma are taken numerically from the schedule (exact for Flow)."""

    name = "flow"

    @staticmethod
    def _derivatives(a, t, schedule, dtype):
        tt = torch.as_tensor(t, dtype=torch.float64)
        h = 1e-6
        da = (schedule.alpha(tt + h) - schedule.alpha(tt - h)) / (2 * h)
        ds = (schedule.sigma(tt + h) - schedule.sigma(tt - h)) / (2 * h)
        return tuple(d.reshape(a.shape).to(dtype) if tt.dim() else d.to(dtype) for d in (da, ds))

    def to_x0(self, out, x, a, s, t, schedule):
        da, ds = self._derivatives(a, t, schedule, x.dtype)
        return P.flow_to_x0(x, out, a, s, da, ds)

    def target(self, x0, eps, a, s, t, schedule):
        da, ds = self._derivatives(a, t, schedule, x0.dtype)
        return da * x0 + ds * eps

    def x0_scale(self, a, s, t, schedule):
        da, ds = self._derivatives(a, t, schedule, s.dtype)
        return s / (a * ds - s * da).abs()


class EDMPrecond(Prediction):
    """EDM preconditioning (Karras et al. 2022, sec. 5 and Table 1; eqs. 7-8):
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), with, for sigma_data = s_d,

        c_skip = s_d^2 / (sigma^2 + s_d^2),  c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
        c_in = 1 / sqrt(sigma^2 + s_d^2),    c_noise = 250 ln sigma.

    Any schedule works: sigma is rho = sigma(t)/alpha(t), the noise level of the rescaled variable
    x/alpha = x0 + rho eps (alpha = 1 on the EDM schedule), so the network sees c_in x / alpha.

    The training target of F (Karras et al. eq. 8) is (x0 - c_skip x/alpha) / c_out, which simplifies to
    (rho x0 - s_d^2 eps) / (s_d sqrt(rho^2 + s_d^2)): unit variance for data of variance s_d^2, and no
    division by rho, so it is finite at rho -> 0. With EDM's weighting lambda = 1/c_out^2 the x0-space loss
    lambda ||D - x0||^2 is exactly ||F - target||^2 (see training.objectives.EDMWeight).

    c_noise. Karras et al. feed c_noise = ln(sigma)/4 to their own embedding; diffusers' sinusoidal time
    embedding (UNet2DModel) has frequencies from 1 down to 1e-4 per unit and is built for timesteps spread
    over ~[0, 1000]: over ln(sigma)/4 in [-1.6, 1.1] its fastest channel turns less than half a period and
    the embedding is nearly constant. 250 ln sigma = 1000 * (ln(sigma)/4), the same factor diffusers puts
    between continuous t in [0, 1] and its timesteps, spans ~2650 units over sigma in [0.002, 80] (and
    ~[-900, 300] for the bulk of the log-normal training sigmas): the range the embedding was designed for.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, noise_scale: float = 250.0):
        self.sigma_data = float(sigma_data)
        self.noise_scale = float(noise_scale)

    def __repr__(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data:g}, noise_scale={self.noise_scale:g})"

    def coefficients(self, rho):
        """(c_skip, c_out, c_in, c_noise) at noise level rho = sigma/alpha (numbers or tensors)."""
        rho = torch.as_tensor(rho, dtype=torch.float64)
        sd = self.sigma_data
        norm = torch.sqrt(rho * rho + sd * sd)
        return sd * sd / (norm * norm), rho * sd / norm, 1.0 / norm, self.noise_scale * torch.log(rho)

    def _rho(self, a, s):
        return s / a

    def to_x0(self, out, x, a, s, t, schedule):
        c_skip, c_out, _, _ = self.coefficients(self._rho(a, s))
        return c_skip.to(x.dtype) * (x / a) + c_out.to(x.dtype) * out

    def target(self, x0, eps, a, s, t, schedule):
        rho, sd = self._rho(a, s), self.sigma_data
        return (rho * x0 - sd * sd * eps) / (sd * torch.sqrt(rho * rho + sd * sd))

    def precondition(self, x, t, a, s, schedule):
        _, _, c_in, _ = self.coefficients(self._rho(a, s))
        rho_t = schedule.sigma_over_alpha(torch.as_tensor(t, dtype=torch.float64))
        return c_in.to(x.dtype) * (x / a), self.noise_scale * torch.log(rho_t)

    def x0_scale(self, a, s, t, schedule):
        return self.coefficients(self._rho(a, s))[1].to(s.dtype)


PREDICTIONS = {p.name: p for p in (Eps(), X0(), V(), FlowVelocity(), EDMPrecond())}


def as_prediction(name_or_obj) -> Prediction:
    if isinstance(name_or_obj, Prediction):
        return name_or_obj
    if name_or_obj not in PREDICTIONS:
        raise one_of("prediction type", name_or_obj, PREDICTIONS)
    return PREDICTIONS[name_or_obj]


ROWS_HINT = "conditions need one row per sample, or pass a shared tensor with no batch dimension"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def describe(value) -> str:
    """'a float32 tensor of shape (8, 1, 16, 16)', or the type of a value that is not a tensor."""
    if isinstance(value, torch.Tensor):
        name = dtype_name(value.dtype)
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def check_batch(x, what: str = "x") -> torch.Tensor:
    """``x`` when it is a floating-point tensor with a batch dimension (at least 1-D); otherwise the one-line
    ConfigError naming what it is. ``sample``, ``invert`` and ``WrappedDenoiser`` run it."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.is_floating_point()):
        raise ConfigError(f"{what} must be a floating-point tensor with a batch dimension, got {describe(x)}")
    return x


def rows_mismatch(cond: Mapping[str, Any] | None, n: int, label: str = "condition", against: str = "x") -> str | None:
    """The message for the first tensor of ``cond`` (top level) with a batch dimension but not ``n`` rows (the
    rows of ``against``), or None when every one has ``n`` (0-d tensors are shared by every sample; other
    values are not rows)."""
    for key, value in (cond or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != n:
            r = value.shape[0]
            return f"{label} {key!r} has {r} row{'' if r == 1 else 's'} but {against} has {n} ({ROWS_HINT})"
    return None


def check_cond_rows(cond: Mapping[str, Any] | None, n: int, label: str = "condition", against: str = "x") -> None:
    """Raise the one-line ConfigError of ``rows_mismatch`` when a tensor of ``cond`` does not have ``n`` rows."""
    message = rows_mismatch(cond, n, label, against)
    if message is not None:
        raise ConfigError(message)


def first_weight(net) -> torch.Tensor | None:
    """The first floating-point parameter of ``net`` (an ``nn.Module``), or None (no such parameter, or not
    a module)."""
    if not isinstance(net, torch.nn.Module):
        return None
    return next((p for p in net.parameters() if p.is_floating_point()), None)


def config_channels(net) -> int | None:
    """``net.config['in_channels']`` for a network with a diffusers-style config (``ModelMixin``), else None."""
    cfg = getattr(net, "config", None)
    c = cfg.get("in_channels") if isinstance(cfg, Mapping) else getattr(cfg, "in_channels", None)
    return c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else None


def _weight_or_false(net):
    w = first_weight(net)
    return False if w is None else w


def _torch_message(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return one_line(lines[0] if lines else type(err).__name__)


def _default_call(net, x, t_in, cond):
    return net(x, t_in, **dict(cond or {}))


@dataclass
class WrappedDenoiser:
    """A network behind the Denoiser protocol (see ``wrap``).

    Every call checks x (``check_batch``), its channels against ``channels`` (dimension 1; None: not known)
    and its dtype against the network's first floating-point weight (an ``nn.Module``'s; the parameter is
    looked up once and kept, so the checks cost about a microsecond). A RuntimeError from the forward or from
    converting its output is re-raised as a one-line ``NetworkInputError`` (a ConfigError that is also a
    RuntimeError): the shapes involved, PyTorch's first line, and a likely cause where one is seen (a condition
    tensor without one row per sample, x on another device than the weights). Out-of-memory errors and
    NotImplementedError (an op without a kernel or a forward-AD rule) pass through unchanged."""

    net: Callable
    schedule: NoiseSchedule
    prediction: Prediction
    time_input: Callable = lambda t: t
    call: Callable = _default_call
    channels: int | None = None
    _weight: Any = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:  # one line: the network's class, not its module tree
        return f"WrappedDenoiser({self.prediction.name}, {self.schedule!r}, net={type(self.net).__name__})"

    def _check_weights(self, x):
        w = self._weight
        if w is None:
            w = self._weight = _weight_or_false(self.net)
        if w is False or w.dtype == x.dtype:
            return
        w = self._weight = _weight_or_false(self.net)  # the parameters may have been replaced since
        if w is False or w.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
            return
        raise ConfigError(
            f"x is {dtype_name(x.dtype)} but the network's weights are {dtype_name(w.dtype)} "
            f"(cast x with x.to(torch.{dtype_name(w.dtype)}), or the network with .to(torch.{dtype_name(x.dtype)}))"
        )

    def _refusal(self, x, cond, err, out=None) -> NetworkInputError:
        """The one-line NetworkInputError (a ConfigError) for a RuntimeError ``err`` of the forward (``out``
        None) or of converting its output ``out`` to x0: the shapes involved and PyTorch's first line, then a
        likely cause where one is seen (a condition without one row per sample, x on another device)."""
        if out is not None:
            what = f"the network's output ({describe(out)}) does not fit x ({describe(x)})"
        else:
            tensors = {k: v for k, v in (cond or {}).items() if isinstance(v, torch.Tensor)}
            conds = ", ".join(f"{k!r}: {tuple(v.shape)} {dtype_name(v.dtype)}" for k, v in tensors.items())
            what = f"the network refused x ({describe(x)}) with cond {{{conds}}}"
        seen = [rows_mismatch(cond, x.shape[0])]
        w = first_weight(self.net)
        if w is not None and w.device != x.device:
            seen.append(f"x is on {x.device} but the network's weights are on {w.device}")
        return NetworkInputError("; ".join([f"{what}: {_torch_message(err)}", *filter(None, seen)]))

    def __call__(self, x, t, cond=None):
        check_batch(x)
        if self.channels is not None and (x.dim() < 2 or x.shape[1] != self.channels):
            got = x.shape[1] if x.dim() >= 2 else "no"
            raise ConfigError(
                f"x has {got} channel{'' if got == 1 else 's'} but the network expects {self.channels} "
                f"(x's shape after its batch dimension is {tuple(x.shape[1:])})"
            )
        self._check_weights(x)
        a, s = coefficients(self.schedule, t, x)
        t_vec = torch.as_tensor(t, dtype=torch.float64)
        if t_vec.dim() == 0:
            t_vec = t_vec.expand(x.shape[0])
        x_in, t_in = self.prediction.precondition(x, t_vec, a, s, self.schedule)
        try:
            out = self.call(self.net, x_in, self.time_input(t_in).to(x.dtype), cond)
        except (torch.OutOfMemoryError, NotImplementedError):
            raise
        except RuntimeError as err:
            raise self._refusal(x, cond, err) from err
        try:
            return self.prediction.to_x0(out, x, a, s, t, self.schedule)
        except (torch.OutOfMemoryError, NotImplementedError):
            raise
        except RuntimeError as err:
            raise self._refusal(x, cond, err, out) from err


def wrap(
    net,
    schedule: NoiseSchedule,
    prediction="eps",
    time_input: Callable | None = None,
    call: Callable | None = None,
    channels: int | None = None,
) -> WrappedDenoiser:
    """Adapt any network to the Denoiser protocol.

    ``prediction``: a Prediction object or one of eps, x0, v, flow, edm. ``time_input`` maps the schedule's
    time to what the network expects (identity by default: VP-discrete's t is diffusers' timestep).
    ``call(net, x, t_in, cond)`` runs the network; by default ``net(x, t_in, **cond)``.
    ``channels``: the channels x must have (dimension 1); by default the network's ``config.in_channels``
    when it has one (a diffusers model), else not checked before the forward. A ``call`` that changes the
    number of channels (pixel unshuffling, concatenated masks) passes the number x has.

    dtype: x must have the dtype of the network's weights. A float64 x with float32 weights (or the reverse)
    is a ConfigError naming both, not a silent cast: casting would change the precision the caller asked for
    without saying so. Under ``torch.autocast`` the check is skipped (autocast casts on purpose)."""
    if channels is not None:
        channels = check_int("channels", channels, lo=1)
    return WrappedDenoiser(
        net,
        schedule,
        as_prediction(prediction),
        time_input or (lambda t: t),
        call or _default_call,
        channels if channels is not None else config_channels(net),
    )


def diffuse(schedule: NoiseSchedule, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps, the forward process (t scalar or per-sample), computed in float64 and
    returned in x0's dtype."""
    a, s = coefficients(schedule, t, x0)
    return (a * x0.double() + s * eps.double()).to(x0.dtype)


def take_rows(cond: Mapping[str, Any] | None, index, n: int):
    """The rows ``index`` (a slice, an index tensor or a boolean mask) of every tensor in ``cond`` whose first
    dimension is the batch size ``n``, in nested mappings too; other values (scalars, shared tensors,
    non-tensors) pass through unchanged. None stays None."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: take_rows(v, index, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.dim() > 0 and cond.shape[0] == n:
        return cond[index]
    return cond
