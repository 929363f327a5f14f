"""Property-based fuzzing of the public API: grids, guidance scales, solver names, VP-discrete tables,
schedule configs, the caption tokenizer, safetensors/JSON loading, the model-directory loader and the sampling
loop's inputs (shapes, channels, dtypes and condition rows).

Bad input must raise a typed CondiffError subclass with a one-line message; valid input must give a
well-formed result (a finite, strictly descending grid; four slot tokens)."""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from fuzzkit import expect_api_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.files import load_json, load_tensors, save_tensors
from condiff.core.grids import MAX_STEPS, SPACINGS, Karras, make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import EDM, Flow, VPCosine, VPDiscrete, VPLinear, schedule_from_config
from condiff.data import text
from condiff.errors import CondiffError, ConfigError, InputFileError
from condiff.guidance import CFG
from condiff.models.base import bundled_dir, load_model
from condiff.solvers import DDIM, SOLVERS, get_solver

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
SCHEDULES = [VPLinear(), VPCosine(), EDM(), Flow(), VPDiscrete.from_betas("squaredcos_cap_v2", 1000)]
SCHEDULE = st.sampled_from(SCHEDULES)
SPACING = st.sampled_from(list(SPACINGS.values()))


def _is_grid(g: torch.Tensor, steps: int) -> bool:
    return (
        g.dtype == torch.float64
        and g.numel() == steps + 1
        and bool(torch.isfinite(g).all())
        and bool((g[1:] < g[:-1]).all())
    )


# ---- make_grid ------------------------------------------------------------------------------------------

BAD_STEPS = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_STEPS + 1),
    st.booleans(),
    st.floats(),
    st.text(max_size=3),
    st.none(),
    st.just([3]),
    st.just(torch.tensor([2, 3])),
)


@settings(max_examples=40)
@given(schedule=SCHEDULE, spacing=SPACING, steps=BAD_STEPS)
def test_make_grid_bad_steps(schedule, spacing, steps):
    expect_api_error(make_grid, schedule, steps, spacing, needles=("steps",))


def _times(schedule):
    """None (the default), in range, out of range, NaN, inf, or not a number at all."""
    lo, hi = min(schedule.t_clean, schedule.t_min), schedule.t_max
    return st.one_of(
        st.none(),
        st.floats(lo, hi),
        st.floats(lo, hi),
        st.floats(max_value=lo, exclude_max=True),
        st.floats(min_value=hi, exclude_min=True),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.text(max_size=3),
        st.booleans(),
        st.just(torch.tensor(0.5)),
    )


@settings(max_examples=60)
@given(schedule=SCHEDULE, spacing=SPACING, steps=st.integers(1, 200), final_zero=st.booleans(), data=st.data())
def test_make_grid_any_range_gives_a_grid_or_a_config_error(schedule, spacing, steps, final_zero, data):
    t_start = data.draw(_times(schedule), label="t_start")
    t_end = data.draw(_times(schedule), label="t_end")
    try:
        g = make_grid(schedule, steps, spacing, t_start, t_end, final_zero)
    except ConfigError as e:
        assert str(e).splitlines() == [str(e)]
        return
    assert _is_grid(g, steps), g


@settings(max_examples=20)
@given(schedule=SCHEDULE, spacing=SPACING, steps=st.integers(1, 50), data=st.data())
def test_make_grid_reversed_or_empty_range(schedule, spacing, steps, data):
    lo, hi = schedule.t_min, schedule.t_max
    t_start = data.draw(st.floats(lo, hi))
    t_end = data.draw(st.floats(t_start, hi))
    expect_api_error(make_grid, schedule, steps, spacing, t_start, t_end, needles=("t_start",))


@settings(max_examples=10)
@given(schedule=SCHEDULE, spacing=st.one_of(TEXT, st.integers(), st.none(), st.just(object())))
def test_make_grid_bad_spacing_object(schedule, spacing):
    expect_api_error(make_grid, schedule, 10, spacing, needles=("spacing", repr(spacing)))


@settings(max_examples=10)
@given(rho=st.one_of(st.floats().filter(lambda r: not 0 < r <= 1e3), st.text(max_size=2), st.booleans()))
def test_karras_bad_rho(rho):
    expect_api_error(Karras, rho, needles=("rho",))


