"""`condiff recipes` (the packaged recipes: list, copy) and `condiff train NAME` (a packaged recipe by name)."""

import json
from pathlib import Path

import pytest

import condiff
from clikit import ok, one_line_error, run
from condiff.cli.recipes import describe, packaged, packaged_finetune, resolve_recipe
from condiff.cli.tokens import load_any_recipe
from condiff.errors import ConfigError, InputFileError

NAMES = [
    "captions-blocks",
    "captions-cdcd",
    "captions-radd",
    "captions-uncond",
    "chars-ar",
    "chars-radd",
    "ddpm-restore-shapes",
    "dense-eps",
    "diffmatch",
    "diffusevae",
    "diffusevae-spatial",
    "diffusevae-spatial-code",
    "diffusevae-vae",
    "diffusevae-vae-spatial",
    "digits",
    "digits-conprediff",
    "digits_edm",
    "digits_pfgmpp",
    "dna-radd",
    "lotus",
    "noise-digits-0.25",
    "noise-digits-0.5",
    "rddm-shapes",
    "rrcm-digits-0.25",
    "rrcm-digits-0.5",
    "seq2seq-diffusia",
    "seq2seq-plain",
    "shapes",
    "shapes-clean-classifier",
    "shapes-dit-dense",
    "shapes-dit-moe",
    "shapes-minority",
    "shapes-noisy-classifier",
    "sr-shapes",
    "tsdiff-co2",
    "tsdiff-nile",
    "tsdiff-nile-pool-se",
    "tsdiff-sunspots",
    "unicon",
]


def test_the_recipes_are_in_the_package_and_load():
    """Every recipe lives in condiff/recipes (so the wheel carries it), loads, is named after its file, and states
    what it trains and its CPU time in its leading comment."""
    folder = Path(condiff.__file__).parent / "recipes"
    assert list(packaged()) == NAMES and all(p.parent == folder for p in packaged().values())
    for name, path in packaged().items():
        assert load_any_recipe(path).name == name
        about = describe(path)
        assert about["trains"] and about["cpu_time"] and "min" in about["cpu_time"], (name, about)
        assert f"condiff train {name} --out runs/{name}" in about["comment"]


def test_recipes_lists_name_cpu_time_and_what_it_trains(capsys):
    out = ok(["recipes"], capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "CPU", "time", "trains"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(NAMES)]}
    assert list(rows) == NAMES
    assert "13.7 min, 1 thread" in rows["digits"] and "Class-conditional digits" in rows["digits"]
    assert "101.6 min" in rows["shapes"] and "condiff recipes copy NAME DIR" in out


def test_recipes_json_parses(capsys):
    records = json.loads(ok(["recipes", "--json"], capsys))
    assert [r["name"] for r in records if r["command"] == "train"] == NAMES
    tuned = [r["name"] for r in records if r["command"] == "finetune"]
    assert tuned == sorted(packaged_finetune()) and "shapes-striped-lora" in tuned
    assert all(Path(r["file"]).is_file() and r["trains"] and r["cpu_time"] for r in records)


def test_listing_shows_the_fine_tuning_recipes_apart(capsys):
    out = ok(["recipes"], capsys)
    head, tail = out.split("fine-tuning recipes (condiff finetune NAME):")
    assert "shapes-striped-lora" in tail and "shapes-striped-lora" not in head


def test_copy_writes_a_fine_tuning_recipe_with_its_command(tmp_path, capsys):
    out = ok(["recipes", "copy", "shapes-dpo", str(tmp_path)], capsys)
    assert (tmp_path / "shapes-dpo.toml").read_text() == packaged_finetune()["shapes-dpo"].read_text()
    assert f"condiff finetune {tmp_path / 'shapes-dpo.toml'}" in out


def test_copy_writes_the_recipe_and_keeps_an_existing_file(tmp_path, capsys):
    dest = tmp_path / "mine"
    out = ok(["recipes", "copy", "digits", str(dest)], capsys)
    target = dest / "digits.toml"
    assert target.read_text() == packaged()["digits"].read_text()
    assert f"condiff train {target}" in out
    target.write_text("# edited\n")
    code, _, err = run(["recipes", "copy", "digits", str(dest)], capsys)
    one_line_error(code, err, "already exists; pass --force")
    assert target.read_text() == "# edited\n"
    ok(["recipes", "copy", "digits", str(dest), "--force"], capsys)
    assert target.read_text() == packaged()["digits"].read_text()
    ok(["recipes", "copy", "shapes", str(tmp_path / "named.toml")], capsys)  # a .toml DEST is the file itself
    assert (tmp_path / "named.toml").read_text() == packaged()["shapes"].read_text()


def test_copy_refuses_an_unknown_name_with_did_you_mean(tmp_path, capsys):
    code, _, err = run(["recipes", "copy", "digit", str(tmp_path)], capsys)
    one_line_error(code, err, "unknown recipe 'digit' (did you mean 'digits'?)")
    assert "shapes-minority" in err and not list(tmp_path.iterdir())


def test_copy_refuses_a_file_as_the_directory(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run(["recipes", "copy", "digits", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file; give a directory or a path ending in .toml")


def test_train_takes_a_packaged_name_or_a_path(tmp_path):
    assert resolve_recipe("digits") == packaged()["digits"]
    path = tmp_path / "r.toml"
    path.write_text("")
    assert resolve_recipe(str(path)) == path
    with pytest.raises(ConfigError, match=r"unknown recipe 'shape' \(did you mean 'shapes'\?\); packaged recipes: "):
        resolve_recipe("shape")
    with pytest.raises(InputFileError, match=r"the packaged recipe of that name is `condiff train digits`"):
        resolve_recipe("recipes/digits.toml")  # the old path, in a directory without it


def test_train_by_name_trains_the_packaged_recipe(tmp_path, capsys):
    """`condiff train digits --steps 1` trains the packaged digits recipe (one step, exported)."""
    out = ok(["train", "digits", "--steps", "1", "--out", str(tmp_path / "run")], capsys)
    assert "trained 1 steps" in out
    meta = json.loads((tmp_path / "run" / "model" / "condiff.json").read_text())
    assert meta["recipe"]["name"] == "digits" and meta["trained_steps"] == 1


def test_train_unknown_name_is_one_line(tmp_path, capsys):
    code, _, err = run(["train", "digitz", "--out", str(tmp_path / "run")], capsys)
    one_line_error(code, err, "unknown recipe 'digitz' (did you mean 'digits'?)")
    assert not (tmp_path / "run").exists()
