"""Figures for docs/RESULTS.md and docs/BENCHMARKS.md from the JSON the tools write.

* ``dice_vs_clicks.png`` (or ``--dice-name``): mean Dice after each click, one panel per data
  set, one line per method (``fastsam3d eval --json`` files).
* ``latency.png``: exact fp32 reference vs fast path per benchmarked path and device
  (``fastsam3d bench --json`` files).
* ``example_masks.png`` (with ``--model``, ``--images``, ``--labels``): one axial slice per
  structure with the ground truth and the model's mask after each shown click count.

Usage::

    python benchmarks/make_figures.py --out docs/images \
        --eval "CT:docs/results/*_ct-dicom.json" --eval "BraTS:docs/results/*_brats.json" \
        --bench docs/results/bench_*.json \
        --model default --images EVAL/images --labels EVAL/labels --structures 1,5,52
"""

import argparse
import glob
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def method_label(report: dict, path: str) -> str:
    """A legend entry: the file's stem without the protocol and data set, marked when the
    method is an oracle."""
    label = Path(path).stem.rsplit("_", 1)[0]
    label = label.removeprefix("cvpr25-").removesuffix("-cvpr25")
    return f"{label} (oracle)" if report.get("oracle") else label


def plot_dice_vs_clicks(panels: dict[str, list[str]], target: Path) -> Path:
    """One panel per data set, written to ``target``; ``panels`` maps a title to eval JSON
    files."""
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    colours: dict[str, str] = {}  # one colour per method in every panel
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, files) in zip(axes.flat[: len(panels)], panels.items(), strict=True):
        reports = [(json.loads(Path(p).read_text()), p) for p in files]
        for report, path in sorted(reports, key=lambda item: method_label(*item)):
            label = method_label(report, path)
            colour = colours.setdefault(label, cycle[len(colours) % len(cycle)])
            dice = report["summary"]["mean_dice_per_click"]
            style = "--" if report.get("oracle") else "-"
            ax.plot(range(1, len(dice) + 1), dice, style, marker="o", ms=3, color=colour)
            ax.lines[-1].set_label(label)
        count = report["summary"]["structures"]
        noun = "structure" if count == 1 else "structures"
        ax.set(title=f"{title} ({count} {noun})", xlabel="clicks", ylabel="mean Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, target, dpi=120)


def plot_latency(files: list[str], out: Path) -> Path:
    """Horizontal bars (log scale): reference and fast median per path, one panel per device."""
    reports = [json.loads(Path(p).read_text()) for p in sorted(files)]
    counts = [len(report["results"]) for report in reports]
    fig, axes = plt.subplots(
        len(reports),
        1,
        figsize=(9, 0.3 * sum(counts) + 1.2 * len(reports)),
        squeeze=False,
        gridspec_kw={"height_ratios": counts},
    )
    for ax, report in zip(axes[:, 0], reports, strict=True):
        rows = report["results"]
        names = [f"{re.sub(r' [(][^)]*[)]', '', r['name'])} (batch {r['batch']})" for r in rows]
        y = np.arange(len(rows))
        ref = [r["reference_ms"] or np.nan for r in rows]
        fast = [r["fast_ms"] for r in rows]
        ax.barh(y + 0.2, ref, 0.4, label="exact fp32 reference")
        ax.barh(y - 0.2, fast, 0.4, label="fast path")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel="median ms", title=f"{report['device']} (torch {report['torch']})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, out / "latency.png", dpi=120)


def plot_example_masks(args, out: Path) -> Path:
    """Axial slices through structures: ground truth and masks after each shown click count."""
    from fastsam3d.checkpoints import load_model
    from fastsam3d.data import find_cases, preprocess_case
    from fastsam3d.evaluation import (
        SamSegmenter,
        crop_box,
        evaluate_structure,
        extract,
        source_voxel_mm,
    )
    from fastsam3d.refine import RefineSettings

    model = load_model(args.model, progress=False)
    refine = RefineSettings() if args.refine else None
    segmenter = SamSegmenter(model, False, fine_spacing=args.fine_spacing, refine=refine)
    case = find_cases(args.labels, args.images)[0]
    segmenter.source_voxel_mm = source_voxel_mm(case)
    arrays = preprocess_case(case)
    labels, ids, image = arrays["labels"], list(arrays["ids"]), arrays["image"]
    segmenter.volume_minimum = float(image.min())  # the click walker runs on CT
    shown = [int(s) for s in args.structures.split(",")]
    counts = [int(c) for c in args.show_clicks.split(",")]
    fig, axes = plt.subplots(len(shown), len(counts), figsize=(3 * len(counts), 3 * len(shown)))
    axes = np.atleast_2d(axes)
    for row, value in enumerate(shown):
        full_gt = labels == ids.index(value)
        start, stop = crop_box(full_gt)
        crop, gt = extract(image, start, stop), extract(full_gt, start, stop)
        rng = np.random.default_rng([0, value])
        dices, preds, _ = evaluate_structure(
            segmenter, crop, gt, max(counts), "cvpr25", rng, model.config.intensity_clip
        )
        z = int(np.argmax(gt.sum((0, 1))))
        for col, count in enumerate(counts):
            ax = axes[row, col]
            ax.imshow(np.rot90(crop[:, :, z]), cmap="gray")
            ax.contour(np.rot90(gt[:, :, z]), levels=[0.5], colors="lime", linewidths=0.8)
            pred = preds[count - 1][:, :, z]
            if pred.any():
                ax.contour(np.rot90(pred), levels=[0.5], colors="red", linewidths=0.8)
            title = f"label {value}, {count} click(s): Dice {dices[count - 1]:.2f}"
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    zoom = ", fine-to-coarse zoom" if args.fine_spacing else ""
    zoom += ", edge refinement" if args.refine else ""
    zoom += " with the click walker" if args.refine and refine.walks_clicks(image.min()) else ""
    fig.suptitle(f"green: reference label, red: model mask (cvpr25 clicks{zoom})", fontsize=9)
    return save(fig, out / "example_masks.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument(
        "--eval", action="append", default=[], metavar="TITLE:GLOB", help="repeatable"
    )
    parser.add_argument(
        "--dice-name", default="dice_vs_clicks.png", help="file name of the --eval figure"
    )
    parser.add_argument("--bench", nargs="*", default=[])
    parser.add_argument("--model")
    parser.add_argument("--images")
    parser.add_argument("--labels")
    parser.add_argument("--structures", default="1")
    parser.add_argument("--show-clicks", default="1,3,5")
    parser.add_argument(
        "--fine-spacing", type=float, help="example masks with the session's zoom (0.75)"
    )
    parser.add_argument(
        "--refine", action="store_true", help="example masks with the session's edge refinement"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.eval:
        panels = {}
        for item in args.eval:
            title, _, pattern = item.partition(":")
            panels.setdefault(title, []).extend(glob.glob(pattern))
        written.append(plot_dice_vs_clicks(panels, out / args.dice_name))
    if args.bench:
        written.append(plot_latency(args.bench, out))
    if args.model:
        written.append(plot_example_masks(args, out))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