# ---- guidance, solvers ----------------------------------------------------------------------------------


class _Den:
    schedule = VPLinear()

    def __call__(self, x, t, cond=None):
        return x


BAD_SCALES = st.one_of(
    st.floats().filter(lambda w: not abs(w) <= 1e4),
    st.integers().filter(lambda w: abs(w) > 1e4),
    st.booleans(),
    TEXT,
    st.none(),
    st.complex_numbers(),
    st.lists(st.floats(), max_size=2),
    st.just(torch.tensor([1.0, 2.0])),
)


@settings(max_examples=30)
@given(scale=BAD_SCALES)
def test_cfg_rejects_nan_inf_huge_and_non_numbers(scale):
    expect_api_error(CFG, _Den(), scale, needles=("guidance scale",))


@settings(max_examples=10)
@given(scale=st.floats(-1e4, 1e4))
def test_cfg_accepts_finite_scales(scale):
    den = CFG(_Den(), scale)
    x = torch.ones(2, 3)
    out = den(x, 0.5, {"y": torch.zeros(2), "null": {"y": torch.ones(2)}})
    assert torch.equal(out, x)


@settings(max_examples=25)
@given(name=st.one_of(TEXT, st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2)))
def test_get_solver_unknown_names(name):
    assume(name not in SOLVERS if isinstance(name, str) else True)
    expect_api_error(get_solver, name, needles=(repr(name), "accepted: ddpm"))


@settings(max_examples=10)
@given(name=st.sampled_from(sorted(SOLVERS)), option=st.from_regex(r"[a-z]{1,8}", fullmatch=True))
def test_get_solver_unknown_options(name, option):
    assume(option not in {"eta", "order", "variant", "predictor_order", "corrector", "lower_order_final"})
    import dataclasses

    assume(option not in {f.name for f in dataclasses.fields(SOLVERS[name])})
    expect_api_error(get_solver, name, needles=(repr(name), option), **{option: 1})


# ---- schedules ------------------------------------------------------------------------------------------


def _valid_table(a) -> bool:
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in a):
        return False
    return len(a) >= 2 and all(0 < x < 1 for x in a) and all(b < c for c, b in zip(a, a[1:]))


BAD_TABLES = st.one_of(
    st.lists(st.floats(), max_size=8).filter(lambda a: not _valid_table(a)),
    st.lists(st.floats(0.01, 0.99), min_size=2, max_size=8).map(sorted),  # increasing
    st.lists(st.floats(0.01, 0.99), min_size=3, max_size=8).map(lambda a: sorted(a, reverse=True) + [max(a)]),
    st.lists(st.text(max_size=2), min_size=1, max_size=3),
    st.none(),
    TEXT,
    st.just([[0.9, 0.5], [0.4]]),
    st.just({"a": 0.5}),
)


@settings(max_examples=30)
@given(table=BAD_TABLES)
def test_vp_discrete_rejects_bad_tables(table):
    assume(not (isinstance(table, list) and _valid_table(table)) or table is None)
    expect_api_error(VPDiscrete, alphas_cumprod=table, needles=("alphas_cumprod",))


SCHEDULE_CFG = st.one_of(
    st.dictionaries(TEXT, st.integers(), max_size=3),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["vp_linear", "vp_cosine", "vp_discrete", "edm", "flow"])},
        optional={
            "beta_min": st.floats(),
            "beta_max": st.floats(),
            "s": st.floats(),
            "num_steps": st.one_of(st.integers(-5, 5), st.floats()),
            "beta_start": st.floats(),
            "beta_end": st.floats(),
            "beta_schedule": TEXT,
            "sigma_min": st.floats(),
            "sigma_max": st.floats(),
            "junk": st.integers(),
        },
    ),
    TEXT,
    st.integers(),
    st.lists(st.integers(), max_size=2),
    st.none(),
)


@settings(max_examples=40)
@given(cfg=SCHEDULE_CFG)
def test_schedule_from_config_gives_a_schedule_or_a_config_error(cfg):
    try:
        s = schedule_from_config(cfg)
    except ConfigError as e:
        assert str(e).splitlines() == [str(e)]
        return
    g = make_grid(s, 5)  # a schedule that is accepted must give a valid grid
    assert _is_grid(g, 5)


# ---- the caption tokenizer ------------------------------------------------------------------------------


