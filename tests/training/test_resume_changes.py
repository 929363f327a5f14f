"""`condiff train --resume`: a changed seed or recipe value is refused, naming each key as old -> new, unless
--allow-changes (which records it); every checkpoint corrupt -> a from-scratch notice; a finished run -> nothing to
train."""

import json
from pathlib import Path

import torch

from clikit import one_line_error, run
from condiff.cli import main
from condiff.cli.train import train_recipe
from condiff.core.files import load_json, load_tensors
from condiff.training.recipe import load_recipe, recipe_changes

RECIPE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_digits.toml"


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", str(RECIPE), "--out", str(out), *extra]


def _listing(out: Path) -> dict:
    """Every file under OUT with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _with_lr(tmp_path: Path, lr: str) -> Path:
    text = RECIPE.read_text()
    assert "lr = 1e-3\n" in text
    path = tmp_path / "changed.toml"
    path.write_text(text.replace("lr = 1e-3\n", f"lr = {lr}\n"))
    return path


def test_recipe_changes_names_each_changed_key():
    r = load_recipe(RECIPE).to_dict()
    new = json.loads(json.dumps(r))
    new["train"].update(seed=5, lr=0.002)
    new["objective"]["prediction"] = "v"
    new["model"]["unet"]["block_out_channels"] = [16, 16]
    assert recipe_changes(r, r) == {}
    assert recipe_changes(r, new) == {
        "model.unet.block_out_channels": ([16, 32], [16, 16]),
        "objective.prediction": ("eps", "v"),
        "train.lr": (0.001, 0.002),
        "train.seed": (3, 5),
    }


def test_changed_seed_is_refused_and_nothing_changes(tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(load_recipe(RECIPE), out, progress=False, stop_after=4)
    before = _listing(out)
    code, _, err = run(_train(out, "--resume", "--seed", "5"), capsys)
    one_line_error(code, err, "train.seed 3 -> 5")
    assert "--allow-changes" in err and "train.lr" not in err
    assert _listing(out) == before  # the recorded seed (3) stays


def test_changed_lr_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(load_recipe(RECIPE), out, progress=False, stop_after=4)
    code, _, err = run(["train", str(_with_lr(tmp_path, "2e-3")), "--out", str(out), "--resume"], capsys)
    one_line_error(code, err, "(train.lr 0.001 -> 0.002)")


def test_allow_changes_goes_on_and_records_the_change(tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(load_recipe(RECIPE), out, progress=False, stop_after=4)
    main(_train(out, "--resume", "--seed", "5", "--allow-changes"))
    stdout, err = capsys.readouterr()
    assert "notice: --allow-changes: from step 4, train.seed 3 -> 5\n" in err
    assert "trained 24 steps" in stdout
    recorded = [{"step": 4, "changes": {"train.seed": [3, 5]}}]
    meta = load_json(out / "checkpoints" / "step-00000024" / "trainer.json")
    assert meta["recipe"]["train"]["seed"] == 5 and meta["recipe_changes"] == recorded
    assert load_json(out / "model" / "condiff.json")["recipe_changes"] == recorded


def test_allow_changes_needs_resume(tmp_path, capsys):
    code, _, err = run(_train(tmp_path / "run", "--allow-changes"), capsys)
    one_line_error(code, err, "--allow-changes goes with --resume")


def test_every_checkpoint_corrupt_starts_from_scratch_with_a_notice(tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(load_recipe(RECIPE), out, steps=8, progress=False)
    weights = out / "checkpoints" / "step-00000008" / "model.safetensors"
    first = load_tensors(weights)
    for step in (4, 8):
        f = out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    main(_train(out, "--resume", "--steps", "8"))
    err = capsys.readouterr().err
    scratch = [line for line in err.splitlines() if "from scratch" in line]
    assert scratch == [
        f"notice: no checkpoint in {str(out / 'checkpoints')!r} verifies (2 corrupt, renamed to *.corrupt); "
        f"starting from scratch at step 0"
    ]
    assert err.count("notice: skipping checkpoint") == 2
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000004.corrupt", "step-00000008", "step-00000008.corrupt"]
    again = load_tensors(weights)  # trained again from step 0: the same bits as the first run
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_resuming_a_finished_run_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    train_recipe(load_recipe(RECIPE), out, steps=8, progress=False)
    checkpoints = _listing(out / "checkpoints")
    main(_train(out, "--resume", "--steps", "8"))
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"finished at step 8: nothing to train; model at {out / 'model'}"
    assert "trained" not in stdout
    assert _listing(out / "checkpoints") == checkpoints
