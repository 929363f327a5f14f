"""PPAP (Go et al., CVPR 2023) on the exact GMM oracle (specs/sampling_guidance.md sec. 9d).

The clean "off-the-shelf" classifier is a tiny MLP fitted to the exact clean classifier log p(y | x_0) of the
``gmm`` fixture; the teacher is that exact clean classifier; the experts are LoRA copies of the MLP distilled
on unlabelled GMM samples. Checked: routing floor(t N / T) and its boundary convention, per-row routing, LoRA
wiring (fresh expert = classifier, only LoRA trains, base weights untouched), the KD loss against its formula
and its decrease, the experts against the exact noisy classifier p(y | x_t), guided sampling against exact
classifier guidance and against the naive clean classifier applied to x_t, and the safetensors round trip."""

import json
import math

import pytest
import torch
from torch import nn

from condiff.core.denoiser import coefficients
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError, InputFileError
from condiff.guidance.classifier import ClassifierGuidance, exact_gmm_classifier, from_logits
from condiff.guidance.ppap import (
    MultiExpert,
    adaptable_layers,
    expert_index,
    expert_interval,
    frozen_checksum,
    load_ppap,
    lora_expert,
    lora_parameters,
    lora_spec,
    ppap_guidance,
    save_ppap,
)
from condiff.models.classifiers import load_guidance_classifier
from condiff.nets import AttributeClassifier
from condiff.solvers import get_solver
from condiff.training.ppap import T_KD, distill_expert, kd_loss

F64 = torch.float64
N_EXPERTS = 5


class MLP(nn.Module):
    """A tiny clean classifier: (x, t) -> logits, t ignored."""

    def __init__(self, dim=2, hidden=32, classes=2):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x, t=None):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def noisy(schedule, x0, t, generator):
    a, s = coefficients(schedule, t, x0)
    return a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)


