"""benchmarks/drakes_policy.py: its closed-form chain expectations against enumeration, and its table policy against
the chain it starts from."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from condiff.data import dna
from condiff.discrete.denoiser import mask_id, one_hot

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "drakes_policy.py"
_spec = importlib.util.spec_from_file_location("drakes_policy", _PATH)
drakes_policy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drakes_policy)

LENGTH = 6


def chain_law(p: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """The probability of each sequence under the stationary chain with transitions p."""
    law = dna.stationary(p)[seqs[:, 0]]
    for i in range(1, seqs.shape[1]):
        law = law * p[seqs[:, i - 1], seqs[:, i]]
    return law


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_expectations_equal_enumeration(seed):
    g = torch.Generator().manual_seed(seed)
    p0 = dna.TRANSITIONS
    p = torch.softmax(p0.log() + torch.randn(4, 4, generator=g, dtype=torch.float64), -1)
    seqs = torch.tensor(list(itertools.product(range(4), repeat=LENGTH)))
    q, q0 = chain_law(p, seqs), chain_law(p0, seqs)
    onehots = torch.nn.functional.one_hot(seqs, dna.V).double()  # the rewards evaluated in float64
    assert q.sum().item() == pytest.approx(1.0, abs=1e-12)
    got = drakes_policy.chain_expectations(p, p0, LENGTH)
    assert got["reward"].item() == pytest.approx((q * dna.reward(onehots)).sum().item(), abs=1e-9)
    assert got["heldout"].item() == pytest.approx((q * dna.heldout_reward(onehots)).sum().item(), abs=1e-9)
    assert got["motifs"].item() == pytest.approx((q * dna.motif_count(onehots)).sum().item(), abs=1e-9)
    assert got["kl"].item() == pytest.approx((q * (q / q0).log()).sum().item(), abs=1e-9)


def test_the_table_policy_reads_the_left_neighbour_and_starts_at_the_data_chain():
    den = drakes_policy.LeftNeighbourTable(drakes_policy.data_table())
    m = mask_id(dna.V)
    x = torch.tensor([[m, 3, m, 0, 2, m]])  # - T - A G -
    got = den(one_hot(x, dna.V), None)[0].double().exp()
    stationary, p = dna.STATIONARY, dna.TRANSITIONS
    want = torch.stack([stationary, stationary, p[3], stationary, p[0], p[2]])  # left neighbour: -, -, T, -, A, G
    assert torch.allclose(got, want, atol=1e-6)
