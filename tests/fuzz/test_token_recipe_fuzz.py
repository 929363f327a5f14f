"""Property-based fuzzing of the discrete recipes: token recipes (chars, captions, dna), seq2seq (DiffuSIA) and
DRAKES fine-tuning. Mutations (wrong types, unknown keys, unknown names) are refused by the loader with a one-line
ConfigError naming the key or value, and by `condiff train` / `condiff finetune` with exit code 2 before any model
is built or any output written."""

from __future__ import annotations

import dataclasses
import tempfile
import tomllib
from pathlib import Path
from unittest import mock

from fuzzkit import expect_api_error, expect_cli_error, guarded, to_toml, wrong_type
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.cli.finetune import load_any_finetune_recipe
from condiff.cli.recipes import RECIPES_DIR
from condiff.cli.tokens import load_any_recipe
from condiff.models import drakes_finetune, seq2seq, tokens
from condiff.training.recipe import TrainConfig

KINDS = {
    # name: (packaged file, loader, command, its tables)
    "token": (
        RECIPES_DIR / "captions-cdcd.toml",
        load_any_recipe,
        "train",
        {
            "model": tokens.NetConfig,
            "data": tokens.DataConfig,
            "train": TrainConfig,
            "contrastive": tokens.ContrastiveConfig,
        },
    ),
    "seq2seq": (
        RECIPES_DIR / "seq2seq-diffusia.toml",
        load_any_recipe,
        "train",
        {
            "model": seq2seq.Seq2SeqNetConfig,
            "diffusion": seq2seq.DiffusionConfig,
            "data": seq2seq.Seq2SeqDataConfig,
            "train": TrainConfig,
        },
    ),
    "drakes": (
        RECIPES_DIR / "finetune" / "dna-drakes.toml",
        load_any_finetune_recipe,
        "finetune",
        {"drakes": drakes_finetune.DrakesConfig, "train": TrainConfig},
    ),
}
FIELDS = [
    (kind, t, f.name, f.default)
    for kind, (_, _, _, tables) in KINDS.items()
    for t, cls in tables.items()
    for f in dataclasses.fields(cls)
]


def _check(kind: str, data: dict, workdir: Path, *needles: str, via_cli: bool = False):
    _, loader, command, _ = KINDS[kind]
    d = Path(tempfile.mkdtemp(dir=workdir))
    path = d / "recipe.toml"
    path.write_text(to_toml(data))
    expect_api_error(loader, path, needles=needles)
    if via_cli:
        with (
            mock.patch("condiff.cli.tokens.make_token_trainer", guarded),
            mock.patch("condiff.models.seq2seq.make_seq2seq_trainer", guarded),
            mock.patch("condiff.models.drakes_finetune.make_drakes_trainer", guarded),
        ):
            expect_cli_error([command, str(path), "--out", str(d / "run")], *needles)
        assert not (d / "run").exists()


def _base(kind: str) -> dict:
    return tomllib.loads(KINDS[kind][0].read_text())


@settings(max_examples=60)
@given(field=st.sampled_from(FIELDS), data=st.data(), via_cli=st.booleans())
def test_wrong_types(workdir, field, data, via_cli):
    kind, table, key, default = field
    value = data.draw(wrong_type(default))
    assume(not (isinstance(default, bool) and isinstance(value, bool)))
    r = _base(kind)
    r.setdefault(table, {})[key] = value
    _check(kind, r, workdir, f"{table}.{key}", via_cli=via_cli)


@settings(max_examples=30)
@given(kind=st.sampled_from(list(KINDS)), key=st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True), data=st.data())
def test_unknown_keys(workdir, kind, key, data):
    tables = KINDS[kind][3]
    where = data.draw(st.sampled_from(["", *tables]))
    r = _base(kind)
    if where:
        assume(key not in tables[where].__dataclass_fields__)
        r.setdefault(where, {})[key] = 1
        _check(kind, r, workdir, f"{where}.{key}", via_cli=True)
    else:
        assume(key not in r and key not in tables and key not in ("name", "family", "loss", "base", "objective"))
        r[key] = 1
        _check(kind, r, workdir, repr(key), via_cli=True)


NAMES = [
    ("token", ("family",), tuple(tokens.FAMILIES) + ("shapes", "digits", "seq2seq")),
    ("token", ("loss",), tuple(tokens.LOSSES)),
    ("token", ("model", "kind"), tokens.KINDS),
    ("token", ("contrastive", "kind"), tokens.CONTRASTIVE_KINDS),
    ("drakes", ("drakes", "reward"), tuple(drakes_finetune.REWARDS)),
    ("drakes", ("drakes", "sampler"), drakes_finetune.SAMPLERS),
]


@settings(max_examples=30)
@given(
    which=st.sampled_from(NAMES), value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
)
def test_unknown_names(workdir, which, value):
    kind, keys, accepted = which
    assume(value not in accepted and "\x00" not in value and value.strip())
    r = _base(kind)
    target = r
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value
    _check(kind, r, workdir, repr(value), via_cli=True)
