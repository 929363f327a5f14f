"""SDA (Guo et al., "Everything to the Synthetic: Diffusion-driven Test-time Adaptation via Synthetic-Domain
Alignment", CVPR 2025) on digits-C (condiff.data.digits_c): the digits-specific part of ``condiff adapt`` and
benchmarks/sda.py. The method itself is condiff.tasks.sda.

- The source classifier is the digits scorer (condiff.data.digits.scorer(), a scikit-learn MLP on the 256 pixels)
  carried over exactly into torch (``scorer_net``: the same weights, the same clamp to [-1, 1]), so that a copy of
  it can be fine-tuned.
- The projection (DDA / DiffPure style, the paper's Sec. 3.1) is the bundled digits model run unconditionally (the
  null label 10): x_t* = alpha(t*) x + sigma(t*) eps, then ``steps`` DDIM steps back to clean, each followed by
  DDA's structure guidance (Gao et al., CVPR 2023, eq. 6; condiff.tasks.sda) when ``structure_factor`` D > 0 and
  ``structure_weight`` w > 0. The same projection is used on the synthetic digits and at test time.
- Stage 1 (the paper's Sec. 3.2, Mix of Diffusion): ``synthetic`` class-conditional samples of the same model
  (labels 0..9, balanced), passed through the same unconditional projection; the scorer copy fine-tuned on them
  with cross-entropy (Adam). With ``mix_real`` the scorer's own 1347 training digits, passed through the same
  projection, are added (a variant: the paper fine-tunes on synthetic data only).
- Stage 2: the test image projected, classified by the fine-tuned copy, the probabilities averaged with the source
  scorer's on the original image (the paper's ensemble).

The comparison (one table, per corruption x severity and averaged): the source scorer on the corrupted image,
plain purification (the source scorer on the projected image), purification ensembled with the source on the
original (DDA's input ensemble, the same averaging SDA uses), SDA without and with the ensemble.

The 450 held-out digits are split once (a fixed permutation, seed 0) into a validation part (the first
``VALIDATION`` of the permutation: the projection's t* is chosen there) and the test part (the other 300: the
reported table). Neither part was seen by the scorer or by the diffusion model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from condiff.data import digits, digits_c
from condiff.errors import ConfigError

VALIDATION = 150
SPLIT_SEED = 0
BATCH = 512
SYNTH_BATCH = 250
METHODS = ("source", "purified", "purified_ensemble", "sda_adapted", "sda")
METHOD_LABELS = {
    "source": "source scorer",
    "purified": "diffusion purification",
    "purified_ensemble": "purification + source ensemble",
    "sda_adapted": "SDA fine-tuned (projected only)",
    "sda": "SDA (fine-tuned + source ensemble)",
}


@dataclass(frozen=True)
class Settings:
    """The experiment's knobs (the defaults are the ones chosen on the validation part; benchmarks/sda.py)."""

    t_star: float = 300.0
    steps: int = 5
    structure_factor: int = 2
    structure_weight: float = 0.5
    synthetic: int = 1000
    synthesis_steps: int = 20
    epochs: int = 30
    lr: float = 1e-3
    mix_real: bool = True
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ScorerNet(nn.Module):
    """The digits scorer (an MLP(256) with ReLU, scikit-learn's ``MLPClassifier``) as a torch module: clamp to
    [-1, 1], flatten, Linear(256, 256), ReLU, Linear(256, 10); returns logits (its arg-max is the scorer's
    ``predict``)."""

    def __init__(self, hidden: int = 256, pixels: int = digits.SIZE * digits.SIZE, classes: int = digits.NUM_CLASSES):
        super().__init__()
        self.hidden = nn.Linear(pixels, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.clamp(-1, 1).flatten(1))))


def scorer_net() -> ScorerNet:
    """A fresh torch copy of ``digits.scorer()`` (float32), in eval mode."""
    clf = digits.scorer().clf
    if clf.activation != "relu" or len(clf.coefs_) != 2:
        raise ConfigError(f"the digits scorer must be a one-hidden-layer ReLU MLP, got {clf.activation}")
    net = ScorerNet(clf.coefs_[0].shape[1], clf.coefs_[0].shape[0], clf.coefs_[1].shape[1])
    with torch.no_grad():
        net.hidden.weight.copy_(torch.from_numpy(clf.coefs_[0].T))
        net.hidden.bias.copy_(torch.from_numpy(clf.intercepts_[0]))
        net.out.weight.copy_(torch.from_numpy(clf.coefs_[1].T))
        net.out.bias.copy_(torch.from_numpy(clf.intercepts_[1]))
    return net.eval()


