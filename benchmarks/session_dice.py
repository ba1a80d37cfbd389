"""Dice per click of :class:`fastsam3d.Session` on a volume's own voxels (what a user gets).

``fastsam3d eval`` scores 128^3 crops of the 1.5 mm grid; this script drives the public
session API instead: for every structure of a label map, a fresh object, simulated clicks
(``cvpr25``: each at the deepest voxel of the largest error, computed on the volume's voxels),
Dice on the whole volume after each click. Same clicks for every setting compared.

    python benchmarks/session_dice.py --image CT.nii.gz --labels SEG.nii.gz --json out.json
    python benchmarks/session_dice.py ... --no-refine      # thresholded logits, no refinement
    python benchmarks/session_dice.py ... --click-walker off  # refinement from the model alone
    python benchmarks/session_dice.py ... --keep-unclicked-parts  # parts without a click too
    python benchmarks/session_dice.py ... --exact  # the unprepared exact fp32 reference model
    python benchmarks/session_dice.py ... --protocol fastsam3d --seed 2023,2024,2025

Two reports of the same volume compare click by click, paired by structure and seed, with
``benchmarks/compare_dice.py``: one run's mean moves by a few hundredths on its own.

The model runs its fast path (``prepare_inference()``), as the napari plugin and the CLI load
it.
"""

from __future__ import annotations

import argparse
import json
import time

import nibabel as nib
import numpy as np

import fastsam3d
from fastsam3d.cache import EmbeddingCache
from fastsam3d.clicks import protocol_click
from fastsam3d.evaluation import dice_score
from fastsam3d.refine import RefineSettings
from fastsam3d.session import SessionSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--labels", required=True, help="label map on the image's voxel grid")
    parser.add_argument("--model", default="default")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--protocol", default="cvpr25", choices=["cvpr25", "fastsam3d"])
    parser.add_argument("--min-voxels", type=int, default=10)
    parser.add_argument(
        "--structures",
        type=lambda text: [int(v) for v in text.split(",")],
        help="comma-separated label values (default: all)",
    )
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--click-walker", choices=["ct", "on", "off"], default="ct")
    parser.add_argument(
        "--keep-unclicked-parts",
        action="store_true",
        help="keep mask parts that hold no positive click (RefineSettings.clicked_parts_only)",
    )
    parser.add_argument("--walker-step", type=float, help="RefineSettings.walker_step_mm")
    parser.add_argument("--walker-side", type=int, help="RefineSettings.walker_side")
    parser.add_argument(
        "--walker-later-seed", type=float, help="RefineSettings.walker_later_seed_mm"
    )
    parser.add_argument("--refine-beta", type=float, help="RefineSettings.beta (default: its own)")
    parser.add_argument("--refine-prior", type=float, help="RefineSettings.prior_weight")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--exact", action="store_true", help="the exact fp32 reference (no prepare_inference)"
    )
    parser.add_argument(
        "--seed",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[2023],
        help="comma-separated seeds of the clicks' random generators; one run per seed "
        "(the official protocol's later clicks are random; cvpr25 clicks are not)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    volume = fastsam3d.Volume.from_file(args.image)
    labels = np.asarray(nib.load(args.labels).dataobj).astype(np.int64)
    if labels.shape != volume.shape:
        raise SystemExit(f"labels {labels.shape} and image {volume.shape} differ")
    model = fastsam3d.load_model(args.model, args.device)
    if not args.exact:
        model = model.prepare_inference()
    chosen = {
        "beta": args.refine_beta,
        "prior_weight": args.refine_prior,
        "click_walker": args.click_walker,
        "walker_step_mm": args.walker_step,
        "walker_side": args.walker_side,
        "walker_later_seed_mm": args.walker_later_seed,
        "clicked_parts_only": False if args.keep_unclicked_parts else None,
    }
    refine = RefineSettings(**{k: v for k, v in chosen.items() if v is not None})
    settings = SessionSettings(refine=None if args.no_refine else refine)
    results, seconds = [], []
    for seed in args.seed:
        cache = EmbeddingCache()  # each seed as its own run: a fresh cache of encoded ROIs
        for value in np.unique(labels)[1:]:
            gt = labels == value
            if gt.sum() < args.min_voxels or (
                args.structures and int(value) not in args.structures
            ):
                continue
            session = fastsam3d.Session(model, volume, args.device, settings=settings, cache=cache)
            rng = np.random.default_rng([seed, int(value)])
            pred, dices = np.zeros_like(gt), []
            for index in range(args.clicks):
                click = protocol_click(args.protocol, index, pred, gt, rng)
                if click is not None:
                    start = time.perf_counter()
                    pred = session.add_point(click.point, click.positive)
                    seconds.append(time.perf_counter() - start)
                dices.append(dice_score(pred, gt))
            result = {"structure": int(value), "seed": seed, "voxels": int(gt.sum())}
            results.append({**result, "dice": dices})
    mean = np.mean([r["dice"] for r in results], axis=0)
    print(f"{len(results)} click sequences, refine={settings.refine}, mean Dice per click:")
    print(" ".join(f"{v:.3f}" for v in mean))
    print(f"median click {1000 * float(np.median(seconds)):.0f} ms (first clicks of ROIs included)")
    if args.json:
        report = {"args": vars(args), "mean_dice_per_click": mean.tolist(), "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
