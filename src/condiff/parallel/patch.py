"""Patch parallelism: one image's network evaluation split into row bands across ranks.

DistriFusion (Li, Cai, Zhang, Chen, Han, Li, Zhu, Han, "DistriFusion: Distributed Parallel Inference for
High-Resolution Diffusion Models", CVPR 2024; sec. 4.2 "displaced patch parallelism", Fig. 3, and sec. 4.3 for
the sparse operations; official code mit-han-lab/distrifuser, modules/pp/{attn,conv2d,groupnorm}.py) and PCPP
(condiff.parallel.pcpp). The latent (B, C, H, W) is split into n row bands, one per rank (with ``split_batch``
and an even world, the batch is first split in two halves, e.g. CFG's [uncond, cond], each handled by one
half of the ranks). Each rank runs the whole network on its band; the operations that reach across bands are
taken over by scoped forwards installed for one call (``PatchEngine.attach``), so any network built from
``nn.Conv2d``, ``nn.GroupNorm`` and diffusers ``Attention`` works (condiff's and diffusers'
UNet2DConditionModel):

* Conv2d (k x k, stride s, zero padding p): the band is padded with halo rows of the neighbours (p rows above,
  d (k - 1) - p + ... below; ``halo_rows``) and convolved without row padding; the first convolution reads the
  replicated input and needs no communication. Sliced convolution with exchanged halos equals the full
  convolution on the band (``halo_rows`` gives the exact rows).
* GroupNorm: per (sample, group) partial moments m = (E[x], E[x^2]) are all-gathered, var = E[x^2] - E[x]^2;
  in ``corrected_async_gn`` the moments are the stale ones of every rank plus the change of the own ones,
  full = mean_j(stale_j) + (fresh_r - stale_r) (``corrected_moments``); a negative variance falls back to the
  local one. Bessel's correction is not applied (the official code multiplies the variance by m/(m - 1), m the
  elements of the band's group): torch's GroupNorm uses the biased variance, so ``full_sync`` equals the
  single-process network.
* Self-attention: Q of the band against keys/values of the whole image, where the other bands' K/V are the
  previous evaluation's (all-gathered asynchronously, "stale") and the own band's are fresh. Cross-attention
  reads the replicated text states and needs no communication.
* The output bands are all-gathered synchronously so every rank holds the full network output (and the
  solver's update is replicated).

Modes (DistriFusion's): ``full_sync`` (every exchange synchronous: equals the single process), ``sync_gn``
(GroupNorm synchronous, convolutions and attention stale), ``corrected_async_gn`` (default), ``stale_gn``
(the other ranks' stale moments, own slot fresh, no extrapolation), ``no_sync`` (no communication after the
warm-up: the other bands' K/V, halos and GroupNorm moments stay at their warm-up values; the official code
instead normalises each band by its own statistics there, its ``separate_gn``). The first ``warmup_steps``
network evaluations of a trajectory (at least one: nothing is stale before it) are synchronous in every mode.

Layers are keyed by the order of their first call within one network evaluation (the official code registers
them lazily on the first pass); a layer whose input shape changes is exchanged synchronously that call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from condiff.errors import ConfigError, check_int, check_real, one_of
from condiff.parallel import pcpp
from condiff.parallel.comm import CommCounter

MODES = ("full_sync", "sync_gn", "corrected_async_gn", "stale_gn", "no_sync")
METHODS = ("distrifusion", "pcpp")
UNSUPPORTED = (nn.MultiheadAttention, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class PatchConfig:
    """method: distrifusion or pcpp; mode: one of MODES; warmup_steps: synchronous evaluations at the start of
    each trajectory (DistriFusion's default 4); split_batch: split the batch (CFG's two halves) across two rank
    groups when the world is even; window: PCPP's partial attention window p (official default 0.3)."""

    method: str = "distrifusion"
    mode: str = "corrected_async_gn"
    warmup_steps: int = 4
    split_batch: bool = True
    window: float = 0.3

    def __post_init__(self):
        if self.method not in METHODS:
            raise one_of("parallel method", self.method, METHODS)
        if self.mode not in MODES:
            raise one_of("parallel mode", self.mode, MODES)
        check_int("warmup_steps", self.warmup_steps, lo=0)
        check_real("window", self.window, lo=0.0)
        if not isinstance(self.split_batch, bool):
            raise ConfigError(f"split_batch must be true or false, got {self.split_batch!r}")


