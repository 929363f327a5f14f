"""The digits part of SDA (condiff.models.sda_digits): the torch scorer is the scikit-learn scorer (same
probabilities), the validation / test split partitions the 450 held-out digits, the unconditional denoiser is the
model with the null label, ``evaluate``'s columns are what they claim (an untouched copy of the source as the
"adapted" classifier makes the SDA columns equal the purification ones), stage 1 fine-tunes a copy and leaves the
source alone, and the saved classifier round-trips (with bad folders refused)."""

from __future__ import annotations

import json

import pytest
import torch

from condiff.data import digits, digits_c
from condiff.errors import ConfigError, InputFileError
from condiff.models import sda_digits as sd
from condiff.models.base import load_model


@pytest.fixture(scope="module")
def m():
    model = load_model("digits")
    model.module.requires_grad_(False)
    return model


def test_scorer_net_has_the_scorers_probabilities():
    x = digits.load_split()["x_test"]
    net = sd.scorer_net()
    with torch.no_grad():
        p = net(x).softmax(-1).double()
    ref = torch.from_numpy(digits.scorer().clf.predict_proba(x.flatten(1).clamp(-1, 1).numpy())).double()
    assert torch.allclose(p, ref, atol=1e-5)
    assert torch.equal(p.argmax(-1), digits.scorer().predict(x))


def test_split_partitions_the_heldout_digits():
    s, full = sd.split(), digits.load_split()
    assert (s["x_val"].shape[0], s["x_test"].shape[0]) == sd.split_sizes() == (150, 300)
    rows = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(full["x_test"], full["y_test"])}
    val = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(s["x_val"], s["y_val"])}
    test = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(s["x_test"], s["y_test"])}
    assert not val & test and val | test == rows


def test_null_label_is_the_unconditional_model(m):
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = m.denoiser(x, 250.0, {"class_labels": torch.full((3,), 10)})
    assert torch.equal(sd.NullLabel(m)(x, 250.0), ref)
    assert sd.NullLabel(m).schedule is m.denoiser.schedule


def test_evaluate_columns(m):
    s = sd.split()
    x, y = s["x_val"][:12], s["y_val"][:12]
    settings = sd.Settings(t_star=200.0, steps=1, seed=3)
    source = sd.scorer_net()
    rows = sd.evaluate(m, source, sd.scorer_net(), settings, x, y, ["noise", "occlusion"], [2])
    assert [(r["corruption"], r["severity"]) for r in rows] == [("noise", 2), ("occlusion", 2)]
    for ci, r in enumerate(rows):
        xc = digits_c.corrupt(r["corruption"], x, 2, 3)
        assert r["source"] == float((digits.scorer().predict(xc) == y).double().mean())
        xp = sd.project_images(m, xc, sd.projection_of(settings), sd.projection_seed(3, ci, 2))
        with torch.no_grad():
            assert r["purified"] == float((source(xp).argmax(-1) == y).double().mean())
        # the "adapted" classifier is the source itself: SDA's columns are purification's
        assert r["sda_adapted"] == r["purified"] and r["sda"] == r["purified_ensemble"]
    means = sd.averages(rows)
    assert means["source"] == pytest.approx((rows[0]["source"] + rows[1]["source"]) / 2, abs=1e-15)
    table = sd.format_table(rows, means).splitlines()
    assert len(table) == 2 + 2 + 1 and table[-1].startswith("| **average** |")


def test_adapt_fine_tunes_a_copy(m):
    source = sd.scorer_net()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    settings = sd.Settings(synthetic=10, synthesis_steps=1, steps=1, epochs=2, t_star=100.0, mix_real=False)
    adapted, info = sd.adapt(m, source, settings)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items())
    assert set(info) == {
        "synthetic_scorer_accuracy",
        "projected_synthetic_source_accuracy",
        "loss_first",
        "loss_last",
        "cpu_seconds",
        "finetune_images",
    }
    assert info["finetune_images"] == 10
    images, labels = sd.synthesize(m, settings)
    assert images.shape == (10, 1, 16, 16) and sorted(labels.tolist()) == list(range(10))
    again = sd.synthesize(m, settings)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])  # same seed, same digits


