"""Where DRAKES's plateau on synthetic DNA comes from: the same objective and the same estimator on a policy that
can move fast.

The recipe dna-drakes fine-tunes the RADD transformer and stays near 1.26x the pretrained held-out reward. This
script keeps the DNA rewards (condiff.data.dna), alpha = 0.05 and DRAKES itself, and swaps the policy:

1. exact: the best stationary first-order Markov chain, by gradient ascent on the closed-form expectation of
   r - alpha KL (the KL between two stationary chains of L letters is KL(pi || pi0) + (L - 1) sum_a pi_a
   KL(P_a || P0_a)); its held-out reward is exact too. This bounds what a one-letter context rule can reach.
2. DRAKES (``condiff.discrete.drakes_loss``: the tau-leaping sampler's Gumbel-softmax trajectory, 32 steps,
   truncation 8, straight-through end, the exact per-step KL) on a table policy: log p(x_i | x_t) is a learned row
   indexed by x_t's left neighbour (A, C, G, T, or MASK when it is still masked or i = 0), started at the data's
   chain. The held-out reward of 512 samples (the same sampler) is read every ``--every`` steps.
3. The same through the ordered sampler (``ordered=True``: left to right, one letter per step, 64 steps, full
   backpropagation). The left neighbour is then always drawn, so the table policy is a Markov chain, the class of
   the exact optimum in 1.

    OMP_NUM_THREADS=1 python benchmarks/drakes_policy.py --json outputs/discrete/drakes_policy.json \\
        --png docs/discrete_drakes_policy.png
"""

from __future__ import annotations

import argparse
import io
import itertools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from condiff.core.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from condiff.data import dna  # noqa: E402
from condiff.discrete import drakes_loss, sample, sample_ordered  # noqa: E402
from condiff.discrete.denoiser import LogitDenoiser, mask_id, one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 64


def chain_expectations(p: torch.Tensor, p0: torch.Tensor, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Exact E[r], E[r'] and KL to the chain p0 for the stationary chain with transitions p (4 x 4, float64)."""
    pi = dna.stationary(p)
    kmers = torch.tensor(list(itertools.product(range(4), repeat=4)))
    law = pi[kmers[:, 0]] * p[kmers[:, 0], kmers[:, 1]] * p[kmers[:, 1], kmers[:, 2]] * p[kmers[:, 2], kmers[:, 3]]
    matches = (kmers == dna.encode(dna.MOTIF)).sum(1)
    exact, one = law[matches == 4].sum(), law[matches == 3].sum()
    gc = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=p.dtype)
    mean = (pi * gc).sum()
    cov, step = [], torch.eye(4, dtype=p.dtype)
    for _ in range(length):  # Cov(g_i, g_{i+d}) for d = 0..L-1
        cov.append((pi[:, None] * step * gc[:, None] * gc[None, :]).sum() - mean**2)
        step = step @ p
    var = (length * cov[0] + 2 * sum((length - d) * cov[d] for d in range(1, length))) / length**2
    square = (mean - 0.5) ** 2 + var  # E[(gc - 1/2)^2]
    windows = length - 3
    weights = 0.5 + (torch.arange(windows, dtype=p.dtype) + 0.5) / windows
    pi0 = dna.stationary(p0)
    kl = (pi * (pi / pi0).log()).sum() + (length - 1) * (pi[:, None] * p * (p / p0).log()).sum()
    return {
        "reward": windows * exact - dna.GC_WEIGHT * length * square,
        "heldout": weights.sum() * (exact + 0.5 * one) - dna.HELDOUT_GC_WEIGHT * length * square,
        "kl": kl,
        "motifs": windows * exact,
    }


def best_chain(alpha: float, iters: int) -> dict:
    p0 = dna.TRANSITIONS.clone()
    logits = p0.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.02)
    for _ in range(iters):
        e = chain_expectations(logits.softmax(-1), p0)
        opt.zero_grad()
        (-(e["reward"] - alpha * e["kl"])).backward()
        opt.step()
    with torch.no_grad():
        p = logits.softmax(-1)
        out = {k: float(v) for k, v in chain_expectations(p, p0).items()}
        base = {k: float(v) for k, v in chain_expectations(p0, p0).items()}
    return {"base": base, "best": out, "transitions": [[round(float(v), 3) for v in row] for row in p]}


