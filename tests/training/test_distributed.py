"""Data-parallel training (condiff.training.distributed) on 2 gloo ranks, forked from the test process.

Oracles: 2 ranks with ``batch_size`` B each train as one process with the global batch 2B in 2 shards (gradient
accumulation over the same shards), so loss curve and weights are equal (bitwise: for 2 summands the all-reduce
adds in the one process's order); a job killed at a random moment (a rank's step, or rank 0 inside a checkpoint
write) stops on both ranks within seconds, and resumed ends with the weights of the uninterrupted job; every rank
but 0 writes nothing; the all-reduce moves exactly the gradient elements plus their flags and the loss per step.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import time
from pathlib import Path
from queue import Empty
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from condiff.cli.train import train_recipe
from condiff.core.files import load_tensors
from condiff.errors import CondiffError, ConfigError
from condiff.training import distributed, trainer
from condiff.training.recipe import load_recipe

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_digits.toml"
STEPS = 6
_R = load_recipe(FIXTURE)
RECIPE = dataclasses.replace(_R, train=dataclasses.replace(_R.train, steps=STEPS, batch_size=4, ckpt_every=2))
WAIT_S = 90  # a rank that neither ends nor reports by then hangs: the test fails (and kills it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(rank: int, world: int, port: int) -> dict:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
    }


def _no_writes(*_a, **_k):
    raise AssertionError("a rank other than 0 wrote a file")


def _rank_main(rank, port, out, queue, kwargs, die):
    """One rank: train RECIPE into ``out``; ``die`` = (rank, step, where) ends this process with os._exit at that
    step ("step": before computing it; "checkpoint": rank 0 inside writing that step's checkpoint)."""
    os.environ.update(_launch_env(rank, 2, port))
    if rank != 0:  # rank 0 alone writes: any write from another rank fails its run
        for name in ("atomic_dir", "atomic_write_json", "save_tensors"):
            setattr(trainer, name, _no_writes)
    if die is not None and die[0] == rank:
        _, at, where = die
        if where == "step":
            step = trainer.Trainer.train_step

            def dying_step(self):
                if self.step == at:
                    os._exit(9)
                return step(self)

            trainer.Trainer.train_step = dying_step
        else:
            save = trainer.save_tensors

            def dying_save(path, tensors, *a, **k):
                written = save(path, tensors, *a, **k)
                if f"step-{at:08d}" in str(path):
                    os._exit(9)
                return written

            trainer.save_tensors = dying_save
    t0 = time.perf_counter()
    try:
        tr = train_recipe(RECIPE, out, progress=False, **kwargs)
        queue.put((rank, "ok", tr.step_losses, tr.parallel.counter.as_dict(), time.perf_counter() - t0))
    except CondiffError as e:
        queue.put((rank, type(e).__name__, str(e), None, time.perf_counter() - t0))


def run_ranks(out: Path, die=None, **kwargs) -> dict:
    """Fork 2 ranks; their reports by rank (a rank that died reports nothing) and exit codes."""
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out, queue, kwargs, die)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline, reports, expected = time.monotonic() + WAIT_S, {}, 2 if die is None else 1
        while len(reports) < expected and time.monotonic() < deadline:
            try:
                rep = queue.get(timeout=0.5)
                reports[rep[0]] = rep
            except Empty:
                if all(p.exitcode is not None for p in procs):
                    break
        for p in procs:
            p.join(max(deadline - time.monotonic(), 1))
        codes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return {"reports": reports, "codes": codes}


