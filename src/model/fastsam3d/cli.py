"""The ``fastsam3d`` command: one entry point, one subcommand per task.

``fastsam3d segment IMAGE --point I,J,K[:+|-] ... -o OUT.nii.gz`` segments one object from clicks
(and/or replays a prompt file) and writes the label map with the source affine and header.
``fastsam3d info FILE`` prints a volume's geometry; ``fastsam3d convert`` rewrites weights as
safetensors. Subcommands register in :data:`COMMANDS`; those other modules own (eval, bench,
train, distill) in :data:`EXTERNAL_COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import re
import sys
from collections.abc import Callable

import numpy as np

from .errors import FastSAM3DError, InputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"

_POINT = re.compile(
    r"^\s*([-+]?[\d.]+(?:e[-+]?\d+)?)\s*,\s*([-+]?[\d.]+(?:e[-+]?\d+)?)\s*,"
    r"\s*([-+]?[\d.]+(?:e[-+]?\d+)?)\s*(?::\s*([-+]|pos|neg|positive|negative))?\s*$",
    re.IGNORECASE,
)


def parse_point(text: str) -> tuple[tuple[float, float, float], bool]:
    """``"I,J,K[:+|-]"`` -> ((i, j, k), positive).

    >>> parse_point("10,20,3:-")
    ((10.0, 20.0, 3.0), False)
    """
    match = _POINT.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a point: write voxel indices I,J,K with an optional :+ or :- "
            "(e.g. 60,48,15 or 60,48,15:-)"
        )
    sign = (match.group(4) or "+").lower()
    return tuple(float(match.group(i)) for i in (1, 2, 3)), sign in ("+", "pos", "positive")


PRECISIONS = ("fp32", "bf16", "int8")  # the keys of ``modeling.sam3d.ENCODER_PRECISIONS``


def _load_model(source: str, device, precision: str = "fp32"):
    """The model prepared for inference with its encoder in ``precision`` (see
    :meth:`Sam3D.prepare_inference`: fp32 is exact; bf16 and int8 are faster opt-ins)."""
    from .checkpoints import load_model
    from .modeling.sam3d import ENCODER_PRECISIONS

    model = load_model(source, device=device)
    try:
        return model.prepare_inference(dtype=ENCODER_PRECISIONS[precision])
    except ValueError as err:  # e.g. int8 asked for on a GPU
        raise InputError(f"--precision {precision}: {err}") from None


def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an object from clicks and write a label map",
        description="Clicks are voxel indices into the stored array (as nibabel loads it).",
    )
    p.add_argument("image", help="input volume (.nii, .nii.gz or another format nibabel reads)")
    p.add_argument(
        "--point",
        action="append",
        type=parse_point,
        default=[],
        metavar="I,J,K[:+|-]",
        help="a click (repeat for more); ':-' marks a negative click",
    )
    p.add_argument("--prompts", metavar="FILE.json", help="replay a prompt file first")
    p.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz", help="label map to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name or weights file")
    p.add_argument(
        "--device", default=None, help="cuda (or cuda:N), mps or cpu (default: best available)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="image encoder precision: fp32 (exact, default); bf16 (GPUs and CPUs with bf16 "
        "units, several times faster on a GPU) or int8 (CPU only, about 2x faster): masks "
        "within Dice 0.98-0.99 of fp32 on held-out CT (docs/RESULTS.md)",
    )
    p.add_argument("--point-policy", choices=("newest", "all"), default=None)
    p.add_argument(
        "--max-extra-rois",
        type=int,
        default=None,
        metavar="N",
        help="neighbouring ROIs one click may add for large objects (default 8, 0: one ROI)",
    )
    p.add_argument(
        "--no-fine-grid",
        action="store_true",
        help="segment every object on the 1.5 mm grid (default: start on 0.75 mm and move to "
        "1.5 mm when the object outgrows the fine ROI)",
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="show the model's thresholded logits (default: snap each mask to image edges with "
        "a random walker that takes the model's probability as prior)",
    )
    p.add_argument(
        "--click-walker",
        choices=("ct", "on", "off"),  # fastsam3d.refine.CLICK_WALKER_MODES (imports torch)
        help="merge a plain random walker from the clicks into the refinement's prior: on CT "
        "volumes only (ct, the default), on every volume (on) or never (off)",
    )
    p.add_argument(
        "--keep-unclicked-parts",
        action="store_true",
        help="keep the parts of a mask that hold no positive click (default: where the click "
        "walker ran, they are dropped)",
    )
    p.add_argument("--save-prompts", metavar="FILE.json", help="also write the prompts as JSON")
    p.set_defaults(func=_run_segment)


def _run_segment(args) -> int:
    from .geometry import Volume
    from .nifti import check_output_path, save_labels
    from .predictor import resolve_device
    from .session import Session, SessionSettings

    check_output_path(args.output, args.image)
    if not args.point and not args.prompts:
        raise InputError("nothing to segment: give at least one --point I,J,K or --prompts FILE")
    volume = Volume.from_file(args.image)
    device = resolve_device(args.device)
    settings = SessionSettings(fine_spacing=None) if args.no_fine_grid else None
    model = _load_model(args.model, device, args.precision)
    session = Session(model, volume, device, settings=settings)
    if args.prompts:
        session.from_json(args.prompts)
    overrides = {"point_policy": args.point_policy, "max_extra_rois": args.max_extra_rois}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    refine = session.settings.refine
    if args.no_refine:
        refine = None
    elif refine is not None:
        walker = refine.click_walker if args.click_walker is None else args.click_walker
        refine = dataclasses.replace(
            refine,
            click_walker=walker,
            clicked_parts_only=refine.clicked_parts_only and not args.keep_unclicked_parts,
        )
    overrides["refine"] = refine
    session.settings = session.settings.replace(**overrides)
    for point, positive in args.point:
        session.add_point_result(point, positive)
    if session.clicks:
        session.commit()
    if args.save_prompts:
        session.prompts_to_json(args.save_prompts)
    out = save_labels(session.labels, volume, args.output)
    ids = sorted(int(v) for v in np.unique(session.labels) if v)
    voxels = int(np.count_nonzero(session.labels))
    print(f"wrote {out}: {len(ids)} object(s), labels {ids}, {voxels} voxels")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a volume's geometry")
    p.add_argument("file", help="volume (.nii, .nii.gz or another format nibabel reads)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_info)


def volume_info(volume) -> dict:
    """Geometry summary of a volume (what ``fastsam3d info`` prints)."""
    from .roi import tile_origins

    grid = volume.model_grid()
    array = volume.array
    return {
        "file": volume.path,
        "shape": list(volume.shape),
        "dtype": str(array.dtype),
        "voxel_size_mm": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation,
        "affine": np.round(volume.affine, 6).tolist(),
        "intensity_range": [float(array.min()), float(array.max())],
        "model_grid": {
            "spacing_mm": grid.spacing,
            "orientation": "RAS (closest canonical axes)",
            "shape": list(grid.shape),
            "rois_to_precompute": len(tile_origins(grid.shape)),
        },
    }


def _run_info(args) -> int:
    from .geometry import Volume

    info = volume_info(Volume.from_file(args.file))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    affine = "\n".join("  " + "  ".join(f"{v:11.4f}" for v in row) for row in info["affine"])
    grid = info["model_grid"]
    print(f"file:         {info['file']}")
    print(f"shape:        {tuple(info['shape'])}  {info['dtype']}")
    print("voxel size:   " + " x ".join(f"{s:g}" for s in info["voxel_size_mm"]) + " mm")
    print(f"orientation:  {info['orientation']}")
    print(f"affine (voxel -> world mm):\n{affine}")
    print(f"intensities:  {info['intensity_range'][0]:g} .. {info['intensity_range'][1]:g}")
    print(
        f"model grid:   {tuple(grid['shape'])} at {grid['spacing_mm']:g} mm, RAS; "
        f"{grid['rois_to_precompute']} ROIs of 128^3 to precompute"
    )
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="rewrite any loadable checkpoint as weights-only safetensors"
    )
    p.add_argument("source", help="registry name or .pth / .pt / .safetensors file")
    p.add_argument("output", help="OUT.safetensors")
    p.add_argument("--block-style", choices=("fastsam3d", "sam_med3d"), default=None)
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .checkpoints import convert_checkpoint

    out = convert_checkpoint(args.source, args.output, block_style=args.block_style)
    print(f"wrote {out}")
    return 0


COMMANDS: list[Callable] = [_add_segment, _add_info, _add_convert]
"""Functions that add one subparser each (``sub.add_parser(...)`` with ``func`` default)."""

EXTERNAL_COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("fastsam3d.benchmark", "add_bench_command", "time the fast paths"),
    "train": ("fastsam3d.training", "add_parser", "interactive SAM-style training"),
    "distill": ("fastsam3d.distillation", "add_parser", "layer-wise progressive distillation"),
    "eval": ("fastsam3d.evaluation", "add_parser", "click-simulation evaluation (Dice per click)"),
}
"""Subcommands other modules own: name -> (module, registering function, help). The module is
imported only when its subcommand runs, so that ``fastsam3d info`` starts fast."""


def _requested(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _add_external(sub, name: str, requested: str | None) -> None:
    module, function, help_text = EXTERNAL_COMMANDS[name]
    if name == requested:
        try:
            getattr(importlib.import_module(module), function)(sub)
            return
        except (ImportError, AttributeError) as err:
            reason = f"the {name} command is unavailable ({err})"
            sub.add_parser(name, help=help_text).set_defaults(func=_unavailable(reason))
            return
    sub.add_parser(name, help=help_text, add_help=False)


def _unavailable(reason: str) -> Callable:
    def run(args) -> int:
        raise InputError(reason)

    return run


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``fastsam3d`` parser; ``argv`` decides which external subcommand is imported."""
    parser = argparse.ArgumentParser(prog="fastsam3d", description="FastSAM3D 3D segmentation")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    requested = _requested(sys.argv[1:] if argv is None else argv)
    for name in EXTERNAL_COMMANDS:
        _add_external(sub, name, requested)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``fastsam3d`` command; returns the exit status (2 for a user error)."""
    args = build_parser(argv).parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
        if isinstance(result, str):  # subcommands in other modules return their report
            if result:
                print(result)
            return 0
        return int(result or 0)
    except (FastSAM3DError, OSError) as err:
        print(f"fastsam3d: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
