"""DiT-MoE's oracles (Fei et al., 2024; spec training_discrete_tasks.md B13 (d)): uniform routing gives aux = alpha,
all tokens on the same K experts with P = 1/K gives alpha E / K, the training and inference paths agree to 1e-5,
the shared expert contributes when every gate is zero; and the balance loss's pass-through autograd."""

from __future__ import annotations

import pytest
import torch

from condiff.nets.dit_moe import DiTMoE, SparseMoE, balance_loss

ALPHA = 0.01
E, K, D = 8, 2, 16


def moe(dtype=torch.float64, shared=2 * D, seed=0):
    torch.manual_seed(seed)
    return SparseMoE(D, E, K, 4 * D, shared, ALPHA).to(dtype)


def test_uniform_routing_gives_alpha():
    n = 4 * E  # every expert takes the same share of the N K assignments, every probability is 1/E
    probs = torch.full((n, E), 1.0 / E, dtype=torch.float64)
    idx = torch.stack([torch.arange(n) % E, (torch.arange(n) + 1) % E], 1)
    assert balance_loss(probs, idx, ALPHA).item() == pytest.approx(ALPHA, rel=1e-15, abs=0)
    # the module: a zero gate gives softmax exactly 1/E for every token
    m = moe()
    with torch.no_grad():
        m.gate.weight.zero_()
    m.train()
    m(torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True))
    assert m.last_aux.item() == pytest.approx(ALPHA, rel=1e-15, abs=0)


def test_all_tokens_on_the_same_k_experts_give_alpha_e_over_k():
    chosen = torch.tensor([2, 5])
    n = 10
    probs = torch.zeros(n, E, dtype=torch.float64)
    probs[:, chosen] = 1.0 / K
    idx = chosen.expand(n, K)
    assert balance_loss(probs, idx, ALPHA).item() == pytest.approx(ALPHA * E / K, rel=1e-15, abs=0)
    # the module: gate rows that make the chosen experts' logits +200 and the others' -200 on positive inputs
    m = moe()
    with torch.no_grad():
        m.gate.weight.fill_(-200.0 / D)
        m.gate.weight[chosen] = 200.0 / D
    m.train()
    m(torch.ones(n, D, dtype=torch.float64, requires_grad=True))
    assert sorted(torch.nonzero(m.last_counts).flatten().tolist()) == chosen.tolist()
    assert m.last_aux.item() == pytest.approx(ALPHA * E / K, rel=1e-15, abs=0)


def test_training_and_inference_paths_agree():
    m = moe(torch.float32)
    x = torch.randn(2, 64, D, requires_grad=True)
    m.train()
    y_train = m(x)  # grad enabled: the repeat-interleave path with the pass-through aux
    m.eval()
    with torch.no_grad():
        y_infer = m(x)  # the sorted scatter-add path
    assert (y_train.detach() - y_infer).abs().max().item() <= 1e-5
    # and through the whole DiT-MoE (every block's MoE on its own path)
    torch.manual_seed(1)
    net = DiTMoE(sample_size=8, patch_size=2, dim=16, depth=2, heads=2, experts=4, top_k=2)
    for p in net.parameters():  # adaLN-Zero starts with every block's output at zero: give the blocks weights
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    cond = net.embed_caption(torch.tensor([[1, 3, 0, 9], [0, 0, 0, 0], [2, 4, 7, 12]]))
    net.train()
    a = net(x, t, cond)
    net.eval()
    with torch.no_grad():
        b = net(x, t, cond)
    assert a.abs().max().item() > 0.1
    assert (a.detach() - b).abs().max().item() <= 1e-5


def test_the_shared_expert_contributes_when_every_gate_is_zero():
    m = moe()
    x = torch.randn(12, D, dtype=torch.float64)
    _, weight, idx = m.route(x)
    zero = torch.zeros_like(weight)
    shared = m.shared(x)
    assert shared.abs().max().item() > 1e-3
    for train in (True, False):
        assert torch.equal(m.combine(x, zero, idx, train), shared)
    routed_only = moe(shared=0)
    assert torch.equal(routed_only.combine(x, zero, idx, True), torch.zeros_like(x))


