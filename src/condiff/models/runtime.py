"""Opt-in ways to run a loaded model's denoising network faster: channels_last memory format, bfloat16 autocast
and torch.compile.

Each acts on the network that every denoiser call runs (``model.module["unet"]``), in place, and keep its module
tree: parameter names, values and the state dict are unchanged (so ``weights_digest``, fitted-file checks,
exports and PAG's attention processors see the same network).

- ``use_channels_last(model)``: the network's 4-D weights in ``torch.channels_last`` (NHWC), a forward pre-hook
  that hands it its 4-D tensor inputs (x) in channels_last, and a forward hook that returns its output in the
  default contiguous format, so everything after the network (guidance, solvers) sees the layout it always saw.
  The arithmetic is the same up to the order of float32 sums inside the convolutions.
- ``use_bfloat16(model)``: the network's forward under ``torch.autocast`` in bfloat16 (Micikevicius et al. 2018,
  "Mixed Precision Training", sec. 3: weights kept in float32, matrix products and convolutions in 16 bits),
  its floating-point outputs cast back to float32. Its diffusers ``Attention`` modules keep float32
  (``Float32Attention``: CPU's fused attention kernel is about 3x slower in bfloat16 than in float32, measured
  on the shapes UNet, where the convolutions gain 1.8x). The weights are not touched; the outputs differ from
  float32 by bfloat16's 8-bit mantissa (relative error up to 2^-8 per product), so samples are close to eager's,
  not equal (docs/benchmarks.md has the measured speed).
- ``compile_network(model)``: ``nn.Module.compile`` (``torch.compile`` of the network's forward; the first call
  at each new input shape compiles). ``check_compile()`` compiles and runs a one-line function with the same
  backend first, so a build without a working compiler is a one-line ConfigError naming the cause, not a
  traceback in the middle of sampling.

The measured speed and the largest difference of the samples against eager: benchmarks/compile_speed.py and
docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from condiff.errors import ConfigError, one_line

NETWORK = "unet"  # the key of the denoising network in a LoadedModel's module (every diffusion family)
BACKEND = "inductor"


def network(model, label: str = "this option") -> torch.nn.Module:
    """The denoising network of a LoadedModel (``model.module['unet']``); a ConfigError naming ``label`` when
    the model has none (a classifier family)."""
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.ModuleDict) or NETWORK not in module:
        raise ConfigError(f"{label} needs a diffusion model with a '{NETWORK}' network")
    return module[NETWORK]


def _map_tensors(value, fn):
    """``fn`` applied to the tensors in ``value`` (a tensor, or one level of tuple / list / mapping / output
    object's ``sample``); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict) and not hasattr(value, "sample"):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    sample = getattr(value, "sample", None)
    if isinstance(sample, torch.Tensor):  # a diffusers output (UNet2DOutput): its sample, in place
        value.sample = fn(sample)
    return value


def _to_format(value, memory_format):
    """4-D tensors in ``value`` (see ``_map_tensors``) in ``memory_format``."""
    return _map_tensors(value, lambda v: v.contiguous(memory_format=memory_format) if v.dim() == 4 else v)


def _channels_last_inputs(module, args, kwargs):
    return _to_format(args, torch.channels_last), _to_format(kwargs, torch.channels_last)


def _contiguous_output(module, args, kwargs, output):
    return _to_format(output, torch.contiguous_format)


def _float32(v):
    """A floating tensor in float32; anything else as it is."""
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def use_channels_last(model, label: str = "channels_last"):
    """Run the model's denoising network in channels_last memory format (see the module docstring); returns the
    model (changed in place). Calling it twice changes nothing more."""
    net = network(model, label)
    if getattr(net, "_condiff_channels_last", False):
        return model
    net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
    net.register_forward_hook(_contiguous_output, with_kwargs=True)
    net._condiff_channels_last = True
    return model


class Float32Attention:
    """A diffusers attention processor that runs ``inner`` (the module's own processor) with autocast off and its
    tensor inputs in float32: the attention block of a network that otherwise runs under bfloat16 autocast."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        tensors = (hidden_states, encoder_hidden_states, attention_mask, temb)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.inner(attn, *(_float32(v) for v in tensors), *args, **kw)


def use_bfloat16(model, label: str = "bfloat16"):
    """Run the model's denoising network under bfloat16 autocast, its floating outputs cast back to float32
    (see the module docstring); returns the model (changed in place: the network's ``forward`` is wrapped, its
    weights and module tree stay as they are). Calling it twice changes nothing more."""
    net = network(model, label)
    if getattr(net, "_condiff_bfloat16", False):
        return model
    first = next(net.parameters(), None)
    device = "cpu" if first is None else first.device.type
    forward = net.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return _map_tensors(out, _float32)

    net.forward = autocast_forward
    for module in net.modules():  # diffusers Attention modules: attention in float32 (module docstring)
        if callable(getattr(module, "set_processor", None)) and hasattr(module, "processor"):
            module.set_processor(Float32Attention(module.processor))
    net._condiff_bfloat16 = True
    return model


def check_compile(label: str = "torch.compile", backend: str = BACKEND) -> None:
    """Compile and run a one-line function with ``backend``: a ConfigError naming the cause (no C++ compiler,
    an inductor error) where torch.compile does not work in this environment."""
    try:
        probe = torch.compile(lambda a: torch.sin(a) * 2.0 + 1.0, backend=backend, fullgraph=True)
        got = probe(torch.linspace(0.0, 1.0, 8))
    except Exception as err:  # any failure of the compiler stack: name its first line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = one_line(lines[0] if lines else type(err).__name__)
        raise ConfigError(f"{label}: torch.compile does not work here ({type(err).__name__}: {cause})") from None
    want = torch.sin(torch.linspace(0.0, 1.0, 8)) * 2.0 + 1.0
    if not torch.allclose(got, want, atol=1e-5):
        raise ConfigError(f"{label}: torch.compile gave wrong values on a one-line test function")


def compile_network(model, label: str = "torch.compile", backend: str = BACKEND, check: bool = True):
    """``torch.compile`` the model's denoising network in place (``nn.Module.compile``: the module tree and its
    weights stay as they are); returns the model. ``check``: run ``check_compile`` first."""
    net = network(model, label)
    if check:
        check_compile(label, backend)
    net.compile(backend=backend)
    return model


def run_faster(model, compile_net: bool = False, channels_last: bool = False, bf16: bool = False):
    """channels_last, then bfloat16, then torch.compile, each where asked, in the order `condiff sample|eval`
    applies them (errors name them by their flags: --channels-last, --bf16, --compile); returns the model."""
    if channels_last:
        use_channels_last(model, "--channels-last")
    if bf16:
        use_bfloat16(model, "--bf16")
    if compile_net:
        compile_network(model, "--compile")
    return model


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_LIMIT = 1 << 30  # tensors up to 1 GiB come from the heap and are reused, not mapped and unmapped


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make glibc's allocator keep freed blocks for reuse (allocations up to 1 GiB from the heap, no trimming of
    its top), so a loop that frees and re-allocates the same tensor sizes every step stops paying page faults
    for fresh zeroed pages: glibc's default maps each block over its (adaptive) mmap threshold and unmaps it
    when freed. The process keeps its peak heap until it exits. Returns whether it was applied: False where
    the C library is not glibc, or with ``enabled=False`` (``CONDIFF_ALLOCATOR=system``)."""
    if not enabled:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) == 1
    return mallopt(M_TRIM_THRESHOLD, 2 * HEAP_LIMIT) == 1 and ok
