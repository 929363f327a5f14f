"""One gloo run per world size (2 and 4 ranks, forked, one thread each) that computes every distributed check of
tests/parallel once; the tests read its results (``results(world)``, cached per session).

Networks (float64, deterministic weights): ``Toy``: conv3x3 -> GroupNorm -> self-attention (diffusers
Attention) -> stride-2 conv -> nearest upsample -> conv, on a 16 x 16 latent, whose input is [x, z] stacked on
channels: the time-dependent variant feeds x + z and t through the blocks; the time-independent variant feeds
only the fixed field z (its activations are the same at every step) and adds x pointwise at the end, so that a
stale buffer equals a fresh one. Sampler: 10-step DDIM on VPLinear (condiff.core.sampling.sample)."""

from __future__ import annotations

import functools
import os
import tempfile

import torch
import torch.distributed as dist
from diffusers.models.attention_processor import Attention
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.sampling import sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError
from condiff.guidance.cfg import CFG
from condiff.models.base import load_model
from condiff.parallel import PatchConfig, PatchEngine, patch_parallel
from condiff.parallel.comm import total_over_ranks
from condiff.parallel.launch import spawn
from condiff.parallel.pcpp import neighbour_needs
from condiff.solvers import get_solver

H = W = 16
B = 2
CH = 8


