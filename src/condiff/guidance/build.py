"""The guidance of `condiff sample` / `condiff eval`: a pure builder from options to a Denoiser.

``build_guidance(denoiser, options)`` composes the guidance objects of this package (no string switches in the
solver loop); ``options`` is a frozen ``GuidanceOptions``, checked when it is made. The methods and their
papers are in the modules used (docs/guidance.md):

- CFG (Ho & Salimans 2022, eq. 6), the base: ``CFG(D, cfg)``. No option = exactly this object.
- ``pag``: PAG (Ahn et al., ECCV 2024, eqs. 9-11) with ``cfg_scale=cfg``, self-attention perturbed in
  ``pag_layers``. It must wrap the model's own denoiser (it swaps the network's attention processors).
- ``ag``: adaptive guidance (Castillo et al., AAAI 2025), threshold gamma_bar = ``ag`` on the cosine between
  the branches in ``ag_space`` ('x0' by default: on shapes the eps cosine stays above 0.9996 at every step, so
  it switches at the first step or never; docs/guidance.md).
- ``cfg_rescale``: guidance rescale (Lin et al., WACV 2024, eqs. 15-18) with phi = ``cfg_rescale``, in x0 space.
- ``interval``: guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024, eq. 4), (t_lo, t_hi] in the
  model schedule's own t units (the t the solver passes the denoiser; the bundled VP models: 0-999, 999 =
  noise). Alone: ``GuidanceInterval``; with ``ag`` / ``cfg_rescale`` the CFG scale becomes
  ``IntervalScale(cfg, t_lo, t_hi)`` (1, the conditional model, outside); with ``pag`` both the CFG and the PAG
  scale are limited to it (outside: CFG scale 1 and PAG scale 0, i.e. the conditional model, one branch).
- ``negative_prompt``: the negative condition replaces the null branch (cond['negative'], which the caller
  encodes): with plain CFG ``NegativeGuidance``; otherwise ``NegativeAsNull`` around the method, so that
  PAG / AG / rescale / interval contrast against the negative condition instead of the empty one.

- ``linear_ag``: LinearAG (Castillo et al. 2025) with fitted ``LinearAGCoefficients``,
  checked against the run's cfg and time grid (``allow_mismatch``: a warning, and LinearAG runs at the run's cfg
  on its grid); ``linear_ag_steps`` evaluations predict the unconditional branch (default: the first half of
  the fitted ones).
- ``classifier``: classifier guidance of one attribute (``cg_attribute``, default color) at scale ``cg_scale``,
  wrapped around all of the above (guidance/attribute.py); the target of each row is the value its prompt names
  (cond['cg_target'], set by the caller). A noise-aware classifier gives ADM guidance (Dhariwal & Nichol 2021);
  a clean one gets EluCD's calibration (Ma et al., ICLR 2024) on the sampling grid, or, with ``cg_raw``, is
  applied to x_t as it is (the naive off-the-shelf baseline); PPAP experts (a ``MultiExpert``)
  give guidance by its t-routed LoRA experts (Go et al., CVPR 2023).
- ``minority``: minority guidance (Um et al., ICLR 2024) with a ``MinorityClassifier``, toward ``minority_level``
(default the most minority) at scale ``minority_scale``; outermost.

AG, LinearAG and guidance rescale each run CFG their own way, so at most one of them is accepted (two: one
ConfigError).
PAG composes with each: its term s (x0_c - x0_p) is added to theirs (``PAGTerm``, reading x0_c from their own
network call through a ``Tap``, so PAG adds one perturbed row per call); alone (with plain CFG) it is ``PAG``. Interval,
negative prompt and the classifier compose with all.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from condiff.core.denoiser import X0, Eps, Wrapper
from condiff.errors import ConfigError, check_int, check_real, one_of
from condiff.guidance.adaptive import AdaptiveGuidance
from condiff.guidance.cfg import CFG
from condiff.guidance.interval import GuidanceInterval, split_null
from condiff.guidance.negative import NegativeGuidance
from condiff.guidance.pag import PAG, PAGTerm, Tap
from condiff.guidance.rescale import GuidanceRescale
from condiff.guidance.schedules import MAX_SCALE, IntervalScale

AG_SPACES = {"x0": X0(), "eps": Eps()}


def parse_interval(text: str, what: str = "interval") -> tuple[float, float]:
    """'LO,HI' -> (t_lo, t_hi) in the model schedule's t units; HI may be inf; needs LO < HI."""
    parts = str(text).split(",")
    bad = ConfigError(
        f"{what} must be LO,HI with LO < HI in the model's t units (e.g. 200,800 "
        f"for the bundled models, t in 0-999), got {text!r}"
    )
    if len(parts) != 2:
        raise bad
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise bad from None
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise bad
    return lo, hi