@pytest.fixture(scope="module")
def ppap(gmm):
    """Fit the clean MLP, then distil 5 rank-4 experts on 2048 unlabelled samples (150 AdamW steps each)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sch = VPLinear()

    def clean(x):
        return torch.log(gmm.class_posterior(x, 1.0, 0.0))

    net = MLP(classes=gmm.num_classes).double()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        x, _ = gmm.sample(256, g)
        loss = kd_loss(clean(x), net(x), 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    images, labels = gmm.sample(2048, g)
    z = clean(images)
    base_sum = frozen_checksum(net)
    experts, held, sums = [], [], []
    for k in range(N_EXPERTS):
        lo, hi = expert_interval(k, N_EXPERTS, sch.t_min, sch.t_max)
        ge = torch.Generator().manual_seed(100 + k)
        t = lo + (hi - lo) * torch.rand(2048, generator=ge, dtype=F64)
        xt = noisy(sch, images, t, ge)
        e = lora_expert(net, rank=4, alpha=4.0)
        with torch.no_grad():
            before = float(kd_loss(z, e(xt, t)).mean())
        distill_expert(e, z, images, sch, (lo, hi), steps=150, batch_size=256, lr=1e-2, weight_decay=0.0, generator=g)
        with torch.no_grad():
            after = float(kd_loss(z, e(xt, t)).mean())
        held.append((before, after))
        sums.append(frozen_checksum(e))
        experts.append(e)
    return {
        "net": net,
        "clean": clean,
        "schedule": sch,
        "multi": MultiExpert(experts, sch.t_min, sch.t_max),
        "held": held,
        "sums": sums,
        "base_sum": base_sum,
        "images": images,
        "labels": labels,
    }


# ---- routing --------------------------------------------------------------------------------------------


def test_routing_is_floor_t_n_over_T_with_half_open_intervals():
    """k = floor(t N / T) on [0, T); intervals closed on the left; t = T goes to the last expert, times outside
    [t_min, t_max] are clamped; per-sample tensors route elementwise."""
    T, N = 1000.0, 5
    t = torch.arange(0, 1000, dtype=F64)
    assert torch.equal(expert_index(t, N, 0.0, T), torch.floor(t * N / T).long())
    for k in range(N):
        lo, hi = expert_interval(k, N, 0.0, T)
        assert (lo, hi) == (200.0 * k, 200.0 * (k + 1))
        assert int(expert_index(lo, N, 0.0, T)) == k
        assert int(expert_index(math.nextafter(hi, -math.inf), N, 0.0, T)) == k
        if k < N - 1:
            assert int(expert_index(hi, N, 0.0, T)) == k + 1
    assert int(expert_index(T, N, 0.0, T)) == N - 1
    assert int(expert_index(-1.0, N, 0.0, T)) == 0  # VPDiscrete's t_clean
    assert int(expert_index(1e9, N, 0.0, T)) == N - 1
    # a continuous range: the same rule on (t - t_min) / (t_max - t_min)
    assert expert_index(torch.tensor([1e-3, 0.2008, 0.5, 0.999, 1.0]), 5, 1e-3, 1.0).tolist() == [0, 1, 2, 4, 4]
    with pytest.raises(ConfigError, match="finite"):
        expert_index(float("nan"), N, 0.0, T)
    with pytest.raises(ConfigError, match="t_min < t_max"):
        expert_index(0.5, N, 1.0, 1.0)
    with pytest.raises(ConfigError, match="positive integer"):
        expert_index(0.5, 0, 0.0, 1.0)


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, t):
        return x @ self.w


def test_multi_expert_routes_each_row_to_its_expert_with_gradients():
    """Per-sample t: row b gets expert k_b's logits and k_b's gradient w.r.t. x; scalar t: one expert."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=g, dtype=F64) for _ in range(N_EXPERTS)]
    multi = MultiExpert([Linear(w) for w in ws], 0.0, 1000.0)
    t = torch.tensor([999.0, 0.0, 450.0, 200.0, 199.0, 650.0, 1000.0, 800.0], dtype=F64)
    x = torch.randn(t.numel(), 3, generator=g, dtype=F64, requires_grad=True)
    out = multi(x, t)
    k = expert_index(t, N_EXPERTS, 0.0, 1000.0)
    want = torch.stack([x[b] @ ws[int(k[b])] for b in range(t.numel())])
    assert torch.equal(out, want)
    (grad,) = torch.autograd.grad(out[:, 1].sum(), x)
    assert torch.allclose(grad, torch.stack([ws[int(kb)][:, 1] for kb in k]))
    assert torch.equal(multi(x, 450.0), x @ ws[2])
    with pytest.raises(ConfigError, match="per-sample"):
        multi(x, t[:3])


def test_ppap_guidance_with_exact_noisy_experts_is_the_conditional_denoiser(gmm):
    """ppap_guidance = ADM classifier guidance: with every expert the exact p(y | x_t) (log of it as logits),
    scale 1 gives E[x_0 | x_t, y] exactly, for per-sample t spread over all experts."""
    sch = VPLinear()
    den = gmm.denoiser(sch)

    class Exact(nn.Module):
        def forward(self, x, t):
            return torch.log(den.class_posterior(x, t))

    multi = MultiExpert([Exact() for _ in range(N_EXPERTS)], sch.t_min, sch.t_max)
    g = torch.Generator().manual_seed(3)
    n = 40
    t = torch.linspace(0.01, 0.99, n, dtype=F64)
    x = noisy(sch, gmm.sample(n, g)[0], t, g)
    y = torch.arange(n) % gmm.num_classes
    out = ppap_guidance(den, multi, 1.0)(x, t, {"y": y})
    assert len(set(multi.route(t).tolist())) == N_EXPERTS
    assert torch.allclose(out, den(x, t, {"y": y}), rtol=1e-9, atol=1e-9)
    ref = ClassifierGuidance(den, exact_gmm_classifier(den), 2.5)(x, t, {"y": y})
    assert torch.allclose(ppap_guidance(den, multi, 2.5)(x, t, {"y": y}), ref, rtol=1e-9, atol=1e-9)


