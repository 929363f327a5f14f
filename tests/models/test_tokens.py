"""Token models: recipes (strict, one-line errors), the AR baseline's exact likelihood, the RADD bound against it,
save/load, and exact resume through the Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from condiff.cli.tokens import make_token_trainer
from condiff.cli.train import run_trainer
from condiff.discrete import one_hot
from condiff.errors import ConfigError, InputFileError
from condiff.models.tokens import (
    Captions,
    ar_nll,
    bits_per_token,
    build_token_model,
    load_token_model,
    token_recipe_from_dict,
)


def tiny(**over):
    d = {
        "name": "tiny-tokens",
        "family": "dna",
        "model": {"dim": 16, "layers": 1, "heads": 2},
        "data": {"length": 8},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return token_recipe_from_dict(d)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"family": "words"}, "'words'"),
        ({"loss": "mse"}, "'mse'"),
        ({"model": {"kind": "gpt"}}, "'gpt'"),
        ({"model": {"dim": 15}}, "multiple of model.heads"),
        ({"data": {"length": 0}}, "data.length"),
        ({"colour": 1}, "'colour'"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"data": {"promoter_share": 1.5}}, "data.promoter_share"),
        ({"family": "captions", "data": {"promoter_share": 0.1}}, "data.promoter_share"),
    ],
)
def test_bad_token_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError) as e:
        tiny(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ar_nll_is_the_chain_rule_of_its_own_conditionals():
    torch.manual_seed(0)
    m = build_token_model(tiny(model={"kind": "ar"}))
    net = m.net.eval()
    x = torch.randint(4, (3, 8), generator=torch.Generator().manual_seed(1))
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(8):  # p(x_i | x_<i) from a sequence whose later tokens are scrambled
        scrambled = torch.cat([x[:, :i], torch.randint(4, (3, 8 - i))], 1)
        logp = torch.log_softmax(net(one_hot(scrambled, 4)), -1)[:, i]
        total -= logp.gather(1, x[:, i : i + 1]).squeeze(1).double()
    assert torch.allclose(ar_nll(net, x).double(), total, atol=1e-4)


def test_ar_probabilities_sum_to_one_over_every_sequence():
    torch.manual_seed(0)
    r = tiny(model={"kind": "ar"}, data={"length": 3})
    m = build_token_model(r)
    import itertools

    seqs = torch.tensor(list(itertools.product(range(4), repeat=3)))
    with torch.no_grad():
        p = torch.exp(-ar_nll(m.net.eval(), seqs).double())
    assert abs(float(p.sum()) - 1) < 1e-5


def test_radd_bound_is_at_least_the_entropy_of_the_data_and_uniform_model_costs_log_v():
    torch.manual_seed(0)
    m = build_token_model(tiny())
    with torch.no_grad():  # a zero read-out: every conditional uniform, so the bound is exactly log2(V) bits
        m.net.out.weight.zero_()
        m.net.out.bias.zero_()
    x = torch.randint(4, (64, 8), generator=torch.Generator().manual_seed(0))
    res = bits_per_token(m, x, draws=3)
    assert abs(res["bits"] - math.log2(4)) < 1e-6


def test_token_model_saves_and_loads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    m = build_token_model(tiny(family="captions"))
    m.save(tmp_path / "m", {"note": 1})
    back = load_token_model(tmp_path / "m")
    x = torch.randint(Captions.vocab_size + 1, (2, back.length))
    c = torch.tensor([[0, 1, 2, Captions.NULL]] * 2)
    assert torch.equal(m.net.eval()(one_hot(x, Captions.vocab_size), c), back.net(one_hot(x, Captions.vocab_size), c))


def test_token_training_resumes_exactly(tmp_path):
    r = tiny()
    full = run_trainer(make_token_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_token_trainer(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_token_trainer(r, tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert (tmp_path / "b" / "model" / "condiff.json").is_file()


def test_promoter_share_reaches_the_batches_and_the_saved_config(tmp_path):
    r = tiny(data={"length": 16, "promoter_share": 1.0})
    m = build_token_model(r)
    x, _ = m.family.batch(64, torch.Generator().manual_seed(0), r.data)
    assert (x.unfold(1, 4, 1) == torch.tensor([3, 0, 3, 0])).all(-1).any(1).all()  # every row holds TATA
    m.save(tmp_path / "m")
    assert load_token_model(tmp_path / "m").config["promoter_share"] == 1.0
    info = json.loads((tmp_path / "m" / "condiff.json").read_text())
    info["tokens"]["promoter_share"] = "half"
    (tmp_path / "m" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="promoter_share"):
        load_token_model(tmp_path / "m")


def test_contrastive_weight_zero_is_the_plain_loss_and_a_weight_adds_the_cdcd_term():
    torch.manual_seed(0)
    base = tiny(family="captions")
    m = build_token_model(base)
    from condiff.models.tokens import token_loss_fn

    plain, _ = token_loss_fn(m, base)(0, torch.Generator().manual_seed(5))
    zero = tiny(family="captions", contrastive={"weight": 0.0, "negatives": 3})
    same, _ = token_loss_fn(m, zero)(0, torch.Generator().manual_seed(5))
    assert torch.equal(plain, same)
    one = tiny(family="captions", contrastive={"weight": 1.0, "negatives": 3})
    total, metrics = token_loss_fn(m, one)(0, torch.Generator().manual_seed(5))
    # the DCE part draws first from the same generator, so the difference is the contrastive term over L
    assert abs(float((total - plain).detach()) - metrics["contrastive"] / m.length) < 1e-5
    assert 0 < metrics["contrastive"]


def test_inter_negatives_need_a_larger_batch():
    with pytest.raises(ConfigError, match="batch_size"):
        tiny(contrastive={"weight": 1.0, "negatives": 8})


def test_attribute_classifier_reads_the_colour_word_and_is_unsure_without_it():
    from condiff.data import captions, shapes
    from condiff.models.tokens import attribute_of, fit_attribute_classifier

    col, val = attribute_of("color=red")
    assert (col, val) == (1, 0)
    clf = fit_attribute_classifier(col, val, p_drop=0.3, steps=150, seed=0)
    g = torch.Generator().manual_seed(9)
    attrs = shapes.random_attrs(200, g)
    keep = torch.ones(200, 4, dtype=torch.bool)
    tokens, _ = captions.generate(attrs, g, keep=keep)
    p = clf.log_prob(one_hot(tokens, captions.VOCAB.V)).exp()
    red = attrs[:, 1] == 0
    assert p[red].min() > 0.9 and p[~red].max() < 0.1
    masked = torch.full((1, captions.SEQ_LEN), captions.VOCAB.V)  # nothing seen: about the prior, 1/6
    assert abs(float(clf.log_prob(one_hot(masked, captions.VOCAB.V)).exp()) - 1 / 6) < 0.05


def test_bad_attribute_names_are_one_line():
    from condiff.models.tokens import attribute_of

    for bad in ("color=pink", "colour=red", "red"):
        with pytest.raises(ConfigError, match="NAME=VALUE"):
            attribute_of(bad)
