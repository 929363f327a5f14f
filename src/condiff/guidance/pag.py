"""Perturbed-Attention Guidance (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", ECCV 2024, sec. 4, eqs. 9-11).

The perturbed branch runs the network with the self-attention map of chosen layers replaced by the identity:
softmax(Q K^T / sqrt(d)) V becomes V, so such a layer outputs to_out(to_v(h)) (its output projection of the
value path; then the usual residual). Cross-attention is never touched. With x0_p the perturbed estimate
under the conditional input (paper eq. 10; diffusers' PAG pipelines compose it with CFG the same way):

    without CFG:  x0 = x0_c + s (x0_c - x0_p)                          = contrast(x0_c, x0_p, 1 + s)
    with CFG:     x0 = x0_u + w (x0_c - x0_u) + s (x0_c - x0_p)

w is the CFG scale in the diffusers convention (w = 1: conditional, spec 0.1). The weights sum to 1, so
mixing x0 equals mixing eps exactly (x0 is affine in eps at fixed x, t). s = 0 is plain CFG (or the plain
conditional denoiser): that case calls ``CFG`` / the denoiser itself, so it is bit-identical.

Mechanism: a scoped attention-processor swap. For the one forward that carries the perturbed rows, each
chosen diffusers ``Attention`` module gets an ``IdentityAttention`` processor via ``set_processor``; a
``finally`` puts every original processor object back (also when the forward raises). No hook or processor
stays on the network between calls, so PAG nests with anything and leaves the model as it found it.

Branches go through the network in one batch, layout [uncond, cond, perturbed]; the swapped
processors perturb only the last ``n`` rows of what they see (n = the caller's batch) and run the original
processor on the others. ``batched=False`` runs the perturbed rows as a forward of their own instead (every
row perturbed): the same numbers, for inner denoisers that reorder or split batches. PAG does CFG itself
(``cfg_scale``): wrap the model's own denoiser, not a ``CFG`` object (which would double the batch so that
the perturbed branch's null rows would not be perturbed).

Layers are named by dotted prefixes of self-attention module names of the UNet: ``'mid'`` (alias of
``mid_block``), ``'down'``, ``'up'``, ``'up_blocks.0'``, or a full name such as
``'mid_block.attentions.0.transformer_blocks.0.attn1'``. A name must select at least one self-attention
module (``Attention`` with ``is_cross_attention`` False: ``attn1`` in transformer blocks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError, one_of
from condiff.guidance.cfg import CFG, NAMES, batch_cond, contrast, split_batch
from condiff.guidance.schedules import check_scale

ALIASES = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}


def identity_attention(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """A diffusers self-attention layer with its attention map replaced by the identity: the value path
    to_out(to_v(h)), with the layer's own pre-norms, 4-D reshaping, residual and output rescaling."""
    residual = hidden_states
    h = hidden_states
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb)
    image = h.dim() == 4
    if image:
        b, c, height, width = h.shape
        h = h.reshape(b, c, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[0](attn.to_v(h))
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)
    if image:
        out = out.transpose(1, 2).reshape(b, c, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@dataclass
class IdentityAttention:
    """Attention processor: identity attention on the last ``rows`` rows of the batch (all rows if None),
    ``original`` (the module's own processor) on the rest."""

    original: Any
    rows: int | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ConfigError("PAG perturbs self-attention only, but a selected layer got encoder states")
        n = hidden_states.shape[0] if self.rows is None else self.rows
        keep = hidden_states.shape[0] - n
        if keep < 0:
            raise ConfigError(
                f"PAG: the layer saw a batch of {hidden_states.shape[0]} rows, fewer than the {n} perturbed rows"
            )
        pert = identity_attention(attn, hidden_states[keep:], None if temb is None else temb[keep:])
        if keep == 0:
            return pert
        mask = attention_mask
        if mask is not None and mask.shape[0] == hidden_states.shape[0]:
            mask = mask[:keep]
        normal = self.original(
            attn, hidden_states[:keep], None, mask, **({"temb": temb[:keep]} if temb is not None else {}), **kwargs
        )
        return torch.cat([normal, pert])


def _is_self_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and not module.is_cross_attention


def attention_root(denoiser_or_net) -> nn.Module:
    """The network whose module names PAG layer names refer to: ``net['unet']`` when the denoiser's network
    is a ModuleDict with a 'unet' (condiff's model families), else the network itself."""
    net = denoiser_or_net if isinstance(denoiser_or_net, nn.Module) else getattr(denoiser_or_net, "net", None)
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"PAG needs a denoiser over a torch network (a .net module), got {type(denoiser_or_net).__name__}"
        )
    if isinstance(net, nn.ModuleDict) and "unet" in net:
        return net["unet"]
    return net


