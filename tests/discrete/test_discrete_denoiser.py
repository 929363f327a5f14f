import pytest
import torch
from torch import nn

from condiff.discrete import ExactConditional, NetworkDenoiser, mask_id, one_hot
from condiff.errors import ConfigError
from discretekit import markov_joint, random_joint


def test_exact_conditional_with_nothing_masked_is_the_token_and_with_all_masked_the_marginals():
    lj = random_joint(3, 4)
    ex = ExactConditional(lj)
    x = ex.sequences[:10]
    assert torch.allclose(ex(x).exp(), one_hot(x, 3)[..., :3].double())
    marg = [lj.exp().sum(tuple(j for j in range(4) if j != i)) for i in range(4)]
    out = ex(torch.full((1, 4), mask_id(3))).exp()[0]
    for i in range(4):
        assert torch.allclose(out[i], marg[i], atol=1e-12)


def test_exact_conditional_of_a_markov_chain_given_the_left_neighbour_is_the_transition_row():
    t = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    ex = ExactConditional(markov_joint(t, torch.tensor([0.2, 0.5, 0.3]), 4))
    x = torch.tensor([[1, 3, 3, 3]])  # x^0 = 1, everything after it masked
    assert torch.allclose(ex(x).exp()[0, 1], t[1].double(), atol=1e-12)


def test_network_denoiser_drops_the_mask_logit_and_normalises():
    net = nn.Linear(5, 5)
    den = NetworkDenoiser(net, 4)
    x = torch.tensor([[0, 4, 2]])
    lp = den(x)
    assert lp.shape == (1, 3, 4)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(1, 3))
    assert torch.allclose(lp, torch.log_softmax(net(one_hot(x, 4))[..., :4], -1))


def test_one_hot_refuses_ids_outside_the_vocabulary_and_the_mask():
    with pytest.raises(ConfigError, match=r"0\.\.4"):
        one_hot(torch.tensor([[0, 5]]), 4)


def test_exact_conditional_refuses_a_ragged_joint():
    with pytest.raises(ConfigError, match="shape"):
        ExactConditional(torch.zeros(3, 4))
