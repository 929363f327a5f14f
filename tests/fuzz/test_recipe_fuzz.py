"""Property-based fuzzing of training recipes: mutations of the tiny digits recipe (wrong types, extra and
missing keys, non-table sections, zero/negative/non-finite values, unknown names, bad schedules) and invalid
TOML. Each must be refused by ``load_recipe`` with a one-line ConfigError naming the key, and by
``condiff train`` with exit code 2 before any model is built or any output is written."""

from __future__ import annotations

import math
import re
import tempfile
import tomllib
from pathlib import Path

from fuzzkit import TINY_RECIPE, expect_api_error, expect_cli_error, to_toml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.core.schedules import SCHEDULE_KEYS
from condiff.errors import CondiffError, ConfigError
from condiff.models.base import build_model
from condiff.training.recipe import ObjectiveConfig, TrainConfig, load_recipe, recipe_from_dict

BASE = tomllib.loads(TINY_RECIPE.read_text())
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def test_writer_round_trips_the_fixture():
    assert tomllib.loads(to_toml(BASE)) == BASE


def _check(data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    """The mutated recipe is refused by load_recipe (and, if asked, by `condiff train`)."""
    d = Path(tempfile.mkdtemp(dir=workdir))
    path = d / "recipe.toml"
    path.write_text(to_toml(data))
    expect_api_error(load_recipe, path, needles=needles)
    if via_cli:
        expect_cli_error(["train", str(path), "--out", str(d / "run")], *needles)
        assert not (d / "run").exists()


# ---- mutations -----------------------------------------------------------------------------------------

SECTIONS = {"objective": ObjectiveConfig, "train": TrainConfig}
FIELDS = [(s, f) for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__]


def _wrong_type(default):
    """A TOML value of another type than ``default`` (ints are accepted where floats are)."""
    choices = [st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(IDENT, st.integers(), max_size=1)]
    if isinstance(default, str):
        choices += [st.integers(), st.floats()]
    elif isinstance(default, int):
        choices += [st.text(max_size=5), st.floats()]
    else:
        choices += [st.text(max_size=5)]
    return st.one_of(choices)


@settings(max_examples=40)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_wrong_types(workdir, field, data, via_cli):
    section, key = field
    default = SECTIONS[section].__dataclass_fields__[key].default
    value = data.draw(_wrong_type(default))
    r = _copy(BASE)
    r.setdefault(section, {})[key] = value
    _check(r, workdir, f"{section}.{key}", via_cli=via_cli)


@settings(max_examples=25)
@given(
    where=st.sampled_from(["", "objective", "train", "schedule"]),
    key=IDENT,
    value=st.integers(0, 9),
    via_cli=st.booleans(),
)
def test_extra_keys(workdir, where, key, value, via_cli):
    r = _copy(BASE)
    table = r if not where else r.setdefault(where, {})
    assume(key not in table and key not in {"name", "family", "model", "schedule", "objective", "train"})
    assume(not (where in SECTIONS and key in SECTIONS[where].__dataclass_fields__))
    assume(not (where == "schedule" and key in SCHEDULE_KEYS["vp_discrete"] + ("type",)))
    table[key] = value
    _check(r, workdir, key, via_cli=via_cli)


@settings(max_examples=8)
@given(missing=st.sets(st.sampled_from(["name", "family"]), min_size=1), via_cli=st.booleans())
def test_missing_keys(workdir, missing, via_cli):
    r = _copy(BASE)
    for key in missing:
        del r[key]
    _check(r, workdir, repr(sorted(missing)[-1]) if len(missing) == 1 else "recipe needs a string", via_cli=via_cli)


@settings(max_examples=15)
@given(
    section=st.sampled_from(["model", "schedule", "objective", "train"]),
    value=st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.booleans()),
    via_cli=st.booleans(),
)
def test_non_table_sections(workdir, section, value, via_cli):
    r = _copy(BASE)
    r[section] = value
    _check(r, workdir, f"[{section}] must be a table", via_cli=via_cli)