# ---- LoRA experts ---------------------------------------------------------------------------------------


def test_lora_expert_wraps_every_conv_and_linear_and_starts_as_the_classifier():
    """On condiff's AttributeClassifier: every nn.Conv2d / nn.Linear gets LoRA (rank, alpha read back), only
    LoRA requires grad, the base weights keep their checksum, and B = 0 makes the fresh expert equal the
    classifier (its ``head`` still works)."""
    net = AttributeClassifier(width=8, hidden=16).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    e = lora_expert(net, rank=2, alpha=4.0)
    spec = lora_spec(e)
    assert spec == {"rank": 2, "alpha": 4.0, "targets": adaptable_layers(net)}
    assert {type(m).__name__ for n, m in net.named_modules() if n in spec["targets"]} == {"Conv2d", "Linear"}
    trainable = {n for n, p in e.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(e)) and trainable
    assert frozen_checksum(e) == frozen_checksum(net)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(e.head(e(x), "color"), net.head(net(x), "color"))
    assert all(not hasattr(m, "lora_A") for m in net.modules())  # the classifier itself is untouched
    with pytest.raises(ConfigError, match="LoRA target layer"):
        lora_expert(net, 2, 4.0, targets=["nope"])
    with pytest.raises(ConfigError, match="rank"):
        lora_expert(net, 0, 4.0)


def test_kd_loss_is_the_tempered_kl_summed_over_groups():
    """KL(softmax(z_t / T) || softmax(z_s)) per sample, by its formula; zero iff z_s = z_t / T (+ const per
    group); groups add."""
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    p, q = torch.softmax(zt / T_KD, 1), torch.softmax(zs, 1)
    assert torch.allclose(kd_loss(zt, zs), (p * (p.log() - q.log())).sum(1), rtol=1e-12)
    assert kd_loss(zt, zt / T_KD + 7.0).abs().max() < 1e-12
    split = kd_loss(zt[:, :2], zs[:, :2], 1.0) + kd_loss(zt[:, 2:], zs[:, 2:], 1.0)
    assert torch.allclose(kd_loss(zt, zs, 1.0, groups=[(0, 2), (2, 5)]), split, rtol=1e-12)
    with pytest.raises(ConfigError, match="groups"):
        kd_loss(zt, zs, groups=[(0, 9)])


def test_distillation_lowers_the_kd_loss_and_trains_only_lora(ppap):
    """Held-out KD loss (fixed x0, t, eps per interval) goes down for every expert; the frozen weights keep
    their checksum (equal to the clean classifier's) while the LoRA B matrices moved off zero."""
    for before, after in ppap["held"]:
        assert after < before
    assert ppap["sums"] == [ppap["base_sum"]] * N_EXPERTS
    assert frozen_checksum(ppap["net"]) == ppap["base_sum"]
    for e in ppap["multi"].experts:
        bs = [p for n, p in lora_parameters(e).items() if "lora_B" in n]
        assert bs and all(float(b.detach().abs().max()) > 0 for b in bs)


def test_experts_approximate_the_exact_noisy_classifier(gmm, ppap):
    """In each expert's interval, KL(p_exact(y | x_t) || expert) is below KL(p_exact || clean classifier on x_t),
    and far below it (a quarter) once the noise matters (experts 1..4): the experts became noisy classifiers."""
    sch, multi, images = ppap["schedule"], ppap["multi"], ppap["images"]
    den = gmm.denoiser(sch)
    for k in range(N_EXPERTS):
        lo, hi = multi.interval(k)
        g = torch.Generator().manual_seed(7 + k)
        t = lo + (hi - lo) * torch.rand(images.shape[0], generator=g, dtype=F64)
        xt = noisy(sch, images, t, g)
        with torch.no_grad():
            lp = torch.log(den.class_posterior(xt, t))

            def kl(z):
                return float((lp.exp() * (lp - torch.log_softmax(z, 1))).sum(1).mean())

            ours, naive = kl(multi(xt, t)), kl(ppap["clean"](xt))
        assert ours < naive
        if k > 0:
            assert ours < 0.25 * naive


