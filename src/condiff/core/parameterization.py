"""Pure conversions between network parameterizations, given x_t = a x_0 + s eps.

This module is the only place these conversions live. ``a``/``s`` are alpha(t)/sigma(t) broadcastable to x.
- eps: the added noise (Ho et al. 2020).
- x0: the clean data (Tweedie's E[x_0 | x_t]).
- v = a eps - s x0 (Salimans & Ho 2022, sec. 4); x0 = (a x - s v) / (a^2 + s^2).
- score = grad log p_t(x) = -eps / s (Song et al. 2021).
- flow velocity u = dx/dt = da x0 + ds eps (Lipman et al. 2023); needs the derivatives da, ds.
"""

from __future__ import annotations


def eps_to_x0(x, eps, a, s):
    return (x - s * eps) / a


def x0_to_eps(x, x0, a, s):
    return (x - a * x0) / s


def v_to_x0(x, v, a, s):
    return (a * x - s * v) / (a * a + s * s)


def x0_to_v(x, x0, a, s):
    return a * x0_to_eps(x, x0, a, s) - s * x0


def score_to_x0(x, score, a, s):
    return eps_to_x0(x, -s * score, a, s)


def x0_to_score(x, x0, a, s):
    return -x0_to_eps(x, x0, a, s) / s


def flow_to_x0(x, u, a, s, da, ds):
    """Solve x = a x0 + s eps, u = da x0 + ds eps for x0."""
    return (ds * x - s * u) / (a * ds - s * da)


def x0_to_flow(x, x0, a, s, da, ds):
    return da * x0 + ds * x0_to_eps(x, x0, a, s)
