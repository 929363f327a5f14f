"""DiffuSIANet: shapes, the plain encoder's independence of z_t, the spiral net with its interaction zeroed equal to
the plain one, the interaction changing the encoder once it is not zero, and the tied read-out."""

from __future__ import annotations

import torch

from condiff.nets.diffusia import DiffuSIANet, count_parameters

V, L, D = 11, 6, 8


def nets(seed: int = 0):
    torch.manual_seed(seed)
    plain = DiffuSIANet(V, L, dim=16, layers=2, heads=2, spiral=False, embed_dim=D).eval()
    torch.manual_seed(seed + 1)
    spiral = DiffuSIANet(V, L, dim=16, layers=2, heads=2, spiral=True, embed_dim=D).eval()
    missing, unexpected = spiral.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".cross." in k and k.startswith("encoder.") for k in missing)
    return plain, spiral


def inputs(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, D, generator=g), torch.rand(b, generator=g), torch.randint(V, (b, L), generator=g)


def test_output_shapes_and_tied_logits():
    plain, spiral = nets()
    z, t, src = inputs()
    for net in (plain, spiral):
        out = net(z, t, src)
        assert out.x0.shape == (3, L, D) and out.logits.shape == (3, L, V) and len(out.encoder) == 2
        assert torch.allclose(out.logits, out.x0 @ net.embedding.weight.t())
        assert torch.equal(net.embed(src), net.embedding.weight[src])
    assert count_parameters(spiral) > count_parameters(plain)


def test_plain_encoder_does_not_depend_on_z_t_or_t():
    plain, _ = nets()
    z, t, src = inputs()
    z.requires_grad_(True)
    out = plain(z, t, src)
    grad = torch.autograd.grad(out.encoder[-1].sum(), z, allow_unused=True)[0]
    assert grad is None or torch.equal(grad, torch.zeros_like(z))
    other = plain(torch.randn_like(z), torch.rand(3), src)
    for a, b in zip(out.encoder, other.encoder):
        assert torch.equal(a, b)
    for a, b in zip(out.encoder, plain.encode(src)):  # and it is what encode() caches
        assert torch.equal(a, b)
    cached = plain(z, t, src, encoder_states=plain.encode(src))
    assert torch.equal(cached.x0, out.x0)


def test_spiral_with_zero_interaction_equals_plain_exactly():
    plain, spiral = nets()
    z, t, src = inputs()
    a, b = plain(z, t, src), spiral(z, t, src)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.logits, b.logits)
    assert all(torch.equal(p, q) for p, q in zip(a.encoder, b.encoder))


def test_spiral_encoder_reads_the_decoder_once_the_interaction_is_on():
    _, spiral = nets()
    for layer in spiral.encoder:
        torch.nn.init.normal_(layer.cross.attn.out.weight, std=0.2)
    z, t, src = inputs()
    z.requires_grad_(True)
    out = spiral(z, t, src)
    grad = torch.autograd.grad(out.encoder[0].sum(), z)[0]  # layer 0 reads the decoder's input embedding
    assert grad.abs().sum() > 0
    assert not torch.equal(out.encoder[-1], spiral(torch.randn_like(z), t, src).encoder[-1])


def test_save_and_load_round_trip(tmp_path):
    _, spiral = nets()
    for layer in spiral.encoder:
        torch.nn.init.normal_(layer.cross.attn.out.weight, std=0.2)
    spiral.save_pretrained(tmp_path / "net")
    assert (tmp_path / "net" / "diffusion_pytorch_model.safetensors").is_file()
    back = DiffuSIANet.from_pretrained(tmp_path / "net").eval()
    z, t, src = inputs()
    assert torch.equal(spiral(z, t, src).x0, back(z, t, src).x0)