def self_attention_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Every self-attention module of ``net`` by name (in module order)."""
    return {name: m for name, m in net.named_modules() if _is_self_attention(m)}


def _block_names(names: Sequence[str]) -> list[str]:
    """Short accepted names for an error message: the prefix up to '...attentions.N' (or the full name)."""
    out = []
    for n in names:
        parts = n.split(".")
        cut = next((i + 2 for i, p in enumerate(parts) if p == "attentions" and i + 1 < len(parts)), len(parts))
        short = ".".join(parts[:cut])
        if short not in out:
            out.append(short)
    return out


def select_layers(net: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """The self-attention modules selected by ``layers`` (comma-separated string or a sequence of names;
    each a dotted prefix or an alias mid/down/up). Unknown names are a one-line error listing accepted ones."""
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(x, str) for x in layers):
        raise ConfigError(f"PAG layers must be a non-empty list of layer names, got {layers!r}")
    table = self_attention_layers(net)
    if not table:
        raise ConfigError(f"PAG found no self-attention layer in {type(net).__name__}")
    chosen: dict[str, nn.Module] = {}
    for spec in layers:
        prefix = ALIASES.get(spec, spec)
        hits = {n: m for n, m in table.items() if n == prefix or n.startswith(prefix + ".")}
        if not hits:
            raise one_of("PAG layer", spec, list(ALIASES) + _block_names(list(table)))
        chosen.update(hits)
    return {n: chosen[n] for n in table if n in chosen}  # module order, no duplicates


@contextmanager
def perturbed_attention(modules: Sequence[nn.Module], rows: int | None = None):
    """Within the block, ``modules`` (diffusers Attention) run IdentityAttention on their last ``rows``
    rows; their original processor objects are restored on exit, also on an exception."""
    originals = [m.get_processor() for m in modules]
    try:
        for m, orig in zip(modules, originals):
            m.set_processor(IdentityAttention(orig, rows))
        yield
    finally:
        for m, orig in zip(modules, originals):
            m.set_processor(orig)


def _repeat_t(t, k: int):
    tt = torch.as_tensor(t)
    return torch.cat([tt] * k) if tt.dim() == 1 else t


@dataclass
class PAG(Wrapper):
    """Perturbed-attention guidance (module docstring). ``scale`` (s) and ``cfg_scale`` (w) are numbers or
    functions of t; ``cfg_scale=None`` means no CFG (then a 'null' entry of cond is ignored). ``layers``:
    names as in ``select_layers`` (default the middle block, as in diffusers). ``net`` overrides the network
    searched for layers (default ``attention_root(denoiser)``)."""

    denoiser: Any
    scale: float | Callable = 3.0
    layers: str | Sequence[str] = ("mid",)
    cfg_scale: float | Callable | None = None
    null: Mapping[str, Any] | None = None
    batched: bool = True
    skip_trivial: bool = True
    net: nn.Module | None = field(default=None, repr=False)  # a module tree
    modules: dict = field(init=False, repr=False)

    def __post_init__(self):
        check_scale(self.scale)
        if self.cfg_scale is not None:
            check_scale(self.cfg_scale)
        self.modules = select_layers(self.net if self.net is not None else attention_root(self.denoiser), self.layers)

    def perturbed(self, x, t, cond=None):
        """The perturbed estimate x0_p alone (identity attention in the chosen layers, every row)."""
        with perturbed_attention(list(self.modules.values())):
            return self.denoiser(x, t, cond)

    def __call__(self, x, t, cond=None):
        cond = dict(cond or {})
        null = cond.pop("null", None) or self.null
        s = self.scale(t) if callable(self.scale) else self.scale
        use_cfg = self.cfg_scale is not None
        w = (self.cfg_scale(t) if callable(self.cfg_scale) else self.cfg_scale) if use_cfg else 1.0
        if use_cfg and null is None:
            raise ConfigError("PAG with cfg_scale needs a null condition: pass cond['null'] or PAG(..., null=...)")
        if self.skip_trivial and s == 0:
            if not use_cfg:
                return self.denoiser(x, t, cond)
            return CFG(self.denoiser, w, null=null)(x, t, cond)
        need_u = use_cfg and not (self.skip_trivial and w == 1)
        n = x.shape[0]
        mods = list(self.modules.values())
        if self.batched:
            conds = ([dict(null)] if need_u else []) + [cond, cond]
            k = len(conds)
            with perturbed_attention(mods, rows=n):
                names = ([NAMES[0]] if need_u else []) + ["condition", "condition"]
                out = self.denoiser(torch.cat([x] * k), _repeat_t(t, k), batch_cond(conds, n, names))
            parts = split_batch(out, k)
            x0_c, x0_p = parts[-2], parts[-1]
            x0_u = parts[0] if need_u else None
        else:
            if need_u:
                x0_u, x0_c = split_batch(
                    self.denoiser(torch.cat([x, x]), _repeat_t(t, 2), batch_cond([dict(null), cond], n, NAMES)), 2
                )
            else:
                x0_u, x0_c = None, self.denoiser(x, t, cond)
            x0_p = self.perturbed(x, t, cond)
        base = x0_c if x0_u is None else contrast(x0_c, x0_u, w)
        return base + s * (x0_c - x0_p)


@dataclass
class Tap(Wrapper):
    """A transparent Denoiser wrapper that keeps its last call (x, t, cond, x0): ``PAGTerm`` reads the
    conditional rows of the inner guidance's own network call from it instead of evaluating them again."""

    denoiser: Any
    last: tuple | None = field(default=None, repr=False)

    def __call__(self, x, t, cond=None):
        out = self.denoiser(x, t, cond)
        self.last = (x, t, cond, out)
        return out


