"""`condiff features fit | edit | show` under bad input: every bad option value and input file (a pickle included,
which is refused) gets one ``error:`` line naming it and what is accepted, exit code 2, and nothing is written (no
output, no sidecar, no stray temporary file). Option and file errors come before any model is read; the two that
need the network (an unknown --layer, a features file fitted on other weights) come right after loading it."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from fuzzkit import expect_cli_error, no_stray_temp_files, run_cli
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from condiff.core.files import save_tensors
from condiff.data.shapes import ATTRIBUTES
from condiff.tasks import bias_features as bf

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)


def _features(path: Path, **meta):
    """A valid features file (random SAE, 64 latents) with the records `features fit` writes."""
    sae = bf.TopKSAE(64, 64, 4, generator=torch.Generator().manual_seed(0))
    record = {
        "model": "shapes",
        "model_weights": "0" * 64,
        "layer": "mid",
        "attribute": "size",
        "value": "large",
        **meta,
    }
    bf.Features(sae, (0, 1), torch.randn(64), torch.zeros(2, 64, 4, 4), torch.tensor([1.0, 0.0]), record).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("features")
    _features(d / "feats.safetensors")
    _features(d / "nomodel.safetensors", model=None)
    _features(d / "digits.safetensors", model="digits")
    torch.save({"W_d": torch.zeros(2)}, d / "pickled.safetensors")  # a torch.save zip under a safetensors name
    (d / "proto.safetensors").write_bytes(pickle.dumps({"W_d": [0.0]}, protocol=4))
    save_tensors(d / "other.safetensors", {"x": torch.zeros(2)})
    torch.save({"x": torch.zeros(2)}, d / "weights.pt")
    (d / "clfdir").mkdir()
    torch.save({"x": torch.zeros(2)}, d / "clfdir" / "model.bin")
    (d / "file").write_text("x")
    (d / "out").mkdir()
    return d


def _nothing_written(d: Path):
    out = d / "out"
    assert not any(p.suffix in (".safetensors", ".json", ".png") for p in out.iterdir()), list(out.iterdir())
    assert no_stray_temp_files(d, out)


def _fit(d: Path, *extra: str) -> list[str]:
    return ["features", "fit", "--out", str(d / "out" / "f.safetensors"), *extra]


def _edit(d: Path, *extra: str, features: str = "feats.safetensors") -> list[str]:
    return ["features", "edit", str(d / features), "--prompt", "red circle", "--out", str(d / "out" / "g.png"), *extra]


FIT_CASES = [
    (("--n", "1"), ("--n must be an integer in [2, 100000], got 1",)),
    (("--n-attr", "0"), ("--n-attr", "0")),
    (("--steps", "0"), ("--steps must be an integer in [1, 1000]",)),
    (("--latents", "1"), ("--latents", "[2, 65536]")),
    (("--k", "300"), ("--k must be an integer in [1, 256] (at most --latents), got 300",)),
    (("--k", "0"), ("--k", "0")),
    (("--sae-steps", "0"), ("--sae-steps", "0")),
    (("--seed", "-1"), ("--seed", "-1")),
    (("--threads", "0"), ("--threads", "0")),
    (("--attribute", "weight"), ("unknown --attribute 'weight'", "shape, color, size, position")),
    (("--value", "medium"), ("unknown --value 'medium'", "small, large")),
    (("--attribute", "color", "--value", "large"), ("unknown --value 'large'", "red")),
    (("--model", "digits"), ("--model", "shapes model", "digits")),
    (("--model", "nope"), ("model 'nope'", "shapes, digits")),
    (("--layer", " "), ("--layer", "mid")),
    (("--classifier", "WEIGHTS"), ("--classifier", "weights.pt", "never pickles")),
    (("--classifier", "CLFDIR"), ("--classifier", "model.bin", "never pickles")),
    (("--bogus", "1"), ("--bogus",)),
]


def _resolve(d: Path, argv: list[str]) -> list[str]:
    names = {"WEIGHTS": d / "weights.pt", "CLFDIR": d / "clfdir", "FILE": d / "file"}
    return [str(names[a]) if a in names else a for a in argv]


@pytest.mark.parametrize("extra,needles", FIT_CASES, ids=[" ".join(e) for e, _ in FIT_CASES])
def test_fit_bad_options_fail_before_any_model_is_read(files, extra, needles):
    expect_cli_error(_resolve(files, _fit(files, *extra)), *needles)
    _nothing_written(files)


@pytest.mark.parametrize(
    "out,needles",
    [
        ("f.pt", ("--out must end in .safetensors", "f.pt")),
        ("FILE/f.safetensors", ("--out", "is not a directory")),
    ],
)
def test_fit_bad_out_paths(files, out, needles):
    path = str(files / "file" / "f.safetensors") if out.startswith("FILE") else str(files / "out" / out)
    expect_cli_error(["features", "fit", "--out", path], *needles)
    _nothing_written(files)


@settings(max_examples=25)
@given(attribute=TEXT)
def test_fit_any_unknown_attribute_is_named(files, attribute):
    assume(attribute not in ATTRIBUTES and not attribute.startswith("-"))
    line = expect_cli_error(_fit(files, "--attribute", attribute), "--attribute", "accepted: shape, color, size")
    assert repr(attribute)[1:-1] in line or attribute in line
    _nothing_written(files)


@settings(max_examples=20)
@given(n=st.integers(-1000, 1), k=st.integers(-5, 0))
def test_fit_out_of_range_counts(files, n, k):
    expect_cli_error(_fit(files, "--n", str(n)), "--n", str(n))
    expect_cli_error(_fit(files, "--k", str(k)), "--k", str(k))


EDIT_CASES = [
    (("--method", "swap"), ("unknown --method 'swap'", "sae, delta-h")),
    (("--scale", "nan"), ("--scale", "nan")),
    (("--scale", "inf"), ("--scale", "inf")),
    (("--scale", "1e9"), ("--scale", "|scale| <= 10000")),
    (("--t-window", "0"), ("--t-window must be a fraction of the steps in (0, 1], got 0.0",)),
    (("--t-window", "1.5"), ("--t-window", "1.5")),
    (("--t-window", "nan"), ("--t-window", "nan")),
    (("--n", "0"), ("--n", "0")),
    (("--steps", "0"), ("--steps", "0")),
    (("--latents", "33"), ("--latents must be an integer in [1, 32] (half the latents), got 33",)),
    (("--latents", "0"), ("--latents", "0")),
    (("--seed", "-3"), ("--seed", "-3")),
    (("--prompt", "purple circle"), ("--prompt", "purple", "accepted words")),
    (("--model", "digits"), ("--model", "shapes model")),
    (("--out", "OUT/g.jpg"), ("--out must end in .png",)),
]


@pytest.mark.parametrize("extra,needles", EDIT_CASES, ids=[" ".join(e) for e, _ in EDIT_CASES])
def test_edit_bad_options_fail_before_any_model_is_read(files, extra, needles):
    argv = [a.replace("OUT", str(files / "out")) for a in _edit(files, *extra)]  # a second --out wins
    expect_cli_error(argv, *needles)
    _nothing_written(files)


@pytest.mark.parametrize(
    "name,needles",
    [
        ("missing.safetensors", ("missing.safetensors", "not found")),
        ("pickled.safetensors", ("pickled.safetensors", "pickle")),
        ("proto.safetensors", ("proto.safetensors", "pickle")),
        ("weights.pt", ("weights.pt", "never pickles")),
        ("other.safetensors", ("other.safetensors", "not a condiff features file")),
        ("file", ("file",)),
        ("out", ("out", "directory")),
        ("nomodel.safetensors", ("nomodel.safetensors", "'model'")),
        ("digits.safetensors", ("shapes model", "digits")),
    ],
)
def test_edit_and_show_bad_feature_files(files, name, needles):
    expect_cli_error(_edit(files, features=name), *needles)
    _nothing_written(files)
    if name not in ("nomodel.safetensors", "digits.safetensors"):  # show reads any valid features file
        expect_cli_error(["features", "show", str(files / name)], *needles)


@settings(max_examples=25)
@given(content=st.binary(max_size=96))
def test_edit_garbage_feature_files(tmp_path_factory, content):
    d = tmp_path_factory.mktemp("g")
    (d / "out").mkdir()
    (d / "x.safetensors").write_bytes(content)
    expect_cli_error(_edit(d, features="x.safetensors"), "x.safetensors")
    _nothing_written(d)


@settings(max_examples=20)
@given(
    meta=st.dictionaries(
        st.sampled_from(["model", "model_weights", "layer", "attribute", "value"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=6), st.lists(st.integers(), max_size=2)),
        min_size=1,
    )
)
def test_edit_feature_files_with_bad_records(tmp_path_factory, meta):
    """A features file whose records are missing or of the wrong kind: one line, before any model is read."""
    good = {"model": "shapes", "model_weights": "0" * 64, "layer": "mid", "attribute": "size", "value": "large"}
    assume(
        any(not isinstance(v, str) or (k in ("attribute", "value", "model") and v != good[k]) for k, v in meta.items())
    )
    d = tmp_path_factory.mktemp("m")
    (d / "out").mkdir()
    _features(d / "f.safetensors", **meta)
    expect_cli_error(_edit(d, features="f.safetensors"))
    _nothing_written(d)


def test_bad_values_in_a_features_file_are_refused(files, tmp_path):
    """Tensors of the wrong shape or with NaN inside a file with the right format tag: one line naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = files / "feats.safetensors"
    tensors = load_file(src)
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    (tmp_path / "out").mkdir()
    for name, value in (("W_e", torch.zeros(3)), ("s", torch.tensor([math.nan])), ("latents", torch.tensor([0, 0]))):
        save_file(dict(tensors, **{name: value}), tmp_path / "bad.safetensors", metadata=meta)
        expect_cli_error(_edit(tmp_path, features="bad.safetensors"), "bad.safetensors")
        save_file(
            tensors, tmp_path / "bad.safetensors", metadata=dict(meta, sae=json.dumps({"d": 64, "m": 64, "k": 99}))
        )
        expect_cli_error(_edit(tmp_path, features="bad.safetensors"), "bad.safetensors", "SAE k")
    _nothing_written(tmp_path)


