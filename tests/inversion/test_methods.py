"""condiff.inversion.methods: editing methods as objects, their options, labels and inversion files.

Every registered method survives invert -> save_inverted -> load_inverted -> sample unchanged (bit for
bit); get_method refuses unknown names, unknown options and wrongly typed values with one-line
ConfigErrors; edit-friendly's reconstruction is exact on the toy model.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from condiff.core.grids import make_grid
from condiff.errors import ConfigError, InputFileError
from condiff.inversion import METHODS, EditMethod, get_method, load_inverted, save_inverted

N = 8
# options that fit the toy MLP where a default needs a real UNet (feature injection names UNet layers)
TOY_OPTIONS = {"pnp": {"layers": ""}}


def toy_method(name):
    return get_method(name, **TOY_OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_round_trips_through_its_file(toy, tmp_path, name):
    """invert -> save_inverted -> load_inverted keeps the method, grid, tensors (bit for bit) and info, and
    sampling the loaded state with a target condition (same generator seed) equals sampling the
    in-memory state bit for bit; the output has the image's shape and dtype."""
    m = toy(torch.float64)
    x0, src, tgt = m.x0(3), m.cond(3), m.cond(3, seed=9)
    grid = make_grid(m.schedule, N)
    method = toy_method(name)
    state = method.invert(m.denoiser, grid, x0, src, torch.Generator().manual_seed(0))
    path = tmp_path / f"{name}.safetensors"
    save_inverted(state, path, {"note": "test"})
    loaded, meta = load_inverted(path)
    assert loaded.method == state.method == name
    assert meta["note"] == "test" and meta["method"] == name
    assert loaded.grid.dtype == torch.float64 and torch.equal(loaded.grid, state.grid)
    assert loaded.info == state.info
    assert sorted(loaded.tensors) == sorted(state.tensors)
    for k, v in state.tensors.items():
        assert torch.equal(loaded.tensors[k], v) and loaded.tensors[k].dtype == v.dtype
    before = method.sample(m.denoiser, state, tgt, torch.Generator().manual_seed(1))
    after = method.sample(m.denoiser, loaded, tgt, torch.Generator().manual_seed(1))
    assert torch.equal(before, after)
    assert before.shape == x0.shape and before.dtype == x0.dtype


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_edit_friendly_reconstruct_is_exact_on_the_toy(toy, tmp_path, dtype, bound, eta):
    """EditFriendly.reconstruct (the maps replayed at cfg_src with the source condition) returns x0 to
    < 1e-5 in float32 and < 1e-10 in float64, also after a save/load; and sampling with target = source,
    cfg = cfg_src and skip = 0 is that reconstruction, bit for bit."""
    m = toy(dtype)
    x0, src = m.x0(4), m.cond(4)
    method = get_method("edit-friendly", cfg_src=3.5, cfg=3.5, eta=eta)
    state = method.invert(m.denoiser, make_grid(m.schedule, 20), x0, src, torch.Generator().manual_seed(0))
    rec = method.reconstruct(m.denoiser, state, src)
    assert (rec - x0).abs().max().item() < bound
    save_inverted(state, tmp_path / "ef.safetensors")
    loaded, _ = load_inverted(tmp_path / "ef.safetensors")
    assert (method.reconstruct(m.denoiser, loaded, src) - x0).abs().max().item() < bound
    assert torch.equal(method.sample(m.denoiser, state, src), rec)


def test_edit_friendly_repo_mode_reconstruct_misses_by_the_final_residual(toy):
    """With exact=False the stored residual is zero and the reconstruction misses x0 by the final step's
    residual (nonzero on the toy), which exact mode stores."""
    m = toy(torch.float64)
    x0, src = m.x0(4), m.cond(4)
    grid = make_grid(m.schedule, 20)
    ex = get_method("edit-friendly").invert(m.denoiser, grid, x0, src, torch.Generator().manual_seed(0))
    repo_method = get_method("edit-friendly", exact=False)
    repo = repo_method.invert(m.denoiser, grid, x0, src, torch.Generator().manual_seed(0))
    assert not bool(repo.tensors["residual"].any())
    miss = x0 - repo_method.reconstruct(m.denoiser, repo, src)
    assert torch.allclose(miss, ex.tensors["residual"], rtol=0, atol=1e-12)
    assert miss.abs().max().item() > 1e-2


