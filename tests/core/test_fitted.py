"""condiff.core.fitted: the weights digest, the fitted-for record and its check against a run, against exact
answers."""

import hashlib
import warnings

import pytest
import torch

from condiff.core.fitted import FittedFor, FitWarning, check_fitted, describe, weights_digest
from condiff.errors import ConfigError, InputFileError


def test_weights_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    """Exactly the sha256 of 'name|dtype|shape|' and the raw bytes of each state-dict entry in name order: the
    same for a copy, another for one changed value."""
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0]]))
        net.bias.fill_(0.5)
    want = hashlib.sha256()
    for name, t in (("bias", net.bias), ("weight", net.weight)):
        want.update(f"{name}|torch.float32|{tuple(t.shape)}|".encode())
        want.update(t.detach().numpy().tobytes())
    assert weights_digest(net) == want.hexdigest()
    other = torch.nn.Linear(2, 1)
    other.load_state_dict(net.state_dict())
    assert weights_digest(other) == want.hexdigest()
    with torch.no_grad():
        other.bias.fill_(0.25)
    assert weights_digest(other) != want.hexdigest()


def test_record_round_trips_and_malformed_records_are_one_line_errors():
    f = FittedFor("digits", "a" * 64, 3.0, 2, "uniform-t", (999.0, 500.0, 0.0))
    assert FittedFor.from_json(f.to_json(), "x") == f
    assert FittedFor.from_json({}, "x") == FittedFor()
    for bad in ({"cfg": "3"}, {"steps": 0}, {"grid": [1.0]}, {"model_weights": 7}, [1]):
        with pytest.raises(InputFileError, match=r"^'f\.json': its fitted-for") as e:
            FittedFor.from_json(bad, "'f.json'")
        assert "\n" not in str(e.value)


def test_check_compares_only_what_the_run_gives():
    """A run that gives nothing checks nothing; each aspect it gives is compared, and only the mismatched ones
    are named."""
    f = FittedFor("digits", "a" * 64, 3.0, 2, "uniform-t", (999.0, 500.0, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_fitted("F", f, FittedFor())
        check_fitted("F", f, FittedFor("renamed", "a" * 64, 3.0, 2, "uniform-t", (999.0, 500.0, 0.0)))
    with pytest.raises(ConfigError) as e:
        check_fitted("F", f, FittedFor(cfg=1.0, times=(999.0, 400.0, 0.0)))
    assert str(e.value) == (
        "F was fitted for cfg 3 and a grid of 2 'uniform-t' steps from t=999 to t=0, but this run uses cfg 1 and "
        "a grid of 2 steps from t=999 to t=0; refit it for this run, or give --allow-mismatch to use it anyway"
    )
    with pytest.warns(FitWarning) as w:
        check_fitted("F", f, FittedFor("other", "b" * 64), allow_mismatch=True)
    assert [str(x.message) for x in w] == [
        "F was fitted for model 'digits' (weights aaaaaaaaaaaa), but this run uses model 'other' (weights "
        "bbbbbbbbbbbb); used anyway (--allow-mismatch)"
    ]
    with pytest.warns(FitWarning) as w:
        check_fitted("F", FittedFor(cfg=3.0), FittedFor("other", "b" * 64, 3.0))
    assert [str(x.message) for x in w] == [
        "F does not record the weights it was fitted with (written before condiff recorded them), so it cannot "
        "be checked against model 'other' (weights bbbbbbbbbbbb)"
    ]
    assert describe(FittedFor(spacing="karras"), ["grid"]) == "the 'karras' spacing"