def test_errors_that_need_the_network_come_right_after_loading_it(files):
    """An unknown --layer (names are the network's own) and a file fitted on other weights: exit 2, one line."""
    code, out, err = run_cli(_fit(files, "--layer", "middle_block", "--n", "2", "--n-attr", "1"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in out + err
    assert "'middle_block'" in err and "mid_block" in err
    code, out, err = run_cli(_edit(files))
    assert code == 2 and err.count("\n") == 1 and "fitted on model 'shapes' (weights 000000000000)" in err
    _nothing_written(files)


def test_the_good_path_writes_exactly_its_files(tmp_path):
    """fit -> show -> edit on a tiny budget: the features file, its sidecar, the grid and its sidecar, nothing else."""
    feats = tmp_path / "f.safetensors"
    fit = ["features", "fit", "--n", "4", "--n-attr", "2", "--steps", "2", "--latents", "8", "--k", "2"]
    code, out, err = run_cli([*fit, "--sae-steps", "3", "--out", str(feats)])
    assert code == 0, err
    assert "wrote" in out and json.loads((tmp_path / "f.json").read_text())["layer"] == "up_blocks.0.upsamplers.0"
    code, out, err = run_cli(["features", "show", str(feats)])
    assert code == 0 and json.loads(out)["attribute"] == "size"
    for method, window in (("sae", "1"), ("delta-h", "0.5")):
        argv = ["features", "edit", str(feats), "--prompt", "small red circle", "--n", "2", "--steps", "2"]
        code, out, err = run_cli(
            [
                *argv,
                "--latents",
                "2",
                "--method",
                method,
                "--t-window",
                window,
                "--out",
                str(tmp_path / f"{method}.png"),
            ]
        )
        assert code == 0, err
        side = json.loads((tmp_path / f"{method}.json").read_text())
        assert side["method"] == method and side["t_window"] == float(window)
        assert f"--t-window {float(window)}" in side["reproduce"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["delta-h.json", "delta-h.png", "f.json", "f.safetensors", "sae.json", "sae.png"]
