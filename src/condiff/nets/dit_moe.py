"""DiT-MoE: a Diffusion Transformer whose MLPs are sparse mixtures of experts (Fei et al., 2024, "Scaling Diffusion
Transformers to 16 Billion Parameters", arXiv:2407.11633; the official code's models.py: ``MoEGate``,
``AddAuxiliaryLoss``, ``SparseMoeBlock.moe_infer``), on DiT's adaLN-Zero blocks (Peebles & Xie, 2023, Sec. 3.2).

Each block's MLP is (Sec. 3.1, Eq. 1-3)

    y = sum_{k in top-K(g)} g_k E_k(h) + S(h),   g = softmax(W_g h) over the E routed experts,

with the top-K gates used as they are (**no renormalisation** over the K chosen experts), each E_k a SwiGLU MLP
(Shazeer, 2020) of hidden size ``expert_ratio * d`` (4d), and S the always-active shared experts: ``shared`` of
them of hidden ``shared_ratio * d`` each, implemented as one SwiGLU MLP of hidden ``shared * shared_ratio * d``
(the paper's 2 shared experts of hidden d -> one MLP of hidden 2d).

Expert balance loss (Sec. 3.1, Eq. 4; the code's non-sequence ``aux_loss``):

    aux = alpha * sum_i P_i f_i,   P_i = mean over tokens of g_i,   f_i = E * (share of the N K top-K assignments
                                                                              that go to expert i),

so perfectly uniform routing gives aux = alpha and all tokens on the same K experts with P = 1/K on them gives
alpha E / K. It is not added to the training loss: ``AddAuxiliaryLoss`` returns the block's output unchanged and,
in the backward pass, hands the aux term a gradient of 1, so the gate receives d(aux)/dW_g alongside the task loss's
gradient (a pass-through autograd function).

Two paths compute the same y: training (``train()``) repeats each token K times and runs every expert on the
copies routed to it, weighting and summing the K copies; inference (``eval()``) sorts the N K assignments by
expert, runs each expert once on its contiguous run of tokens and scatter-adds the gated outputs into the result
(``moe_infer``). ``experts = 0`` makes the MLP a dense SwiGLU of hidden ``dense_ratio * d`` (the baseline: with
K experts of 4d and shared 2d, a dense hidden of 10d has the same active parameters and FLOPs per token, up to the
gate's d E).

The network is a diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors.
The condition is a caption of ``seq_len`` slot tokens (condiff.data.text): the sum of their embeddings is added to
the time embedding and drives every block's adaLN-Zero modulation (DiT's class-conditional design). With
``cross_attention`` the image tokens also attend to the caption's token embeddings (plus a learned slot embedding)
in every block, between self-attention and the MLP (PixArt-alpha's text-conditioned DiT block, Chen et al., 2023,
Sec. 2.3); its output projection starts at zero, so at initialisation the block is the adaLN-Zero one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class AddAuxiliaryLoss(torch.autograd.Function):
    """``y`` unchanged in the forward pass; in the backward pass ``aux`` gets gradient 1 (the official code's
    pass-through: the balance loss joins the backward pass without being added to the reported loss)."""

    @staticmethod
    def forward(ctx, y, aux):
        ctx.dtype, ctx.requires_aux = aux.dtype, aux.requires_grad
        return y

    @staticmethod
    def backward(ctx, grad_output):
        grad_aux = torch.ones((), dtype=ctx.dtype, device=grad_output.device) if ctx.requires_aux else None
        return grad_output, grad_aux


def balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * sum_i P_i f_i for gate probabilities ``probs`` (N, E) and the chosen experts ``topk_idx`` (N, K):
    P_i the mean probability of expert i, f_i = E * (its share of the N K assignments)."""
    n_experts = probs.shape[-1]
    share = F.one_hot(topk_idx.reshape(-1), n_experts).to(probs.dtype).mean(0)
    return alpha * (probs.mean(0) * share * n_experts).sum()


