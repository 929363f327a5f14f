"""Loading never unpickles: every user-supplied file or folder (--model, --pipeline, --classifier, --minority,
--inversion, a recipe's train.init_from) that holds pickled weights is refused with one `error:` line naming the
file and the option, exit code 2, before anything is loaded or written.

The pickles are written here with torch.save / pickle.dump; nothing may read them back: pickle.load,
pickle.loads and torch.load raise AssertionError for the whole of each test."""

import ast
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clikit import run
from condiff.core.files import PICKLE_SUFFIXES, SCAN_DEPTH, load_json, load_tensors, refuse_pickles, save_tensors
from condiff.errors import InputFileError
from condiff.models.base import bundled_dir, load_model

SRC = Path(__file__).resolve().parents[2] / "src" / "condiff"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHAPES_PROMPT = "large red circle top-left"


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Anything that tries to unpickle fails the test (and the one thread the shared cores allow)."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A tiny DiT pipeline folder (random weights, safetensors), built once for this module."""
    from condiff.interop.tiny import build_tiny_dit

    return build_tiny_dit(tmp_path_factory.mktemp("safe_dit") / "pipe")


def to_pickle(weights: Path, suffix: str = ".bin", keep: bool = False) -> Path:
    """Write the tensors of a safetensors file with torch.save beside it (a ``suffix`` file, as old diffusers and
    transformers folders hold them); the safetensors file goes unless ``keep``."""
    tensors = load_file(str(weights))
    dest = weights.with_suffix(suffix)
    torch.save(tensors, dest)
    if not keep:
        weights.unlink()
    return dest


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def refused(argv, capsys, bad: Path, option: str, out_dir: Path):
    """Exit 2, exactly one `error:` line naming ``bad`` and ``option``, and nothing under ``out_dir``."""
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert repr(str(bad)) in err and option in err and "only safetensors and JSON" in err, err
    assert "Traceback" not in err
    assert not out_dir.exists(), sorted(out_dir.rglob("*"))
    return err


# ---- --model ----------------------------------------------------------------------------------------------------


