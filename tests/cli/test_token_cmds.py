"""`condiff train / sample / eval` on token models: a tiny DNA recipe trained from its file, texts printed and
written as JSON, the exact judges, and one-line errors."""

from __future__ import annotations

import pytest

from clikit import ok, one_line_error, run
from condiff.core.files import load_json

RECIPE = """
name = "tiny-dna"
family = "dna"
[model]
dim = 16
layers = 1
heads = 2
[data]
length = 12
[train]
steps = 3
batch_size = 8
warmup = 1
ckpt_every = 3
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "tiny-dna.toml").write_text(RECIPE)
    from condiff.cli import main

    main(["train", str(d / "tiny-dna.toml"), "--out", str(d / "run")])
    return d / "run" / "model"


def test_sample_prints_texts_from_the_prompt_and_writes_json(trained, capsys, tmp_path):
    out = ok(
        [
            "sample",
            "--model",
            str(trained),
            "--prompt",
            "ACGT",
            "--n",
            "3",
            "--steps",
            "6",
            "--out",
            str(tmp_path / "s.json"),
        ],
        capsys,
    )
    lines = out.splitlines()
    assert all(len(t) == 12 and t.startswith("ACGT") and set(t) <= set("ACGT") for t in lines[:3])
    data = load_json(tmp_path / "s.json")
    assert data["texts"] == lines[:3] and data["steps"] == 6 and data["network_rows"] <= 3 * 6


def test_eval_reports_bits_per_token(trained, capsys, tmp_path):
    ok(["eval", "--model", str(trained), "--n", "8", "--json", str(tmp_path / "e.json")], capsys)
    data = load_json(tmp_path / "e.json")
    assert 0 < data["bits"] < 3 and data["chunks"] == 8


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--n", "0"], "--n must be a positive integer, got 0"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--ems", "x.safetensors"], "--ems does not apply to a token model"),
        (["--prompt", "ACGTN"], "'N'"),
        (["--prompt", "A" * 12], "at most 11"),
        (["--out", "x.png"], ".json"),
    ],
)
def test_bad_sample_options_are_one_line_errors(trained, capsys, argv, needle):
    code, _, err = run(["sample", "--model", str(trained), *argv], capsys)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("tokens", [{"family": "words", "kind": "radd", "length": 4}, 3, {"family": "dna"}])
def test_a_token_model_folder_with_a_bad_tokens_table_is_one_line(tmp_path, capsys, tokens):
    import json

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "condiff.json").write_text(json.dumps({"tokens": tokens}))
    code, _, err = run(["sample", "--model", str(tmp_path / "m")], capsys)
    one_line_error(code, err, "'tokens' must name a family")


def test_block_diffusion_captions_train_sample_and_eval(tmp_path, capsys):
    """kind = "block": a block-causal net trained with the block DCE loss and sampled block by block with the
    previous blocks' keys and values cached (3 blocks of 4 tokens, 2 steps each: at most 6 calls per text)."""
    recipe = tmp_path / "blocks.toml"
    recipe.write_text(
        'name = "tiny-blocks"\nfamily = "captions"\n[model]\nkind = "block"\nblock_size = 4\ndim = 16\nlayers = 1\n'
        "heads = 2\n[train]\nsteps = 2\nbatch_size = 8\nwarmup = 1\nckpt_every = 2\neval_every = 0\n"
    )
    ok(["train", str(recipe), "--out", str(tmp_path / "run")], capsys)
    model = str(tmp_path / "run" / "model")
    ok(["sample", "--model", model, "--n", "3", "--steps", "2", "--out", str(tmp_path / "s.json")], capsys)
    data = load_json(tmp_path / "s.json")
    assert len(data["texts"]) == 3 and data["network_rows"] <= 3 * 3 * 2
    ok(["eval", "--model", model, "--n", "4", "--json", str(tmp_path / "e.json")], capsys)
    assert set(load_json(tmp_path / "e.json")) >= {"accuracy", "parses"}


def test_block_size_must_divide_the_length(tmp_path, capsys):
    recipe = tmp_path / "blocks.toml"
    recipe.write_text('name = "b"\nfamily = "captions"\n[model]\nkind = "block"\nblock_size = 5\n')
    code, _, err = run(["train", str(recipe), "--out", str(tmp_path / "run")], capsys)
    one_line_error(code, err, "model.block_size 5 must divide the sequence length 12")


def test_guide_steers_a_captions_model_and_is_refused_elsewhere(trained, tmp_path, capsys):
    recipe = tmp_path / "caps.toml"
    recipe.write_text(
        'name = "tiny-caps"\nfamily = "captions"\n[model]\ndim = 16\nlayers = 1\nheads = 2\n[data]\ncond_drop = 1.0\n'
        "[train]\nsteps = 2\nbatch_size = 8\nwarmup = 1\nckpt_every = 2\neval_every = 0\n"
    )
    ok(["train", str(recipe), "--out", str(tmp_path / "run")], capsys)
    model = str(tmp_path / "run" / "model")
    argv = ["sample", "--model", model, "--n", "64", "--steps", "12", "--guide", "color=red", "--guide-scale", "8"]
    ok([*argv, "--out", str(tmp_path / "g.json")], capsys)
    ok(["sample", "--model", model, "--n", "64", "--steps", "12", "--out", str(tmp_path / "u.json")], capsys)
    from condiff.data import captions

    def red(name):
        tokens = load_json(tmp_path / name)["tokens"]
        import torch

        words = [captions.VOCAB.decode(torch.tensor(t)) for t in tokens]
        return sum("red" in w for w in words)

    assert red("g.json") > 2 * max(red("u.json"), 1)  # an untrained model too: the tilt alone moves the colour word
    code, _, err = run(["sample", "--model", model, "--guide", "colour=red"], capsys)
    one_line_error(code, err, "NAME=VALUE")
    code, _, err = run(["sample", "--model", str(trained), "--guide", "color=red"], capsys)
    one_line_error(code, err, "--guide needs a RADD model of captions")
    code, _, err = run(["sample", "--model", "shapes", "--guide", "color=red"], capsys)
    one_line_error(code, err, "--guide goes with a token model of captions")


def test_solver_picks_the_token_sampler(trained, capsys, tmp_path):
    out = ok(
        ["sample", "--model", str(trained), "--n", "2", "--solver", "ordered", "--out", str(tmp_path / "o.json")],
        capsys,
    )
    assert "one position per step" in out and load_json(tmp_path / "o.json")["nfe_per_sample"] == 12
    ok(["sample", "--model", str(trained), "--n", "2", "--steps", "4", "--solver", "euler"], capsys)
    code, _, err = run(["sample", "--model", str(trained), "--solver", "heun"], capsys)
    one_line_error(code, err, "accepted: tau-leaping, euler, ordered")