@settings(max_examples=80)
@given(
    prompt=st.one_of(
        TEXT,
        st.lists(st.sampled_from(sorted(text.VOCAB) + sorted(text.ALIASES) + ["", ",", "x"]), max_size=6).map(" ".join),
    )
)
def test_tokenize_arbitrary_text(prompt):
    try:
        ids = text.tokenize(prompt)
    except ConfigError as e:
        msg = str(e)
        assert msg.splitlines() == [msg] and repr(prompt) in msg
        return
    assert len(ids) == text.SEQ_LEN and all(isinstance(i, int) and 0 <= i < text.VOCAB_SIZE for i in ids)
    for slot, tok in enumerate(ids):  # each token sits in its own slot
        assert tok == text.PAD or text.VOCAB[[w for w, v in text.VOCAB.items() if v[1] == tok][0]][0] == slot


@settings(max_examples=20)
@given(
    words=st.lists(st.sampled_from(sorted(text.VOCAB)), max_size=4, unique_by=lambda w: text.VOCAB[w][0]),
    data=st.data(),
    sep=st.sampled_from([" ", ", ", "\t", "\n", "  "]),
    upper=st.booleans(),
)
def test_tokenize_ignores_order_case_and_separators(words, data, sep, upper):
    shuffled = data.draw(st.permutations(words))
    a = text.tokenize(" ".join(words))
    b = text.tokenize(sep.join(w.upper() if upper else w for w in shuffled))
    assert a == b and sum(t != text.PAD for t in a) == len(words)


def test_tokenize_empty_and_blank_prompts_are_null():
    for p in ("", " ", "\t\n", ", ,"):
        assert text.tokenize(p) == [text.PAD] * text.SEQ_LEN


@settings(max_examples=5)
@given(prompt=st.one_of(st.integers(), st.none(), st.binary(max_size=4), st.lists(st.text(max_size=2), max_size=2)))
def test_tokenize_non_strings(prompt):
    expect_api_error(text.tokenize, prompt, needles=("prompt must be a string",))


# ---- files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_safetensors(workdir) -> bytes:
    path = workdir / "real.safetensors"
    save_tensors(path, {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.zeros(3)})
    return path.read_bytes()


def _file(workdir: Path, name: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / name).write_bytes(data)
    return d / name


@settings(max_examples=30)
@given(kind=st.sampled_from(["garbage", "truncated", "pickle", "torch-save", "header-only", "flipped"]), data=st.data())
def test_load_tensors_refuses_garbage_truncated_and_pickles(workdir, real_safetensors, kind, data):
    real = real_safetensors
    if kind == "garbage":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "truncated":
        blob = real[: data.draw(st.integers(0, len(real) - 1))]
    elif kind == "pickle":
        blob = pickle.dumps({"w": [1.0, 2.0]}, protocol=data.draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
    elif kind == "torch-save":
        buf = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buf)
        blob = buf.getvalue()
    elif kind == "header-only":
        blob = real[: 8 + int.from_bytes(real[:8], "little")]
    else:  # a corrupted length prefix
        n = data.draw(st.integers(0, 7))
        blob = real[:n] + bytes([real[n] ^ 0xFF]) + real[n + 1 :]
    path = _file(workdir, "model.safetensors", blob)
    expect_api_error(load_tensors, path, needles=(repr(str(path)),))


@settings(max_examples=5)
@given(kind=st.sampled_from(["missing", "directory"]))
def test_load_tensors_missing_or_directory(workdir, kind):
    d = Path(tempfile.mkdtemp(dir=workdir))
    path = d / "x.safetensors"
    if kind == "directory":
        path.mkdir()
    expect_api_error(load_tensors, path, needles=(repr(str(path)),))


@settings(max_examples=25)
@given(
    blob=st.one_of(
        st.binary(max_size=100),
        st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"9" * 5000, b"\xff\xfe\x00", b"", b"{'a': 1}", b"NaN x"]),
    )
)
def test_load_json_refuses_garbage(workdir, blob):
    try:
        json.loads(blob.decode())
        assume(False)
    except (ValueError, RecursionError):
        pass
    path = _file(workdir, "x.json", blob)
    expect_api_error(load_json, path, needles=(repr(str(path)),))


# ---- model directories ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_meta() -> dict:
    return json.loads((bundled_dir("digits") / "condiff.json").read_text())


