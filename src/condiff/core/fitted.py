"""What a fitted file was made for, and the check of it against the run that uses it.

Statistics, ratios, coefficients, classifiers and inversions are fitted on one model's weights, at one CFG
scale, on one time grid: DPM-Solver-v3's EMS (Zheng et al. 2023) belong to a model and a guidance scale,
DC-Solver's ratios (Zhao et al. 2024) to a model and a grid spacing, LinearAG's coefficients (Castillo et al.
2025) to a model, a scale and a grid. Each such file records a ``FittedFor``: the model (its name, for
messages, and ``weights_digest`` of its weights), the CFG scale and the grid (steps, spacing, times).
``check_fitted`` compares it with what a run uses: a mismatch is a one-line ConfigError that names the file,
what it was fitted for and what the run uses; with ``allow_mismatch`` it is a one-line ``FitWarning``
instead. A file written before these records existed loads, with a ``FitWarning`` that it cannot be checked.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import torch

from condiff.errors import ConfigError, InputFileError, is_real

SHORT = 12  # hex digits of a weights digest shown in messages
GRID_RTOL = 1e-9


class FitWarning(UserWarning):
    """A fitted file used for another model, CFG scale or grid (allowed), or one that cannot be checked."""


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a loaded model's weights: its state dict's names, dtypes, shapes and bytes, in name order (the
    same for every load of the same weights, whatever the folder is called)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class FittedFor:
    """What a fitted file was made for, or what a run uses: the model (``model``, a name for messages;
    ``weights``, its ``weights_digest``), the CFG scale and the time grid (``steps``, ``spacing``, ``times``).
    None: not recorded (a file) or not checked (a run)."""

    model: str | None = None
    weights: str | None = None
    cfg: float | None = None
    steps: int | None = None
    spacing: str | None = None
    times: tuple[float, ...] | None = None

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "model_weights": self.weights,
            "cfg": self.cfg,
            "steps": self.steps,
            "spacing": self.spacing,
            "grid": None if self.times is None else list(self.times),
        }

    @classmethod
    def from_json(cls, obj, where: str) -> "FittedFor":
        """The record ``to_json`` wrote (missing keys: not recorded); a malformed one is an InputFileError."""
        if not isinstance(obj, dict):
            raise InputFileError(f"{where}: its fitted-for record must be a JSON object, got {type(obj).__name__}")

        def bad(key):
            return InputFileError(f"{where}: its fitted-for {key} is malformed, got {obj.get(key)!r}")

        for key in ("model", "model_weights", "spacing"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise bad(key)
        cfg, steps, grid = obj.get("cfg"), obj.get("steps"), obj.get("grid")
        if cfg is not None and not is_real(cfg):
            raise bad("cfg")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise bad("steps")
        if grid is not None and (not isinstance(grid, list) or len(grid) < 2 or not all(is_real(v) for v in grid)):
            raise bad("grid")
        return cls(
            obj.get("model"),
            obj.get("model_weights"),
            None if cfg is None else float(cfg),
            steps,
            obj.get("spacing"),
            None if grid is None else tuple(float(v) for v in grid),
        )


def grid_times(grid) -> tuple[float, ...] | None:
    """A time grid (tensor or sequence) as a tuple of floats, None for None."""
    return None if grid is None else tuple(float(v) for v in torch.as_tensor(grid, dtype=torch.float64).reshape(-1))


def same_times(a, b) -> bool:
    """Two time grids of the same length that agree to GRID_RTOL (relative and absolute)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=GRID_RTOL, abs_tol=GRID_RTOL) for x, y in zip(a, b))


def _model_text(f: FittedFor) -> str:
    name = f"model {f.model!r}" if f.model else "a model"
    return f"{name} (weights {f.weights[:SHORT]})" if f.weights else name


def _grid_text(f: FittedFor) -> str:
    steps = f.steps if f.steps is not None else (None if f.times is None else len(f.times) - 1)
    if steps is None:
        return f"the {f.spacing!r} spacing" if f.spacing else "a grid"
    text = f"a grid of {steps} {f.spacing!r} steps" if f.spacing else f"a grid of {steps} steps"
    if f.times is not None:
        text += f" from t={f.times[0]:g} to t={f.times[-1]:g}"
    return text


def _mismatches(fitted: FittedFor, run: FittedFor) -> list[str]:
    """The aspects the run gives (not None) that the file records differently."""
    out = []
    if run.weights is not None and fitted.weights is not None and run.weights != fitted.weights:
        out.append("model")
    if run.cfg is not None and fitted.cfg is not None and not math.isclose(run.cfg, fitted.cfg, abs_tol=1e-12):
        out.append("cfg")
    grid = run.steps is not None and fitted.steps is not None and run.steps != fitted.steps
    grid = grid or run.spacing is not None and fitted.spacing is not None and run.spacing != fitted.spacing
    grid = grid or run.times is not None and fitted.times is not None and not same_times(run.times, fitted.times)
    if grid:
        out.append("grid")
    return out


def describe(f: FittedFor, aspects=("model", "cfg", "grid")) -> str:
    """'model 'digits' (weights 0123456789ab), cfg 3 and a grid of 4 steps (...)' for the given aspects."""
    parts = {"model": _model_text(f), "cfg": f"cfg {f.cfg:g}" if f.cfg is not None else "", "grid": _grid_text(f)}
    words = [parts[a] for a in aspects if parts[a]]
    return ", ".join(words[:-1]) + (" and " if len(words) > 1 else "") + words[-1] if words else "nothing recorded"


def mismatch(
    where: str, fitted: str, run: str, allow_mismatch: bool = False, made: str = "fitted", redo: str = "refit it"
) -> None:
    """A file fitted for ``fitted`` used by a run with ``run``: a one-line ConfigError, or (``allow_mismatch``)
    a FitWarning. ``made`` and ``redo`` word the message ('{where} was {made} for ...; {redo} for this run')."""
    text = f"{where} was {made} for {fitted}, but this run uses {run}"
    if not allow_mismatch:
        raise ConfigError(f"{text}; {redo} for this run, or give --allow-mismatch to use it anyway")
    warnings.warn(f"{text}; used anyway (--allow-mismatch)", FitWarning, stacklevel=3)


def check_fitted(
    where: str,
    fitted: FittedFor,
    run: FittedFor,
    allow_mismatch: bool = False,
    made: str = "fitted",
    redo: str = "refit it",
) -> None:
    """Compare what a file was fitted for with what the run uses, for every aspect the run gives (a None field
    of ``run`` is not checked): the model's weights digest, the CFG scale, the grid (steps, spacing, times).
    A mismatch is ``mismatch``'s error (or warning); a run that gives the weights of a file that records none
    (written before condiff recorded them) gets a FitWarning that the file's model cannot be checked."""
    if run.weights is not None and fitted.weights is None:
        warnings.warn(
            f"{where} does not record the weights it was {made} with (written before condiff recorded them), so it "
            f"cannot be checked against {_model_text(run)}",
            FitWarning,
            stacklevel=2,
        )
    bad = _mismatches(fitted, run)
    if bad:
        mismatch(where, describe(fitted, bad), describe(run, bad), allow_mismatch, made, redo)