def halo_rows(conv: nn.Conv2d, rows: int, row0: int, height: int) -> tuple[int, int]:
    """(top, bottom): the halo rows a band of ``rows`` input rows starting at ``row0`` (of ``height``) needs so
    that ``conv`` without row padding gives exactly its band of output rows [row0 / s, (row0 + rows) / s).
    Refuses (ConfigError) a convolution whose output rows do not split with the input's bands."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    p = _row_padding(conv)
    out_full = (height + 2 * p - d * (k - 1) - 1) // s + 1
    if row0 % s or rows % s or out_full * s != height:
        raise ConfigError(
            f"patch parallelism needs convolutions whose output rows split with the bands: a {k}x{k} stride-{s} "
            f"convolution over {height} rows in bands of {rows} (give an image height divisible by the number "
            "of bands times the network's total downsampling)"
        )
    o0, o1 = row0 // s, (row0 + rows) // s
    first, last = o0 * s - p, (o1 - 1) * s - p + d * (k - 1)  # input rows read, inclusive
    return row0 - first, max(0, last + 1 - (row0 + rows))


def _row_padding(conv: nn.Conv2d) -> int:
    if isinstance(conv.padding, str):
        return 0 if conv.padding == "valid" else conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    return conv.padding[0]


def corrected_moments(stale: list[torch.Tensor], fresh: torch.Tensor, rank: int) -> torch.Tensor:
    """DistriFusion's corrected asynchronous GroupNorm moments: mean_j stale_j + (fresh - stale_rank). With
    fresh == stale_rank this is the exact mean of the ranks' moments."""
    return torch.stack(stale).mean(0) + (fresh - stale[rank])


@dataclass
class _Layer:
    index: int
    shape: tuple = ()
    stale: Any = None  # what the next asynchronous use reads
    pending: Any = None  # (works, apply) of an exchange in flight


@dataclass
class _Call:
    """What one network evaluation needs while its hooks run."""

    sync: bool
    full_in: torch.Tensor
    local_in: torch.Tensor
    next_index: int = 0
    self_attention: Any = None
    pending_v: Any = None