class Toy(nn.Module):
    def __init__(self, time_free: bool = False, seed: int = 0):
        super().__init__()
        self.time_free = time_free
        self.c1 = nn.Conv2d(3, CH, 3, padding=1)
        self.gn = nn.GroupNorm(2, CH)
        self.attn = Attention(CH, heads=2, dim_head=4, residual_connection=True)
        self.down = nn.Conv2d(CH, CH, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.wide = nn.Conv2d(CH, CH, 5, padding=2)
        self.c2 = nn.Conv2d(CH, 3, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3

    def forward(self, xz, t):
        x, z = xz[:, :3], xz[:, 3:]
        h = self.c1(z if self.time_free else z + x)
        if not self.time_free:
            h = h + t.reshape(-1, 1, 1, 1) / 1000
        h = self.attn(self.gn(h))
        h = self.wide(self.up(self.down(h))) + h
        out = self.c2(torch.nn.functional.silu(h))
        return out + 0.5 * x if self.time_free else out


class Scaled(nn.Module):
    """x * 1 before ``inner``: the layer's input is then not the replicated network input, so the halos are
    exchanged (the first-convolution shortcut does not apply)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t=None):
        return self.inner(x * 1.0)


def _field(seed=5):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _denoiser(net):
    return wrap(net, VPLinear(), "eps", call=lambda n, x, t, cond: n(torch.cat([x, cond["z"]], 1), t), channels=3)


def _sample(den, steps=10, cond=None, batch=B):
    x = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float64)
    with torch.no_grad():
        return sample(den, get_solver("ddim"), grid, x, cond or {"z": _field()[:batch]}).x


def _dev(a, b):
    return float((a - b).abs().max())


def _run(den, net, cfg, **kw):
    eng = PatchEngine(cfg)
    out = _sample(patch_parallel(den, net, engine=eng), **kw)
    eng.close()
    return out, eng


def _bytes_per_step(eng, after: int):
    """Bytes per network evaluation summed over ranks, per kind, averaged over evaluations >= ``after``."""
    kinds = ("kv", "halo", "gn", "output")
    steps = eng.counter.steps[after:]
    mine = [sum(s.get(k, 0) for s in steps) / len(steps) for k in kinds]
    return dict(zip(kinds, total_over_ranks(mine)))


def _worker(rank, world, path):
    torch.manual_seed(0)
    res = {}
    toy, free = Toy(), Toy(time_free=True)
    den, den_free = _denoiser(toy), _denoiser(free)
    ref, ref_free, ref4 = _sample(den), _sample(den_free), _sample(den, steps=4)
    nosplit = dict(split_batch=False)
    # full_sync equals the single process, both methods, with and without the batch split
    for method in ("distrifusion", "pcpp"):
        for split in (False, True):
            out, _ = _run(den, toy, PatchConfig(method=method, mode="full_sync", split_batch=split))
            res[f"full_sync/{method}/split={split}"] = _dev(out, ref)
        # every mode with the warm-up covering all steps is synchronous throughout
        out, _ = _run(den, toy, PatchConfig(method=method, mode="stale_gn", warmup_steps=10, **nosplit))
        res[f"warmup_all/{method}"] = _dev(out, ref)
    # time-independent activations: every asynchronous mode equals the single process
    for mode in ("sync_gn", "corrected_async_gn", "stale_gn", "no_sync"):
        for method, window in (("distrifusion", 0.3), ("pcpp", float(world))):
            cfg = PatchConfig(method=method, mode=mode, warmup_steps=1, window=window, **nosplit)
            out, _ = _run(den_free, free, cfg)
            res[f"time_free/{method}/{mode}"] = _dev(out, ref_free)
            out, _ = _run(den, toy, cfg, steps=4)
            res[f"time_dep/{method}/{mode}"] = _dev(out, ref4)
    # halo exchange: sliced convolutions (stride 1 and 2, 3x3, 5x5, dilation 2) equal the full convolution
    g = torch.Generator().manual_seed(3)
    for k, s, p, d in ((3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (1, 1, 0, 1)):
        conv = nn.Conv2d(4, 5, k, stride=s, padding=p, dilation=d).double()
        for q in conv.parameters():
            q.data = torch.randn(q.shape, generator=g, dtype=torch.float64)
        net = Scaled(conv)
        x = torch.randn(3, 4, H, W, generator=g, dtype=torch.float64)
        for method in ("distrifusion", "pcpp"):
            eng = PatchEngine(PatchConfig(method=method, mode="full_sync", **nosplit))
            with torch.no_grad(), eng.attach(net):
                y = net(x)
            res[f"halo/{method}/k{k}s{s}p{p}d{d}"] = _dev(y, conv(x))
    # GroupNorm across bands: synchronous moments equal torch's GroupNorm; corrected async with unchanged
    # input equals it too (fresh == stale)
    gn = nn.GroupNorm(4, 8).double()
    for q in gn.parameters():
        q.data = torch.randn(q.shape, generator=g, dtype=torch.float64)
    net = Scaled(gn)
    x = torch.randn(2, 8, H, W, generator=g, dtype=torch.float64) * 3 + 1
    for mode in ("full_sync", "corrected_async_gn", "stale_gn"):
        eng = PatchEngine(PatchConfig(mode=mode, warmup_steps=1, **nosplit))
        outs = []
        for _ in range(3):
            with torch.no_grad(), eng.attach(net):
                outs.append(net(x))
        eng.close()
        res[f"gn/{mode}"] = max(_dev(o, gn(x)) for o in outs)
    # CFG through the parallel denoiser, the [null, cond] batch split across the two rank groups
    cond = {"z": _field(), "null": {"z": torch.zeros(B, 3, H, W, dtype=torch.float64)}}
    ref_cfg = _sample(CFG(den, 3.0), cond=cond)
    for split in (False, True):
        eng = PatchEngine(PatchConfig(mode="full_sync", split_batch=split))
        out = _sample(CFG(patch_parallel(den, toy, engine=eng), 3.0), cond=cond)
        eng.close()
        res[f"cfg/split={split}"] = _dev(out, ref_cfg)
        res[f"cfg/groups/split={split}"] = eng.n_batch
    # the bundled shapes model (diffusers UNet2DConditionModel) in float64: full_sync gives the whole network's
    # x0 at every call, with the [null, cond] batch split across two groups and without
    m = _shapes()
    gen = torch.Generator().manual_seed(11)
    raw, _ = m.family.random_conditions(2, gen)
    cond = m.condition(raw)
    xs = [torch.randn(2, *m.family.image_shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    ts = [900.0, 500.0, 100.0]
    with torch.no_grad():
        want = [m.denoiser(x, t, cond) for x, t in zip(xs, ts)]
        for split in (False, True):
            eng = PatchEngine(PatchConfig(mode="full_sync", split_batch=split))
            par = patch_parallel(m.denoiser, m.module["unet"], engine=eng)
            got = [par(x, t, cond) for x, t in zip(xs, ts)]
            eng.close()
            res[f"unet/full_sync/split={split}"] = max(_dev(a, b) for a, b in zip(got, want))
            res[f"unet/bands/split={split}"] = eng.n_patch
    # layers that reach across rows in a way the engine does not split are refused, not run wrong
    refusals = []
    for bad in (
        nn.AvgPool2d(2),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Conv2d(1, 1, 3, padding_mode="circular"),
    ):
        try:
            with PatchEngine(PatchConfig()).attach(nn.Sequential(bad)):
                refusals.append(None)
        except ConfigError as e:
            refusals.append(str(e))
    res["refusals"] = refusals
    # bytes per step after the warm-up, summed over ranks
    bytes_ = {}
    for method, window in (("distrifusion", 0.3), ("pcpp", 0.3), ("pcpp", 1.0)):
        cfg = PatchConfig(method=method, mode="corrected_async_gn", warmup_steps=2, window=window, **nosplit)
        out, eng = _run(den, toy, cfg, steps=5)
        bytes_[f"{method}/{window}"] = _bytes_per_step(eng, 2)
        res[f"out/{method}/{window}"] = out
    res["bytes"] = bytes_
    tokens = (H // world) * W
    kv_band = B * tokens * 2 * 8 * 8  # (B, L, 2 x inner dim 8) float64
    res["kv_band_bytes"] = kv_band
    res["pcpp_kv_expected"] = {
        p: kv_band / tokens * sum(sum(neighbour_needs(i, tokens, world, p)) for i in range(world)) for p in (0.3, 1.0)
    }
    if rank == 0:
        torch.save(res, path)
    dist.barrier()


@functools.lru_cache(maxsize=None)
def _shapes():
    """The bundled shapes model in float64, loaded once in the parent: the forked ranks inherit it."""
    m = load_model("shapes")
    m.module.double()
    return m


@functools.lru_cache(maxsize=None)
def results(world: int) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res.pt")
        _shapes()
        spawn(_worker, world, path)
        return torch.load(path, weights_only=False)
