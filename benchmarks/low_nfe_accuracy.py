"""The labeller's accuracy at the NFE of the terminal-error benchmark: condiff's searched grids beside the
peers' best schedulers, on the same conditions and starting noise.

`condiff bench solvers --model shapes --grid ...` gives each configuration's terminal error against a 1000-step
reference at NFE 5, 8 and 10 (docs/solvers.md, "Time grids searched on the model"). This script samples 512
random conditions (seed 0, cfg 3) with the same configurations at the same NFE and scores them with the exact
labeller (``all``: every attribute right), so the two can be read side by side. The peers are driven as in
benchmarks/time_to_quality.py (diffusers' pipeline pattern, k-diffusion's samplers).

    python benchmarks/low_nfe_accuracy.py --grid outputs/grids/shapes_unipc.json \
        --grid outputs/grids/shapes_dpmpp-2m_n64.json [--nfe 5,8,10] [--json outputs/bench/low_nfe_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import time_to_quality as ttq
import torch

from condiff.core.grids import Trailing
from condiff.models import runtime
from condiff.models.base import load_model, silence_diffusers
from condiff.solvers.grid_search import check_grids_fit, load_grids

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--grid", action="append", default=[], type=Path, help="a grids file (condiff grid search)")
    ap.add_argument("--nfe", default="5,8,10")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "low_nfe_accuracy.json")
    args = ap.parse_args()
    runtime.keep_freed_memory()
    silence_diffusers()
    torch.set_num_threads(args.threads)
    m = load_model(args.model)
    key, _ = ttq.TARGETS[args.model]
    g = torch.Generator().manual_seed(args.seed)
    raw, targets = m.family.random_conditions(args.n, g)
    z = torch.randn((args.n, *m.family.image_shape), generator=g)
    nfes = [int(k) for k in args.nfe.split(",")]
    configs = []
    for path in args.grid:
        gr = load_grids(path)
        tab = check_grids_fit(gr, m.schedule, cfg=ttq.CFG, where=str(path))
        configs.append(ttq.condiff_config(f"{gr.solver} + grid {path.stem}", gr.solver, tab))
    t_max = float(m.schedule.t_max)
    configs += [
        ttq.condiff_config("unipc + trailing (= diffusers UniPC bh2)", "unipc", Trailing(), None, t_start=t_max),
        ttq.diffusers_config(
            "UniPC", "UniPCMultistepScheduler", "trailing", solver_type="bh2", final_sigmas_type="zero"
        ),
        ttq.diffusers_config("DPM++ 2M", "DPMSolverMultistepScheduler", "trailing", **ttq.PEER_MS),
        ttq.kdiffusion_config("dpmpp_2m", "dpmpp_2m"),
    ]
    rows = []
    for cfg in configs:
        for nfe in nfes:
            try:
                with torch.no_grad():
                    outs = [cfg.run(m, c, x, nfe) for c, x in zip(torch.split(raw, 256), torch.split(z, 256))]
            except Exception as e:  # a grids file without this step count
                rows.append({"impl": cfg.impl, "config": cfg.label, "nfe": nfe, key: None, "note": str(e)})
                continue
            images = torch.cat([o[0] for o in outs]).clamp(-1, 1)
            acc = float(m.family.score(images, targets)[key])
            rows.append({"impl": cfg.impl, "config": cfg.label, "nfe": outs[0][1], key: acc})
            print(f"{cfg.impl:11s} {cfg.label:44s} NFE {nfe:3d} {key} {acc:.4f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "n": args.n, "seed": args.seed, "rows": rows}, indent=1))
    lines = [
        "| impl | configuration | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
        "|---|---|" + "---:|" * len(nfes),
    ]
    for cfg in configs:
        cells = {r["nfe"]: r[key] for r in rows if r["config"] == cfg.label}
        lines.append(
            f"| {cfg.impl} | {cfg.label} | "
            + " | ".join("" if cells.get(k) is None else f"{cells[k]:.3f}" for k in nfes)
            + " |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