@dataclass
class PatchEngine:
    """The per-rank state of patch-parallel evaluation: process groups, per-layer stale buffers, the byte
    counter, and the count of network evaluations in the current trajectory (``calls``).

    With ``split_batch`` and an even world of n ranks, ranks [0, n/2) take the first half of the batch and
    ranks [n/2, n) the second; each half is split into n/2 row bands. ``new_group`` is called on every rank in
    the same order (torch.distributed requires it), so build the engine on every rank."""

    config: PatchConfig = field(default_factory=PatchConfig)
    counter: CommCounter = field(default_factory=CommCounter)

    def __post_init__(self):
        live = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if live else 1
        self.rank = dist.get_rank() if live else 0
        self.n_batch = 2 if (self.config.split_batch and self.world >= 2 and self.world % 2 == 0) else 1
        self.n_patch = self.world // self.n_batch
        self.batch_index, self.patch_rank = divmod(self.rank, self.n_patch)
        self.patch_group = None
        if self.n_batch == 2:
            groups = [dist.new_group(list(range(g * self.n_patch, (g + 1) * self.n_patch))) for g in range(2)]
            self.patch_group = groups[self.batch_index]
        self.layers: dict[int, _Layer] = {}
        self.calls = 0
        self.synchronous: list[bool] = []  # per network evaluation (all trajectories): exchanged synchronously?
        self._call: _Call | None = None

    # trajectory ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Finish every exchange in flight and forget the stale buffers (a new trajectory)."""
        self.close()
        self.layers = {}
        self.calls = 0

    def close(self) -> None:
        """Wait for every asynchronous exchange still in flight (every rank has issued the same ones)."""
        for layer in self.layers.values():
            self._finish(layer)

    def describe(self) -> dict:
        c = self.config
        return {
            "parallel": c.method,
            "parallel_mode": c.mode,
            "warmup_steps": c.warmup_steps,
            "split_batch": self.n_batch == 2,
            "pcpp_window": c.window if c.method == "pcpp" else None,
            "world_size": self.world,
            "bands": self.n_patch,
        }

    # the scoped forwards ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, root: nn.Module):
        """Install the band-splitting forwards on ``root`` (the network that takes the latent as its first
        argument) and its Conv2d, GroupNorm and attention modules for the duration of the block."""
        if self.world == 1:
            try:
                yield
            finally:
                self.calls += 1
                self.synchronous.append(True)
                self.counter.mark_step()
            return
        installed = []

        def put(module, fn):
            module.forward = fn
            installed.append(module)

        for name, mod in root.named_modules():
            bad = isinstance(mod, UNSUPPORTED) or (isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros")
            if bad or (isinstance(mod, nn.Upsample) and mod.mode != "nearest"):
                raise ConfigError(
                    f"patch parallelism does not handle {type(mod).__name__} (at {name or 'the root'}); it splits "
                    "networks of Conv2d (zero padding), GroupNorm and diffusers Attention"
                )
        try:
            for mod in root.modules():
                if mod is root:
                    continue
                if isinstance(mod, nn.Conv2d):
                    put(mod, self._conv_forward(mod))
                elif isinstance(mod, nn.GroupNorm):
                    put(mod, self._gn_forward(mod))
                elif _is_attention(mod):
                    put(mod, self._attn_forward(mod, mod.forward))
                    put(mod.to_k, self._to_k_forward(mod, mod.to_k.forward, mod.to_v))
                    put(mod.to_v, self._to_v_forward(mod, mod.to_v.forward))
            put(root, self._root_forward(root.forward))
            yield
        finally:
            for mod in installed:
                mod.__dict__.pop("forward", None)
            self._call = None

    def _sync_now(self) -> bool:
        return self.config.mode == "full_sync" or self.calls < max(1, self.config.warmup_steps)

    def _root_forward(self, forward):
        def run(x, *args, **kwargs):
            if not (isinstance(x, torch.Tensor) and x.dim() == 4):
                raise ConfigError("patch parallelism needs a network whose first argument is a (B, C, H, W) latent")
            b, _, h, _ = x.shape
            if h % self.n_patch:
                raise ConfigError(f"the latent's {h} rows do not split into {self.n_patch} equal bands")
            lo, hi = 0, b
            if self.n_batch == 2 and b % 2 == 0:
                lo, hi = self.batch_index * b // 2, (self.batch_index + 1) * b // 2
                args, kwargs = _rows(args, lo, hi, b), _rows(kwargs, lo, hi, b)
            rows = h // self.n_patch
            full = x[lo:hi]
            local = full[:, :, self.patch_rank * rows : (self.patch_rank + 1) * rows].contiguous()
            self._call = _Call(self._sync_now(), full, local)
            self.synchronous.append(self._call.sync)
            try:
                out = forward(local, *args, **kwargs)
            finally:
                self._call = None
            tensor = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
            whole = self._gather_output(tensor, b)
            self.calls += 1
            self.counter.mark_step()
            if hasattr(out, "sample"):
                out.sample = whole
                return out
            return (whole, *out[1:]) if isinstance(out, tuple) else whole

        return run

    def _gather_output(self, band: torch.Tensor, b: int) -> torch.Tensor:
        parts = [torch.empty_like(band) for _ in range(self.world)]
        self.counter.all_gather(parts, band.contiguous(), None, "output")
        groups = [torch.cat(parts[g * self.n_patch : (g + 1) * self.n_patch], 2) for g in range(self.n_batch)]
        split = self.n_batch == 2 and b % 2 == 0
        return torch.cat(groups, 0) if split else groups[0]

    def _layer(self, shape: tuple) -> tuple[_Layer, bool]:
        """This call's next layer and whether it must exchange synchronously (warm-up, full_sync, a new shape)."""
        call = self._call
        idx = call.next_index
        call.next_index += 1
        layer = self.layers.get(idx)
        if layer is None or layer.shape != shape:
            if layer is not None:
                self._finish(layer)
            layer = self.layers[idx] = _Layer(idx, shape)
            return layer, True
        self._finish(layer)
        return layer, call.sync

    @staticmethod
    def _finish(layer: _Layer) -> None:
        if layer.pending is not None:
            works, apply = layer.pending
            for w in works:
                w.wait()
            apply()
            layer.pending = None

    @staticmethod
    def _tag(layer: _Layer, direction: int) -> int:
        """The point-to-point tag of a layer's messages going up (0) or down (1) the bands."""
        return 2 * layer.index + direction

    def _peer(self, j: int) -> int:
        """Global rank of band j of this rank's batch group."""
        return self.batch_index * self.n_patch + j

    # convolution ------------------------------------------------------------------------------------------
    def _conv_forward(self, conv: nn.Conv2d):
        def run(x):
            call = self._call
            if call is None:
                return conv._conv_forward(x, conv.weight, conv.bias)
            rows, n, r = x.shape[2], self.n_patch, self.patch_rank
            top, bottom = halo_rows(conv, rows, r * rows, rows * n)
            pw = conv.padding[1] if not isinstance(conv.padding, str) else _row_padding(conv)
            if x is call.local_in:  # the replicated input: halos read directly, no communication
                full, r0 = call.full_in, r * rows
                up = full[:, :, max(0, r0 - top) : r0]
                down = full[:, :, r0 + rows : r0 + rows + bottom]
                up = torch.cat([x.new_zeros(*x.shape[:2], top - up.shape[2], x.shape[3]), up], 2)
                down = torch.cat([down, x.new_zeros(*x.shape[:2], bottom - down.shape[2], x.shape[3])], 2)
            elif top == 0 and bottom == 0:
                up = down = None
            else:
                if max(top, bottom) > rows:
                    raise ConfigError(f"a convolution's halo ({max(top, bottom)} rows) exceeds its band ({rows} rows)")
                layer, sync = self._layer(("conv", tuple(x.shape), top, bottom))
                up, down = self._halo(layer, x, top, bottom, sync)
            xp = x if up is None else torch.cat([up, x, down], 2)
            return F.conv2d(xp, conv.weight, conv.bias, conv.stride, (0, pw), conv.dilation, conv.groups)

        return run

    def _halo(self, layer: _Layer, x, top: int, bottom: int, sync: bool):
        """(rows above, rows below) the band: exchanged now when ``sync``, else the previous evaluation's (and
        this evaluation's exchange starts, except in no_sync, which keeps the warm-up's)."""
        if sync or layer.stale is None:
            self._exchange_halo(layer, x, top, bottom)
            self._finish(layer)
            return layer.stale
        stale = layer.stale
        if self.config.mode != "no_sync":
            self._exchange_halo(layer, x, top, bottom)
        return stale

    def _exchange_halo(self, layer: _Layer, x, top: int, bottom: int) -> None:
        """Start the halo exchange of band x: the rank above needs x's first ``bottom`` rows, the rank below its
        last ``top`` rows. DistriFusion all-gathers both boundaries; PCPP sends them to the neighbours only."""
        n, r, h = self.n_patch, self.patch_rank, x.shape[2]
        b, c, w = x.shape[0], x.shape[1], x.shape[3]
        for_up, for_down = x[:, :, :bottom].contiguous(), x[:, :, h - top :].contiguous()
        zeros_top, zeros_bottom = x.new_zeros(b, c, top, w), x.new_zeros(b, c, bottom, w)
        if self.config.method == "distrifusion":
            payload = torch.cat([for_up, for_down], 2).contiguous()
            outs = [torch.empty_like(payload) for _ in range(n)]
            work = self.counter.all_gather(outs, payload, self.patch_group, "halo", async_op=True)

            def apply():
                up = zeros_top if r == 0 else outs[r - 1][:, :, bottom:]
                down = zeros_bottom if r == n - 1 else outs[r + 1][:, :, :bottom]
                layer.stale = (up, down)

            layer.pending = ([work], apply)
            return
        works = []
        up_buf, down_buf = torch.empty_like(zeros_top), torch.empty_like(zeros_bottom)
        if r > 0:
            if bottom:
                works.append(self.counter.isend(for_up, self._peer(r - 1), self._tag(layer, 0), "halo"))
            if top:
                works.append(self.counter.irecv(up_buf, self._peer(r - 1), self._tag(layer, 1), "halo"))
        if r < n - 1:
            if top:
                works.append(self.counter.isend(for_down, self._peer(r + 1), self._tag(layer, 1), "halo"))
            if bottom:
                works.append(self.counter.irecv(down_buf, self._peer(r + 1), self._tag(layer, 0), "halo"))

        def apply_p2p():
            layer.stale = (zeros_top if r == 0 else up_buf, zeros_bottom if r == n - 1 else down_buf)

        layer.pending = (works, apply_p2p)

    # GroupNorm --------------------------------------------------------------------------------------------
    def _gn_forward(self, gn: nn.GroupNorm):
        def run(x):
            call = self._call
            if call is None:
                return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
            b, c = x.shape[:2]
            g = gn.num_groups
            xg = x.reshape(b, g, -1)
            xd = xg.double()
            local = torch.stack([xd.mean(-1), (xd * xd).mean(-1)], -1)  # (B, G, 2)
            layer, sync = self._layer(("gn", tuple(x.shape)))
            full = self._moments(layer, local, sync or self.config.mode == "sync_gn")
            mean, var = full[..., 0], full[..., 1] - full[..., 0] ** 2
            local_var = local[..., 1] - local[..., 0] ** 2
            var = torch.where(var < 0, local_var, var)
            y = (xd - mean[..., None]) / torch.sqrt(var[..., None] + gn.eps)
            y = y.to(x.dtype).reshape(x.shape)
            if gn.affine:
                shape = (1, c) + (1,) * (x.dim() - 2)
                y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
            return y

        return run

    def _moments(self, layer: _Layer, local: torch.Tensor, sync: bool) -> torch.Tensor:
        r, mode = self.patch_rank, self.config.mode
        if sync or layer.stale is None:
            self._gather_async(layer, local, "gn")
            self._finish(layer)
            return torch.stack(layer.stale).mean(0)
        stale = layer.stale
        if mode == "corrected_async_gn":
            full = corrected_moments(stale, local, r)
        else:  # stale_gn, no_sync: the other ranks' stale moments, the own slot fresh
            parts = list(stale)
            parts[r] = local
            full = torch.stack(parts).mean(0)
        if mode != "no_sync":
            self._gather_async(layer, local, "gn")
        return full

    def _gather_async(self, layer: _Layer, t: torch.Tensor, kind: str) -> None:
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.n_patch)]
        work = self.counter.all_gather(outs, t, self.patch_group, kind, async_op=True)
        layer.pending = ([work], lambda: setattr(layer, "stale", outs))

    # attention --------------------------------------------------------------------------------------------
    def _attn_forward(self, attn, forward):
        def run(hidden_states, encoder_hidden_states=None, *args, **kwargs):
            call = self._call
            if call is None or encoder_hidden_states is not None:
                return forward(hidden_states, encoder_hidden_states, *args, **kwargs)
            call.self_attention = attn
            try:
                return forward(hidden_states, None, *args, **kwargs)
            finally:
                call.self_attention = None
                call.pending_v = None

        return run

    def _to_k_forward(self, attn, to_k, to_v: nn.Module):
        v_forward = type(to_v).forward

        def run(x):
            call = self._call
            if call is None or call.self_attention is not attn:
                return to_k(x)
            k, v = to_k(x), v_forward(to_v, x)
            full = self._kv(torch.cat([k, v], -1))
            fk, fv = full.split(k.shape[-1], -1)
            call.pending_v = fv
            return fk

        return run

    def _to_v_forward(self, attn, to_v):
        def run(x):
            call = self._call
            if call is not None and call.self_attention is attn and call.pending_v is not None:
                v, call.pending_v = call.pending_v, None
                return v
            return to_v(x)

        return run

    def _kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys/values (B, L, 2C) of the band -> those the band's queries attend to."""
        layer, sync = self._layer(("kv", tuple(kv.shape)))
        n, r, mode = self.n_patch, self.patch_rank, self.config.mode
        if sync or layer.stale is None:
            self._gather_async(layer, kv, "kv")
            self._finish(layer)
            return torch.cat(layer.stale, 1)
        parts = list(layer.stale)
        parts[r] = kv
        full = torch.cat(parts, 1)
        if self.config.method == "distrifusion":
            if mode != "no_sync":
                self._gather_async(layer, kv, "kv")
            return full
        tokens = kv.shape[1]
        start, end = pcpp.window(r, tokens, n, self.config.window)
        if mode != "no_sync":
            self._send_neighbours(layer, kv)
        return full[:, start:end]

    def _send_neighbours(self, layer: _Layer, kv: torch.Tensor) -> None:
        """PCPP: send the upper neighbour the first tokens its window reads, the lower one the last; receive
        the tokens of the own window from them (applied at the next evaluation)."""
        n, r, tokens, p = self.n_patch, self.patch_rank, kv.shape[1], self.config.window
        up_need, down_need = pcpp.neighbour_needs(r, tokens, n, p)
        works, recvs = [], []
        if r > 0:
            k = pcpp.neighbour_needs(r - 1, tokens, n, p)[1]  # the upper neighbour reads my first k tokens
            if k:
                works.append(self.counter.isend(kv[:, :k].contiguous(), self._peer(r - 1), self._tag(layer, 0), "kv"))
            if up_need:
                buf = kv.new_empty(kv.shape[0], up_need, kv.shape[2])
                works.append(self.counter.irecv(buf, self._peer(r - 1), self._tag(layer, 1), "kv"))
                recvs.append((r - 1, slice(tokens - up_need, tokens), buf))
        if r < n - 1:
            k = pcpp.neighbour_needs(r + 1, tokens, n, p)[0]  # the lower neighbour reads my last k tokens
            if k:
                send = kv[:, tokens - k :].contiguous()
                works.append(self.counter.isend(send, self._peer(r + 1), self._tag(layer, 1), "kv"))
            if down_need:
                buf = kv.new_empty(kv.shape[0], down_need, kv.shape[2])
                works.append(self.counter.irecv(buf, self._peer(r + 1), self._tag(layer, 0), "kv"))
                recvs.append((r + 1, slice(0, down_need), buf))

        def apply():
            for j, where, buf in recvs:
                layer.stale[j][:, where] = buf

        layer.pending = (works, apply)


def _is_attention(mod: nn.Module) -> bool:
    """A diffusers-style attention module: to_q, to_k, to_v linear projections and a processor."""
    return all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("to_q", "to_k", "to_v")) and hasattr(
        mod, "processor"
    )


def _rows(value, lo: int, hi: int, b: int):
    """``value`` with every tensor of ``b`` rows (in tuples, lists and dicts) cut to rows [lo, hi)."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() > 0 and value.shape[0] == b else value
    if isinstance(value, dict):
        return {k: _rows(v, lo, hi, b) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, lo, hi, b) for v in value)
    return value