class NullLabel:
    """The digits model run unconditionally: every call gets the null label (10) for each row."""

    def __init__(self, m):
        self.m = m
        self.inner = m.denoiser

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, x, t, cond=None):
        return self.inner(x, t, {"class_labels": self.m.family.null_raw(x.shape[0])})


def split_sizes() -> tuple[int, int]:
    """(validation, test) image counts of ``split``."""
    n = int(digits.load_split()["x_test"].shape[0])
    return VALIDATION, n - VALIDATION


def split() -> dict[str, torch.Tensor]:
    """The held-out digits split into validation (``VALIDATION`` images) and test (the rest), fixed."""
    s = digits.load_split()
    x, y = s["x_test"], s["y_test"]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    v, t = perm[:VALIDATION], perm[VALIDATION:]
    return {"x_val": x[v], "y_val": y[v], "x_test": x[t], "y_test": y[t]}


def _batches(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[i : i + BATCH]) for i in range(0, x.shape[0], BATCH)])


@torch.no_grad()
def project_images(m, x: torch.Tensor, projection, seed: int) -> torch.Tensor:
    """``tasks.sda.project`` with the unconditional digits model, in batches, noise from a generator seeded
    ``seed``."""
    from condiff.core.sampling import Gaussian
    from condiff.tasks import sda

    noise = Gaussian(torch.Generator().manual_seed(seed))
    uncond = NullLabel(m)
    return _batches(lambda b: sda.project(uncond, b, projection, noise), x)


def projection_of(settings: Settings):
    from condiff.solvers.ddim import DDIM
    from condiff.tasks import sda

    return sda.Projection(
        float(settings.t_star),
        int(settings.steps),
        DDIM(),
        structure_factor=int(settings.structure_factor) or None,
        structure_weight=float(settings.structure_weight),
    )


@torch.no_grad()
def synthesize(m, settings: Settings, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``settings.synthetic`` class-conditional samples (balanced labels, shuffled with the seed) of the digits
    model, ``settings.synthesis_steps`` DDIM steps each: SDA's synthetic source data before the projection."""
    from condiff.core.sampling import Gaussian
    from condiff.tasks import sda

    g = torch.Generator().manual_seed(settings.seed)
    labels = torch.arange(settings.synthetic) % digits.NUM_CLASSES
    labels = labels[torch.randperm(settings.synthetic, generator=g)]
    noise = Gaussian(g)
    shape = (1, digits.SIZE, digits.SIZE)
    starts = range(0, settings.synthetic, SYNTH_BATCH)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="synthesis", leave=False)
    parts = [
        sda.synthesize(m.denoiser, labels[i : i + SYNTH_BATCH], shape, settings.synthesis_steps, noise=noise)
        for i in starts
    ]
    images = torch.cat(parts)
    return images, labels


def adapt(
    m,
    source: nn.Module,
    settings: Settings,
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
    cache: dict | None = None,
):
    """SDA's stage 1: synthesise (or take ``synthetic``), project with the test-time projection (MoD; with
    ``settings.mix_real`` the scorer's real training digits are projected the same way and added), fine-tune a
    copy of ``source``. Returns (adapted, info). ``cache`` (a dict) keeps the projected images across calls that
    share the projection and the synthetic set (the benchmark's fine-tuning variants)."""
    from condiff.tasks import sda

    t0 = time.process_time()
    images, labels = synthetic if synthetic is not None else synthesize(m, settings, progress)
    t1 = time.process_time()
    projection = projection_of(settings)
    cache = {} if cache is None else cache
    key = (projection, settings.seed, settings.synthetic, settings.synthesis_steps)
    if ("synthetic",) + key not in cache:
        cache[("synthetic",) + key] = project_images(m, images, projection, settings.seed + 1)
    projected = cache[("synthetic",) + key]
    if settings.mix_real:
        real = digits.load_split()
        if ("real",) + key not in cache:
            cache[("real",) + key] = project_images(m, real["x_train"], projection, settings.seed + 2)
        projected = torch.cat([projected, cache[("real",) + key]])
        labels = torch.cat([labels, real["y_train"].long()])
    t2 = time.process_time()
    torch.manual_seed(settings.seed)
    adapted, history = sda.finetune(
        source, projected, labels, settings.epochs, settings.lr, 128, torch.Generator().manual_seed(settings.seed)
    )
    t3 = time.process_time()
    info = {
        "synthetic_scorer_accuracy": sda.accuracy(source(images), labels[: images.shape[0]]),
        "projected_synthetic_source_accuracy": sda.accuracy(
            source(projected[: images.shape[0]]), labels[: images.shape[0]]
        ),
        "finetune_images": int(projected.shape[0]),
        "loss_first": history[0],
        "loss_last": history[-1],
        "cpu_seconds": {"synthesis": t1 - t0, "projection": t2 - t1, "finetune": t3 - t2},
    }
    return adapted, info


