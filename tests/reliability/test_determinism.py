"""Same seed, same bits, across two separate processes: samples for every solver, every inversion and editing
method (invert, then edit), and a short training run."""

import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_digits.toml"

SCRIPT = r"""
import hashlib, json, sys, torch
torch.set_num_threads(1)
from condiff.evaluation.evaluate import generate
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers import SOLVERS
from condiff.training.recipe import load_recipe
from condiff.cli.train import train_recipe
silence_diffusers()
m = load_model("digits")
out = {}
for name, cls in SOLVERS.items():
    x, _ = generate(m, torch.arange(4), cls(), 3, 2.0, torch.Generator().manual_seed(11))
    out[name] = hashlib.sha256(x.numpy().tobytes()).hexdigest()
from condiff.data import shapes, text
from condiff.core.grids import make_grid
from condiff.inversion import METHODS, get_method
fast = {"null-text": {"inner_steps": 2}, "dci": {"iterations": 2}}
s = load_model("shapes")
b = shapes.sample_batch(2, torch.Generator().manual_seed(5))
src = s.condition(text.attrs_to_tokens(b.attrs))
tgt = s.condition(text.tokenize_batch(["large blue square center", "small red circle"]))
grid = make_grid(s.schedule, 4)
for name in METHODS:
    meth = get_method(name, **fast.get(name, {}))
    g = torch.Generator().manual_seed(3)
    state = meth.invert(s.denoiser, grid, b.images, src, g)
    with torch.no_grad():
        x = meth.sample(s.denoiser, state, tgt, g)
    out["edit:" + name] = hashlib.sha256(x.numpy().tobytes()).hexdigest()
tr = train_recipe(load_recipe(sys.argv[1]), sys.argv[2], steps=4, progress=False)
h = hashlib.sha256()
for k, v in sorted(tr.module.state_dict().items()):
    h.update(k.encode()); h.update(v.numpy().tobytes())
out["training"] = h.hexdigest()
print(json.dumps(out))
"""


def _run(tmp_path, tag):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(FIXTURE), str(tmp_path / tag)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_two_processes_give_identical_bits(tmp_path):
    from condiff.solvers import SOLVERS

    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    from condiff.inversion import METHODS

    assert set(a) == set(SOLVERS) | {"training"} | {"edit:" + name for name in METHODS}
    assert a == b