def _same_rows(a, b, n: int) -> bool:
    """The last n rows of the per-row entries of mapping ``a`` equal mapping ``b`` (the cond of n rows)."""
    for k, v in b.items():
        w = a.get(k) if isinstance(a, Mapping) else None
        if isinstance(v, Mapping):
            if not isinstance(w, Mapping) or not _same_rows(w, v, n):
                return False
        elif isinstance(v, torch.Tensor) and v.dim() > 0:
            if not isinstance(w, torch.Tensor) or w.shape[0] < n or not torch.equal(w[-n:], v):
                return False
        elif not (w is v or (not isinstance(w, torch.Tensor) and w == v)):
            return False
    return True


def tapped_conditional(tap: Tap | None, x, t, cond) -> torch.Tensor | None:
    """x0_c = D(x, t, cond) from the tap's last call when that call's last n rows were exactly (x, t, cond)
    (the [uncond, cond] layout of CFG, AG, LinearAG and rescale); None when they were not."""
    if tap is None or tap.last is None:
        return None
    lx, lt, lc, out = tap.last
    n = x.shape[0]
    if lx.shape[0] < n or not torch.equal(lx[-n:], x):
        return None
    lt = torch.as_tensor(lt, dtype=torch.float64).reshape(-1).expand(lx.shape[0])[-n:]
    if not torch.equal(lt, torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(n)):
        return None
    return out[-n:] if _same_rows(lc or {}, cond, n) else None


@dataclass
class PAGTerm(Wrapper):
    """PAG's term added to any other guided denoiser: x0 = guided(x) + s (x0_c - x0_p), with x0_p the model's
    own ``denoiser`` with perturbed self-attention on the conditional input (paper eq. 11). This is how PAG
    composes with a guidance that runs CFG its own way (adaptive guidance, LinearAG, guidance rescale).

    x0_c: when ``guided`` calls the network through ``tap`` (build it as ``guided = AG(tap, ...)`` with
    ``tap = Tap(denoiser)``), the conditional rows of that call are reused after checking that they were
    exactly (x, t, cond), so PAG costs one perturbed row per sample and call; otherwise [cond, perturbed] run
    in one batch (two rows). Over CFG it equals ``PAG(denoiser, s, layers, cfg_scale=w)``. ``scale`` 0 is
    ``guided`` bit for bit. ``start()`` starts ``guided``, ``denoiser`` and ``tap`` in one pass of
    ``start_trajectory``, so the tap inside the started ``guided`` is the started ``tap``: still one object."""

    inner = ("guided", "denoiser", "tap")

    guided: Any
    denoiser: Any
    scale: float | Callable = 3.0
    layers: str | Sequence[str] = ("mid",)
    net: nn.Module | None = field(default=None, repr=False)
    tap: Tap | None = None
    modules: dict = field(init=False, repr=False)

    def __post_init__(self):
        check_scale(self.scale)
        self.modules = select_layers(self.net if self.net is not None else attention_root(self.denoiser), self.layers)

    def __call__(self, x, t, cond=None):
        if self.tap is not None:
            self.tap.last = None
        out = self.guided(x, t, cond)
        s = self.scale(t) if callable(self.scale) else self.scale
        if s == 0:
            return out
        c = {k: v for k, v in (cond or {}).items() if k != "null"}
        x0_c = tapped_conditional(self.tap, x, t, c)
        mods = list(self.modules.values())
        if x0_c is None:
            with perturbed_attention(mods, rows=x.shape[0]):
                both = self.denoiser(torch.cat([x, x]), _repeat_t(t, 2), batch_cond([c, c], x.shape[0]))
                x0_c, x0_p = split_batch(both, 2)
        else:
            with perturbed_attention(mods):
                x0_p = self.denoiser(x, t, c)
        if self.tap is not None:
            self.tap.last = None  # nothing kept between calls
        return out + s * (x0_c - x0_p)