def projection_seed(seed: int, corruption_index: int, severity: int) -> int:
    """The seed of the projection noise of one corruption (its index in the evaluated list) and severity."""
    return (seed * 7919 + 1000 * (corruption_index + 1) + severity) % (2**63 - 1)


@torch.no_grad()
def corrupt_and_project(
    m,
    settings: Settings,
    x: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int],
) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(corruption, severity, corrupted, projected) per cell: the corruption drawn with
    ``digits_c.corrupt(name, x, severity, settings.seed)``, the projection (``settings``' t*, steps and structure
    guidance) with its noise seeded from the seed, the corruption and the severity."""
    projection = projection_of(settings)
    cells = []
    for ci, name in enumerate(corruptions):
        for s in severities:
            xc = digits_c.corrupt(name, x, s, settings.seed)
            cells.append((name, s, xc, project_images(m, xc, projection, projection_seed(settings.seed, ci, s))))
    return cells


@torch.no_grad()
def score_cells(source: nn.Module, adapted: nn.Module | None, cells, y: torch.Tensor) -> list[dict]:
    """Each method's accuracy (``METHODS``; the SDA ones only with ``adapted``) on each cell of
    ``corrupt_and_project``."""
    from condiff.tasks import sda

    rows = []
    for name, s, xc, xp in cells:
        p_src, p_pur = source(xc).softmax(-1), source(xp).softmax(-1)
        row = {
            "corruption": name,
            "severity": s,
            "source": sda.accuracy(p_src, y),
            "purified": sda.accuracy(p_pur, y),
            "purified_ensemble": sda.accuracy((p_src + p_pur) / 2, y),
        }
        if adapted is not None:
            row["sda_adapted"] = sda.accuracy(sda.predict(source, adapted, xc, xp, ensemble=False), y)
            row["sda"] = sda.accuracy(sda.predict(source, adapted, xc, xp, ensemble=True), y)
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate(
    m,
    source: nn.Module,
    adapted: nn.Module | None,
    settings: Settings,
    x: torch.Tensor,
    y: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int],
    progress: Callable | None = None,
) -> list[dict]:
    """Accuracy of each method (``METHODS``; the SDA ones only with ``adapted``) per corruption x severity
    (``corrupt_and_project`` then ``score_cells``, one cell at a time; ``progress(row)`` after each)."""
    rows = []
    for ci, name in enumerate(corruptions):
        for s in severities:
            xc = digits_c.corrupt(name, x, s, settings.seed)
            xp = project_images(m, xc, projection_of(settings), projection_seed(settings.seed, ci, s))
            row = score_cells(source, adapted, [(name, s, xc, xp)], y)[0]
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def averages(rows: list[dict]) -> dict[str, float]:
    """Each method's accuracy averaged over the rows (corruptions x severities)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in METHODS if rows and k in rows[0]}


