"""Parameters and FLOPs of each model's encoder and click path (the paper's Table 3 columns).

FLOPs are counted by ``torch.utils.flop_counter`` on the exact fp32 reference path (a multiply-add
counts as 2), for one 128^3 crop and one click with previous logits. Usage::

    python benchmarks/model_cost.py --configs fastsam3d sam-med3d-turbo fastsam3d-lite --json OUT
"""

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastsam3d.modeling.configs import build_model, get_config


def count_flops(fn) -> int:
    """Total FLOPs of ``fn()`` (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_cost(name: str) -> dict:
    """Parameters and GFLOPs of one registered config."""
    model = build_model(get_config(name)).eval()
    x = torch.randn(1, 1, 128, 128, 128)
    points = torch.tensor([[[64.0, 60.0, 70.0]]])
    labels = torch.ones(1, 1, dtype=torch.int64)
    previous = torch.zeros(1, 1, 32, 32, 32)
    with torch.inference_mode():
        embedding = model.encode(x)
        encoder = count_flops(lambda: model.encode(x))
        click = count_flops(lambda: model.decode(embedding, points, labels, previous))
    encoder_params = sum(p.numel() for p in model.image_encoder.parameters())
    return {
        "config": name,
        "encoder_params_m": encoder_params / 1e6,
        "prompt_decoder_params_m": (sum(p.numel() for p in model.parameters()) - encoder_params)
        / 1e6,
        "encoder_gflop": encoder / 1e9,
        "click_gflop": click / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["fastsam3d", "sam-med3d-turbo"])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [model_cost(name) for name in args.configs]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
