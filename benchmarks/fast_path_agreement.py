"""Dice between the fast path's masks and the exact fp32 reference's, on real volumes.

Both paths get the same clicks (simulated from the reference's predictions with the official
protocol) and the same previous-logit feedback history of their own, as in interactive use.
Usage::

    python benchmarks/fast_path_agreement.py --model W.safetensors --images DIR --labels DIR \
        [--dtype bfloat16|int8] [--compile] [--clicks 5] [--device cpu]

Without trained weights (the full-size ``fastsam3d`` config), ``--fixture official_parity_a.pt
--config fastsam3d`` compares on the fixture's image and clicks with random weights (PyTorch's
default initialisation, seeded): the embedding's relative error, and per click the Dice of both
masks decoded from the same previous logits (the reference's).
"""

import argparse
import copy
import statistics

import numpy as np
import torch

from fastsam3d.checkpoints import load_model
from fastsam3d.data import find_cases
from fastsam3d.evaluation import SamSegmenter, dice_score, evaluate_case
from fastsam3d.modeling.configs import build_model


class PairedSegmenter:
    """Reference and fast segmenters in lockstep; clicks follow the reference."""

    def __init__(self, model, dtype: torch.dtype, compile_mode: str | None = None) -> None:
        fast = copy.deepcopy(model).prepare_inference(dtype=dtype, compile_mode=compile_mode)
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


def fixture_agreement(config: str, dtype: torch.dtype, fixture: str, seed: int = 0) -> str:
    """Random-weight agreement of a config's fast path on the fixture image and clicks."""
    data = torch.load(fixture, weights_only=True)
    torch.manual_seed(seed)
    reference = build_model(config).eval()
    fast = copy.deepcopy(reference).prepare_inference(dtype=dtype)
    with torch.inference_mode():
        image = data["image"].float()
        exact, approx = reference.encode(image), fast.encode(image)
        error = float((approx - exact).norm() / exact.norm())
        previous, dice = None, []
        for click in data["click_sequence"]:
            points = torch.tensor([[click["point"]]], dtype=torch.float32)
            labels = torch.tensor([[click["label"]]])
            low, _, mask = reference.decode(exact, points, labels, previous)
            _, _, mask_fast = fast.decode(approx, points, labels, previous)
            dice.append(dice_score(mask_fast.numpy(), mask.numpy()))
            previous = low
    clicks = ", ".join(f"{d:.4f}" for d in dice)
    return (
        f"{config} (random weights, seed {seed}) fast path ({dtype}) vs fp32 reference on the "
        f"fixture: embedding relative error {error:.4f}, Dice per click {clicks}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--images")
    parser.add_argument("--labels")
    parser.add_argument("--fixture", help="official_parity_a.pt: random-weight mode")
    parser.add_argument("--config", default="fastsam3d", help="with --fixture")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"]
    )
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-voxels", type=int, default=200)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the fast path through torch.compile (encoder; on a CPU the decoder too)",
    )
    args = parser.parse_args()
    if args.fixture:
        print(fixture_agreement(args.config, getattr(torch, args.dtype), args.fixture))
        return
    model = load_model(args.model, device=args.device, progress=False)
    compile_mode = "default" if args.compile else None
    paired = PairedSegmenter(model, getattr(torch, args.dtype), compile_mode)
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
        f"{args.model} fast path ({args.dtype}{', compiled' if args.compile else ''}, "
        f"{args.device}) vs fp32 reference: "
        f"{len(values)} masks, Dice median {statistics.median(values):.4f}, "
        f"mean {statistics.mean(values):.4f}, min {min(values):.4f}, "
        f"share >= 0.99: {np.mean(np.array(values) >= 0.99):.3f}"
    )


if __name__ == "__main__":
    main()
