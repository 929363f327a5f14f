"""LoRA through peft (condiff.training.lora) on the bundled shapes network: at its zero init the adapted network
is the base bit for bit, merged and unmerged adapters agree, and an adapter saved by condiff loads into a fresh
diffusers UNet with diffusers' own loader and predicts the same."""

import copy

import pytest
import torch

from condiff.errors import ConfigError, InputFileError
from condiff.models.base import load_model
from condiff.training.lora import add_lora, load_lora, merged, save_lora, set_scales


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


def _inputs(m):
    g = torch.Generator().manual_seed(0)
    raw, _ = m.family.random_conditions(2, g)
    cond = m.condition(raw)
    cond.pop("null")
    x = torch.randn(2, 3, 32, 32, generator=g)
    return x, cond


def _predict(m, net, x, cond):
    with torch.no_grad():
        return m.family.forward({"unet": net}, m.model_cfg, x, torch.tensor([500.0, 500.0]), cond)


def _perturb(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_zero_init_is_the_base_bit_for_bit(shapes):
    x, cond = _inputs(shapes)
    base = _predict(shapes, shapes.module["unet"], x, cond)
    net = copy.deepcopy(shapes.module["unet"])
    n = add_lora(net, rank=2)
    lora = {k: p for k, p in net.named_parameters() if "lora_" in k}
    assert n == sum(p.numel() for p in lora.values())  # only the adapter trains
    assert all(p.requires_grad == ("lora_" in k) for k, p in net.named_parameters())
    assert n <= 0.05 * sum(p.numel() for k, p in net.named_parameters() if "lora_" not in k)
    assert torch.equal(_predict(shapes, net, x, cond), base)


def test_merged_and_unmerged_agree(shapes):
    x, cond = _inputs(shapes)
    net = copy.deepcopy(shapes.module["unet"])
    add_lora(net, rank=4)
    _perturb(net)
    unmerged = _predict(shapes, net, x, cond)
    with merged(net):
        folded = _predict(shapes, net, x, cond)
    assert float((folded - unmerged).abs().max()) <= 1e-6 * max(1.0, float(unmerged.abs().max()))
    assert torch.equal(_predict(shapes, net, x, cond), unmerged)  # unfolded again
    assert not torch.equal(unmerged, _predict(shapes, shapes.module["unet"], x, cond))


def test_a_saved_adapter_loads_with_diffusers_own_loader(shapes, tmp_path):
    x, cond = _inputs(shapes)
    net = copy.deepcopy(shapes.module["unet"])
    add_lora(net, rank=4, alpha=8)
    _perturb(net)
    ours = _predict(shapes, net, x, cond)
    save_lora(net, tmp_path / "lora")
    fresh = copy.deepcopy(shapes.module["unet"])
    # diffusers' own loader, not condiff's
    fresh.load_lora_adapter(
        str(tmp_path / "lora"), adapter_name="x", prefix=None, weight_name="pytorch_lora_weights.safetensors"
    )
    theirs = _predict(shapes, fresh, x, cond)
    assert float((theirs - ours).abs().max()) <= 1e-5
    again = copy.deepcopy(shapes.module["unet"])
    load_lora(again, tmp_path / "lora")
    assert torch.equal(_predict(shapes, again, x, cond), theirs)


def test_stacked_adapters_add_with_their_scales(shapes, tmp_path):
    x, cond = _inputs(shapes)
    base = _predict(shapes, shapes.module["unet"], x, cond)
    net = copy.deepcopy(shapes.module["unet"])
    add_lora(net, rank=2, name="a")
    _perturb(net, seed=2)
    save_lora(net, tmp_path / "a", name="a")
    one = copy.deepcopy(shapes.module["unet"])
    load_lora(one, tmp_path / "a", name="a")
    set_scales(one, {"a": 0.0})
    assert float((_predict(shapes, one, x, cond) - base).abs().max()) <= 1e-6  # scale 0: the base
    set_scales(one, {"a": 1.0})
    full = _predict(shapes, one, x, cond) - base
    set_scales(one, {"a": 0.5})
    half = _predict(shapes, one, x, cond) - base
    assert float((half - 0.5 * full).abs().max()) <= 0.05 * float(full.abs().max())  # LoRA is linear in its scale


def test_bad_inputs_are_one_line(shapes, tmp_path):
    net = copy.deepcopy(shapes.module["unet"])
    with pytest.raises(ConfigError, match="LoRA rank must be an integer"):
        add_lora(net, rank=0)
    with pytest.raises(ConfigError, match="alpha must be a positive finite number"):
        add_lora(net, rank=2, alpha=-1.0)
    with pytest.raises(ConfigError, match="adapter support"):
        add_lora(torch.nn.Linear(2, 2))
    with pytest.raises(InputFileError, match="pytorch_lora_weights.safetensors"):
        load_lora(net, tmp_path)