class LeftNeighbourTable(LogitDenoiser):
    """log p(x_0^i = v | x_t) = log_softmax(table[state of x_t at i - 1])[v]; the state is the letter, or MASK when
    the neighbour is masked and at i = 0. ``table`` is (V + 1, V)."""

    vocab_size = dna.V

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, x, cond=None):
        h = x if x.is_floating_point() else one_hot(x, self.vocab_size)
        left = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        left[:, 0, mask_id(self.vocab_size)] = 1
        return torch.log_softmax(left @ self.table, -1)


def data_table() -> torch.Tensor:
    return torch.cat([dna.TRANSITIONS.log(), dna.STATIONARY.log()[None]]).float()


@torch.no_grad()
def held_out(den, n: int, ordered: bool) -> dict:
    g = torch.Generator().manual_seed(10**6)
    x = sample_ordered(den, n, LENGTH, generator=g)[0] if ordered else sample(den, n, LENGTH, 32, generator=g)[0]
    h = dna.heldout_reward(x).double()
    return {"heldout": float(h.mean()), "se": float(h.std() / n**0.5), "motifs": float(dna.motif_count(x).mean())}


def drakes_on_table(alpha: float, steps: int, every: int, lr: float, n: int, ordered: bool) -> list[dict]:
    table = nn.Parameter(data_table())
    reference = LeftNeighbourTable(data_table())
    opt = torch.optim.Adam([table], lr=lr)
    curve, t0 = [{"step": 0, "kl": 0.0, **held_out(LeftNeighbourTable(table.detach()), n, ordered)}], time.time()
    sampler = {"steps": LENGTH, "truncate": LENGTH, "ordered": True} if ordered else {"steps": 32, "truncate": 8}
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(step)
        loss, m = drakes_loss(
            LeftNeighbourTable(table), reference, dna.reward, alpha, n=32, length=LENGTH, generator=g, **sampler
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            row = {"step": step, "kl": float(m["kl"]), "seconds": time.time() - t0}
            curve.append({**row, **held_out(LeftNeighbourTable(table.detach()), n, ordered)})
            name = "ordered" if ordered else "tau-leaping"
            print(f"{name} step {step}: held-out {curve[-1]['heldout']:.3f}, KL {row['kl']:.1f}", flush=True)
    return curve


def plot(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    runs = (("drakes_table", "tau-leaping, 32 steps", "C0"), ("drakes_table_ordered", "ordered", "C1"))
    for key, label, colour in runs:
        steps, held = [c["step"] for c in result[key]], [c["heldout"] for c in result[key]]
        ax.plot(steps, held, "o-", color=colour, label=f"DRAKES, {label}")
        ax.axhline(3 * held[0], color=colour, ls="--", lw=0.8, label=f"3x its start ({3 * held[0]:.2f})")
    ax.axhline(
        result["exact_chain"]["best"]["heldout"],
        color="k",
        ls=":",
        label="stationary chain maximising E[r] - alpha KL (exact)",
    )
    ax.set_xlabel("DRAKES step (table policy)")
    ax.set_ylabel("held-out reward (512 samples)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=2000, help="DRAKES steps through the tau-leaping sampler")
    ap.add_argument("--ordered-steps", type=int, default=500, help="DRAKES steps through the ordered sampler")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "discrete" / "drakes_policy.json")
    ap.add_argument("--png", type=Path, default=None)
    a = ap.parse_args(argv)
    exact = best_chain(a.alpha, 2000)
    base, best = exact["base"]["heldout"], exact["best"]["heldout"]
    print(f"exact: data chain held-out {base:.3f}; best chain {best:.3f}", flush=True)
    result = {
        "alpha": a.alpha,
        "exact_chain": exact,
        "drakes_table": drakes_on_table(a.alpha, a.steps, a.every, a.lr, a.n, ordered=False),
        "drakes_table_ordered": drakes_on_table(a.alpha, a.ordered_steps, a.every // 2, a.lr, a.n, ordered=True),
    }
    atomic_write_json(a.json, result)
    if a.png:
        plot(result, a.png)
    return result


if __name__ == "__main__":
    main()
