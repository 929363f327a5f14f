"""Fuzzing of data-parallel launches of `condiff train`: the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, the MPI names, CONDIFF_DDP_TIMEOUT), the backend and the number of data shards. Each bad
value is one ``error:`` line naming it and what is accepted, exit code 2, refused before any model is built or any
process group joined, and nothing is written."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from fuzzkit import TINY_RECIPE, expect_api_error, expect_cli_error, guarded, no_stray_temp_files

from condiff.cli.train import train_recipe
from condiff.training import distributed
from condiff.training.recipe import load_recipe

LAUNCH_VARS = (*distributed.RANK_VARS, *distributed.WORLD_VARS, *distributed.LOCAL_VARS, distributed.TIMEOUT_ENV)
OK = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

BAD_ENV = [
    ({"WORLD_SIZE": "two"}, ("WORLD_SIZE='two'", "positive integer")),
    ({"WORLD_SIZE": "0"}, ("WORLD_SIZE='0'", "positive integer")),
    ({"WORLD_SIZE": "2"}, ("WORLD_SIZE='2'", "RANK is not")),
    ({"WORLD_SIZE": "2", "RANK": "2", **OK}, ("RANK='2'", "[0, 1]")),
    ({"WORLD_SIZE": "2", "RANK": "-1", **OK}, ("RANK='-1'", "[0, 1]")),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "first", **OK}, ("LOCAL_RANK='first'", ">= 0")),
    ({"WORLD_SIZE": "2", "RANK": "1"}, ("MASTER_ADDR", "host name")),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, ("MASTER_PORT=''", "[1, 65535]")),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, ("MASTER_PORT='70000'",)),
    ({"WORLD_SIZE": "2", "RANK": "1", distributed.TIMEOUT_ENV: "0", **OK}, ("CONDIFF_DDP_TIMEOUT='0'", "positive")),
    ({"WORLD_SIZE": "2", "RANK": "1", distributed.TIMEOUT_ENV: "nan", **OK}, ("CONDIFF_DDP_TIMEOUT='nan'",)),
    ({"WORLD_SIZE": "2", "RANK": "1", distributed.TIMEOUT_ENV: "soon", **OK}, ("CONDIFF_DDP_TIMEOUT='soon'",)),
    ({"OMPI_COMM_WORLD_SIZE": "x"}, ("OMPI_COMM_WORLD_SIZE='x'", "positive integer")),
    ({"PMI_SIZE": "4", "PMI_RANK": "9", **OK}, ("PMI_RANK='9'", "[0, 3]")),
]


def launch(env: dict):
    """The environment of a launch: ``env`` and none of the launch variables the test process may have."""
    clean = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARS, "MASTER_ADDR", "MASTER_PORT")}
    return mock.patch.dict(os.environ, {**clean, **env}, clear=True)


@pytest.mark.parametrize("env,needles", BAD_ENV, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in BAD_ENV])
def test_bad_launch_environment_is_one_line(env, needles, tmp_path):
    out = tmp_path / "run"
    with launch(env):
        expect_cli_error(["train", str(TINY_RECIPE), "--out", str(out), "--steps", "2"], *needles)
    assert not out.exists() and no_stray_temp_files(tmp_path)


@pytest.mark.parametrize(
    "kwargs,env,needles",
    [
        ({"ddp_backend": "mpi"}, {}, ("--ddp-backend 'mpi'", "auto, gloo, nccl")),
        ({"ddp_backend": ""}, {}, ("--ddp-backend ''", "auto, gloo, nccl")),
        ({"ddp_backend": None}, {}, ("--ddp-backend None",)),
        ({"data_shards": 0}, {}, ("--data-shards", "[1, 4096]", "got 0")),
        ({"data_shards": True}, {}, ("--data-shards", "got True")),
        ({"data_shards": 2.0}, {}, ("--data-shards", "got 2.0")),
        ({"data_shards": 3}, {"WORLD_SIZE": "2", "RANK": "1", **OK}, ("multiple of the number of ranks (2)", "got 3")),
    ],
)
def test_bad_backend_or_shards_is_refused_before_anything_is_built(kwargs, env, needles, tmp_path):
    out = tmp_path / "run"
    with launch(env), mock.patch("condiff.cli.train.make_trainer", guarded):
        expect_api_error(train_recipe, load_recipe(TINY_RECIPE), out, progress=False, needles=needles, **kwargs)
    assert not out.exists()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the refusal of nccl on a CPU-only machine; with CUDA present nccl is valid input",
)
def test_nccl_without_a_gpu_names_what_is_accepted(tmp_path):
    with launch({}), mock.patch("condiff.cli.train.make_trainer", guarded):
        expect_api_error(
            train_recipe,
            load_recipe(TINY_RECIPE),
            tmp_path / "run",
            ddp_backend="nccl",
            needles=("--ddp-backend nccl", "CUDA", "accepted here: gloo, auto"),
        )


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--ddp-backend", "mpi"], ("--ddp-backend 'mpi'", "auto, gloo, nccl")),
        (["--data-shards", "0"], ("--data-shards", "got 0")),
        (["--data-shards", "x"], ("--data-shards", "'x'")),
    ],
)
def test_bad_cli_options(args, needles, tmp_path):
    out = tmp_path / "run"
    with launch({}):
        expect_cli_error(["train", str(TINY_RECIPE), "--out", str(out), *args], *needles)
    assert not out.exists()