def _weights(out: Path, step: int = STEPS, name: str = "model"):
    return load_tensors(out / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors")


def _rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    return num / den


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with the doubled batch in 2 shards, and the same job on 2 gloo ranks."""
    d = tmp_path_factory.mktemp("ddp")
    one = train_recipe(RECIPE, d / "one", progress=False, data_shards=2)
    two = run_ranks(d / "two")
    return d, one, two


def test_two_ranks_equal_one_process_with_the_doubled_batch(runs):
    d, one, two = runs
    assert two["codes"] == [0, 0], two
    for rank in (0, 1):
        _, status, losses, _, _ = two["reports"][rank]
        assert status == "ok"
        assert len(losses) == STEPS
        assert max(abs(a - b) / abs(a) for a, b in zip(losses, one.step_losses)) <= 1e-5, (losses, one.step_losses)
    assert _rel_diff(_weights(d / "one"), _weights(d / "two")) <= 1e-5
    assert _rel_diff(_weights(d / "one", name="ema"), _weights(d / "two", name="ema")) <= 1e-5
    assert (d / "two" / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((d / "two").glob(".*.tmp")) and not list((d / "two" / "checkpoints").glob(".*.tmp"))


def test_the_global_batch_holds_twice_the_rows_of_one_rank(runs):
    """The shards split one global order: the 2B rows of step s are the plain one-process batch of 2B."""
    fam, cfg = runs[1].model.family, RECIPE.train
    full, _ = fam.training_batch(3, 8, trainer.step_generator(cfg.seed, 3), cfg.seed, RECIPE.objective)
    half, _ = fam.training_batch(3, 4, trainer.step_generator(cfg.seed, 3), cfg.seed, RECIPE.objective)
    assert not torch.equal(full[4:], half)  # rank 1's shard is not a copy of rank 0's
    assert torch.equal(trainer.rows(full, 4, 8), full[4:])


def test_all_reduce_bytes_are_counted_exactly(runs):
    """One all-reduce per step of the float32 gradients, one flag per parameter and the loss."""
    _, one, two = runs
    numel, count = sum(p.numel() for p in one.params), len(one.params)
    counter = two["reports"][0][3]
    assert counter["calls"]["all_reduce"] == STEPS
    assert counter["bytes"]["all_reduce"] == STEPS * 4 * (numel + count + 1)
    assert counter["bytes"]["broadcast"] == 4 * sum(t.numel() for t in one.module.state_dict().values())


def test_killed_job_stops_every_rank_and_resumes_exactly(runs):
    d, _, _ = runs
    seed = int(os.environ.get("CONDIFF_KILL_SEED") or random.SystemRandom().randrange(10**6))  # to replay one
    rng = random.Random(seed)
    if rng.random() < 0.5:
        die = (rng.randrange(2), rng.randrange(STEPS), "step")
    else:
        die = (0, rng.choice(range(RECIPE.train.ckpt_every, STEPS + 1, RECIPE.train.ckpt_every)), "checkpoint")
    why = f"kill seed {seed}: rank {die[0]} at step {die[1]} ({die[2]})"
    out = d / f"killed-{seed}"
    t0 = time.monotonic()
    killed = run_ranks(out, die=die)
    assert killed["codes"][die[0]] == 9, (why, killed)
    survivor = 1 - die[0]
    assert killed["codes"][survivor] == 0 and time.monotonic() - t0 < WAIT_S, (why, killed)
    _, status, message, _, _ = killed["reports"][survivor]
    assert status == "RankStopped" and "another rank of this job stopped" in message, (why, message)
    assert "--resume" in message or "nothing to resume" in message, (why, message)
    if list((out / "checkpoints").glob("step-*")):  # one process must not silently change the job
        with pytest.raises(ConfigError, match="data shard"):
            train_recipe(RECIPE, out, progress=False, resume=True)
    resumed = run_ranks(out, resume=True)
    assert resumed["codes"] == [0, 0], (why, resumed)
    for name in ("model", "ema"):
        a, b = _weights(d / "two", name=name), _weights(out, name=name)
        assert all(torch.equal(a[k], b[k]) for k in a), (why, name)


def test_a_two_rank_job_resumes_on_one_process_with_its_shards(runs, tmp_path):
    """The job, not the launch, fixes the result: 2 ranks stop at step 2, one process with 2 shards finishes."""
    d, _, _ = runs
    first = run_ranks(tmp_path / "j", stop_after=2)
    assert first["codes"] == [0, 0], first
    train_recipe(RECIPE, tmp_path / "j", progress=False, resume=True, data_shards=2)
    a, b = _weights(d / "two"), _weights(tmp_path / "j")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _reduce_main(rank, port, queue):
    os.environ.update(_launch_env(rank, 2, port))
    par = distributed.setup("gloo")
    try:
        a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
        a.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # both ranks: summed
        if rank == 1:
            b.grad = torch.tensor([0.5, 0.25, 0.125])  # one rank: that rank's gradient
        scalars = par.reduce_gradients([a, b, c], torch.tensor([float(rank + 1), 10.0 * rank]))
        queue.put((rank, a.grad.tolist(), None if b.grad is None else b.grad.tolist(), c.grad, scalars.tolist()))
    finally:
        par.close()


def test_reduce_gradients_sums_and_keeps_missing_gradients_missing():
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_reduce_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        reports = sorted(queue.get(timeout=WAIT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(WAIT_S)
            if p.is_alive():
                p.kill()
    for _, a, b, c, scalars in reports:
        assert a == [3.0, 6.0, 9.0] and b == [0.5, 0.25, 0.125] and c is None and scalars == [3.0, 10.0]


def test_launch_env_reads_torchrun_and_mpi_names():
    env = distributed.launch_env({**_launch_env(1, 4, 29500), "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 4, 1, 29500)
    mpi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert distributed.launch_env(mpi).rank == 2
    assert distributed.launch_env({}) is None
    assert distributed.launch_env({"WORLD_SIZE": "1"}).rank == 0
    with mock.patch.dict(os.environ, {"WORLD_SIZE": "1", "RANK": "0"}):
        assert distributed.setup("auto") is None  # a world of one: plain single-process training
    assert distributed.resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def test_shard_generators_differ_from_the_step_stream():
    draw = lambda g: torch.randn(4, generator=g)  # noqa: E731
    base = draw(trainer.step_generator(3, 5))
    s0, s1 = draw(trainer.shard_generator(3, 5, 0)), draw(trainer.shard_generator(3, 5, 1))
    assert not torch.equal(base, s0) and not torch.equal(s0, s1)
    assert torch.equal(s1, draw(trainer.shard_generator(3, 5, 1)))
