import pytest
import torch

from condiff.discrete import one_hot
from condiff.nets.token_transformer import TokenTransformer


def _x(v=6, n=3, length=10, seed=0):
    return torch.randint(v + 1, (n, length), generator=torch.Generator().manual_seed(seed))


def test_causal_output_at_position_i_depends_only_on_tokens_before_i():
    torch.manual_seed(0)
    net = TokenTransformer(vocab_size=6, length=10, dim=32, layers=2, heads=4, causal=True).eval()
    x = _x()
    y = _x(seed=1)
    for i in range(10):
        mixed = torch.cat([x[:, :i], y[:, i:]], 1)  # same tokens before i, different from i on
        a, b = net(one_hot(x, 6)), net(one_hot(mixed, 6))
        assert torch.allclose(a[:, : i + 1], b[:, : i + 1], atol=1e-5)


def test_bidirectional_output_sees_later_tokens_and_the_condition():
    torch.manual_seed(0)
    net = TokenTransformer(vocab_size=6, length=10, dim=32, layers=2, heads=4, cond_slots=2, cond_vocab=3).eval()
    x, y = _x(), _x(seed=1)
    c = torch.tensor([[0, 1]] * 3)
    base = net(one_hot(x, 6), c)
    assert base.shape == (3, 10, 6)
    later = torch.cat([x[:, :5], y[:, 5:]], 1)
    assert not torch.allclose(base[:, :5], net(one_hot(later, 6), c)[:, :5])
    assert not torch.allclose(base, net(one_hot(x, 6), torch.tensor([[2, 1]] * 3)))


def test_soft_one_hot_inputs_carry_gradients():
    net = TokenTransformer(vocab_size=4, length=5, dim=16, layers=1, heads=2)
    soft = torch.softmax(torch.randn(2, 5, 5), -1).requires_grad_()
    net(soft).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_the_adapter_is_a_convolution_of_the_input_added_to_the_logits():
    torch.manual_seed(0)
    plain = TokenTransformer(vocab_size=4, length=9, dim=16, layers=1, heads=2).eval()
    adapted = TokenTransformer(vocab_size=4, length=9, dim=16, layers=1, heads=2, adapter_kernel=3).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 9)), 5).float()
    with torch.no_grad():
        assert torch.equal(adapted(x), plain(x))  # zero-initialised
        adapted.adapter.weight.normal_()
        adapted.adapter.bias.normal_()
        got = adapted(x) - plain(x)
    w, b = adapted.adapter.weight, adapted.adapter.bias  # (V, V+1, 3), (V,)
    padded = torch.nn.functional.pad(x, (0, 0, 1, 1))  # a zero letter beyond each end
    want = torch.stack([torch.einsum("bkc,vck->bv", padded[:, i : i + 3], w) + b for i in range(9)], 1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kw", [{"adapter_kernel": 2}, {"adapter_kernel": -1}, {"adapter_kernel": 3, "causal": True}])
def test_bad_adapters_are_refused(kw):
    with pytest.raises(ValueError, match="adapter_kernel must be 0 or an odd size"):
        TokenTransformer(vocab_size=4, length=9, dim=16, layers=1, heads=2, **kw)
