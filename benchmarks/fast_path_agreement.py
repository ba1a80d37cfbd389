"""Dice between the fast path's masks and the exact fp32 reference's, on real volumes.

Both paths get the same clicks (simulated from the reference's predictions with the official
protocol) and the same previous-logit feedback history of their own, as in interactive use.
Usage::

    python benchmarks/fast_path_agreement.py --model W.safetensors --images DIR --labels DIR \
        [--dtype bfloat16|int8] [--clicks 5] [--device cpu]
"""

import argparse
import copy
import statistics

import numpy as np
import torch

from fastsam3d.checkpoints import load_model
from fastsam3d.data import find_cases
from fastsam3d.evaluation import SamSegmenter, dice_score, evaluate_case


class PairedSegmenter:
    """Reference and fast segmenters in lockstep; clicks follow the reference."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        fast = copy.deepcopy(model).prepare_inference(dtype=dtype)
        self.reference = SamSegmenter(model, newest_only=True)
        self.fast = SamSegmenter(fast, newest_only=True)
        self.model = model
        self.agreement: list[float] = []

    def start(self, raw, normalised) -> None:
        self.reference.start(raw, normalised)
        self.fast.start(raw, normalised)

    def predict(self, points, labels):
        ref = self.reference.predict(points, labels)
        fast = self.fast.predict(points, labels)
        agreement = dice_score(fast.cpu().numpy(), ref.cpu().numpy())
        self.agreement.append(1.0 if np.isnan(agreement) else agreement)
        return ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"]
    )
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-voxels", type=int, default=200)
    args = parser.parse_args()
    model = load_model(args.model, device=args.device, progress=False)
    paired = PairedSegmenter(model, getattr(torch, args.dtype))
    options = argparse.Namespace(
        structures=None,
        min_voxels=args.min_voxels,
        seed=0,
        clicks=args.clicks,
        protocol="fastsam3d",
        scoring="roi",
    )
    for index, case in enumerate(find_cases(args.labels, args.images)):
        evaluate_case(paired, case, options, index, model.config.intensity_clip)
    values = paired.agreement
    print(
        f"{args.model} fast path ({args.dtype}, {args.device}) vs fp32 reference: "
        f"{len(values)} masks, Dice median {statistics.median(values):.4f}, "
        f"mean {statistics.mean(values):.4f}, min {min(values):.4f}, "
        f"share >= 0.99: {np.mean(np.array(values) >= 0.99):.3f}"
    )


if __name__ == "__main__":
    main()