def format_table(rows: list[dict], means: dict[str, float]) -> str:
    """The rows and the average as a Markdown table (one column per method)."""
    methods = [k for k in METHODS if k in means]
    head = "| corruption | severity | " + " | ".join(METHOD_LABELS[k] for k in methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for r in rows:
        lines.append(f"| {r['corruption']} | {r['severity']} | " + " | ".join(f"{r[k]:.3f}" for k in methods) + " |")
    lines.append("| **average** | | " + " | ".join(f"**{means[k]:.3f}**" for k in methods) + " |")
    return "\n".join(lines)


# the adapted classifier on disk (`condiff adapt --save DIR` / `--classifier DIR`) --------------------------------
TABLE = "sda_digits"
WEIGHTS = "classifier.safetensors"


def save_adapted(adapted: nn.Module, settings: Settings, directory, extra: dict | None = None) -> None:
    """``DIR/classifier.safetensors`` (the fine-tuned scorer copy) and ``DIR/condiff.json`` (a "sda_digits" table
    with the settings it was adapted with), written atomically."""
    from pathlib import Path

    from condiff.core.files import atomic_dir, atomic_write_json, save_tensors

    with atomic_dir(Path(directory)) as tmp:
        save_tensors(tmp / WEIGHTS, {k: v.detach().contiguous() for k, v in adapted.state_dict().items()})
        atomic_write_json(tmp / "condiff.json", {TABLE: settings.as_dict(), **(extra or {})})


def load_adapted(directory, what: str = "--classifier") -> tuple[ScorerNet, Settings]:
    """The classifier ``save_adapted`` wrote and its settings. Pickled files are refused before anything is read;
    a folder without a valid "sda_digits" table, or weights that do not fit a ScorerNet, is one InputFileError."""
    from pathlib import Path

    from condiff.core.files import load_json, load_tensors, refuse_pickles
    from condiff.errors import InputFileError

    path = Path(directory)
    accepted = "a folder written by `condiff adapt --save DIR` (condiff.json and classifier.safetensors)"
    if not str(directory) or not path.exists():
        raise InputFileError(f"{what} {str(path)!r} does not exist; accepted: {accepted}")
    if not path.is_dir():
        raise InputFileError(f"{what} {str(path)!r} is not a folder; accepted: {accepted}")
    refuse_pickles(path, what)
    if not (path / "condiff.json").is_file():
        raise InputFileError(f"{what} {str(path)!r} has no condiff.json; accepted: {accepted}")
    try:
        info = load_json(path / "condiff.json", what)
    except InputFileError as e:
        raise InputFileError(f"{what}: {e}" if not str(e).startswith(what) else str(e)) from None
    table = info.get(TABLE) if isinstance(info, dict) else None
    try:
        if not isinstance(table, dict) or set(table) != set(Settings().as_dict()):
            raise ConfigError(f"needs a {TABLE!r} table with the keys {', '.join(Settings().as_dict())}")
        settings = check_settings(Settings(**table))
    except ConfigError as e:
        raise InputFileError(f"{what} {str(path)!r}: condiff.json: {e}") from None
    try:
        weights = load_tensors(path / WEIGHTS, what)
    except InputFileError as e:
        raise InputFileError(f"{what}: {e}" if not str(e).startswith(what) else str(e)) from None
    net = ScorerNet()
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:150]
        raise InputFileError(f"{what} {str(path)!r}: {WEIGHTS} does not fit the digits scorer ({first})") from None
    if any(not torch.isfinite(p).all() for p in net.parameters()):
        raise InputFileError(f"{what} {str(path)!r}: {WEIGHTS} holds non-finite weights")
    return net.eval(), settings


MAX_SYNTHETIC = 100_000
MAX_STEPS = 1000
MAX_EPOCHS = 1000
MAX_WEIGHT = 100.0


def check_settings(s: Settings, t_range: tuple[float, float] = (0.0, 999.0), as_options: bool = False) -> Settings:
    """Every knob in range (``t_range``: the schedule's (t_min, t_max]); one ConfigError naming the bad one (as the
    CLI option, --t-star, with ``as_options``)."""
    from condiff.errors import check_int, check_real

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if as_options else key

    lo, hi = t_range
    check_real(
        name("t_star"), s.t_star, lo, hi, accepted=f"a time in ({lo:g}, {hi:g}] of the model's schedule", lo_open=True
    )
    check_int(name("steps"), s.steps, 1, MAX_STEPS)
    factors = [d for d in range(digits.SIZE + 1) if d == 0 or digits.SIZE % d == 0]
    if isinstance(s.structure_factor, bool) or s.structure_factor not in factors:
        raise ConfigError(
            f"{name('structure_factor')} must be one of {', '.join(map(str, factors))} (0: no structure guidance; "
            f"others divide the {digits.SIZE}-pixel side), got {s.structure_factor!r}"
        )
    check_real(
        name("structure_weight"), s.structure_weight, 0.0, MAX_WEIGHT, accepted=f"a number in [0, {MAX_WEIGHT:g}]"
    )
    check_int(name("synthetic"), s.synthetic, digits.NUM_CLASSES, MAX_SYNTHETIC)
    check_int(name("synthesis_steps"), s.synthesis_steps, 1, MAX_STEPS)
    check_int(name("epochs"), s.epochs, 1, MAX_EPOCHS)
    check_real(name("lr"), s.lr, 0.0, 1.0, accepted="a number in (0, 1]", lo_open=True)
    if not isinstance(s.mix_real, bool):
        raise ConfigError(f"{name('mix_real')} must be true or false, got {s.mix_real!r}")
    check_int(name("seed"), s.seed, 0, 2**63 - 1)
    return s
