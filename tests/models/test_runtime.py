"""condiff.models.runtime.keep_freed_memory: with it, a loop that frees and re-allocates a large tensor every
iteration stops taking page faults (glibc's default maps blocks over 32 MiB afresh every time); the CLI applies
it unless CONDIFF_ALLOCATOR=system. Each case runs in a fresh process, where the allocator starts at glibc's
defaults."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
from condiff.models.runtime import keep_freed_memory
print(keep_freed_memory(sys.argv[1] == "keep"))
x = torch.ones(1 << 24)  # 64 MiB: over glibc's largest adaptive mmap threshold (32 MiB)
for _ in range(5):
    (x * 2).sum()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    (x * 2).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
"""


def _faults(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1"}
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = _faults("keep")
    default_applied, default = _faults("system")
    assert applied == "True" and default_applied == "False"
    # glibc's default maps the 64 MiB block afresh each time: its pages fault again (16384 pages of 4 KiB, fewer
    # where the kernel backs it with huge pages); kept, the block is reused and nothing faults
    assert default >= 16, (kept, default)
    assert kept <= default / 20, (kept, default)
