"""ConPreDiff's context loss (condiff.training.conprediff): the neighbour sets are gathered exactly, the set
distance is 0 for every permutation of the true neighbours and positive otherwise, and its gradient reaches the
prediction."""

import itertools

import pytest
import torch

from condiff.errors import ConfigError
from condiff.training.conprediff import OFFSETS, context_loss, neighbours, set_distance

G = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_neighbours_are_the_values_at_each_offset(stride):
    x = torch.arange(2 * 1 * 9 * 9, dtype=torch.float64).view(2, 1, 9, 9)
    n = neighbours(x, stride)
    assert n.shape == (2, 1, 8, 9, 9)
    for k, (di, dj) in enumerate(OFFSETS):  # interior positions: exact values; borders replicate
        assert n[0, 0, k, 4, 4] == x[0, 0, 4 + di * stride, 4 + dj * stride]
    assert n[1, 0, 0, 0, 0] == x[1, 0, 0, 0]  # top-left corner, offset (-1, -1): the replicated corner


def test_the_loss_is_zero_for_every_permutation_of_the_true_neighbours():
    x0 = torch.randn(2, 3, 6, 6, generator=G, dtype=torch.float64)
    true = neighbours(x0, 1)
    for perm in itertools.islice(itertools.permutations(range(8)), 0, 40320, 997):
        assert context_loss({1: true[:, :, list(perm)]}, x0).item() == 0.0


def test_the_loss_is_positive_with_a_gradient_for_wrong_sets():
    x0 = torch.randn(2, 1, 6, 6, generator=G, dtype=torch.float64)
    pred = {s: (neighbours(x0, s) + 0.1).requires_grad_() for s in (1, 2)}
    loss = context_loss(pred, x0)
    grads = torch.autograd.grad(loss, list(pred.values()))
    assert loss.item() == pytest.approx(2 * 0.01, rel=1e-12) and all(float(g.abs().max()) > 0 for g in grads)


def test_set_distance_is_the_w2_of_sorted_values():
    a = torch.tensor([[3.0, 1.0, 2.0]])
    b = torch.tensor([[0.0, 2.0, 4.0]])
    assert set_distance(a, b, dim=1).item() == pytest.approx(((1 - 0) ** 2 + (2 - 2) ** 2 + (3 - 4) ** 2) / 3)


def test_bad_inputs_are_one_line():
    with pytest.raises(ConfigError, match="one shape"):
        set_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        neighbours(torch.zeros(3, 3))
    with pytest.raises(ConfigError, match="stride"):
        neighbours(torch.zeros(1, 1, 3, 3), 0)
    with pytest.raises(ConfigError, match="at least one stride"):
        context_loss({}, torch.zeros(1, 1, 3, 3))


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
    )


def test_the_head_changes_nothing_the_network_returns_and_detaches():
    from condiff.training.conprediff import ContextHead, attach

    net = _net()
    x = torch.randn(2, 1, 6, 6, generator=G)
    plain = net(x)
    head = ContextHead(8, 1, strides=(1, 2))
    handle = attach(net[1], head)
    with_head = net(x)
    assert torch.equal(with_head, plain) and head.features.shape == (2, 8, 6, 6)
    handle.remove()
    head.features = None
    assert torch.equal(net(x), plain) and head.features is None


def test_the_context_loss_reaches_the_backbone():
    from condiff.training.conprediff import ContextHead, attach

    net = _net()
    head = ContextHead(8, 1, strides=(1,))
    attach(net[1], head)
    x0 = torch.randn(2, 1, 6, 6, generator=G)
    net(x0)
    loss = context_loss(head(head.features), x0)
    loss.backward()
    assert net[0].weight.grad is not None and float(net[0].weight.grad.abs().max()) > 0
    assert net[2].weight.grad is None  # the last layer is after the features: the head does not train it


def _context_recipe(weight=0.1):
    import dataclasses
    from pathlib import Path

    from condiff.training.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[1] / "fixtures" / "tiny_digits.toml")
    return dataclasses.replace(r, objective=dataclasses.replace(r.objective, context_weight=weight))


def test_training_with_the_context_head_resumes_exactly_and_exports_the_plain_network(tmp_path):
    from condiff.cli.train import train_recipe
    from condiff.core.files import load_tensors
    from condiff.models.base import load_model

    r = _context_recipe()
    a = train_recipe(r, tmp_path / "a", progress=False)
    train_recipe(r, tmp_path / "b", progress=False, stop_after=10)
    train_recipe(r, tmp_path / "b", resume=True, progress=False)
    wa = load_tensors(tmp_path / "a" / "checkpoints" / "step-00000024" / "model.safetensors")
    wb = load_tensors(tmp_path / "b" / "checkpoints" / "step-00000024" / "model.safetensors")
    assert any(k.startswith("context_head.") for k in wa)  # trained and checkpointed beside the network
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    exported = load_model(tmp_path / "a" / "model")
    assert list(exported.module.keys()) == ["unet"]
    assert a.log == [] and a.metrics["context"] > 0


def test_the_context_loss_trains_the_backbone_and_the_head():
    from condiff.cli.train import make_trainer
    from condiff.training.trainer import step_generator

    tr = make_trainer(_context_recipe(1.0), "unused", progress=False)
    loss, metrics = tr.loss_fn(0, step_generator(0, 0))
    head = tr.module["context_head"].proj.weight
    grads = torch.autograd.grad(loss, [head, tr.module["unet"].conv_in.weight])
    assert metrics["context"] > 0 and all(float(g.abs().max()) > 0 for g in grads)
    no_ctx = make_trainer(_context_recipe(0.0), "unused", progress=False)
    assert no_ctx.loss_fn is None and "context_head" not in no_ctx.module