POSITIVE_INTS = ["steps", "batch_size", "ckpt_every", "keep_checkpoints", "threads", "eval_n", "eval_steps"]
NON_NEGATIVE_INTS = ["warmup", "eval_every"]
BAD_FLOATS = {  # key -> strategy of refused values
    "lr": st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan), st.floats(min_value=10.5)),
    "min_lr_ratio": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0001), st.just(math.nan)),
    "weight_decay": st.one_of(st.floats(max_value=-1e-12), st.just(math.inf), st.just(math.nan)),
    "ema_decay": st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0001), st.just(math.nan)),
    "grad_clip": st.one_of(st.floats(max_value=-1e-12), st.just(math.inf), st.just(math.nan)),
    "eval_cfg": st.one_of(st.floats().filter(lambda x: not abs(x) <= 1e4)),
}
BAD_OBJECTIVE = {
    "cond_dropout": st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0), st.just(math.nan)),
    "attr_dropout": st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0), st.just(math.nan)),
    "cep_gamma": st.one_of(st.floats(max_value=-1e-12), st.just(math.inf), st.just(math.nan)),
    "context_weight": st.one_of(st.floats(max_value=-1e-12), st.just(math.inf), st.just(math.nan)),
}


@settings(max_examples=40)
@given(data=st.data(), via_cli=st.booleans())
def test_zero_negative_and_non_finite_values(workdir, data, via_cli):
    kind = data.draw(st.sampled_from(["pos-int", "nonneg-int", "train-float", "objective-float", "seed"]))
    r = _copy(BASE)
    if kind == "pos-int":
        key, section, value = data.draw(st.sampled_from(POSITIVE_INTS)), "train", data.draw(st.integers(-(2**63), 0))
    elif kind == "nonneg-int":
        key, section, value = (
            data.draw(st.sampled_from(NON_NEGATIVE_INTS)),
            "train",
            data.draw(st.integers(-(2**63), -1)),
        )
    elif kind == "train-float":
        key = data.draw(st.sampled_from(sorted(BAD_FLOATS)))
        section, value = "train", data.draw(BAD_FLOATS[key])
    elif kind == "objective-float":
        key = data.draw(st.sampled_from(sorted(BAD_OBJECTIVE)))
        section, value = "objective", data.draw(BAD_OBJECTIVE[key])
    else:
        key, section, value = "seed", "train", data.draw(st.integers(-(2**63), -1))
    r.setdefault(section, {})[key] = value
    _check(r, workdir, f"{section}.{key}", via_cli=via_cli)


@settings(max_examples=15)
@given(threads=st.integers(1025, 2**63 - 1))
def test_absurd_thread_count(workdir, threads):
    r = _copy(BASE)
    r["train"]["threads"] = threads
    _check(r, workdir, "train.threads", str(threads))


NAMES = {
    ("", "family"): ["shapes", "digits"],
    ("objective", "prediction"): ["eps", "x0", "v", "flow"],
    ("objective", "time_sampler"): ["uniform", "logit-normal", "lognormal-sigma"],
    ("objective", "weighting"): ["constant", "min-snr"],
    ("objective", "cep_kind"): ["uniform", "gaussian"],
    ("train", "lr_decay"): ["cosine", "constant"],
    ("schedule", "type"): ["vp_linear", "vp_cosine", "vp_discrete", "edm", "flow"],
    ("schedule", "beta_schedule"): ["linear", "scaled_linear", "squaredcos_cap_v2"],
}


@settings(max_examples=30)
@given(where=st.sampled_from(sorted(NAMES)), value=TEXT, via_cli=st.booleans())
def test_unknown_names(workdir, where, value, via_cli):
    section, key = where
    assume(value not in NAMES[where])
    r = _copy(BASE)
    if section == "schedule" and key == "type":
        r["schedule"] = {"type": value}
    elif section:
        r.setdefault(section, {})[key] = value
    else:
        r[key] = value
    _check(r, workdir, repr(value), via_cli=via_cli)


@settings(max_examples=15)
@given(
    name=st.one_of(
        st.just(""),
        st.sampled_from([".", "..", "../up", "a/b", "/abs", "-x", ".hidden"]),
        TEXT.filter(lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s)),
    ),
    via_cli=st.booleans(),
)
def test_bad_recipe_names(workdir, name, via_cli):
    r = _copy(BASE)
    r["name"] = name
    _check(r, workdir, repr(name), via_cli=via_cli)


