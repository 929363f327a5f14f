"""Discrete diffusion, measured: RADD against an autoregressive transformer of the same size and training compute
on the character corpus (bits per character), RADD's cache (network calls and wall time at N = 4L, samples
identical), conditional captions read back by the exact parser, classifier guidance on the unconditional captions
model, and (where their runs exist) DRAKES on DNA, DiffuSIA and CDCD.

    OMP_NUM_THREADS=1 python benchmarks/discrete.py [--parts chars,cache,captions,guidance] [--docs]

Trained runs are read from runs/<recipe> (train them with the commands in docs/discrete.md). --parts measures
those parts and reads the others back from --json; --docs writes the tables into docs/discrete.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sampling_speed import write_docs_section  # noqa: E402

from condiff.core.files import atomic_write_json, load_json  # noqa: E402
from condiff.data import captions, shapes  # noqa: E402
from condiff.discrete import (  # noqa: E402
    ClassifierGuided,
    ExactTilt,
    expected_nfe,
    relaxed_trajectory,
    sample,
    sample_ordered,
    trajectory_kl,
)
from condiff.models.drakes_finetune import reward_of  # noqa: E402
from condiff.models.seq2seq import exact_match, load_seq2seq_model  # noqa: E402
from condiff.models.tokens import (  # noqa: E402
    Captions,
    attribute_of,
    bits_per_token,
    fit_attribute_classifier,
    load_token_model,
)

PARTS = ("chars", "cache", "captions", "guidance", "drakes", "seq2seq", "cdcd", "blocks")


def _model(runs: Path, name: str):
    path = runs / name / "model"
    return load_token_model(path) if (path / "condiff.json").is_file() else None


def _about(m) -> dict:
    info = m.info
    return {
        "parameters": sum(p.numel() for p in m.module.parameters()),
        "steps": info.get("trained_steps"),
        "train_minutes": info.get("train_minutes"),
    }


def measure_chars(out, args):
    rows = {}
    for name in ("chars-radd", "chars-ar"):
        m = _model(args.runs, name)
        if m is None:
            out["missing"].append(name)
            continue
        test = m.family.corpus.test
        chunks = test[: (len(test) // m.length) * m.length].view(-1, m.length)
        rows[name] = {"kind": m.kind, **_about(m), **bits_per_token(m, chunks, draws=args.draws, seed=0)}
        rows[name]["chunks"] = len(chunks)
        print(name, rows[name], flush=True)
    out["chars"] = rows


@torch.no_grad()
def measure_cache(out, args):
    m = _model(args.runs, "chars-radd")
    if m is None:
        out["missing"].append("chars-radd")
        return
    steps, n, length = 4 * m.length, args.cache_n, m.length
    res = {}
    for cache in (True, False):
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        x, rows = sample(m.denoiser, n, length, steps, generator=g, cache=cache)
        res[cache] = (x, rows, time.perf_counter() - t0)
    (xc, rc, tc), (xu, ru, tu) = res[True], res[False]
    out["cache"] = {
        "steps": steps,
        "length": length,
        "n": n,
        "identical": bool(torch.equal(xc, xu)),
        "nfe_cached": rc / n,
        "nfe_uncached": ru / n,
        "nfe_formula": expected_nfe(steps, length),
        "nfe_ratio": ru / rc,
        "seconds_cached": tc,
        "seconds_uncached": tu,
        "wall_ratio": tu / tc,
        "sample": m.family.text(xc[:2]),
    }
    print("cache", {k: v for k, v in out["cache"].items() if k != "sample"}, flush=True)


@torch.no_grad()
def measure_captions(out, args):
    m = _model(args.runs, "captions-radd")
    if m is None:
        out["missing"].append("captions-radd")
        return
    rows = {}
    for steps in ("ordered", 12, 48, 192, 768):
        g = torch.Generator().manual_seed(100)
        attrs = shapes.random_attrs(args.n, g)
        if steps == "ordered":
            x, nfe = sample_ordered(m.denoiser, args.n, m.length, generator=g, cond=attrs)
        else:
            x, nfe = sample(m.denoiser, args.n, m.length, steps, generator=g, cond=attrs)
        parsed, ok = captions.parse(x), captions.parses(x)
        rows[steps] = {
            "all_correct": float(((parsed == attrs).all(1) & ok).float().mean()),
            "per_attribute": {
                a: float((parsed[:, i] == attrs[:, i]).float().mean()) for i, a in enumerate(shapes.ATTRIBUTES)
            },
            "parses": float(ok.float().mean()),
            "nfe": nfe / args.n,
        }
    out["captions"] = {**_about(m), "by_steps": rows, "sample": captions.text(x[:4]), "conditions": attrs[:4].tolist()}
    print("captions", out["captions"], flush=True)


@torch.no_grad()
def measure_guidance(out, args):
    m = _model(args.runs, "captions-uncond")
    if m is None:
        out["missing"].append("captions-uncond")
        return
    col, val = attribute_of(args.attribute)
    p_drop = m.info["recipe"]["data"]["p_drop"]
    clf = fit_attribute_classifier(col, val, p_drop, seed=1)
    null = torch.full((args.n, 4), Captions.NULL)
    rows = {}
    for gamma in args.gammas:
        den = ClassifierGuided(m.denoiser, clf.log_prob, ExactTilt(gamma))
        g = torch.Generator().manual_seed(200)
        t0 = time.perf_counter()
        x, _ = sample_ordered(den, args.n, m.length, generator=g, cond=null)
        parsed, ok = captions.parse(x), captions.parses(x)
        rows[gamma] = {
            "rate": float((parsed[:, col] == val).float().mean()),
            "parses": float(ok.float().mean()),
            "seconds": time.perf_counter() - t0,
            "sample": captions.text(x[:3]),
        }
        print("guidance", gamma, rows[gamma], flush=True)
    base = rows[0.0]["rate"]
    for r in rows.values():
        r["lift"] = r["rate"] / base if base > 0 else None
    out["guidance"] = {"attribute": args.attribute, "rows": rows}


DRAKES_RUNS = ("dna-drakes", "dna-drakes-adapter")  # each against the pretrained model under its own sampler


@torch.no_grad()
def measure_drakes(out, args):
    pre = _model(args.runs, "dna-radd")
    if pre is None:
        out["missing"].append("dna-radd")
        return
    rows = {}
    for name in DRAKES_RUNS:
        ft = _model(args.runs, name)
        if ft is None:
            out["missing"].append(name)
            continue
        d = ft.info["recipe"]["drakes"]
        steps, ordered = d["sampler_steps"], d.get("sampler") == "ordered"
        base = {**_about(pre), **reward_of(pre, "dna", args.n, steps, 3, ordered)}
        row = {**_about(ft), **reward_of(ft, "dna", args.n, steps, 3, ordered)}
        g = torch.Generator().manual_seed(4)
        traj = relaxed_trajectory(ft.denoiser, args.n, ft.length, steps, ordered=ordered, generator=g, truncate=1)
        kl = trajectory_kl(traj, pre.denoiser)
        row.update(
            kl=float(kl.mean()),
            kl_se=float(kl.std() / args.n**0.5),
            alpha=d["alpha"],
            sampler=d.get("sampler", "tau-leaping"),
            sampler_steps=steps,
            adapter=d.get("adapter", 0),
            heldout_ratio=row["heldout_reward"] / base["heldout_reward"],
            sample=ft.family.text(traj.x0.argmax(-1)[:3]),
        )
        rows[name] = {"pretrained": base, "DRAKES": row}
    out["drakes"] = rows
    print("drakes", rows, flush=True)


def _curve(path: Path, key: str) -> list:
    f = path / "learning_curve.json"
    return [(e["step"], e[key]) for e in load_json(f) if key in e] if f.is_file() else []


def _first_step(curve, level):
    return next((step for step, v in curve if v >= level), None)


def measure_seq2seq(out, args):
    rows = {}
    for name in ("seq2seq-diffusia", "seq2seq-plain"):
        path = args.runs / name / "model"
        if not (path / "condiff.json").is_file():
            out["missing"].append(name)
            continue
        m = load_seq2seq_model(path)
        info = m.info if hasattr(m, "info") else load_json(path / "condiff.json")
        curve = _curve(args.runs / name, "exact_match")
        rows[name] = {
            "spiral": bool(info["recipe"]["model"]["spiral"]),
            "parameters": sum(p.numel() for p in m.module.parameters()),
            "steps": info.get("trained_steps"),
            "train_minutes": info.get("train_minutes"),
            **exact_match(m, args.n, seed=0, steps=20),
            "curve": curve,
            "minutes_to_0.9": next(
                (
                    e["train_minutes"]
                    for e in load_json(args.runs / name / "learning_curve.json")
                    if e.get("exact_match", 0) >= 0.9
                ),
                None,
            ),
        }
        print(name, rows[name], flush=True)
    out["seq2seq"] = rows


def measure_cdcd(out, args):
    rows = {}
    for name in ("captions-radd", "captions-cdcd"):
        m = _model(args.runs, name)
        if m is None:
            out["missing"].append(name)
            continue
        curve = _curve(args.runs / name, "attribute_accuracy")
        g = torch.Generator().manual_seed(100)
        attrs = shapes.random_attrs(args.n, g)
        with torch.no_grad():
            x, _ = sample_ordered(m.denoiser, args.n, m.length, generator=g, cond=attrs)
        right = (captions.parse(x) == attrs).all(1) & captions.parses(x)
        rows[name] = {
            **_about(m),
            "weight": m.info["recipe"]["contrastive"]["weight"],
            "final_accuracy": float(right.float().mean()),
            "curve": curve,
            **{f"steps_to_{lvl}": _first_step(curve, lvl) for lvl in (0.9, 0.95, 0.97)},
        }
        print(name, rows[name], flush=True)
    out["cdcd"] = rows


@torch.no_grad()
def measure_blocks(out, args):
    """Block diffusion on captions: accuracy block by block, and the KV cache against the same network run on the
    full length with the future masked (``sample_blocks``), from the same draws."""
    from condiff.discrete import FixedBlocks, NetworkDenoiser, sample_blocks, sample_blocks_cached

    m = _model(args.runs, "captions-blocks")
    if m is None:
        out["missing"].append("captions-blocks")
        return
    rows = {}
    for per_block in (2, 4, 8):
        g = torch.Generator().manual_seed(100)
        attrs = shapes.random_attrs(args.n, g)
        x, calls, _ = sample_blocks_cached(
            m.denoiser, args.n, m.length, m.block_size, per_block, generator=g, cond=attrs
        )
        right = (captions.parse(x) == attrs).all(1) & captions.parses(x)
        rows[per_block] = {
            "all_correct": float(right.float().mean()),
            "parses": float(captions.parses(x).float().mean()),
            "nfe": calls / args.n,
        }
    timing = {}
    for name in ("cached", "full"):
        g = torch.Generator().manual_seed(101)
        attrs = shapes.random_attrs(args.n, g)
        t0 = time.perf_counter()
        if name == "cached":
            x, calls, positions = sample_blocks_cached(
                m.denoiser, args.n, m.length, m.block_size, 4, generator=g, cond=attrs, same_draws=True
            )
        else:
            den = NetworkDenoiser(m.net, m.family.vocab_size)
            x, calls = sample_blocks(den, args.n, m.length, FixedBlocks(m.block_size), 4, generator=g, cond=attrs)
            positions = calls * m.length
        timing[name] = {"tokens": x, "calls": calls, "positions": positions, "seconds": time.perf_counter() - t0}
    c, f = timing["cached"], timing["full"]
    out["blocks"] = {
        **_about(m),
        "block_size": m.block_size,
        "by_steps_per_block": rows,
        "identical": bool(torch.equal(c["tokens"], f["tokens"])),
        "positions_per_text": {k: v["positions"] / args.n for k, v in timing.items()},
        "seconds": {k: v["seconds"] for k, v in timing.items()},
        "position_ratio": f["positions"] / c["positions"],
        "wall_ratio": f["seconds"] / c["seconds"],
    }
    print("blocks", out["blocks"], flush=True)


def write_tables(out):
    cmd = "OMP_NUM_THREADS=1 python benchmarks/discrete.py --docs"
    c = out.get("chars", {})
    if c:
        lines = [
            f"Measured with `{cmd}` on the test split ({next(iter(c.values()))['chunks']} chunks of 128 characters).",
            "",
            "| model | parameters | steps | train min | bits per character |",
            "|---|---|---|---|---|",
        ]
        for name, r in c.items():
            what = "k-DCE bound" if r["kind"] == "radd" else "exact"
            lines.append(
                f"| {name} ({r['kind']}) | {r['parameters']:,} | {r['steps']} | {r['train_minutes']:.1f} | "
                f"{r['bits']:.3f} ± {r['se']:.3f} ({what}) |"
            )
        write_docs_section("discrete-chars", "\n".join(lines), "RADD against autoregressive", "discrete.md")
    k = out.get("cache")
    if k:
        body = (
            f"| sampler | network calls per sequence | seconds ({k['n']} sequences) |\n|---|---|---|\n"
            f"| uncached, N = {k['steps']} | {k['nfe_uncached']:.1f} | {k['seconds_uncached']:.1f} |\n"
            f"| cached, N = {k['steps']} | {k['nfe_cached']:.1f} (formula {k['nfe_formula']:.1f}) | "
            f"{k['seconds_cached']:.1f} |\n\n"
            f"{k['nfe_ratio']:.2f}x fewer network calls, {k['wall_ratio']:.2f}x less wall time; samples identical: "
            f"{k['identical']}."
        )
        write_docs_section("discrete-cache", body, "The cache", "discrete.md")
    cap = out.get("captions")
    if cap:
        lines = [
            f"captions-radd on {out.get('n', '?')} random full conditions; the exact parser reads the captions back.",
            "",
            "| sampler | network calls per caption | all four attributes (and parses) | shape | color | size | "
            "position | parses |",
            "|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(cap["by_steps"], key=lambda k: -1 if k == "ordered" else int(k))
        for steps in order:
            r, a = cap["by_steps"][steps], cap["by_steps"][steps]["per_attribute"]
            what = "ordered (one token per step)" if steps == "ordered" else f"tau-leaping, {steps} steps, cached"
            lines.append(
                f"| {what} | {r['nfe']:.1f} | {r['all_correct']:.3f} | {a['shape']:.3f} | {a['color']:.3f} | "
                f"{a['size']:.3f} | {a['position']:.3f} | {r['parses']:.3f} |"
            )
        write_docs_section("discrete-captions", "\n".join(lines), "Conditional captions", "discrete.md")
    gd = out.get("guidance")
    if gd:
        lines = [f"| gamma | rate of {gd['attribute']} | lift | parses |", "|---|---|---|---|"]
        for gamma, r in sorted(gd["rows"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {gamma} | {r['rate']:.3f} | {r['lift']:.2f}x | {r['parses']:.3f} |")
        write_docs_section("discrete-guidance", "\n".join(lines), "Classifier guidance", "discrete.md")
    dr = out.get("drakes")
    if dr:
        lines = [
            "| model | sampler | trains | reward (optimised) | held-out reward | held-out ratio | trajectory KL |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, pair in dr.items():
            p, f = pair["pretrained"], pair["DRAKES"]
            sampler = f"{f['sampler']}, {f['sampler_steps']} steps"
            trains = f"{f['adapter']}-letter adapter" if f["adapter"] else "whole network"
            lines += [
                f"| dna-radd (pretrained) | {sampler} | - | {p['reward']:.3f} | {p['heldout_reward']:.3f} ± "
                f"{p['heldout_se']:.3f} | 1 | 0 |",
                f"| {name} (alpha {f['alpha']}) | {sampler} | {trains} | {f['reward']:.3f} | "
                f"{f['heldout_reward']:.3f} ± {f['heldout_se']:.3f} | **{f['heldout_ratio']:.2f}x** | "
                f"{f['kl']:.2f} ± {f['kl_se']:.2f} |",
            ]
        write_docs_section("discrete-drakes", "\n".join(lines), "DRAKES", "discrete.md")
    sq = out.get("seq2seq")
    if sq:
        lines = [
            "| model | spiral | parameters | steps | train min | exact match | attributes | parses | min to 0.9 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in sq.items():
            m09 = "-" if r["minutes_to_0.9"] is None else f"{r['minutes_to_0.9']:.1f}"
            lines.append(
                f"| {name} | {r['spiral']} | {r['parameters']:,} | {r['steps']} | {r['train_minutes']:.1f} | "
                f"{r['exact_match']:.3f} | {r['attributes_correct']:.3f} | {r['parses']:.3f} | {m09} |"
            )
        write_docs_section("discrete-seq2seq", "\n".join(lines), "DiffuSIA", "discrete.md")
    cd = out.get("cdcd")
    if cd:
        lines = [
            "| model | contrastive weight | steps to 0.90 | to 0.95 | to 0.97 | final accuracy | train min |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in cd.items():
            lines.append(
                f"| {name} | {r['weight']} | {r['steps_to_0.9']} | {r['steps_to_0.95']} | {r['steps_to_0.97']} | "
                f"{r['final_accuracy']:.3f} | {r['train_minutes']:.1f} |"
            )
        write_docs_section("discrete-cdcd", "\n".join(lines), "CDCD", "discrete.md")
    write_blocks(out)


def write_blocks(out):
    b = out.get("blocks")
    if not b:
        return
    lines = [
        f"captions-blocks: {b['parameters']:,} parameters, blocks of {b['block_size']} tokens, {b['steps']} steps "
        f"({b['train_minutes']:.1f} min).",
        "",
        "| steps per block | network calls per caption | all four attributes (and parses) | parses |",
        "|---|---|---|---|",
    ]
    for k, r in b["by_steps_per_block"].items():
        lines.append(f"| {k} | {r['nfe']:.1f} | {r['all_correct']:.3f} | {r['parses']:.3f} |")
    p, sec = b["positions_per_text"], b["seconds"]
    lines += [
        "",
        "| network | token positions computed per caption | seconds |",
        "|---|---|---|",
        f"| full length, future masked (`sample_blocks`) | {p['full']:.1f} | {sec['full']:.2f} |",
        f"| KV cache of the finished blocks (`sample_blocks_cached`) | {p['cached']:.1f} | {sec['cached']:.2f} |",
        "",
        f"{b['position_ratio']:.2f}x fewer positions, {b['wall_ratio']:.2f}x less wall time; the same draws give "
        f"identical captions: {b['identical']}.",
    ]
    write_docs_section("discrete-blocks", "\n".join(lines), "Block diffusion and its KV cache", "discrete.md")


def args_n(out):
    return out.get("n", "?")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "discrete" / "discrete.json")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--draws", type=int, default=16, help="k-DCE mask draws per test chunk")
    ap.add_argument("--cache-n", type=int, default=16)
    ap.add_argument("--attribute", default="color=red")
    ap.add_argument("--gammas", default="0,1,2,4")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args(argv)
    args.gammas = [float(x) for x in args.gammas.split(",")]
    torch.set_num_threads(1)
    out = load_json(args.json) if args.json.is_file() else {}
    out["missing"] = []
    out["n"] = args.n
    for part in filter(None, args.parts.split(",")):
        if part not in PARTS:
            ap.error(f"--parts {part!r}: accepted parts are {', '.join(PARTS)}")
        globals()[f"measure_{part}"](out, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out, default=str)))
    if args.docs:
        write_tables(json.loads(json.dumps(out, default=str)))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