# ---- guided sampling ------------------------------------------------------------------------------------


def test_guided_sampling_with_experts_beats_the_clean_teacher_on_x_t(gmm, ppap):
    """DDIM, 20 steps, 512 samples, targets alternating, same x_T for every guidance, scale 2. A sample is a
    valid hit when the exact clean classifier puts it in its target class and its log p_0 is above the 1%
    quantile of real data. PPAP: more valid hits than the clean teacher (and than the clean MLP) applied to x_t,
    hit rate within 0.02 of exact classifier guidance, and samples closer to exact guidance's (same x_T).
    (The plain hit rate does not separate them: the clean GMM log-ratio keeps classifying samples pushed far
    off the data as the target class; see the closing note.)"""
    sch = ppap["schedule"]
    den = gmm.denoiser(sch)
    g = torch.Generator().manual_seed(11)
    threshold = torch.quantile(gmm.log_prob(gmm.sample(20000, g)[0], 1.0, 0.0), 0.01)
    n, scale = 512, 2.0
    y = torch.arange(n) % gmm.num_classes
    grid = make_grid(sch, 20)
    x_T = initial_noise(sch, float(grid[0]), (n, gmm.dim), torch.Generator().manual_seed(1), F64)

    def run(log_prob):
        x = sample(ClassifierGuidance(den, log_prob, scale), get_solver("ddim"), grid, x_T, {"y": y}).x.detach()
        hit = gmm.class_posterior(x, 1.0, 0.0).argmax(1) == y
        valid = gmm.log_prob(x, 1.0, 0.0) >= threshold
        return x, float(hit.double().mean()), float((hit & valid).double().mean())

    x_exact, hit_exact, _ = run(exact_gmm_classifier(den))
    multi = ppap["multi"]
    x_ppap, hit_ppap, ok_ppap = run(from_logits(multi))
    x_teacher, _, ok_teacher = run(from_logits(lambda x, t: ppap["clean"](x)))
    x_mlp, _, ok_mlp = run(from_logits(lambda x, t: ppap["net"](x)))
    assert ok_ppap > ok_teacher and ok_ppap > ok_mlp
    assert hit_ppap >= hit_exact - 0.02
    dist = lambda a: float((a - x_exact).norm(dim=1).mean())  # noqa: E731
    assert dist(x_ppap) < dist(x_teacher) and dist(x_ppap) < dist(x_mlp)
    # ppap_guidance is the same object as ClassifierGuidance(den, from_logits(multi), s, drop=('y',))
    x = sample(ppap_guidance(den, multi, scale), get_solver("ddim"), grid, x_T, {"y": y}).x.detach()
    assert torch.equal(x, x_ppap)


# ---- saving ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(ppap, tmp_path):
    """LoRA weights + JSON metadata, read back onto the same classifier: identical logits at every t; another
    classifier or a damaged file is an InputFileError."""
    multi, net = ppap["multi"], ppap["net"]
    out = save_ppap(multi, tmp_path / "experts", net, info={"note": "test"})
    meta = json.loads((out / "ppap.json").read_text())
    assert meta["n_experts"] == N_EXPERTS and meta["rank"] == 4 and meta["note"] == "test"
    back = load_ppap(out, net)
    x = ppap["images"][:64]
    t = torch.linspace(0.0, 1.0, 64, dtype=F64)
    with torch.no_grad():
        assert torch.equal(back(x, t), multi(x, t))
    other = MLP(classes=2).double()
    with pytest.raises(InputFileError, match="another classifier"):
        load_ppap(out, other)
    (out / "ppap.json").write_text("{}")
    with pytest.raises(InputFileError, match="not PPAP expert metadata"):
        load_ppap(out, net)
    with pytest.raises(InputFileError, match="not found"):
        load_ppap(tmp_path / "missing", net)