META_MUTATIONS = st.one_of(
    st.sampled_from(["family", "prediction", "schedule", "model"]).map(lambda k: ("drop", k, None)),
    st.tuples(
        st.just("set"),
        st.just("family"),
        st.one_of(TEXT.filter(lambda s: s not in ("digits", "shapes")), st.integers(), st.none()),
    ),
    st.tuples(
        st.just("set"),
        st.just("prediction"),
        st.one_of(TEXT.filter(lambda s: s not in ("eps", "x0", "v", "flow")), st.lists(st.integers(), max_size=1)),
    ),
    st.tuples(
        st.just("set"),
        st.just("schedule"),
        st.one_of(
            st.integers(),
            st.just({"type": "nope"}),
            st.just({"type": "vp_discrete", "num_steps": -3}),
            st.just({"type": "vp_discrete", "alphas_cumprod": [0.5, 0.9]}),
        ),
    ),
    st.tuples(st.just("set"), st.just("model"), st.one_of(st.integers(), TEXT, st.none())),
    st.tuples(st.just("whole"), st.just(""), st.one_of(st.lists(st.integers(), max_size=2), st.integers(), TEXT)),
)


@settings(max_examples=25)
@given(mutation=META_MUTATIONS)
def test_load_model_with_bad_condiff_json(workdir, digits_meta, mutation):
    op, key, value = mutation
    meta = dict(digits_meta)
    if op == "drop":
        del meta[key]
    elif op == "set":
        meta[key] = value
    else:
        meta = value
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "condiff.json").write_text(json.dumps(meta))
    err = expect_api_error(load_model, d, needles=(repr(str(d / "condiff.json")),))
    assert isinstance(err, InputFileError)


@settings(max_examples=8)
@given(
    kind=st.sampled_from(["no-unet", "truncated", "pickle", "garbage-config", "empty-weights"]),
    cut=st.integers(0, 4000),
)
def test_load_model_with_bad_weights(workdir, kind, cut):
    """condiff.json is fine but the networks are missing or broken: an InputFileError, not a diffusers trace."""
    d = Path(tempfile.mkdtemp(dir=workdir)) / "m"
    src = bundled_dir("digits")
    d.mkdir()
    shutil.copy(src / "condiff.json", d / "condiff.json")
    if kind != "no-unet":
        (d / "unet").mkdir()
        shutil.copy(src / "unet" / "config.json", d / "unet" / "config.json")
        weights = d / "unet" / "diffusion_pytorch_model.safetensors"
        if kind == "truncated":
            with open(src / "unet" / "diffusion_pytorch_model.safetensors", "rb") as f:
                weights.write_bytes(f.read(cut))
        elif kind == "pickle":
            weights.write_bytes(pickle.dumps({"weight": [0.0] * 4}))
        elif kind == "garbage-config":
            (d / "unet" / "config.json").write_text("{not json")
            shutil.copy(src / "unet" / "diffusion_pytorch_model.safetensors", weights)
        else:
            save_tensors(weights, {"nothing": torch.zeros(1)})
    err = expect_api_error(load_model, d, needles=(str(d),))
    assert isinstance(err, InputFileError)


# ---- checkpoints ----------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    meta=st.one_of(
        st.binary(max_size=40).map(lambda b: ("bytes", b)),
        st.sampled_from([[], 3, "x", None, {}, {"sha256": {}}, {"sha256": []}, {"step": 4}]).map(lambda v: ("json", v)),
        st.dictionaries(
            st.sampled_from(["model.safetensors", "ema.safetensors", "optim.safetensors"]),
            st.text("0123456789abcdef", min_size=64, max_size=64),
            min_size=1,
        ).map(lambda d: ("json", {"sha256": d})),
    )
)
def test_checkpoint_with_bad_trainer_json_fails_verification(workdir, meta):
    """Trainer.verify (what --resume uses to skip corrupt checkpoints) refuses with an InputFileError."""
    from condiff.training.trainer import Trainer

    d = Path(tempfile.mkdtemp(dir=workdir)) / "step-00000004"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"not the file the checksum was taken of")
    kind, value = meta
    (d / "trainer.json").write_bytes(value if kind == "bytes" else json.dumps(value).encode())
    err = expect_api_error(Trainer.verify, d, needles=(str(d),))
    assert isinstance(err, InputFileError)


