"""Fitted files against the run that uses them (condiff.core.fitted): DC ratios, LinearAG coefficients, EMS,
inversions and minority classifiers made for another model (the bundled digits model against a copy with one
weight changed), another cfg or another grid are one `error:` line (exit 2) naming the file, what it was made
for and what the run uses; --allow-mismatch runs them with one `warning:` line instead; files written before
the weights were recorded run with a warning that they cannot be checked; and a solver that lacks the file it
needs says, once, what it runs as, in the output and its JSON."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clikit import ok, one_line_error
from condiff.cli import main
from condiff.core.files import save_tensors
from condiff.core.fitted import weights_digest
from condiff.data.images import write_image
from condiff.guidance.minority import MinorityClassifier
from condiff.models.base import bundled_dir, load_model
from condiff.models.minority import save_minority
from condiff.nets import AttributeClassifier
from condiff.solvers.dc_search import load_ratios
from condiff.solvers.ems import EMS

REFIT = "refit it for this run, or give --allow-mismatch to use it anyway"


def run(argv, capsys):
    """(exit code, stdout, stderr) of a command, 0 when it returns."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def warnings_of(err: str) -> list[str]:
    """The `warning: ` lines of stderr (progress bars share it, separated by carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A copy of the bundled digits model with one weight changed by 1e-3: another model of the same family."""
    d = tmp_path_factory.mktemp("other") / "digits2"
    shutil.copytree(bundled_dir("digits"), d)
    path = d / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def digests(other):
    """The weights digests of the bundled digits model and of the other one, shortened as messages show them."""
    return {name: weights_digest(load_model(name).module) for name in ("digits", str(other))}


def short(digests, name):
    return digests[name][:12]


def sample_argv(out, *extra, model="digits"):
    return ["sample", "--model", str(model), "--n", "1", "--steps", "3", "--cfg", "3", "--out", str(out), *extra]


def test_digest_is_that_of_the_loaded_weights(other, digests):
    """The same weights give the same digest on every load; one changed weight gives another."""
    assert weights_digest(load_model("digits").module) == digests["digits"] != digests[str(other)]
    assert re.fullmatch(r"[0-9a-f]{64}", digests["digits"])


def test_dc_ratios_from_another_model(tmp_path, capsys, other, digests):
    """`dc search` records the digest; the ratios run on their model silently, on another model they are one
    error line, with --allow-mismatch one warning line and a sidecar that says so and reproduces the flag; a
    file without the digest runs with a warning that it cannot be checked."""
    ratios = tmp_path / "r.json"
    ok(
        ["dc", "search", "--model", "digits", "--nfe", "3", "--cfg", "3", "--n-data", "2", "--iters", "2"]
        + ["--ref-steps", "20", "--out", str(ratios)],
        capsys,
    )
    assert load_ratios(ratios).weights == digests["digits"]
    flags = ["--solver", "dc-solver", "--dc-ratios", str(ratios)]
    code, _, err = run(sample_argv(tmp_path / "a.png", *flags), capsys)
    assert code == 0 and warnings_of(err) == [] and "note:" not in err
    code, _, err = run(sample_argv(tmp_path / "b.png", *flags, model=other), capsys)
    one_line_error(
        code,
        err,
        f"error: --dc-ratios {str(ratios)!r} was fitted for model 'digits' (weights {short(digests, 'digits')}), "
        f"but this run uses model {str(other)!r} (weights {short(digests, str(other))}); {REFIT}",
    )
    assert not (tmp_path / "b.png").exists()
    _, _, err = run(sample_argv(tmp_path / "c.png", *flags, "--allow-mismatch", model=other), capsys)
    (warning,) = warnings_of(err)
    assert warning.startswith(f"warning: --dc-ratios {str(ratios)!r} was fitted for model 'digits'")
    assert warning.endswith("; used anyway (--allow-mismatch)")
    side = json.loads((tmp_path / "c.json").read_text())
    assert side["allow_mismatch"] is True and " --allow-mismatch" in side["reproduce"]
    old = json.loads(ratios.read_text())
    old.pop("model_weights")
    (tmp_path / "old.json").write_text(json.dumps(old))
    _, _, err = run(
        sample_argv(tmp_path / "d.png", "--solver", "dc-solver", "--dc-ratios", str(tmp_path / "old.json")), capsys
    )
    assert warnings_of(err) == [
        f"warning: --dc-ratios {str(tmp_path / 'old.json')!r} does not record the weights it was fitted with "
        f"(written before condiff recorded them), so it cannot be checked against model 'digits' "
        f"(weights {short(digests, 'digits')})"
    ]
    assert (tmp_path / "d.png").exists()