# ---- CLI ------------------------------------------------------------------------------------------------


def _classifier_dir(tmp_path, noise_aware=False):
    from condiff.models.base import build_model

    cfg = {"width": 8, "hidden": 16, "noise_aware": noise_aware}
    m = build_model(
        "shapes_classifier",
        cfg,
        {"type": "vp_discrete", "beta_schedule": "squaredcos_cap_v2", "num_steps": 1000},
        "eps",
    )
    path = tmp_path / ("noisy" if noise_aware else "clean")
    m.save(path)
    return path, m.module["classifier"]


def test_cli_train_ppap_writes_loadable_experts_and_refuses_bad_input(tmp_path, capsys):
    """`condiff guidance train-ppap` on a tiny clean classifier and the bundled shapes model: the experts
    directory loads back onto the recorded classifier (one expert per half of the model's t range 0..999, base
    weights untouched); a noise-aware classifier, --experts 0 and a diffusion model given as the classifier are
    one-line errors (exit 2)."""
    from condiff.cli import main
    from condiff.models.base import bundled_dir

    clean, net = _classifier_dir(tmp_path)
    out = tmp_path / "experts"
    args = [
        "guidance",
        "train-ppap",
        "--classifier",
        str(clean),
        "--model",
        "shapes",
        "--out",
        str(out),
        "--experts",
        "2",
        "--images",
        "12",
        "--gen-steps",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--holdout",
        "4",
        "--rank",
        "2",
    ]
    main(args)
    stdout = capsys.readouterr().out
    assert "trained 2 PPAP experts" in stdout and "held-out KD" in stdout
    multi = load_guidance_classifier(out)  # rebuilt on the classifier recorded in ppap.json
    assert multi.n_experts == 2 and (multi.t_min, multi.t_max) == (0.0, 999.0)
    assert lora_spec(multi.experts[0])["rank"] == 2
    assert frozen_checksum(multi.experts[1]) == frozen_checksum(net)
    noisy_dir, _ = _classifier_dir(tmp_path, noise_aware=True)
    for bad, message in [
        (["--classifier", str(noisy_dir)], "noise-aware"),
        (["--experts", "0"], "--experts"),
        (["--classifier", str(bundled_dir("shapes"))], "not a classifier"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args + bad + ["--out", str(tmp_path / "bad")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_bundled_experts_read_noisy_colours_that_the_clean_classifier_misses():
    """The bundled PPAP experts (`--classifier ppap`) load onto the bundled clean classifier and, on 256 fresh
    renders noised to t = 500 of 999 (expert 2's interval), read the colour right >= 95% of the time where the
    clean classifier they were distilled from reads it right < 60%."""
    from condiff.core.denoiser import diffuse as noisy
    from condiff.data import shapes
    from condiff.models.base import load_model
    from condiff.models.classifiers import classifier_path, load_classifier, load_guidance_classifier

    experts = load_guidance_classifier(classifier_path("ppap"))
    clean = load_classifier("clean")
    assert experts.n_experts == 5 and int(experts.route(500.0)) == 2
    sch = load_model("shapes").schedule
    g = torch.Generator().manual_seed(31)
    b = shapes.sample_batch(256, g)
    t = torch.full((256,), 500.0, dtype=torch.float64)
    xt = noisy(sch, b.images, t, torch.randn(b.images.shape, generator=g))
    with torch.no_grad():
        acc_e = (clean.head(experts(xt, t), "color").argmax(1) == b.attrs[:, 1]).float().mean()
        acc_c = (clean.head(clean(xt), "color").argmax(1) == b.attrs[:, 1]).float().mean()
    assert acc_e >= 0.95 and acc_c < 0.6, (float(acc_e), float(acc_c))
