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
