"""`condiff sample --parallel distrifusion|pcpp`: each image sampled patch-parallel across the ranks of
``torchrun --nproc_per_node N -m condiff sample --parallel ...`` (condiff.parallel; docs/scale.md).

Every rank loads the model, draws the same noise (same seed) and runs the same solver and guidance; the network
of each evaluation is split into row bands (DistriFusion, or PCPP's neighbour exchange) and its output gathered,
so every rank holds the same samples; rank 0 writes the outputs. Without a launcher (one process) the network
runs whole and the option only records itself.
"""

from __future__ import annotations

import dataclasses

import typer

from condiff.errors import ConfigError, check_int, check_real, one_of

KEYS = ("mode", "warmup", "window", "split_batch")
BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def config_of(parallel: str | None, options: list[str] | None):
    """The PatchConfig of --parallel and its --parallel-opt KEY=VALUE pairs (None without --parallel); every bad
    value is one ConfigError naming it and what is accepted."""
    from condiff.parallel.patch import METHODS, MODES, PatchConfig

    if parallel is None:
        if options:
            raise ConfigError("--parallel-opt goes with --parallel distrifusion|pcpp")
        return None
    if parallel not in METHODS:
        raise one_of("--parallel", parallel, METHODS)
    values: dict = {"method": parallel}
    for item in options or []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise ConfigError(f"--parallel-opt must be KEY=VALUE with KEY one of {', '.join(KEYS)}, got {item!r}")
        if key not in KEYS:
            raise one_of("--parallel-opt key", key, KEYS)
        if key == "mode":
            if value not in MODES:
                raise one_of("--parallel-opt mode", value, MODES)
            values["mode"] = value
        elif key == "warmup":
            values["warmup_steps"] = check_int("--parallel-opt warmup", _number(value, int), lo=0, hi=100000)
        elif key == "window":
            if parallel != "pcpp":
                raise ConfigError("--parallel-opt window (PCPP's partial attention p) goes with --parallel pcpp")
            values["window"] = check_real("--parallel-opt window", _number(value, float), lo=0.0, hi=1000.0)
        else:
            if value.lower() not in BOOLS:
                raise ConfigError(f"--parallel-opt split_batch must be true or false, got {value!r}")
            values["split_batch"] = BOOLS[value.lower()]
    return PatchConfig(**values)


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        return text


class ParallelModel:
    """A loaded model whose ``denoiser`` is the patch-parallel one (everything else is the model's)."""

    def __init__(self, model, engine):
        self._model, self._engine = model, engine

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def denoiser(self):
        from condiff.parallel import ParallelDenoiser

        return ParallelDenoiser(self._model.denoiser, self._engine, root_of(self._model))


def root_of(model):
    """The network of a condiff model that receives the latent: its ``unet`` (the text encoder stays whole)."""
    module = model.module
    if "unet" not in module:
        raise ConfigError(f"--parallel needs a model with a UNet; the {model.family.name} model has none")
    return module["unet"]


def attach(model, config):
    """(model, engine): the model with its patch-parallel denoiser and the engine (joins torchrun's process
    group; one process: the network runs whole). (model, None) without --parallel."""
    if config is None:
        return model, None
    from condiff.parallel import PatchEngine
    from condiff.parallel.launch import from_env

    root_of(model)
    _, world = from_env()
    if world == 1:
        typer.echo("--parallel: one process (no torchrun), so the network runs whole", err=True)
    engine = PatchEngine(config)
    return ParallelModel(model, engine), engine


def writes(engine) -> bool:
    """Whether this rank writes the outputs (rank 0, or no --parallel)."""
    return engine is None or engine.rank == 0


def describe(engine) -> dict:
    """The sidecar's record of the parallel run: settings, and bytes sent per network evaluation summed over
    the ranks, per kind (attention K/V, convolution halos, GroupNorm moments, the output gather)."""
    if engine is None:
        return {}  # without --parallel the sidecar is unchanged
    from condiff.parallel.comm import total_over_ranks

    engine.close()
    kinds = ("kv", "halo", "gn", "output")
    steps = engine.counter.steps
    after = [s for s, sync in zip(steps, engine.synchronous) if not sync] or steps
    mean = [sum(s.get(k, 0) for s in after) / max(1, len(after)) for k in kinds]
    total = [float(engine.counter.bytes.get(k, 0)) for k in kinds]
    summed = total_over_ranks(mean + total)
    return {
        **engine.describe(),
        "parallel_config": dataclasses.asdict(engine.config),
        "bytes_per_evaluation_after_warmup": dict(zip(kinds, summed[:4])),
        "bytes_total": dict(zip(kinds, summed[4:])),
    }