# ---- the sampling loop's inputs: shapes, channels, dtypes and condition rows ------------------------------
# Whatever x and cond are, ``sample`` (and the CFG batch under it) returns a sample or raises a typed condiff
# error with a one-line message: never PyTorch's RuntimeError from inside the network.


class _Conv(nn.Module):
    """eps = conv(x) * y: a plain float32 network over 3 channels, y one value per sample or a shared 0-d one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, y):
        out = self.conv(x)
        return out * y.to(out.dtype).reshape(-1, *(1,) * (out.dim() - 1))


DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
# the valid value first in each list: hypothesis (derandomized) starts from and shrinks towards it
ROWS = st.sampled_from(["n", None, 1, 0, 2, 5])  # "n": one row per sample; None: a shared 0-d condition


def _sample_outcome(den, grid, x, cond):
    """The sampled x, or the CondiffError ``sample`` raised (checked: a typed subclass, one line)."""
    try:
        with torch.no_grad():
            return sample(den, DDIM(), grid, x, cond).x
    except CondiffError as err:
        msg = str(err)
        assert msg and msg.splitlines() == [msg] and type(err) is not CondiffError, msg
        return err


def _noise(n, channels, spatial, dtype):
    x = torch.randn(n, channels, *spatial) if spatial is not None else torch.tensor(0.5)
    return x.to(dtype)


@settings(max_examples=25)
@given(
    n=st.integers(1, 4),
    channels=st.sampled_from([3, 1, 2, 4]),
    spatial=st.sampled_from([(6, 6), (5, 7), (), (6,), (2, 6, 6), None]),
    dtype=DTYPES,
    rows=ROWS,
    guided=st.booleans(),
)
def test_plain_wrapped_module_inputs_give_a_sample_or_a_condiff_error(n, channels, spatial, dtype, rows, guided):
    den = wrap(_Conv(), VPCosine(), "eps")
    rows = n if rows == "n" else rows
    y = torch.tensor(2.0) if rows is None else torch.linspace(1, 2, rows)
    cond = {"y": y, "null": {"y": torch.zeros_like(y)}} if guided else {"y": y}
    x = _noise(n, channels, spatial, dtype)
    out = _sample_outcome(CFG(den, 2.0) if guided else den, make_grid(VPCosine(), 2), x, cond)
    four_d = spatial is not None and len(spatial) == 2
    rows_ok = rows is None or rows == n
    if dtype == torch.float32 and channels == 3 and four_d and rows_ok:
        assert isinstance(out, torch.Tensor) and out.shape == x.shape, out
    if dtype != torch.float32 or spatial is None or (four_d and channels != 3) or (guided and not rows_ok):
        assert isinstance(out, ConfigError), out


@pytest.fixture(scope="module")
def digits_model():
    return load_model("digits")


@settings(max_examples=20)
@given(
    n=st.integers(1, 3),
    channels=st.sampled_from([1, 3, 2]),
    spatial=st.sampled_from([(16, 16), (8, 8), (6, 6), (), (16,), None]),
    dtype=DTYPES,
    rows=ROWS,
    guided=st.booleans(),
)
def test_digits_model_inputs_give_a_sample_or_a_condiff_error(digits_model, n, channels, spatial, dtype, rows, guided):
    """The bundled digits model (1 channel, class labels; a 1-row label broadcasts when unguided)."""
    m = digits_model
    rows = n if rows == "n" else rows
    if rows is None:
        cond = {"class_labels": torch.tensor(3), "null": {"class_labels": torch.tensor(10)}}
    else:
        cond = m.condition(torch.arange(rows) % 10)
    den = CFG(m.denoiser, 3.0) if guided else m.denoiser
    x = _noise(n, channels, spatial, dtype)
    out = _sample_outcome(den, make_grid(m.schedule, 2), x, cond if guided else {"class_labels": cond["class_labels"]})
    rows_ok = rows is None or rows == n
    if dtype == torch.float32 and channels == 1 and spatial in ((16, 16), (8, 8)) and rows_ok:
        assert isinstance(out, torch.Tensor) and out.shape == x.shape, out
    if dtype != torch.float32 or spatial is None or channels != 1 or (guided and not rows_ok):
        assert isinstance(out, ConfigError), out
