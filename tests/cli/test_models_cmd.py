"""`condiff models`: a table of the bundled models and classifiers (kind, family, parameters, size on disk,
training steps, headline metrics, the flag that uses each), and --json with every record."""

import json

from clikit import ok
from condiff.cli.catalog import card_measurements, headline_text, safetensors_parameters
from condiff.models.base import BUNDLED, bundled_dir
from condiff.models.classifiers import BUNDLED_CLASSIFIERS

NAMES = [*BUNDLED, *BUNDLED_CLASSIFIERS]


def test_models_table_names_every_bundled_model(capsys):
    out = ok(["models"], capsys)
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:6] == ["name", "kind", "family", "parameters", "size", "trained"] and header[-1] == "use"
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(NAMES)]}
    assert list(rows) == NAMES == ["shapes", "digits", "clean", "noisy", "ppap"]
    assert (
        "1.51 M" in rows["shapes"] and "all attributes 0.994" in rows["shapes"] and "--model shapes" in rows["shapes"]
    )
    assert "1.11 M" in rows["digits"] and "class 1.000, Frechet 10.98, precision 0.924, recall 0.649" in rows["digits"]
    assert "--classifier noisy" in rows["noisy"] and "noise-aware" in rows["noisy"]
    assert all(" MB" in rows[n] for n in NAMES)
    columns = [line.index("use") if i == 0 else line.rindex("--") for i, line in enumerate(lines[: 1 + len(NAMES)])]
    assert len(set(columns)) == 1  # aligned


def test_models_json_parses_with_the_raw_records(capsys):
    records = json.loads(ok(["models", "--json"], capsys))
    assert [r["name"] for r in records] == NAMES
    by = {r["name"]: r for r in records}
    shapes = by["shapes"]
    assert shapes["config"]["metrics"]["cfg3"]["accuracy"]["all"] == shapes["headline"]["all"]
    assert 1_505_000 <= shapes["parameters"] < 1_515_000  # the model card's 1.51 M
    assert shapes["bytes"] == sum(p.stat().st_size for p in bundled_dir("shapes").rglob("*") if p.is_file())
    assert by["digits"]["headline"]["frechet"] == 10.983 and by["ppap"]["config"]["n_experts"] == 5


def test_parameters_come_from_the_safetensors_header():
    from condiff.core.files import load_tensors

    path = bundled_dir("digits") / "unet" / "diffusion_pytorch_model.safetensors"
    assert safetensors_parameters(path) == sum(t.numel() for t in load_tensors(path).values())


def test_card_table_and_headline_text(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(
        "# x\n\n## Measured\n\n| cfg | class | frechet |\n|---|---|---|\n| 1 | 0.9 | 3.5 |\n| 3 | 1.0 | 9.25 |\n"
    )
    assert card_measurements(card) == {"class": 1.0, "frechet": 9.25}
    assert card_measurements(tmp_path / "none.md") == {}
    assert headline_text({"class": 1.0, "frechet": 9.25}) == "class 1.000, Frechet 9.25"
    assert headline_text({}) == "-"