SCHEDULE_MUTATIONS = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("vp_discrete"),
            "num_steps": st.one_of(
                st.integers(max_value=1), st.integers(min_value=100_001), st.floats(), st.text(max_size=3)
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("vp_discrete"),
            "beta_start": st.one_of(st.floats(max_value=0), st.floats(min_value=1), st.just(math.nan), st.booleans()),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("vp_discrete"),
            "alphas_cumprod": st.lists(st.floats(), max_size=4).filter(
                lambda a: not (len(a) >= 2 and all(0 < x < 1 for x in a) and all(b < a_ for a_, b in zip(a, a[1:])))
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("vp_linear"),
            "beta_max": st.one_of(st.floats(max_value=0), st.just(math.inf), st.text(max_size=3)),
        }
    ),
    st.fixed_dictionaries({"type": st.just("edm"), "sigma_min": st.one_of(st.floats(max_value=0), st.just(math.nan))}),
    st.fixed_dictionaries(
        {
            "type": st.just("vp_cosine"),
            "s": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.01), st.lists(st.integers(), max_size=2)),
        }
    ),
    st.fixed_dictionaries({"type": st.just("flow"), "sigma_max": st.integers()}),
)


@settings(max_examples=30)
@given(schedule=SCHEDULE_MUTATIONS, via_cli=st.booleans())
def test_bad_schedule_tables(workdir, schedule, via_cli):
    r = _copy(BASE)
    r["schedule"] = schedule
    (key,) = set(schedule) - {"type"}
    _check(r, workdir, key, via_cli=via_cli)


@settings(max_examples=25)
@given(
    junk=st.one_of(
        TEXT,
        st.sampled_from(
            [
                "name = ",
                "[train",
                "[train]\nsteps = 1\nsteps = 2",
                "a = 1\na = 2",
                "x = [1,",
                'name = "unterminated',
                "= 3",
                "[[train]]\n[train]",
                "steps = 01",
                "lr = .5",
                "t = 1979-05-27T07:32:00Zjunk",
            ]
        ),
    )
)
def test_invalid_toml(workdir, junk):
    try:
        tomllib.loads(junk)
        assume(False)
    except tomllib.TOMLDecodeError:
        pass
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "r.toml").write_text(junk)
    expect_api_error(load_recipe, d / "r.toml", needles=("is not valid TOML", repr(str(d / "r.toml"))))


@settings(max_examples=10)
@given(junk=st.binary(min_size=1, max_size=40))
def test_recipe_that_is_not_text(workdir, junk):
    try:
        tomllib.loads(junk.decode())
        assume(False)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "r.toml").write_bytes(junk)
    expect_cli_error(["train", str(d / "r.toml"), "--out", str(d / "run")], repr(str(d / "r.toml")))
    assert not (d / "run").exists()


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=30)
@given(
    data=st.dictionaries(
        st.sampled_from(["name", "family", "model", "schedule", "objective", "train", "extra"]), JSONISH, max_size=6
    )
)
def test_arbitrary_tables_only_raise_config_errors(data):
    """recipe_from_dict on arbitrary data: a Recipe or a one-line ConfigError, never another exception."""
    try:
        recipe_from_dict(data)
    except ConfigError as e:
        assert str(e).splitlines() == [str(e)]


UNET_GARBAGE = st.one_of(
    st.just({}),  # no [model.unet]
    st.fixed_dictionaries({"unet": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2))}),
    st.fixed_dictionaries(
        {
            "unet": st.dictionaries(
                IDENT.filter(lambda k: k not in ("sample_size", "in_channels")),
                st.integers(1, 4),
                min_size=1,
                max_size=2,
            ).map(lambda d: {**BASE["model"]["unet"], **{f"zz_{k}": v for k, v in d.items()}})
        }
    ),
    st.fixed_dictionaries(
        {
            "unet": st.sampled_from(
                [
                    {**BASE["model"]["unet"], "down_block_types": ["NoSuchBlock2D", "DownBlock2D"]},
                    {**BASE["model"]["unet"], "block_out_channels": [16]},
                    {**BASE["model"]["unet"], "norm_num_groups": "eight"},
                    {**BASE["model"]["unet"], "layers_per_block": [1, [2]]},
                ]
            )
        }
    ),
)


@settings(max_examples=12)
@given(model_cfg=UNET_GARBAGE)
def test_bad_model_tables_are_config_errors(model_cfg):
    """The [model] table is only checked when the network is built: build_model must raise a ConfigError."""
    err = expect_api_error(build_model, "digits", model_cfg, BASE["schedule"], "eps")
    assert isinstance(err, CondiffError) and "[model]" in str(err)