@dataclass(frozen=True)
class GuidanceOptions:
    """The guidance of one run (module docstring); None means the option is off. Checked on construction: bad
    values and combinations that do not compose are one-line ConfigErrors. They name each option by its field
    name, or by ``labels[field]`` when the caller gives labels (the CLI passes its flag names).

    The classifier, the minority classifier and the LinearAG coefficients are objects, never names or paths:
    ``classifier`` is a classifier network with heads (``AttributeClassifier`` or any module with ``head`` and
    ``config.noise_aware``) or PPAP experts (``condiff.guidance.ppap.MultiExpert``); ``minority`` a
    ``MinorityClassifier``; ``linear_ag`` ``LinearAGCoefficients``. ``allow_mismatch``: LinearAG coefficients
    fitted for another cfg or grid run with a warning instead of an error (``check_linear_ag_fits``)."""

    cfg: float = 3.0
    pag: float | None = None
    pag_layers: tuple[str, ...] = ("mid",)
    ag: float | None = None
    ag_space: str = "x0"
    cfg_rescale: float | None = None
    interval: tuple[float, float] | None = None
    negative_prompt: str | None = None
    linear_ag: Any = None
    linear_ag_steps: int | None = None
    classifier: Any = None
    cg_scale: float = 1.0
    cg_attribute: str = "color"
    cg_raw: bool = False
    minority: Any = None
    minority_level: int | None = None
    minority_scale: float = 1.0
    allow_mismatch: bool = field(default=False, compare=False)
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def name(self, key: str) -> str:
        """How errors call the option ``key``: its label, else the field name."""
        return self.labels.get(key, key)

    def __post_init__(self):
        L = self.name
        scale = f"a finite number with |scale| <= {MAX_SCALE:g}"
        if not isinstance(self.allow_mismatch, bool):
            raise ConfigError(f"{L('allow_mismatch')} must be true or false, got {self.allow_mismatch!r}")
        check_real(L("cfg"), self.cfg, -MAX_SCALE, MAX_SCALE, f"a finite number with |cfg| <= {MAX_SCALE:g}")
        if self.pag is not None:
            check_real(L("pag"), self.pag, -MAX_SCALE, MAX_SCALE, scale)
        if (
            isinstance(self.pag_layers, str)
            or not isinstance(self.pag_layers, tuple)
            or not self.pag_layers
            or not all(isinstance(n, str) and n.strip() for n in self.pag_layers)
        ):
            raise ConfigError(f"{L('pag_layers')} must be a non-empty list of layer names, got {self.pag_layers!r}")
        if self.ag is not None:
            check_real(
                L("ag"), self.ag, -1.0, 1.0, "a cosine threshold gamma_bar in [-1, 1] (1: never switch, i.e. CFG)"
            )
        if self.ag_space not in AG_SPACES:
            raise one_of(L("ag_space"), self.ag_space, AG_SPACES)
        if self.cfg_rescale is not None:
            check_real(L("cfg_rescale"), self.cfg_rescale, 0.0, 1.0, "a rescale factor phi in [0, 1]")
        if self.interval is not None:
            if not isinstance(self.interval, tuple) or len(self.interval) != 2:
                raise ConfigError(f"{L('interval')} must be a pair (t_lo, t_hi), got {self.interval!r}")
            parse_interval(",".join(repr(float(v)) for v in self.interval), L("interval"))
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ConfigError(f"{L('negative_prompt')} must be a string, got {self.negative_prompt!r}")
        check_real(L("cg_scale"), self.cg_scale, -MAX_SCALE, MAX_SCALE, scale)
        if not isinstance(self.cg_attribute, str) or not self.cg_attribute:
            raise ConfigError(f"{L('cg_attribute')} must be an attribute name such as color, got {self.cg_attribute!r}")
        if self.classifier is not None and not callable(self.classifier):
            raise ConfigError(
                f"{L('classifier')} must be a classifier network or PPAP experts, got {type(self.classifier).__name__}"
            )
        if self.minority is not None and not callable(self.minority):
            raise ConfigError(
                f"{L('minority')} must be a minority level classifier, got {type(self.minority).__name__}"
            )
        check_real(L("minority_scale"), self.minority_scale, -MAX_SCALE, MAX_SCALE, scale)
        if self.minority_level is not None:
            check_int(L("minority_level"), self.minority_level, 0)
        if self.minority is None and (self.minority_scale != 1.0 or self.minority_level is not None):
            raise ConfigError(f"{L('minority_scale')} and {L('minority_level')} need {L('minority')}")
        if self.classifier is None and (self.cg_scale != 1.0 or self.cg_attribute != "color" or self.cg_raw):
            raise ConfigError(f"{L('cg_scale')}, {L('cg_attribute')} and {L('cg_raw')} need {L('classifier')}")
        own = [L(key) for key in ("ag", "cfg_rescale", "linear_ag") if getattr(self, key) is not None]
        if len(own) > 1:
            raise ConfigError(
                f"{' and '.join(own)} do not compose (each runs CFG its own way); use one of "
                f"{L('ag')}, {L('cfg_rescale')}, {L('linear_ag')} (each composes with {L('pag')})"
            )
        if self.linear_ag is not None:
            if not hasattr(self.linear_ag, "predict"):
                raise ConfigError(
                    f"{L('linear_ag')} must be LinearAG coefficients, got {type(self.linear_ag).__name__}"
                )
            for key in ("interval", "negative_prompt"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"{L('linear_ag')} predicts the branch it was fitted on (empty prompt, its "
                        f"fixed {L('cfg')} at every step), so it does not combine with {L(key)}"
                    )
        if self.linear_ag_steps is not None:
            if self.linear_ag is None:
                raise ConfigError(f"{L('linear_ag_steps')} needs {L('linear_ag')}")
            check_int(L("linear_ag_steps"), self.linear_ag_steps, 0)

    @property
    def is_plain_cfg(self) -> bool:
        return self == GuidanceOptions(cfg=self.cfg)

    def describe(self) -> dict:
        """JSON-ready values keyed by field (objects by their type name)."""

        def kind(obj):
            return None if obj is None else type(obj).__name__

        on = self.classifier is not None
        return {
            "pag": self.pag,
            "pag_layers": ",".join(self.pag_layers) if self.pag is not None else None,
            "ag": self.ag,
            "ag_space": self.ag_space if self.ag is not None else None,
            "cfg_rescale": self.cfg_rescale,
            "linear_ag": kind(self.linear_ag),
            "linear_ag_steps": self.linear_ag_steps,
            "guidance_interval": None if self.interval is None else list(self.interval),
            "negative_prompt": self.negative_prompt,
            "classifier": kind(self.classifier),
            "cg_scale": self.cg_scale if on else None,
            "cg_attribute": self.cg_attribute if on else None,
            "cg_raw": self.cg_raw if on else None,
            "minority": kind(self.minority),
            "minority_level": self.minority_level,
            "minority_scale": self.minority_scale if self.minority is not None else None,
        }