def pickled_model(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A copy of the bundled digits model whose UNet weights are pickled in one of several ways; (folder, the
    file the refusal must name)."""
    d = tmp_path / "model"
    shutil.copytree(bundled_dir("digits"), d)
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    if kind == "bin":  # diffusers' pickled fallback name, and no safetensors
        return d, to_pickle(weights)
    if kind == "stray-bin":  # safetensors and a .bin beside it: the .bin is refused all the same
        return d, to_pickle(weights, keep=True)
    if kind == "pt-elsewhere":
        (d / "extra").mkdir()
        bad = d / "extra" / "ema.pt"
        torch.save({"w": torch.ones(2)}, bad)
        return d, bad
    if kind == "zip-as-safetensors":  # torch.save's zip format under the safetensors name
        weights.write_bytes(torch_save_bytes(load_file(str(weights))))
        return d, weights
    assert kind == "pickle-as-json"
    (d / "unet" / "config.json").write_bytes(pickle.dumps({"sample_size": 16}, protocol=4))
    return d, d / "unet" / "config.json"


@pytest.mark.parametrize("kind", ["bin", "stray-bin", "pt-elsewhere", "zip-as-safetensors", "pickle-as-json"])
def test_model_folder_with_pickles_is_refused(tmp_path, capsys, kind):
    d, bad = pickled_model(tmp_path, kind)
    out = tmp_path / "out"
    refused(
        ["sample", "--model", str(d), "--steps", "2", "--n", "1", "--out", str(out / "g.png")],
        capsys,
        bad,
        "--model",
        out,
    )


def test_model_folder_with_pickles_is_refused_by_the_api(tmp_path):
    d, bad = pickled_model(tmp_path, "bin")
    with pytest.raises(InputFileError, match="only safetensors and JSON") as e:
        load_model(d)
    assert repr(str(bad)) in str(e.value)


# ---- --pipeline -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["bin", "stray-bin"])
def test_pipeline_folder_with_pickles_is_refused(tmp_path, capsys, tiny_dit, keep):
    d = tmp_path / "pipe"
    shutil.copytree(tiny_dit, d)
    bad = to_pickle(d / "transformer" / "diffusion_pytorch_model.safetensors", keep=keep)
    out = tmp_path / "out"
    refused(
        ["sample", "--pipeline", str(d), "--prompt", "circle", "--steps", "2", "--n", "1", "--out", str(out / "g.png")],
        capsys,
        bad,
        "--pipeline",
        out,
    )


def test_pipeline_loader_refuses_pickles(tmp_path, tiny_dit):
    from condiff.interop.pipeline import load_pipeline

    d = tmp_path / "pipe"
    shutil.copytree(tiny_dit, d)
    bad = to_pickle(d / "vae" / "diffusion_pytorch_model.safetensors", suffix=".pth")
    with pytest.raises(InputFileError, match="--pipeline") as e:
        load_pipeline(d)
    assert repr(str(bad)) in str(e.value)


# ---- --classifier (a trained classifier, or PPAP experts) --------------------------------------------------------


@pytest.mark.parametrize("bundled", ["shapes-noisy-classifier", "shapes-ppap"])
def test_classifier_folder_with_pickles_is_refused(tmp_path, capsys, bundled):
    d = tmp_path / "clf"
    shutil.copytree(bundled_dir(bundled), d)
    if bundled == "shapes-ppap":
        bad = to_pickle(d / "experts.safetensors", suffix=".pt")
    else:
        bad = to_pickle(d / "classifier" / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    refused(
        [
            "sample",
            "--model",
            "shapes",
            "--classifier",
            str(d),
            "--steps",
            "2",
            "--n",
            "1",
            "--out",
            str(out / "g.png"),
        ],
        capsys,
        bad,
        "--classifier",
        out,
    )


def test_ppap_and_classifier_loaders_refuse_pickles(tmp_path):
    from condiff.guidance.ppap import load_ppap
    from condiff.models.classifiers import load_classifier

    ppap = tmp_path / "ppap"
    shutil.copytree(bundled_dir("shapes-ppap"), ppap)
    (ppap / "old.ckpt").write_bytes(torch_save_bytes({"w": torch.ones(1)}))
    with pytest.raises(InputFileError, match="old.ckpt"):
        load_ppap(ppap, load_classifier("clean"))
    clf = tmp_path / "clf"
    shutil.copytree(bundled_dir("shapes-clean-classifier"), clf)
    bad = to_pickle(clf / "classifier" / "diffusion_pytorch_model.safetensors", keep=True)
    with pytest.raises(InputFileError, match="--classifier") as e:
        load_classifier(clf)
    assert repr(str(bad)) in str(e.value)


# ---- --minority -------------------------------------------------------------------------------------------------


def test_minority_folder_with_pickles_is_refused(tmp_path, capsys):
    d = tmp_path / "minority"
    shutil.copytree(bundled_dir("shapes-noisy-classifier") / "classifier", d / "classifier")
    (d / "minority.json").write_text(
        json.dumps({"levels": 3, "thresholds": [0.2, 0.5], "t": 59.94, "n": 5, "t_range": [0.0, 999.0], "info": {}})
    )
    bad = to_pickle(d / "classifier" / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    refused(
        ["sample", "--model", "shapes", "--minority", str(d), "--steps", "2", "--n", "1", "--out", str(out / "g.png")],
        capsys,
        bad,
        "--minority",
        out,
    )


# ---- --inversion ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch-save-pt", "pickle-as-safetensors"])
def test_inversion_file_with_pickles_is_refused(tmp_path, capsys, kind):
    image = tmp_path / "source.png"
    Image.new("RGB", (32, 32)).save(image)
    if kind == "torch-save-pt":
        bad = tmp_path / "inversion.pt"
        torch.save({"x_T": torch.zeros(1, 3, 32, 32)}, bad)
    else:
        bad = tmp_path / "inversion.safetensors"
        with open(bad, "wb") as f:
            pickle.dump({"x_T": [0.0] * 4}, f, protocol=pickle.HIGHEST_PROTOCOL)
    out = tmp_path / "out"
    refused(
        [
            "edit",
            "--model",
            "shapes",
            "--image",
            str(image),
            "--to",
            SHAPES_PROMPT,
            "--inversion",
            str(bad),
            "--out",
            str(out / "e.png"),
        ],
        capsys,
        bad,
        "--inversion",
        out,
    )


def test_pipeline_inversion_file_with_pickles_is_refused(tmp_path, capsys, tiny_dit):
    image = tmp_path / "source.png"
    Image.new("RGB", (16, 16)).save(image)
    bad = tmp_path / "inversion.pth"
    torch.save({"x_T": torch.zeros(1, 4, 8, 8)}, bad)
    out = tmp_path / "out"
    refused(
        [
            "edit",
            "--pipeline",
            str(tiny_dit),
            "--image",
            str(image),
            "--to",
            "square",
            "--inversion",
            str(bad),
            "--out",
            str(out / "e.png"),
        ],
        capsys,
        bad,
        "--inversion",
        out,
    )


# ---- a recipe's train.init_from ---------------------------------------------------------------------------------


def test_recipe_init_from_a_pickled_model_is_refused(tmp_path, capsys):
    d, bad = pickled_model(tmp_path, "bin")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text((FIXTURES / "tiny_digits.toml").read_text() + f"init_from = {json.dumps(str(d))}\n")
    out = tmp_path / "out"
    refused(["train", str(recipe), "--out", str(out / "run")], capsys, bad, "train.init_from", out)


# ---- the check itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_every_pickle_suffix_is_refused_in_a_folder(tmp_path, suffix):
    (tmp_path / "a" / "b").mkdir(parents=True)
    save_tensors(tmp_path / "a" / "ok.safetensors", {"w": torch.ones(1)})
    bad = tmp_path / "a" / "b" / f"weights{suffix.upper()}"
    bad.write_bytes(b"not even a pickle: refused by its name")
    with pytest.raises(InputFileError, match="--opt: .*only safetensors and JSON") as e:
        refuse_pickles(tmp_path, "--opt")
    assert repr(str(bad)) in str(e.value) and str(e.value).count("\n") == 0


def test_clean_folders_files_and_missing_paths_pass(tmp_path):
    save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(3)})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("binary? no")
    assert refuse_pickles(tmp_path, "--opt") == tmp_path
    assert refuse_pickles(tmp_path / "w.safetensors") == tmp_path / "w.safetensors"
    assert refuse_pickles(tmp_path / "missing") == tmp_path / "missing"  # the loader reports it
    for name in ("shapes", "digits", "shapes-clean-classifier", "shapes-noisy-classifier", "shapes-ppap"):
        refuse_pickles(bundled_dir(name), "--model")


def test_safetensors_whose_header_length_looks_like_a_pickle_still_loads(tmp_path):
    """A safetensors file starts with its header length (8 bytes, little-endian): a length of 0x280 gives the
    bytes 0x80 0x02, a pickle's protocol-2 opcode. The header check must not mistake it for one."""
    path = tmp_path / "w.safetensors"
    for pad in range(700):
        save_tensors(path, {"w": torch.arange(3.0)}, {"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no padding gave a header length of 0x280")
    assert torch.equal(load_tensors(path)["w"], torch.arange(3.0))


@pytest.mark.parametrize(
    "blob",
    [pickle.dumps({"a": 1}, protocol=2), pickle.dumps([1], protocol=5), torch_save_bytes({"w": torch.ones(1)})],
    ids=["pickle-2", "pickle-5", "torch-zip"],
)
def test_pickle_headers_are_refused_where_safetensors_or_json_is_expected(tmp_path, blob):
    for name, load in (("x.safetensors", load_tensors), ("x.json", load_json)):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(InputFileError, match="only safetensors and JSON"):
            load(path)
        with pytest.raises(InputFileError, match=re.escape(f"--opt: {str(path)!r}")):
            refuse_pickles(tmp_path, "--opt")
        path.unlink()


def test_folder_scan_is_bounded_in_depth(tmp_path):
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(SCAN_DEPTH)])
    deep.mkdir(parents=True)
    (deep / "w.bin").write_bytes(b"x")
    refuse_pickles(tmp_path, "--opt")  # below the scanned levels (weights sit one or two levels down)
    (deep.parent / "w.bin").write_bytes(b"x")
    with pytest.raises(InputFileError):
        refuse_pickles(tmp_path, "--opt")


def test_every_from_pretrained_in_src_is_offline_and_safetensors_only():
    """Each ``X.from_pretrained(...)`` call in src passes local_files_only=True, and use_safetensors=True unless it
    reads a part that holds no weights (a scheduler or tokenizer: JSON and text files)."""
    without = []

    class Calls(ast.NodeVisitor):
        def __init__(self, path):
            self.path, self.function = path, "<module>"

        def visit_FunctionDef(self, node):
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Call(self, node):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{self.path}:{node.lineno}"
                assert isinstance(kw.get("local_files_only"), ast.Constant) and kw["local_files_only"].value is True, (
                    where
                )
                if not (isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True):
                    without.append((self.path, self.function))
            self.generic_visit(node)

    for path in sorted(SRC.rglob("*.py")):
        Calls(str(path.relative_to(SRC))).visit(ast.parse(path.read_text()))
    assert sorted(without) == [("interop/pipeline.py", "_load_part"), ("interop/tiny.py", "build_tiny_sd")], without
