"""SaRA (condiff.training.sara) against its exact oracles: after training with any loss every weight with
|w| >= theta is bit-identical, the trainable scalars and the optimiser's state both number sum |M|, and the
progressive re-selection changes no weight."""

import pytest
import torch
from torch import nn

from condiff.errors import ConfigError
from condiff.training.sara import apply_sara, nuclear_penalty, reselect, state_dict_of, trainable

THETA = 0.05


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))


def _effective(m):
    return {n: getattr(m[i], "weight").detach().clone() for n, i in (("0", 0), ("2", 2))}


def _train(m, params, steps=5):
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = (m(x) - 0.3).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_large_weights_stay_bit_identical_and_small_ones_train():
    m = _model()
    before = {n: w.clone() for n, w in ((n, m[i].weight.detach()) for n, i in (("0", 0), ("2", 2)))}
    biases = (m[0].bias.detach().clone(), m[2].bias.detach().clone())
    apply_sara(m, THETA)
    _train(m, trainable(m))
    after = _effective(m)
    for n in before:
        big = before[n].abs() >= THETA
        assert torch.equal(after[n][big], before[n][big])
        assert not torch.equal(after[n][~big], before[n][~big])  # the selected scalars did move
    assert torch.equal(m[0].bias, biases[0]) and torch.equal(m[2].bias, biases[1])  # 1-D: not selected


def test_trainable_scalars_and_optimizer_state_number_the_mask():
    m = _model()
    mask = sum(int((m[i].weight.abs() < THETA).sum()) for i in (0, 2))
    n = apply_sara(m, THETA)
    opt = _train(m, trainable(m), steps=1)
    assert n == mask == sum(p.numel() for p in m.parameters() if p.requires_grad)
    for state in opt.state.values():
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel()
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == mask


def test_reselection_changes_no_weight_and_selects_on_current_values():
    m = _model()
    apply_sara(m, THETA)
    _train(m, trainable(m))
    before = _effective(m)
    n = reselect(m)
    after = _effective(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert n == sum(int((after[k].abs() < THETA).sum()) for k in after)
    _train(m, trainable(m), steps=2)  # the new vectors train
    assert not all(torch.equal(after[k], _effective(m)[k]) for k in after)


def test_the_saved_state_holds_only_the_selected_values():
    m = _model()
    n = apply_sara(m, THETA)
    sd = state_dict_of(m)
    assert sorted(sd) == ["0.weight.sara_values", "2.weight.sara_values"]
    assert sum(v.numel() for v in sd.values()) == n


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_theta_is_one_line(theta):
    with pytest.raises(ConfigError, match="theta must be a positive finite number"):
        apply_sara(_model(), theta)


def test_nothing_to_adapt_and_reselect_without_sara_are_one_line():
    with pytest.raises(ConfigError, match="no parameter to adapt"):
        apply_sara(_model(), THETA, names=["nope.weight"])
    with pytest.raises(ConfigError, match="apply_sara"):
        reselect(_model())


def test_the_low_rank_penalty_lowers_the_nuclear_norm_of_the_learned_update():
    """Toy matrix regression toward a rank-2 change of a 24 x 24 matrix whose entries are all below theta: the
    update learned with lambda_rank > 0 has a smaller nuclear norm (and effective rank) than without."""
    g = torch.Generator().manual_seed(3)
    base = 0.01 * torch.randn(24, 24, generator=g)
    target = base + 0.02 * torch.randn(24, 2, generator=g) @ torch.randn(2, 24, generator=g)
    x = torch.randn(64, 24, generator=g)
    y = x @ target.T + 0.01 * torch.randn(64, 24, generator=g)  # noisy observations

    def learned(lam):
        layer = nn.Linear(24, 24, bias=False)
        with torch.no_grad():
            layer.weight.copy_(base)
        m = nn.Sequential(layer)
        apply_sara(m, 1.0, names=["0.weight"])  # every entry is below theta: all trainable
        opt = torch.optim.Adam(trainable(m), lr=2e-3)
        for _ in range(400):
            loss = (m(x) - y).pow(2).mean() + nuclear_penalty(m, lam, torch.Generator().manual_seed(0), min_dim=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m[0].weight.detach() - base

    free, penalised = learned(0.0), learned(1e-3)
    nuc = [torch.linalg.svdvals(d).sum().item() for d in (free, penalised)]
    assert nuc[1] < nuc[0]
    eff = [int((torch.linalg.svdvals(d) > 0.05 * torch.linalg.svdvals(d)[0]).sum()) for d in (free, penalised)]
    assert eff[1] <= eff[0]


def test_no_matrix_large_enough_gives_a_zero_penalty_and_bad_lambda_is_one_line():
    m = _model()
    apply_sara(m, THETA)
    assert nuclear_penalty(m, 1e-3).item() == 0.0  # 8 x 18 and 2 x 72: min side <= 64
    with pytest.raises(ConfigError, match="lambda_rank"):
        nuclear_penalty(m, -1.0)