@pytest.fixture(scope="module")
def coeffs(tmp_path_factory):
    """LinearAG coefficients fitted on 8 digits trajectories at cfg 3 on the 4-step grid."""
    out = tmp_path_factory.mktemp("lag") / "c.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        main(
            [
                "guidance",
                "fit-linear-ag",
                "--model",
                "digits",
                "--cfg",
                "3",
                "--steps",
                "4",
                "--n",
                "8",
                "--out",
                str(out),
            ]
        )
    return out


def eval_argv(tmp_path, coeffs, *extra, model="digits", cfg="3", steps="4"):
    return ["eval", "--model", str(model), "--n", "2", "--steps", steps, "--cfg", cfg, "--linear-ag", str(coeffs)] + [
        "--json",
        str(tmp_path / "e.json"),
        *extra,
    ]


def test_linear_ag_from_another_model_cfg_or_grid(tmp_path, capsys, coeffs, other, digests):
    """Coefficients fitted on digits at cfg 3 on 4 steps: on another model, at cfg 2, or on 6 steps each is one
    error line naming the file, what it was fitted for and what the run uses; with --allow-mismatch the run
    goes on with one warning line (LinearAG at the run's cfg, on its grid)."""
    where = f"--linear-ag {str(coeffs)!r}"
    code, _, err = run(eval_argv(tmp_path, coeffs, model=other), capsys)
    one_line_error(
        code,
        err,
        f"error: {where} was fitted for model 'digits' (weights {short(digests, 'digits')}), but this run uses "
        f"model {str(other)!r} (weights {short(digests, str(other))}); {REFIT}",
    )
    code, _, err = run(eval_argv(tmp_path, coeffs, cfg="2"), capsys)
    one_line_error(code, err, f"error: {where} was fitted for cfg 3, but this run uses cfg 2; {REFIT}")
    code, _, err = run(eval_argv(tmp_path, coeffs, steps="6"), capsys)
    one_line_error(code, err, f"error: {where} was fitted for a grid of 4 'uniform-t' steps from t=")
    assert "but this run uses a grid of 6 steps from t=" in err and not (tmp_path / "e.json").exists()
    _, _, err = run(eval_argv(tmp_path, coeffs, "--allow-mismatch", model=other), capsys)
    assert [w[:60] for w in warnings_of(err)] == [f"warning: {where} was fitted for model 'digits'"[:60]]
    _, _, err = run(eval_argv(tmp_path, coeffs, "--allow-mismatch", cfg="2", steps="6"), capsys)
    (warning,) = warnings_of(err)
    assert warning.startswith(f"warning: {where} was fitted for cfg 3 and a grid of 4 'uniform-t' steps")
    assert "but this run uses cfg 2 and a grid of 6 steps" in warning and warning.endswith(
        "used anyway (--allow-mismatch)"
    )
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["allow_mismatch"] is True and res["cfg"] == 2.0 and res["nfe"] == 6
    assert res["network_rows_per_sample"] == 2 * 6 - 2  # the first half of the 4 fitted evaluations predicted


