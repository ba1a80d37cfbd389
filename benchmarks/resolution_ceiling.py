"""The Dice the decoder's low-res lattice allows with perfect logits, per structure.

Usage: ``python benchmarks/resolution_ceiling.py --images DIR --labels DIR [--stride 4]``.
Each structure's 128^3 evaluation crop (as ``fastsam3d eval``) is average-pooled to the logit
lattice (stride 4 = the 1.5 mm grid's 6 mm; stride 2 = the 0.75 mm grid's 3 mm), upsampled
back as the model upsamples its logits (trilinear) and thresholded at 0.5.
"""

import argparse
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from fastsam3d.data import find_cases, preprocess_case
from fastsam3d.evaluation import crop_box, dice_score, extract


def ceiling(truth: np.ndarray, stride: int) -> float:
    """Dice of ``truth`` after pooling to ``stride`` and trilinear upsampling back."""
    volume = torch.from_numpy(truth.astype(np.float32))[None, None]
    low = F.avg_pool3d(volume, stride)
    up = F.interpolate(low, size=truth.shape, mode="trilinear", align_corners=False)
    return dice_score(up[0, 0].numpy() > 0.5, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--min-voxels", type=int, default=10)
    args = parser.parse_args()
    scores = []
    for case in find_cases(args.labels, args.images):
        arrays = preprocess_case(case)
        for compact, value in enumerate(arrays["ids"]):
            truth = arrays["labels"] == compact
            if compact == 0 or truth.sum() < args.min_voxels:
                continue
            start, stop = crop_box(truth)
            scores.append(ceiling(extract(truth, start, stop), args.stride))
            print(f"{case.name} {int(value)}: {int(truth.sum())} voxels, Dice {scores[-1]:.3f}")
    print(f"mean over {len(scores)} structures: {statistics.mean(scores):.3f}")


if __name__ == "__main__":
    main()