class SwiGLU(nn.Module):
    """w2(silu(w1 h) * w3 h) (Shazeer, 2020): the expert MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, h):
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class SparseMoE(nn.Module):
    """y = sum_{top-K} g_k E_k(h) + S(h) over the last dimension of h (any leading shape); the module docstring."""

    def __init__(self, dim: int, experts: int, top_k: int, expert_hidden: int, shared_hidden: int, alpha: float):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
        self.n_experts, self.top_k, self.alpha = experts, top_k, alpha
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, expert_hidden) for _ in range(experts))
        self.shared = SwiGLU(dim, shared_hidden) if shared_hidden else None
        self.last_aux: torch.Tensor | None = None  # the balance loss of the last training forward
        self.last_counts: torch.Tensor | None = None  # (E,) assignments per expert in the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs (N, E), top-K gates (N, K) without renormalisation, top-K expert indices (N, K))."""
        probs = self.gate(x).softmax(-1)
        weight, idx = torch.topk(probs, self.top_k, dim=-1, sorted=False)
        return probs, weight, idx

    def routed_train(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The training path: each token repeated K times, each expert run on its copies, the K gated copies summed."""
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0)
        y = torch.zeros_like(xs)
        for i, expert in enumerate(self.experts):
            sel = flat == i
            if bool(sel.any()):
                y = y.index_put((sel,), expert(xs[sel]))
        return (y.view(*weight.shape, -1) * weight.unsqueeze(-1)).sum(1)

    @torch.no_grad()
    def routed_infer(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The inference path (``moe_infer``): assignments sorted by expert, one call per expert on its contiguous
        run of tokens, gated outputs scatter-added into the result."""
        flat, gates = idx.reshape(-1), weight.reshape(-1)
        order = flat.argsort(stable=True)
        ends = torch.bincount(flat, minlength=self.n_experts).cumsum(0).tolist()
        token = order // self.top_k
        out = torch.zeros_like(x)
        start = 0
        for i, end in enumerate(ends):
            if end > start:
                rows = token[start:end]
                y = self.experts[i](x[rows]) * gates[order[start:end]].unsqueeze(-1)
                out.index_add_(0, rows, y)
            start = end
        return out

    def combine(self, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, train: bool) -> torch.Tensor:
        """sum_k weight_k E_{idx_k}(x) + S(x) for flat tokens x (N, d), by the training or the inference path."""
        y = self.routed_train(x, weight, idx) if train else self.routed_infer(x, weight, idx)
        return y + self.shared(x) if self.shared is not None else y

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        probs, weight, idx = self.route(x)
        self.last_counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts).detach()
        train = self.training and torch.is_grad_enabled()
        y = self.combine(x, weight, idx, train)
        if train and self.alpha > 0:
            aux = balance_loss(probs, idx, self.alpha)
            self.last_aux = aux.detach()  # a plain value: the module stays deep-copyable (the EMA copy)
            y = AddAuxiliaryLoss.apply(y, aux)
        return y.view(h.shape)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding of (B,) times (cos, sin halves)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine position embedding (grid*grid, dim) of DiT / MAE."""
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def emb(pos):
        a = pos.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], 1)

    out = torch.cat([emb(yy), emb(xx)], 1)
    return F.pad(out, (0, dim - out.shape[1])).float()


def rope_2d(grid: int, head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary position embedding (Su et al., 2021, RoFormer, Eq. 34, applied per axis): the first half of a
    head's channels rotate with the token's row, the second with its column; (cos, sin), each (grid*grid,
    head_dim / 2), one angle per rotated pair."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ang = torch.cat([yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs], 1)
    return ang.cos().float(), ang.sin().float()


def rotate(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, N, dh) rotated pairwise: (z1, z2) -> (z1 cos - z2 sin, z1 sin + z2 cos) on pairs (2i, 2i + 1)."""
    z1, z2 = z[..., 0::2], z[..., 1::2]
    return torch.stack([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, rope=None) -> torch.Tensor:
    """Multi-head attention of (B, N, d) queries over (B, M, d) keys and values -> (B, N, d); ``rope`` (cos, sin)
    rotates the queries and keys by their positions first."""
    b, n, d = q.shape

    def split(z):
        return z.view(b, z.shape[1], heads, d // heads).transpose(1, 2)

    q, k = split(q), split(k)
    if rope is not None:
        cos, sin = (r.to(q.dtype) for r in rope)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    a = F.scaled_dot_product_attention(q, k, split(v))
    return a.transpose(1, 2).reshape(b, n, d)


class CrossAttention(nn.Module):
    """Image tokens attending to the caption's tokens (PixArt-alpha's cross-attention, no adaLN modulation); the
    output projection is zero at initialisation."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, context):
        k, v = self.kv(context).chunk(2, -1)
        return self.proj(attention(self.q(self.norm(x)), k, v, self.heads))


class Block(nn.Module):
    """DiT's adaLN-Zero block with a sparse MoE (or dense SwiGLU) MLP, and optionally cross-attention to the
    caption's tokens."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module, cross_attention: bool = False):
        super().__init__()
        self.cross = CrossAttention(dim, heads) if cross_attention else None
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, context=None, rope=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, -1)
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).chunk(3, -1)
        x = x + g1.unsqueeze(1) * self.proj(attention(q, k, v, self.heads, rope))
        if self.cross is not None:
            x = x + self.cross(x, context)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiTMoE(ModelMixin, ConfigMixin):
    """A DiT on (B, C, S, S) images with caption-slot conditioning; sparse MoE MLPs (``experts`` > 0) or dense
    SwiGLU ones (``experts`` = 0). ``forward(x, t, cond)`` takes the condition embedding from ``embed_caption``:
    (B, dim), or (B, seq_len, dim) token embeddings with ``cross_attention`` (their sum drives adaLN)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        vocab_size: int = 22,
        seq_len: int = 4,
        experts: int = 8,
        top_k: int = 2,
        expert_ratio: int = 4,
        shared: int = 2,
        shared_ratio: int = 1,
        dense_ratio: int = 10,
        alpha: float = 0.01,
        cross_attention: bool = False,
        rope: bool = False,
    ):
        super().__init__()
        if sample_size % patch_size or dim % heads or dim % 4:
            raise ValueError(
                f"sample_size {sample_size} must be a multiple of patch_size {patch_size}, dim {dim} of heads {heads} "
                f"and of 4"
            )
        self.grid = sample_size // patch_size
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.register_buffer("pos", sincos_2d(dim, self.grid).unsqueeze(0), persistent=False)
        if rope:
            if (dim // heads) % 4:
                raise ValueError(f"rope needs a head size (dim {dim} / heads {heads}) that is a multiple of 4")
            cos, sin = rope_2d(self.grid, dim // heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.caption = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.caption.weight, std=0.02)

        def mlp():
            if experts:
                return SparseMoE(dim, experts, top_k, expert_ratio * dim, shared * shared_ratio * dim, alpha)
            return SwiGLU(dim, dense_ratio * dim)

        if cross_attention:
            self.slot = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp(), cross_attention) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_size * patch_size * in_channels)
        for layer in (self.final_ada, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self) -> list[SparseMoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, SparseMoE)]

    def embed_caption(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, seq_len) caption slot tokens -> (B, dim): the sum of their embeddings; with ``cross_attention``
        (B, seq_len, dim): each token's embedding plus its slot's."""
        if self.config.cross_attention:
            return self.caption(tokens) + self.slot
        return self.caption(tokens).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        cond = cond.to(x.dtype)
        context = cond if cond.dim() == 3 else None
        c = self.t_mlp(timestep_embedding(t, 256).to(x.dtype)) + (cond.sum(1) if context is not None else cond)
        rope = (self.rope_cos, self.rope_sin) if cfg.rope else None
        for block in self.blocks:
            h = block(h, c, context, rope)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, -1)
        h = self.out(modulate(self.norm(h), shift, scale))
        p, g = cfg.patch_size, self.grid
        h = h.view(b, g, g, p, p, cfg.in_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, cfg.in_channels, g * p, g * p)