def test_mix_real_adds_the_projected_training_digits_and_the_cache_is_reused(m):
    source = sd.scorer_net()
    settings = sd.Settings(synthetic=10, synthesis_steps=1, steps=1, epochs=1, t_star=100.0, mix_real=True)
    cache = {}
    _, info = sd.adapt(m, source, settings, cache=cache)
    n_train = digits.load_split()["x_train"].shape[0]
    assert info["finetune_images"] == 10 + n_train
    assert sorted(k[0] for k in cache) == ["real", "synthetic"]
    real = next(v for k, v in cache.items() if k[0] == "real")
    ref = sd.project_images(m, digits.load_split()["x_train"], sd.projection_of(settings), settings.seed + 2)
    assert torch.equal(real, ref)  # the same projection as at test time, on the real training digits
    kept = {k: v for k, v in cache.items()}
    sd.adapt(m, source, settings, cache=cache)
    assert all(cache[k] is v for k, v in kept.items()) and len(cache) == 2


def test_structure_settings_reach_the_projection_and_evaluate_is_project_then_score(m):
    settings = sd.Settings(t_star=150.0, steps=1, structure_factor=4, structure_weight=0.5, seed=2)
    p = sd.projection_of(settings)
    assert (p.structure_factor, p.structure_weight) == (4, 0.5)
    assert sd.projection_of(sd.Settings(structure_factor=0)).structure_factor is None
    s = sd.split()
    x, y = s["x_val"][:8], s["y_val"][:8]
    source = sd.scorer_net()
    cells = sd.corrupt_and_project(m, settings, x, ["blur", "contrast"], [1, 4])
    assert sd.score_cells(source, source, cells, y) == sd.evaluate(
        m, source, source, settings, x, y, ["blur", "contrast"], [1, 4]
    )


def test_saved_classifier_round_trips(tmp_path):
    net = sd.scorer_net()
    with torch.no_grad():
        net.out.bias.add_(0.5)
    settings = sd.Settings(t_star=250.0, steps=3, structure_factor=2, structure_weight=1.5, mix_real=True, seed=7)
    sd.save_adapted(net, settings, tmp_path / "c", {"note": 1})
    back, s = sd.load_adapted(tmp_path / "c")
    assert s == settings
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
    assert json.loads((tmp_path / "c" / "condiff.json").read_text())["note"] == 1


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda d: (d / "condiff.json").unlink(), "has no condiff.json"),
        (lambda d: (d / sd.WEIGHTS).unlink(), "file not found"),
        (lambda d: (d / "condiff.json").write_text('{"sda_digits": {"t_star": 1}}'), "needs a 'sda_digits' table"),
        (lambda d: (d / "condiff.json").write_text("[1"), "is not valid JSON"),
        (lambda d: (d / sd.WEIGHTS).write_bytes(b"\x80\x04K\x01."), "pickle"),
    ],
)
def test_bad_classifier_folders_are_refused(tmp_path, breakage, needle):
    sd.save_adapted(sd.scorer_net(), sd.Settings(), tmp_path / "c")
    breakage(tmp_path / "c")
    with pytest.raises(InputFileError, match=needle):
        sd.load_adapted(tmp_path / "c")


def test_bad_settings_in_the_saved_table(tmp_path):
    sd.save_adapted(sd.scorer_net(), sd.Settings(), tmp_path / "c")
    f = tmp_path / "c" / "condiff.json"
    table = json.loads(f.read_text())
    table["sda_digits"]["steps"] = 0
    f.write_text(json.dumps(table))
    with pytest.raises(InputFileError, match="steps must be an integer in"):
        sd.load_adapted(tmp_path / "c")


def test_check_settings_names_the_option():
    with pytest.raises(ConfigError, match=r"--t-star must be a time in \(0, 999\]"):
        sd.check_settings(sd.Settings(t_star=1000.0), as_options=True)
    with pytest.raises(ConfigError, match="synthetic must be an integer in"):
        sd.check_settings(sd.Settings(synthetic=9))
    with pytest.raises(ConfigError, match=r"--structure-factor must be one of 0, 1, 2, 4, 8, 16 .* got 3"):
        sd.check_settings(sd.Settings(structure_factor=3), as_options=True)
    with pytest.raises(ConfigError, match=r"structure_weight must be a number in \[0, 100\], got -1"):
        sd.check_settings(sd.Settings(structure_weight=-1.0))
    with pytest.raises(ConfigError, match="mix_real must be true or false"):
        sd.check_settings(sd.Settings(mix_real=1))
