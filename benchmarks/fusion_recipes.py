"""Do both halves learn? Fused models vs their ablations vs separately trained unimodal models, per recipe, per
fusion type, per synthetic generator (README "Both halves learn").

For each generator (``shapes``: ``mmcat synth``'s default, the one the recipe was tuned on; ``market``: the
independent one, used only to validate), this writes ``--num-products`` products, packs them like ``make demo``
and trains ``configs/tiny_cpu.yaml`` once per variant through the real CLI (one process, as a user would). Each
variant is a list of ``key=value`` overrides; a variant named ``image`` / ``text`` is a separately trained
unimodal model (``model.modalities=[image]``). Prints one markdown table row per run (test macro-F1 of fused,
image-only and text-only ablations, wall time), and the two acceptance ratios per generator:

  * image-only ablation / separately trained image-only model (target >= 0.9),
  * fused - best separately trained unimodal model, in macro-F1 points (target >= 8).

    python benchmarks/fusion_recipes.py --work /tmp/recipes [--generators shapes market]
        [--variants default no_remedies image text ...] [--num-products 1200] [--num-classes 8]

Results land in WORK/results.jsonl (one JSON line per run, appended, so an interrupted sweep keeps what it
finished; a run already there is not repeated).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

VARIANTS: Dict[str, List[str]] = {
    "default": [],  # configs/tiny_cpu.yaml as shipped
    "no_remedies": ["model.aux_loss_weight=0"],  # the recipe before issue 11: modality dropout only
    "no_aux_no_dropout": ["model.aux_loss_weight=0", "model.modality_dropout=0"],
    "aux_only": ["model.modality_dropout=0"],
    "dropout_stronger": ["model.modality_dropout_target=stronger"],
    "dropout_schedule": ["model.modality_dropout=0.6", "model.modality_dropout_final=0.1"],
    "ogm_ge": ["model.ogm_alpha=0.5"],
    "late": ["model.fusion=late"],
    "concat": ["model.fusion=concat"],
    "attention": ["model.fusion=attention"],
    "late_no_remedies": ["model.fusion=late", "model.aux_loss_weight=0"],
    "image": ["model.modalities=[image]"],
    "text": ["model.modalities=[text]"],
    "image_3x": ["model.modalities=[image]", "train.epochs=24"],  # is the image learnable with 3x the budget?
    # the demo's image recipe until 2026-11-26 (80 px, 8 epochs, crops down to half the photo, AdamW 2e-3)
    "recipe_80px": ["data.image_size=80", "train.epochs=8", "data.min_crop_scale=0.5", "train.lr=2e-3",
                    "train.lr_image=2e-3", "train.warmup_steps=10"],
}
VARIANTS["image_80px"] = VARIANTS["image"] + VARIANTS["recipe_80px"]


def run(cmd: List[str], log: Path) -> None:
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def prepare(work: Path, generator: str, n: int, classes: int) -> Path:
    packed = work / generator / "packed"
    if (packed / "manifest.json").exists():
        return packed
    raw = work / generator / "raw"
    mm = [sys.executable, "-m", "mmcat"]
    run([*mm, "synth", "--out", str(raw), "--num-products", str(n), "--num-classes", str(classes),
         *(["--generator", generator] if generator != "shapes" else [])], work / "prepare.log")
    run([*mm, "pack", str(raw / "products.csv"), "--out", str(packed), "--workers", "2", "--image-size", "128",
         "--max-samples-per-shard", "100"], work / "prepare.log")
    return packed


def train(work: Path, packed: Path, generator: str, variant: str, extra: List[str]) -> Dict:
    out = work / generator / "runs" / variant
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run([sys.executable, "-m", "mmcat", "train", "--config", "configs/tiny_cpu.yaml", f"data.root={packed}",
         f"output_dir={out}", "train.resume=latest", *VARIANTS[variant], *extra], out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"generator": generator, "variant": variant, "overrides": VARIANTS[variant] + extra,
            "seconds": round(time.perf_counter() - start, 1),
            "test": {m: r["macro_f1"] for m, r in metrics["test"].items()},
            "val": {m: r["macro_f1"] for m, r in metrics["val"].items()},
            "weak_modalities": metrics.get("weak_modalities", [])}


def table(rows: List[Dict]) -> str:
    lines = ["| generator | variant | fused | image-only ablation | text-only ablation | minutes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test"]
        image, text = t.get("image_only", float("nan")), t.get("text_only", float("nan"))
        lines.append(f"| {r['generator']} | {r['variant']} | {t['fused']:.3f} | {image:.3f} | {text:.3f} "
                     f"| {r['seconds'] / 60:.1f} |")
    for gen in sorted({r["generator"] for r in rows}):
        by = {r["variant"]: r["test"] for r in rows if r["generator"] == gen}
        if "image" in by and "text" in by:
            uni = max(by["image"]["fused"], by["text"]["fused"])
            for v, t in by.items():
                if "image_only" in t:
                    lines.append(f"- {gen} / {v}: image-only ablation / image model = "
                                 f"{t['image_only'] / max(by['image']['fused'], 1e-9):.2f}; fused - best unimodal = "
                                 f"{100 * (t['fused'] - uni):+.1f} points")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--generators", nargs="+", default=["shapes", "market"])
    p.add_argument("--variants", nargs="+", default=["default", "no_remedies", "image", "text"])
    p.add_argument("--num-products", type=int, default=1200)
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--table-only", action="store_true", help="print the table of WORK/results.jsonl and exit")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not args.table_only:
        for gen in args.generators:
            packed = prepare(args.work, gen, args.num_products, args.num_classes)
            for variant in args.variants:
                if any(r["generator"] == gen and r["variant"] == variant for r in done):
                    continue
                row = train(args.work, packed, gen, variant, list(args.set))
                done.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
