"""``condiff models``: the bundled models and classifiers as a table (name, kind, family, parameters, size on
disk, training steps, headline metrics, the flag that uses it); ``--json`` prints every record with the raw
``condiff.json`` (or ``ppap.json``) it was read from."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import typer

HEADLINE = "measured at cfg 3"  # the column's title: the model cards' acceptance runs (dpmpp-2m, 20 steps, n 512)
QUALITY = (("frechet", "Frechet", ".2f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"))


def safetensors_parameters(path: Path) -> int:
    """The number of values in a safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def folder_stats(folder: Path) -> tuple[int, int]:
    """(parameters in its safetensors files, bytes of every file under it)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    params = sum(safetensors_parameters(p) for p in files if p.suffix == ".safetensors")
    return params, sum(p.stat().st_size for p in files)


def card_measurements(card: Path) -> dict:
    """The cfg 3 row of a model card's "Measured" table ({column: value}); {} where the card has none."""
    if not card.is_file():
        return {}
    header, section = None, False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line.strip() == "## Measured"
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if not section or not cells:
            continue
        if cells[0] == "cfg":
            header = cells
        elif header and cells[0] == "3" and len(cells) == len(header):
            try:
                return {k: float(v) for k, v in zip(header[1:], cells[1:])}
            except ValueError:
                return {}
    return {}


def headline(meta: dict, card: Path) -> dict:
    """The accuracies at cfg 3 from condiff.json, with Frechet distance, precision and recall from condiff.json
    where recorded, else from the model card's Measured table (digits)."""
    cfg3 = (meta.get("metrics") or {}).get("cfg3") or {}
    out = {k: float(v) for k, v in (cfg3.get("accuracy") or {}).items()}
    quality = dict(cfg3.get("quality") or {})
    measured = card_measurements(card)
    for key, _, _ in QUALITY:
        if quality.get(key) is None and key in measured:
            quality[key] = measured[key]
    out.update({k: float(quality[k]) for k, _, _ in QUALITY if quality.get(k) is not None})
    return out


def headline_text(values: dict) -> str:
    """'all attributes 0.994' (shapes), 'class 1.000, Frechet 10.98, precision 0.924, recall 0.649' (digits)."""
    if not values:
        return "-"
    if "all" in values:
        parts = [f"all attributes {values['all']:.3f}"]
    else:
        parts = [f"{k} {v:.3f}" for k, v in values.items() if k not in {q for q, _, _ in QUALITY}]
    parts += [f"{label} {values[k]:{fmt}}" for k, label, fmt in QUALITY if k in values]
    return ", ".join(parts)


def records() -> list[dict]:
    """One record per bundled model and classifier."""
    from condiff.core.files import load_json
    from condiff.models.base import BUNDLED, bundled_dir
    from condiff.models.classifiers import BUNDLED_CLASSIFIERS

    out = []
    for name, folder, flag in [
        *((n, n, "--model") for n in BUNDLED),
        *((n, f, "--classifier") for n, f in BUNDLED_CLASSIFIERS.items()),
    ]:
        d = bundled_dir(folder)
        rec = {"name": name, "use": f"{flag} {name}", "path": str(d)}
        if (d / "condiff.json").is_file():
            meta = load_json(d / "condiff.json")
            if flag == "--model":
                kind = f"model, {meta.get('prediction')}-prediction"
            else:
                kind = "classifier, " + ("noise-aware" if meta.get("model", {}).get("noise_aware") else "clean")
            rec.update(kind=kind, family=meta.get("family"), prediction=meta.get("prediction"))
            rec.update(trained_steps=meta.get("trained_steps"), train_minutes=meta.get("train_minutes"))
            rec["headline"] = headline(meta, d / "README.md") if flag == "--model" else {}
        elif (d / "ppap.json").is_file():
            meta = load_json(d / "ppap.json")
            kind, family = f"PPAP: {meta.get('n_experts')} LoRA experts", f"of --classifier {meta.get('classifier')}"
            rec.update(kind=kind, family=family)
            rec.update(prediction=None, trained_steps=meta.get("steps"), train_minutes=None, headline={})
        else:
            rec.update(kind="missing", family=None, missing=f"weights missing at {d}")
            out.append(rec)
            continue
        rec["parameters"], rec["bytes"] = folder_stats(d)
        rec["config"] = meta
        out.append(rec)
    return out


def table(rows: list[dict]) -> str:
    """The aligned text table `condiff models` prints."""
    head = ("name", "kind", "family", "parameters", "size", "trained", HEADLINE, "use")
    cells = []
    for r in rows:
        if r.get("missing"):
            cells.append((r["name"], r["missing"], "", "", "", "", "", r["use"]))
            continue
        steps = r.get("trained_steps")
        cells.append(
            (
                r["name"],
                r["kind"],
                str(r["family"]),
                f"{r['parameters'] / 1e6:.2f} M",
                f"{r['bytes'] / 1e6:.1f} MB",
                "-" if steps is None else f"{steps} steps",
                headline_text(r.get("headline") or {}),
                r["use"],
            )
        )
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    right = {3, 4, 5}  # numbers align right
    lines = [
        "  ".join(f"{v:>{w}}" if i in right else f"{v:<{w}}" for i, (v, w) in enumerate(zip(row, widths))).rstrip()
        for row in [head, *cells]
    ]
    return "\n".join(lines)


def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="print every record as JSON, with its raw condiff.json"),
):
    """List the bundled models and classifiers: kind, family, parameters, size on disk, training steps and the
    headline metrics their model cards measured (--json: every record, raw)."""
    rows = records()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(table(rows))
    from condiff.models.base import BUNDLED_ROOT

    typer.echo(
        f"\n{HEADLINE}: dpmpp-2m, 20 steps, 512 samples, exact labeller (shapes) or scorer (digits); model cards: "
        f"{BUNDLED_ROOT}/<folder>/README.md (--json: every record, its folder and its condiff.json)"
    )
