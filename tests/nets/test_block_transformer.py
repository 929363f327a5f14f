import pytest
import torch

from condiff.discrete import one_hot
from condiff.errors import ConfigError
from condiff.nets.block_transformer import BlockTransformer

V, L = 5, 12


def _net(block_size=3, **kw):
    torch.manual_seed(0)
    return BlockTransformer(vocab_size=V, length=L, block_size=block_size, dim=32, layers=2, heads=4, **kw).eval()


def _x(n=3, seed=0, length=L):
    return torch.randint(V + 1, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("block_size", [1, 3, 4, 12])
def test_cached_blocks_equal_the_full_block_causal_forward(block_size):
    net = _net(block_size)
    x = one_hot(_x(), V)
    with torch.no_grad():
        full = net(x)
        assert full.shape == (3, L, V)
        for s in range(0, L, block_size):
            e = s + block_size
            block = net.forward_block(x[:, s:e], net.prefix_cache(x[:, :s]), s)
            assert block.shape == (3, block_size, V)
            assert torch.allclose(block, full[:, s:e], atol=1e-5, rtol=0)


def test_an_incrementally_extended_cache_equals_the_prefix_cache():
    net = _net(3)
    x = one_hot(_x(), V)
    with torch.no_grad():
        cache = net.prefix_cache(x[:, :0])
        assert cache.length == 0 and cache.keys[0].shape == (3, 4, 0, 8)
        for s in range(0, L - 3, 3):
            cache = net.extend_cache(cache, x[:, s : s + 3])
            whole = net.prefix_cache(x[:, : s + 3])
            assert cache.length == whole.length == s + 3
            for a, b in zip(cache.keys + cache.values, whole.keys + whole.values):
                assert a.shape == (3, 4, s + 3, 8) and torch.allclose(a, b, atol=1e-5, rtol=0)
        rows = cache[torch.tensor([2, 0])]
        assert torch.equal(rows.keys[1], cache.keys[1][[2, 0]]) and rows.length == cache.length and rows.batch == 2


def test_later_blocks_never_change_earlier_logits_and_a_block_sees_itself_both_ways():
    net = _net(3)
    x, y = _x(), _x(seed=1)
    with torch.no_grad():
        base = net(one_hot(x, V))
        for b in range(1, L // 3):
            for i in range(3 * b, L):  # change one token in block b or later
                z = x.clone()
                z[:, i] = y[:, i] if not torch.equal(y[:, i], x[:, i]) else (x[:, i] + 1) % (V + 1)
                assert torch.equal(net(one_hot(z, V))[:, : 3 * b], base[:, : 3 * b])  # exactly unchanged
        z = x.clone()
        z[:, 5] = (x[:, 5] + 1) % (V + 1)  # the last token of block 1 changes every position of block 1
        changed = (net(one_hot(z, V)) - base).abs().amax((0, 2)) > 1e-6
        assert changed[3:6].all() and not changed[:3].any()


def test_condition_slots_are_seen_by_every_block_and_cached():
    net = _net(4, cond_slots=2, cond_vocab=3)
    x = one_hot(_x(), V)
    c, d = torch.tensor([[0, 1], [2, 2], [1, 0]]), torch.tensor([[2, 1], [0, 2], [1, 1]])
    with torch.no_grad():
        full = net(x, c)
        other = net(x, d)
        assert not torch.allclose(full[:, :4], other[:, :4])  # even the first block sees the condition
        first = net.forward_block(x[:, :4], None, 0, c)
        assert torch.allclose(first, full[:, :4], atol=1e-5, rtol=0)
        for s in (4, 8):
            cache = net.prefix_cache(x[:, :s], c)
            assert cache.keys[0].shape[2] == 2 + s
            assert torch.allclose(net.forward_block(x[:, s : s + 4], cache, s), full[:, s : s + 4], atol=1e-5, rtol=0)
            assert torch.allclose(
                net.forward_block(x[:, s : s + 4], net.prefix_cache(x[:, :s], d), s), other[:, s : s + 4], atol=1e-5
            )


def test_soft_inputs_carry_gradients_and_safetensors_round_trip(tmp_path):
    net = _net(4, cond_slots=1, cond_vocab=2)
    soft = torch.softmax(torch.randn(2, L, V + 1), -1).requires_grad_()
    c = torch.tensor([[1], [0]])
    net(soft, c).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    back = BlockTransformer.from_pretrained(tmp_path).eval()
    assert back.config.block_size == 4 and back.config.cond_slots == 1
    with torch.no_grad():
        assert torch.equal(back(soft.detach(), c), net(soft.detach(), c))


def test_bad_settings_and_misplaced_blocks_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="block_size must divide length 12, got 5"):
        BlockTransformer(vocab_size=V, length=L, block_size=5)
    for bad in (0, -1, 13):
        with pytest.raises(ConfigError, match=f"block_size.*got {bad}"):
            BlockTransformer(vocab_size=V, length=L, block_size=bad)
    with pytest.raises(ConfigError, match="multiple of heads 3, got 32"):
        BlockTransformer(vocab_size=V, length=L, block_size=3, dim=32, heads=3)
    net = _net(3)
    x = one_hot(_x(), V)
    with pytest.raises(ConfigError, match="whole blocks of 3 tokens, got positions 0..3"):
        net.prefix_cache(x[:, :4])
    cache = net.prefix_cache(x[:, :3])
    with pytest.raises(ConfigError, match="start must be the cached length 3, got 6"):
        net.forward_block(x[:, 6:9], cache, 6)
    with pytest.raises(ConfigError, match="whole blocks of 3 tokens, got positions 3..4"):
        net.forward_block(x[:, 3:5], cache, 3)
    with pytest.raises(ConfigError, match="run past the length 12"):
        net(one_hot(_x(length=13), V))
    with pytest.raises(ConfigError, match=r"cond must have shape \(3, 2\), got None"):
        _net(3, cond_slots=2, cond_vocab=2)(x)
