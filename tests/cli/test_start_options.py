"""--centre-subpixels and --t-start on sample (and eval): recorded in the sidecar and the reproduce line, and
one-line errors for a model without pixel-unshuffle or a start outside the schedule."""

import json

from clikit import ok, one_line_error, run


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "s.png"
    ok(["sample", "--model", "shapes", "--n", "2", "--steps", "3", "--out", str(out), "--centre-subpixels",
        "--t-start", "max"], capsys)  # fmt: skip
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["t_start"] == 999.0 and side["centre_subpixels"] is True
    assert "--t-start max --centre-subpixels" in side["reproduce"]
    for argv, needle in (
        (["--model", "digits", "--centre-subpixels"], "--centre-subpixels needs a model that pixel-unshuffles"),
        (["--model", "shapes", "--t-start", "abc"], "--t-start must be 'max' or a number in (-1, 999], got 'abc'"),
        (["--model", "shapes", "--t-start", "1e4"], "--t-start must be 'max' or a number"),
        (["--model", "shapes", "--t-start", "nan"], "--t-start must be 'max' or a number"),
    ):
        code, _, err = run(["sample", *argv, "--n", "1", "--steps", "2", "--out", str(out)], capsys)
        one_line_error(code, err, needle)
