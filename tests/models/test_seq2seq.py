"""The seq2seq task (DiffuSIA and its plain baseline): the data, strict recipes with one-line errors, save/load
(safetensors, pickles refused), exact match's keys, exact Trainer resume, and the CLI's recipe dispatch."""

from __future__ import annotations

import pytest
import torch

from condiff.cli.tokens import load_any_recipe
from condiff.cli.train import run_trainer
from condiff.data import captions
from condiff.errors import ConfigError, InputFileError
from condiff.models.seq2seq import (
    Seq2SeqDataConfig,
    build_seq2seq_model,
    exact_match,
    is_seq2seq_model,
    load_seq2seq_model,
    make_seq2seq_trainer,
    seq2seq_recipe_from_dict,
    translation_batch,
)


def tiny(**over):
    d = {
        "name": "tiny-seq2seq",
        "family": "seq2seq",
        "model": {"dim": 16, "layers": 1, "heads": 2, "embed_dim": 4},
        "diffusion": {"num_steps": 100},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return seq2seq_recipe_from_dict(d)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"family": "captions"}, "'captions'"),
        ({"colour": 1}, "'colour'"),
        ({"model": {"dim": 15}}, "multiple of model.heads"),
        ({"model": {"spiral": 1}}, "model.spiral must be bool, got 1"),
        ({"model": {"depth": 2}}, "model.depth"),
        ({"diffusion": {"schedule": "linear"}}, "'linear'"),
        ({"diffusion": {"round_x0": -1.0}}, "diffusion.round_x0"),
        ({"data": {"src_template": 5}}, "data.src_template must be an integer in [0, 4], got 5"),
        ({"data": {"dst_template": True}}, "data.dst_template"),
        ({"data": {"p_drop": 1.5}}, "data.p_drop"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"name": "no spaces"}, "'no spaces'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError) as e:
        tiny(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_target_is_a_canonical_function_of_the_source():
    data = Seq2SeqDataConfig(src_template=3, dst_template=0, p_drop=0.3)
    src, dst, attrs = translation_batch(200, torch.Generator().manual_seed(0), data)
    assert src.shape == dst.shape == (200, captions.SEQ_LEN)
    assert bool(captions.parses(src, 3).all()) and bool(captions.parses(dst, 0).all())
    assert torch.equal(captions.parse(src), attrs) and torch.equal(captions.parse(dst), attrs)
    # equal attributes give equal targets (canonical words), whatever synonyms the sources drew
    key = {}
    for a, d in zip(attrs.tolist(), dst.tolist()):
        assert key.setdefault(tuple(a), d) == d


def test_packaged_recipes_differ_only_in_spiral():
    from condiff.cli.recipes import RECIPES_DIR, describe

    a, b = (load_any_recipe(RECIPES_DIR / f"seq2seq-{n}.toml") for n in ("diffusia", "plain"))
    assert (a.name, b.name) == ("seq2seq-diffusia", "seq2seq-plain") and a.model.spiral and not b.model.spiral
    da, db = a.to_dict(), b.to_dict()
    da.pop("name"), db.pop("name"), da["model"].pop("spiral"), db["model"].pop("spiral")
    # the plain net gets 1.5x the steps for equal training compute (a plain step costs about 2/3 of a spiral one)
    assert (da["train"].pop("steps"), db["train"].pop("steps")) == (2000, 3000)
    assert da == db
    for name in ("diffusia", "plain"):
        about = describe(RECIPES_DIR / f"seq2seq-{name}.toml")
        assert (
            "min" in about["cpu_time"] and f"condiff train seq2seq-{name} --out runs/seq2seq-{name}" in about["comment"]
        )


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    m = build_seq2seq_model(tiny())
    m.save(tmp_path / "m", {"note": 1})
    assert is_seq2seq_model(tmp_path / "m") and not is_seq2seq_model(tmp_path)
    back = load_seq2seq_model(tmp_path / "m")
    assert back.config == m.config and back.info["note"] == 1
    src = translation_batch(3, torch.Generator().manual_seed(0), m.data)[0]
    z, t = torch.randn(3, captions.SEQ_LEN, 4), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(m.net.eval()(z, t, src).x0, back.net(z, t, src).x0)
    assert torch.equal(m.translate(src, steps=3, seed=1), back.translate(src, steps=3, seed=1))
    res = exact_match(back, 4, seed=0, steps=2)
    assert set(res) == {"exact_match", "attributes_correct", "parses"} and all(0 <= v <= 1 for v in res.values())


def test_loading_refuses_pickles_and_bad_configs(tmp_path):
    import json

    m = build_seq2seq_model(tiny())
    m.save(tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "net" / "extra.bin")
    with pytest.raises(InputFileError, match="extra.bin"):
        load_seq2seq_model(tmp_path / "m")
    m.save(tmp_path / "n")
    info = json.loads((tmp_path / "n" / "condiff.json").read_text())
    info["seq2seq"]["schedule"] = 3
    (tmp_path / "n" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'schedule'"):
        load_seq2seq_model(tmp_path / "n")
    with pytest.raises(InputFileError, match="not a seq2seq model"):
        load_seq2seq_model(tmp_path)


def test_seq2seq_training_resumes_exactly(tmp_path):
    r = tiny()
    full = run_trainer(make_seq2seq_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_seq2seq_trainer(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_seq2seq_trainer(r, tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert full.log == [] and load_seq2seq_model(tmp_path / "b" / "model").config["schedule"] == "sqrt"


def test_train_recipe_dispatches_a_seq2seq_recipe(tmp_path):
    from condiff.cli.train import train_recipe

    r = tiny(model={"spiral": False}, train={"steps": 2, "eval_every": 2, "eval_n": 4, "eval_steps": 2})
    tr = train_recipe(r, tmp_path / "o", progress=False)
    assert tr.step == 2 and set(tr.log[-1]) >= {"exact_match", "attributes_correct", "parses", "mse"}
    assert load_seq2seq_model(tmp_path / "o" / "model").net.config.spiral is False