@dataclass
class NegativeAsNull(Wrapper):
    """The wrapped guided denoiser sees cond['negative'] as its null condition: a negative prompt for any
    method of the CFG family (with plain CFG this is exactly ``NegativeGuidance``)."""

    denoiser: Any

    def __call__(self, x, t, cond=None):
        cond, negative = split_null(cond, None, key="negative", what="a negative prompt")
        cond.pop("null", None)
        return self.denoiser(x, t, {**cond, "null": negative})


def _network(denoiser):
    """The torch network under a chain of wrappers (``.denoiser``), for PAG's layer lookup."""
    d = denoiser
    for _ in range(64):
        if getattr(d, "net", None) is not None:
            return d.net
        if getattr(d, "denoiser", None) is None:
            break
        d = d.denoiser
    raise ConfigError(f"PAG needs a denoiser over a torch network, got {type(denoiser).__name__}")


def _finite_ends(interval: tuple[float, float]) -> tuple[float, float]:
    """(t_lo, t_hi) with +-inf replaced by +-float max, which IntervalScale accepts and every finite t treats
    the same way."""
    big = sys.float_info.max
    return tuple(min(max(v, -big), big) for v in interval)


def with_classifier(den, options: GuidanceOptions, grid=None):
    """``den`` with the classifier guidance of ``options`` around it (module docstring); ``grid`` is the
    sampling grid (EluCD's schedule needs it)."""
    o = options
    if o.classifier is None:
        return den
    from condiff.guidance.attribute import classifier_guidance, elucd_guidance
    from condiff.guidance.ppap import MultiExpert, ppap_attribute_guidance

    if isinstance(o.classifier, MultiExpert):
        if o.cg_raw:
            raise ConfigError(
                f"{o.name('cg_raw')} applies to a clean classifier; PPAP experts are noise-aware by construction"
            )
        return ppap_attribute_guidance(den, o.classifier, o.cg_attribute, o.cg_scale)
    net = o.classifier
    if net.config.noise_aware or o.cg_raw:
        return classifier_guidance(den, net, o.cg_attribute, o.cg_scale)
    if grid is None:
        raise ConfigError("EluCD guidance needs the sampling grid")
    return elucd_guidance(den, net, o.cg_attribute, o.cg_scale, grid)