def test_unknown_method_is_refused_with_the_accepted_names():
    """An unknown method name is a ConfigError that names it and lists every registered method."""
    with pytest.raises(ConfigError) as e:
        get_method("p2p")
    assert "'p2p'" in str(e.value) and all(name in str(e.value) for name in METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_option_is_refused_by_name(name):
    """An option a method does not have is a ConfigError naming it and the accepted ones."""
    with pytest.raises(ConfigError, match="unknown option 'bogus'.*accepted: ") as e:
        get_method(name, bogus=1)
    assert all(f.name in str(e.value) for f in dataclasses.fields(METHODS[name]))


@pytest.mark.parametrize(
    "name, options",
    [
        ("ddim", {"cfg": "3"}),
        ("ddim", {"cfg": True}),
        ("ddim", {"invert_cfg": None}),
        ("edit-friendly", {"skip": 1.5}),
        ("edit-friendly", {"skip": True}),
        ("edit-friendly", {"exact": 1}),
        ("null-text", {"inner_steps": 2.0}),
        ("dci", {"lam": "1"}),
        ("sdedit", {"strength": [0.5]}),
    ],
)
def test_wrongly_typed_option_is_refused(name, options):
    """An option of the wrong type (bools are not numbers, floats are not integers, strings are not
    numbers) is a ConfigError naming the option and the expected type."""
    ((key, value),) = options.items()
    with pytest.raises(ConfigError, match=f"option {key} of '{name}' must be a"):
        get_method(name, **options)


@pytest.mark.parametrize(
    "name, options",
    [
        ("ddim", {"cfg": float("nan")}),
        ("edit-friendly", {"eta": 0.0}),
        ("edit-friendly", {"eta": 1.5}),
        ("edit-friendly", {"skip": -1}),
        ("null-text", {"inner_steps": -2}),
        ("dci", {"iterations": -1}),
        ("sdedit", {"strength": 0.0}),
        ("sdedit", {"strength": 1.2}),
    ],
)
def test_out_of_range_option_is_refused(name, options):
    """Well-typed but out-of-range values are refused when the method is built (ConfigError)."""
    with pytest.raises(ConfigError):
        get_method(name, **options)


def test_integer_for_a_float_option_is_accepted_as_float():
    """An integer where a float is expected is converted (cfg=7 -> 7.0)."""
    method = get_method("ddim", cfg=7)
    assert method.cfg == 7.0 and isinstance(method.cfg, float)


def test_get_method_returns_the_registered_class_with_its_defaults():
    """get_method(name) builds METHODS[name] with every option at its default; each method is an
    EditMethod whose name is its registry key."""
    for name, cls in METHODS.items():
        method = get_method(name)
        assert type(method) is cls and isinstance(method, EditMethod) and method.name == name
        assert method.options() == {f.name: f.default for f in dataclasses.fields(cls)}


def test_label_names_the_changed_options_in_field_order():
    """label is the bare name at the defaults, else name(option=value, ...) for the changed options only,
    in declaration order, with the stored (converted) values."""
    assert get_method("edit-friendly").label == "edit-friendly"
    assert get_method("edit-friendly", skip=5).label == "edit-friendly(skip=5)"
    assert get_method("ddim", invert_cfg=2, cfg=7.5).label == "ddim(cfg=7.5, invert_cfg=2.0)"
    assert get_method("ddim", cfg=3.0).label == "ddim"
    assert get_method("sdedit", strength=0.3).label == "sdedit(strength=0.3)"
    for name in METHODS:
        assert get_method(name).label == name


def test_load_inverted_refuses_files_that_are_not_inversions(tmp_path):
    """A missing file, a safetensors file without condiff metadata and one naming an unknown method are
    InputFileErrors naming the path."""
    with pytest.raises(InputFileError, match="not found"):
        load_inverted(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(InputFileError, match="not a condiff inversion file"):
        load_inverted(plain)
    odd = tmp_path / "odd.safetensors"
    save_file({"x": torch.zeros(2)}, str(odd), metadata={"condiff_inversion": '{"method": "p2p", "grid": [1.0, 0.0]}'})
    with pytest.raises(InputFileError, match="unknown method 'p2p'"):
        load_inverted(odd)
