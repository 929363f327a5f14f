"""Tiny real diffusers pipelines (random weights) saved once per session into temporary folders."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The CLI sets torch's thread count (--threads, default OMP_NUM_THREADS), also on runs that then fail: keep
    every test here on one core (two threads on the shared cores made later tests 100x slower)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A StableDiffusionPipeline folder (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer
    whose vocab.json / merges.txt are written by condiff.interop.tiny, SD v1's PNDM scheduler config)."""
    from condiff.interop.tiny import build_tiny_sd

    torch.set_num_threads(1)
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A DiTPipeline folder (DiTTransformer2DModel with learned sigma, AutoencoderKL, DDIM scheduler)."""
    from condiff.interop.tiny import build_tiny_dit

    return build_tiny_dit(tmp_path_factory.mktemp("tiny_dit") / "pipe")


@pytest.fixture(scope="session")
def sd(tiny_sd_dir):
    """The tiny SD folder loaded through condiff (shared: tests must not change its scheduler)."""
    from condiff.interop import load_pipeline

    return load_pipeline(tiny_sd_dir)


@pytest.fixture(scope="session")
def dit(tiny_dit_dir):
    from condiff.interop import load_pipeline

    return load_pipeline(tiny_dit_dir)