def build_guidance(denoiser, options: GuidanceOptions, grid=None):
    """The guided Denoiser for ``options`` over the model's own ``denoiser`` (or a transparent wrapper of it,
    such as ``CountRows``). No option: ``CFG(denoiser, options.cfg)``. ``grid``: the sampling grid (used by
    EluCD classifier guidance and to check LinearAG's fitted times)."""
    if not isinstance(options, GuidanceOptions):
        raise ConfigError(f"build_guidance needs GuidanceOptions, got {type(options).__name__}")
    return with_minority(with_classifier(_cfg_family(denoiser, options, grid), options, grid), options)


def with_minority(den, options: GuidanceOptions):
    """``den`` with minority guidance toward ``minority_level`` (default the top level) around it."""
    if options.minority is None:
        return den
    from condiff.guidance.minority import MinorityGuidance

    return MinorityGuidance(den, options.minority, options.minority_scale, options.minority_level)


def linear_ag(denoiser, options: GuidanceOptions, grid=None):
    """``LinearAG`` with the coefficients of ``options``, checked against the run's cfg and grid
    (``check_linear_ag_fits``; with ``allow_mismatch`` a mismatch is a warning and LinearAG runs at the run's
    cfg, using row k at evaluation k whatever its time)."""
    from condiff.guidance.linear_ag import LinearAG, check_linear_ag_fits

    coeffs, L = options.linear_ag, options.name
    where = L("linear_ag") + ("" if getattr(coeffs, "source", None) is None else f" {coeffs.source!r}")
    check_linear_ag_fits(coeffs, options.cfg, grid, where=where, allow_mismatch=options.allow_mismatch)
    steps = options.linear_ag_steps
    if steps is not None and steps > coeffs.steps:
        raise ConfigError(f"{L('linear_ag_steps')} must be at most the {coeffs.steps} fitted evaluations, got {steps}")
    return LinearAG(denoiser, coeffs, steps=steps, cfg=options.cfg, check_times=not options.allow_mismatch)


def _cfg_family(denoiser, options: GuidanceOptions, grid=None):
    o, w = options, options.cfg
    scale = w if o.interval is None else IntervalScale(w, *_finite_ends(o.interval))
    s_pag = None
    if o.pag is not None:
        s_pag = o.pag if o.interval is None else IntervalScale(o.pag, *_finite_ends(o.interval), outside=0.0)
    if o.ag is not None or o.cfg_rescale is not None or o.linear_ag is not None:
        inner = denoiser if s_pag is None else Tap(denoiser)  # PAGTerm reuses the conditional rows
        if o.ag is not None:
            den = AdaptiveGuidance(inner, scale, o.ag, space=AG_SPACES[o.ag_space])
        elif o.linear_ag is not None:
            den = linear_ag(inner, o, grid)
        else:
            den = GuidanceRescale(inner, scale, o.cfg_rescale, space=X0())
        if s_pag is not None:
            from condiff.guidance.pag import attention_root

            den = PAGTerm(den, denoiser, s_pag, o.pag_layers, net=attention_root(_network(denoiser)), tap=inner)
    elif o.pag is not None:
        from condiff.guidance.pag import attention_root

        den = PAG(denoiser, s_pag, o.pag_layers, cfg_scale=scale, net=attention_root(_network(denoiser)))
    elif o.negative_prompt is not None and o.interval is None:
        return NegativeGuidance(denoiser, w)
    elif o.interval is not None:
        den = GuidanceInterval(denoiser, w, *o.interval)
    else:
        den = CFG(denoiser, w)
    return den if o.negative_prompt is None else NegativeAsNull(den)