def test_linear_ag_file_without_its_record_runs_with_a_warning(tmp_path, capsys, coeffs, digests):
    """A coefficient file of tensors only (as written before the record existed) still runs on its grid and cfg,
    with one warning that its model cannot be checked."""
    with safe_open(str(coeffs), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = save_tensors(tmp_path / "old.safetensors", tensors)
    _, _, err = run(eval_argv(tmp_path, old), capsys)
    assert warnings_of(err) == [
        f"warning: --linear-ag {str(old)!r} does not record the weights it was fitted with (written before condiff "
        f"recorded them), so it cannot be checked against model 'digits' (weights {short(digests, 'digits')})"
    ]
    assert json.loads((tmp_path / "e.json").read_text())["network_rows_per_sample"] == 2 * 4 - 2


def ems_file(path, digests, **meta):
    """Statistics with the metadata `ems compute` writes for digits at cfg 3 (degenerate values: what the check
    reads is the metadata)."""
    fields = {"model": "digits", "cfg": 3.0, "weights": digests["digits"], **meta}
    return EMS.degenerate((1, 16, 16), **fields).save(path)


def test_ems_at_another_cfg_or_from_another_model(tmp_path, capsys, other, digests):
    """EMS computed at cfg 3: at cfg 1 one error line before any weights are read; on another model one error
    line; with --allow-mismatch one warning each; without the digest a warning that it cannot be checked."""
    ems = ems_file(tmp_path / "e.safetensors", digests)
    where = f"--ems {str(ems)!r}"
    flags = ["--solver", "dpm-v3", "--ems", str(ems)]
    at_cfg_1 = [
        "sample",
        "--model",
        "digits",
        "--n",
        "1",
        "--steps",
        "3",
        "--cfg",
        "1",
        "--out",
        str(tmp_path / "b.png"),
    ]
    code, _, err = run(at_cfg_1 + flags, capsys)
    one_line_error(code, err, f"error: {where} was fitted for cfg 3, but this run uses cfg 1; {REFIT}")
    code, _, err = run(sample_argv(tmp_path / "a.png", *flags, model=other), capsys)
    one_line_error(
        code,
        err,
        f"error: {where} was fitted for model 'digits' (weights {short(digests, 'digits')}), but this run uses "
        f"model {str(other)!r} (weights {short(digests, str(other))}); {REFIT}",
    )
    assert not (tmp_path / "a.png").exists()
    code, _, err = run(at_cfg_1 + flags + ["--allow-mismatch"], capsys)
    assert code == 0
    assert warnings_of(err) == [
        f"warning: {where} was fitted for cfg 3, but this run uses cfg 1; used anyway (--allow-mismatch)"
    ]
    assert (tmp_path / "b.png").exists()
    old = ems_file(tmp_path / "old.safetensors", digests, weights=None)
    _, _, err = run(sample_argv(tmp_path / "c.png", "--solver", "dpm-v3", "--ems", str(old)), capsys)
    assert warnings_of(err) == [
        f"warning: --ems {str(old)!r} does not record the weights it was fitted with (written before condiff "
        f"recorded them), so it cannot be checked against model 'digits' (weights {short(digests, 'digits')})"
    ]


@pytest.fixture(scope="module")
def inversion(tmp_path_factory):
    """A 3-step ddim inversion of a 16 x 16 image under the digits model, prompt 3."""
    d = tmp_path_factory.mktemp("inv")
    image = d / "d.png"
    write_image(torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, image)
    out = d / "inv.safetensors"
    main(
        ["invert", "--model", "digits", "--image", str(image), "--prompt", "3", "--method", "ddim", "--steps", "3"]
        + ["--out", str(out)]
    )
    return image, out


def test_inversion_from_another_model(tmp_path, capsys, inversion, other, digests):
    """`invert` records the digest; `edit` with the inversion on another model is one error line (after
    loading, since names alone do not tell weights apart), with --allow-mismatch one warning line; an
    inversion without the digest edits with a warning that it cannot be checked."""
    image, inv = inversion
    with safe_open(str(inv), "pt") as f:
        meta = json.loads(f.metadata()["condiff_inversion"])
    assert meta["model_weights"] == digests["digits"]
    argv = ["edit", "--image", str(image), "--to", "5", "--inversion", str(inv), "--out", str(tmp_path / "e.png")]
    code, _, err = run(argv + ["--model", str(other)], capsys)
    one_line_error(
        code,
        err,
        f"error: --inversion {str(inv)!r} was made for model 'digits' (weights {short(digests, 'digits')}), but "
        f"this run uses model {str(other)!r} (weights {short(digests, str(other))}); invert the image again for "
        f"this run, or give --allow-mismatch to use it anyway",
    )
    assert not (tmp_path / "e.png").exists()
    _, _, err = run(argv + ["--model", str(other), "--allow-mismatch"], capsys)
    (warning,) = warnings_of(err)
    assert warning.startswith(f"warning: --inversion {str(inv)!r} was made for model 'digits'")
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["allow_mismatch"] is True and " --allow-mismatch" in side["reproduce"]
    tensors = load_file(str(inv))
    old = tmp_path / "old.safetensors"
    save_file(
        tensors,
        str(old),
        metadata={"condiff_inversion": json.dumps({k: v for k, v in meta.items() if k != "model_weights"})},
    )
    argv[argv.index(str(inv))] = str(old)
    _, _, err = run(argv + ["--model", "digits"], capsys)
    assert warnings_of(err) == [
        f"warning: --inversion {str(old)!r} does not record the weights it was made with (written before condiff "
        f"recorded them), so it cannot be checked against model 'digits' (weights {short(digests, 'digits')})"
    ]
    code, _, err = run(argv + ["--model", str(other)], capsys)  # an old file from another model: its name tells
    one_line_error(
        code,
        err,
        f"error: --inversion {str(old)!r} was made for model 'digits', but this run uses model {str(other)!r}",
    )


@pytest.fixture(scope="module")
def minority(tmp_path_factory, digests):
    """A 3-level minority classifier for 16 x 16 digits (random weights), recorded as fitted on the bundled
    digits model, and the same without the record."""
    torch.manual_seed(0)
    net = AttributeClassifier(heads=[["level", 3]], in_channels=1, sample_size=16, noise_aware=True, width=8, hidden=16)
    mc = MinorityClassifier(
        net.eval(), torch.tensor([0.2, 0.5]), 59.94, 5, {}, (0.0, 999.0), "digits", digests["digits"]
    )
    d = tmp_path_factory.mktemp("mino")
    return save_minority(mc, d / "new"), save_minority(dataclasses.replace(mc, model=None, weights=None), d / "old")


def test_minority_classifier_from_another_model(tmp_path, capsys, minority, other, digests):
    """A classifier recorded as fitted on digits: silent there, one error line on another model, one warning
    line with --allow-mismatch; without the record a warning that it cannot be checked."""
    new, old = minority
    argv = ["sample", "--n", "1", "--steps", "3", "--cfg", "0", "--out", str(tmp_path / "m.png")]
    _, _, err = run(argv + ["--model", "digits", "--minority", str(new)], capsys)
    assert warnings_of(err) == [] and (tmp_path / "m.png").exists()
    (tmp_path / "m.png").unlink()
    code, _, err = run(argv + ["--model", str(other), "--minority", str(new)], capsys)
    one_line_error(
        code,
        err,
        f"error: --minority {str(new)!r} was fitted for model 'digits' (weights {short(digests, 'digits')}), but "
        f"this run uses model {str(other)!r} (weights {short(digests, str(other))}); {REFIT}",
    )
    assert not (tmp_path / "m.png").exists()
    _, _, err = run(argv + ["--model", str(other), "--minority", str(new), "--allow-mismatch"], capsys)
    assert len(warnings_of(err)) == 1 and (tmp_path / "m.png").exists()
    _, _, err = run(argv + ["--model", "digits", "--minority", str(old)], capsys)
    assert warnings_of(err) == [
        f"warning: --minority {str(old)!r} does not record the weights it was fitted with (written before condiff "
        f"recorded them), so it cannot be checked against model 'digits' (weights {short(digests, 'digits')})"
    ]


def test_bundled_ppap_experts_record_the_bundled_shapes_model():
    """The bundled PPAP experts were distilled on the bundled shapes model's samples: ppap.json records its
    digest, so `--classifier ppap` with it runs silently and with another model is refused."""
    from condiff.errors import ConfigError
    from condiff.guidance.ppap import check_ppap_fits, read_ppap_meta

    meta = read_ppap_meta(bundled_dir("shapes-ppap"))
    digest = weights_digest(load_model("shapes").module)
    assert meta["model"] == "shapes" and meta["model_weights"] == digest
    check_ppap_fits(meta, digest, "shapes")
    with pytest.raises(ConfigError, match=r"^--classifier 'ppap' was fitted for model 'shapes' \(weights "):
        check_ppap_fits(meta, "0" * 64, "mine", "--classifier 'ppap'")


@pytest.mark.parametrize(
    "solver, note",
    [
        (
            "dpm-v3",
            "note: dpm-v3 without --ems runs as DPM-Solver++(2M) in Taylor form with its pseudo-order corrector: "
            "the statistics l = 1, s = b = 0; compute the model's with `condiff ems compute`",
        ),
        (
            "dc-solver",
            "note: dc-solver without --dc-ratios runs as its base unipc (every compensation ratio 1); search the "
            "model's ratios with `condiff dc search`",
        ),
    ],
)
def test_a_solver_without_its_file_says_what_it_runs_as(tmp_path, capsys, solver, note):
    """Once on stderr, and in the sidecar (sample) and the JSON (eval)."""
    _, _, err = run(sample_argv(tmp_path / "s.png", "--solver", solver), capsys)
    assert [line for line in re.split(r"[\r\n]", err) if line.startswith("note: ")] == [note]
    assert json.loads((tmp_path / "s.json").read_text())["solver_fallback"] == note[len("note: ") :]
    argv = [
        "eval",
        "--model",
        "digits",
        "--n",
        "2",
        "--steps",
        "3",
        "--solver",
        solver,
        "--json",
        str(tmp_path / "e.json"),
    ]
    _, _, err = run(argv, capsys)
    assert err.count("note: ") == 1 and json.loads((tmp_path / "e.json").read_text())["solver_fallback"] == note[6:]
    _, _, err = run(sample_argv(tmp_path / "u.png", "--solver", "unipc"), capsys)
    assert "note: " not in err and json.loads((tmp_path / "u.json").read_text())["solver_fallback"] is None


def test_bench_solvers_checks_its_files(tmp_path, capsys, other, digests):
    """`bench solvers --model` builds its dpm-v3 and dc-solver cases from --ems / --dc-ratios itself: the files
    are checked against its --cfg and the model's weights the same way, before any case runs."""
    ems = ems_file(tmp_path / "e.safetensors", digests)
    argv = ["bench", "solvers", "--model", "digits", "--nfe", "3", "--n", "2", "--ref-steps", "4"]
    code, _, err = run(argv + ["--cfg", "1", "--ems", str(ems)], capsys)
    one_line_error(code, err, f"error: --ems {str(ems)!r} was fitted for cfg 3, but this run uses cfg 1; {REFIT}")
    code, _, err = run(argv[:3] + [str(other)] + argv[4:] + ["--cfg", "3", "--ems", str(ems)], capsys)
    one_line_error(code, err, f"error: --ems {str(ems)!r} was fitted for model 'digits' (weights ")