def test_gates_are_the_top_k_softmax_probabilities_without_renormalisation():
    m = moe()
    x = torch.randn(9, D, dtype=torch.float64)
    probs, weight, idx = m.route(x)
    assert torch.equal(weight, probs.gather(1, idx))
    assert (weight.sum(1) < 1).all()  # not renormalised over the K chosen experts
    want = sum(
        weight[:, k : k + 1] * torch.stack([m.experts[i](x[j]) for j, i in enumerate(idx[:, k])]) for k in range(K)
    )
    assert torch.allclose(m.combine(x, weight, idx, True), want + m.shared(x), atol=1e-12, rtol=0)


def test_the_balance_loss_joins_the_backward_pass_only():
    x = torch.randn(4, 6, D, dtype=torch.float64)
    a = moe()
    a.train()
    y = a(x)
    y.sum().backward()  # the output holds no aux; its gradient does
    b = moe()
    flat = x.reshape(-1, D)
    probs, weight, idx = b.route(flat)
    plain = b.combine(flat, weight, idx, True)
    aux = balance_loss(probs, idx, ALPHA)
    assert torch.equal(y.reshape(-1, D).detach(), plain.detach())
    g_total = torch.autograd.grad(plain.sum() + aux, b.gate.weight, retain_graph=True)[0]
    g_aux = torch.autograd.grad(aux, b.gate.weight)[0]
    assert g_aux.abs().max().item() > 1e-6
    assert torch.allclose(a.gate.weight.grad, g_total, atol=1e-12, rtol=0)


def test_cross_attention_starts_as_the_adaln_only_block_and_then_reads_the_tokens():
    torch.manual_seed(2)
    x_net = DiTMoE(sample_size=8, patch_size=2, dim=16, depth=2, heads=2, experts=0, cross_attention=True)
    for name, p in x_net.named_parameters():  # give every block weights, but keep the cross-attention's zero output
        if ".cross.proj." not in name:
            torch.nn.init.normal_(p, std=0.1)
    plain = DiTMoE(sample_size=8, patch_size=2, dim=16, depth=2, heads=2, experts=0)
    missing, unexpected = plain.load_state_dict(x_net.state_dict(), strict=False)
    assert not missing and unexpected and all(".cross." in k or k == "slot" for k in unexpected)
    tokens = torch.tensor([[1, 3, 0, 9], [0, 0, 0, 0], [2, 4, 7, 12]])
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    context = x_net.embed_caption(tokens)
    assert context.shape == (3, 4, 16)
    with torch.no_grad():
        a = x_net(x, t, context)
        b = plain(x, t, context.sum(1))  # the adaLN path sees the same summed condition
    assert torch.equal(a, b)
    # with a non-zero projection the tokens themselves matter, not only their sum
    for blk in x_net.blocks:
        torch.nn.init.normal_(blk.cross.proj.weight, std=0.1)
    delta = torch.zeros_like(context)
    delta[:, 0], delta[:, 1] = 0.5, -0.5
    moved = context + delta  # the same sum, different tokens
    with torch.no_grad():
        assert torch.allclose(moved.sum(1), context.sum(1))
        assert (x_net(x, t, context) - x_net(x, t, moved)).abs().max().item() > 1e-3


def test_rope_scores_depend_on_the_relative_position_only():
    from condiff.nets.dit_moe import rope_2d, rotate

    grid, dh = 5, 8
    cos, sin = rope_2d(grid, dh)
    torch.manual_seed(3)
    q = torch.randn(dh).expand(1, 1, grid * grid, dh)  # the same query and key content at every position
    k = torch.randn(dh).expand(1, 1, grid * grid, dh)
    rq, rk = rotate(q, cos, sin), rotate(k, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation
    s = (rq[0, 0] @ rk[0, 0].T).view(grid, grid, grid, grid)  # s[y, x, y', x']
    for dy, dx in ((0, 1), (1, 0), (1, -2), (-2, 1)):
        vals = [
            s[y, x, y + dy, x + dx]
            for y in range(grid)
            for x in range(grid)
            if 0 <= y + dy < grid and 0 <= x + dx < grid
        ]
        assert max(vals) - min(vals) <= 1e-5
    assert abs(s[0, 0, 0, 1] - s[0, 0, 1, 0]) > 1e-3  # rows and columns rotate different channels
