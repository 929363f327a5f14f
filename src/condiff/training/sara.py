"""SaRA: sparse adaptation of a pre-trained model's smallest weights (Hu et al. 2025, "SaRA: High-Efficient
Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation", ICLR; sec. 3: the threshold mask,
unstructured backpropagation and progressive re-selection).

For every selected parameter tensor P the mask is M = |P| < theta (the weights the paper finds temporarily
ineffective). Only P[M] is trained: each tensor gets a ``SparseUpdate`` parametrization
(torch.nn.utils.parametrize) that scatters a trainable vector of |M| scalars into the frozen tensor, so
gradients and Adam moments exist for those scalars alone, and every entry with |P| >= theta stays bit-identical.
``nuclear_penalty`` is the low-rank regulariser of the paper: lambda times the nuclear norm of the sparse
update (the selected values minus their values at selection, scattered into the matrix) of one randomly chosen
adapted matrix (min(shape) > 64 by default; convolution kernels as out x (in k k)). The authors' code penalises
the masked current values instead, which on a full-rank base pulls the update toward -base (measured in the
test: a larger nuclear norm of the update than without the penalty). ``reselect`` writes the trained values
back, recomputes the mask on the current values and starts a new vector
of the scalars now below theta (the step makes no update; the caller rebuilds its optimizer over
``trainable(model)``). ``state_dict_of`` holds only the selected values per tensor (the mask follows from the base
weights and theta, recorded beside them).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from condiff.errors import ConfigError, is_real


class SparseUpdate(nn.Module):
    """A parametrization: ``original`` with the entries at ``index`` (flat) replaced by the trainable ``values``."""

    def __init__(self, original: torch.Tensor, theta: float):
        super().__init__()
        index = torch.nonzero(original.detach().abs().flatten() < theta).flatten()
        self.register_buffer("index", index, persistent=False)
        self.values = nn.Parameter(original.detach().flatten()[index].clone())
        self.register_buffer("initial", self.values.detach().clone(), persistent=False)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.flatten().index_put((self.index,), self.values).view_as(original)


def _check_theta(theta) -> float:
    if not is_real(theta) or theta <= 0:
        raise ConfigError(f"SaRA's theta must be a positive finite number, got {theta!r}")
    return float(theta)


def apply_sara(model: nn.Module, theta: float = 2e-3, names=None) -> int:
    """Freeze ``model`` and make the entries |w| < theta of its weights (every parameter with a name in
    ``names``, default: every weight of 2 or more dimensions) trainable; returns the number of trainable
    scalars."""
    theta = _check_theta(theta)
    targets = [
        (mod, pname)
        for mname, mod in model.named_modules()
        for pname, p in list(mod.named_parameters(recurse=False))
        if (names is None and p.dim() >= 2) or (names is not None and f"{mname}.{pname}".strip(".") in names)
    ]
    if not targets:
        raise ConfigError("SaRA found no parameter to adapt (names matched nothing)")
    for p in model.parameters():
        p.requires_grad_(False)
    for mod, pname in targets:
        parametrize.register_parametrization(mod, pname, SparseUpdate(getattr(mod, pname), theta), unsafe=True)
        getattr(mod.parametrizations, pname).original.requires_grad_(False)
    model.sara_theta = theta
    return sum(v.numel() for v in trainable(model))


def updates(model: nn.Module) -> dict[str, SparseUpdate]:
    """The SparseUpdate of every adapted tensor, by the tensor's name."""
    out = {}
    for mname, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is None:
            continue
        for pname, entries in plist.items():
            for e in entries:
                if isinstance(e, SparseUpdate):
                    out[f"{mname}.{pname}".strip(".")] = e
    return out


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The trainable SaRA scalars (one vector per adapted tensor), in a fixed order."""
    return [u.values for _, u in sorted(updates(model).items())]


def _selections(model: nn.Module, what: str):
    """(theta, [(module name, module, tensor name, its ParametrizationList)]) of a model prepared by apply_sara."""
    theta = getattr(model, "sara_theta", None)
    if theta is None:
        raise ConfigError(f"{what} needs a model prepared by apply_sara")
    entries = []
    for mname, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        for pname in list(plist.keys()) if plist is not None else []:
            entries.append((mname, mod, pname, plist[pname]))
    return theta, entries


@torch.no_grad()
def reselect(model: nn.Module) -> int:
    """Progressive adjustment: write the trained values into the frozen tensors, recompute every mask on the
    current values (|w| < theta) and start new trainable vectors; no weight changes. Returns the new number of
    trainable scalars (rebuild the optimizer over ``trainable(model)``)."""
    theta, entries = _selections(model, "reselect")
    for _, mod, pname, entry in entries:
        current = getattr(mod, pname).detach().clone()
        entry.original.copy_(current)
        entry[0] = SparseUpdate(current, theta)
    return sum(v.numel() for v in trainable(model))


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the selected values, one vector per adapted tensor (``{name}.sara_values``)."""
    return {f"{name}.sara_values": u.values.detach().clone() for name, u in sorted(updates(model).items())}


def nuclear_penalty(model: nn.Module, lam: float, generator: torch.Generator | None = None, min_dim: int = 64):
    """lam * nuclear norm of the masked values of one adapted matrix drawn with ``generator`` among those whose
    smaller side exceeds ``min_dim``; a zero tensor where there is none. Differentiable in the SaRA scalars."""
    if not is_real(lam) or lam < 0:
        raise ConfigError(f"SaRA's lambda_rank must be a non-negative finite number, got {lam!r}")
    mods = {n: m for n, m in model.named_modules()}
    cands = []
    for name, u in sorted(updates(model).items()):
        mname, _, pname = name.rpartition(".")
        shape = getattr(mods[mname].parametrizations, pname).original.shape
        rows, cols = shape[0], math.prod(shape[1:])
        if min(rows, cols) > min_dim:
            cands.append((u, rows, cols))
    if not cands or lam == 0:
        return torch.zeros(())
    k = int(torch.randint(len(cands), (1,), generator=generator))
    u, rows, cols = cands[k]
    delta = u.values.new_zeros(rows * cols).index_put((u.index,), u.values - u.initial).view(rows, cols)
    return lam * torch.linalg.svdvals(delta).sum()


@torch.no_grad()
def restructure(model: nn.Module, weights: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Rebuild every adapted tensor's selection from a state dict of ``model`` (keys ``{prefix}{module}.
    parametrizations.{name}.original``): the frozen tensor is set from it and the mask recomputed on it, which is
    the selection the state was trained with (after ``reselect`` the frozen tensor holds the values it selected
    on). The selected values are then ``load_state_dict``'s to fill. Returns the number of trainable scalars."""
    theta, entries = _selections(model, "restructure")
    for mname, mod, pname, entry in entries:
        key = prefix + ".".join(filter(None, (mname, "parametrizations", pname, "original")))
        if key not in weights:
            raise ConfigError(f"the SaRA state lacks {key!r}")
        entry.original.copy_(weights[key])
        entry[0] = SparseUpdate(entry.original, theta)
    return sum(v.numel() for v in trainable(model))
