"""`condiff sample|eval --spacing trailing`: diffusers' trailing timesteps, continuous (with --t-start max on the
1000-step table: exactly the timesteps of diffusers' schedulers with timestep_spacing="trailing" when the step
count divides 1000, which diffusers otherwise rounds to integers), recorded in the sidecar's command."""

import json

import pytest

from clikit import ok, one_line_error, record_grids, run


@pytest.mark.parametrize("steps", [1, 5, 6, 8])
def test_trailing_from_max_is_diffusers_grid(tmp_path, capsys, monkeypatch, steps):
    import diffusers

    seen = record_grids(monkeypatch)
    argv = ["sample", "--model", "digits", "--spacing", "trailing", "--t-start", "max", "--steps", str(steps)]
    ok([*argv, "--n", "2", "--out", str(tmp_path / "s.png")], capsys)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    (grid,) = seen
    want = [float(t) for t in sched.timesteps]
    if 1000 % steps == 0:
        assert grid[:-1] == want
    else:  # diffusers rounds -1 + 1000 (1 - k / steps) to the nearest integer
        assert len(grid) == steps + 1 and max(abs(a - b) for a, b in zip(grid, want)) <= 0.5
    assert grid[-1] < grid[-2]
    side = json.loads((tmp_path / "s.json").read_text())
    assert side["spacing"] == "trailing" and "--spacing trailing" in side["reproduce"]


def test_eval_records_the_spacing(tmp_path, capsys):
    js = tmp_path / "e.json"
    ok(["eval", "--model", "digits", "--spacing", "trailing", "--n", "4", "--steps", "2", "--json", str(js)], capsys)
    assert json.loads(js.read_text())["spacing"] == "trailing"


def test_unknown_spacing_names_trailing_among_the_accepted(tmp_path, capsys):
    code, _, err = run(["sample", "--spacing", "trail", "--out", str(tmp_path / "x.png")], capsys)
    one_line_error(code, err, "'trail'")
    assert "trailing" in err
