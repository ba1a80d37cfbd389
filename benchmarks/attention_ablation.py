"""The paper's Table 4 at this project's scale: dense vs sparse, fused (flash) vs not.

Encoder time and peak memory of each attention variant beside the exact fp32 reference
(random weights at the released sizes, measured in one run), and, with ``--model``, the
click-simulated Dice of each variant on labelled volumes (same clicks protocol as
``fastsam3d eval``). Usage::

    python benchmarks/attention_ablation.py --device cuda --json table4_speed.json  # bf16
    python benchmarks/attention_ablation.py --device cpu --no-speed --model default \
        --images DIR --labels DIR --clicks 5 --json table4_dice.json
"""

import argparse
import copy
import functools
import importlib.util
import json
import statistics

import torch

from fastsam3d.benchmark import _peak_mib, describe_device, time_median
from fastsam3d.checkpoints import load_model
from fastsam3d.data import find_cases
from fastsam3d.evaluation import SamSegmenter, evaluate_case
from fastsam3d.modeling.attention import RelPosAttention3D
from fastsam3d.modeling.configs import build_model, get_config

# (name, attention backend of the dense global blocks, sparse pairs or None, rel-pos kernel)
VARIANTS = (
    ("dense, math (fp32 reference)", "math", None, False),
    ("dense, SDPA with the bias as a mask", "sdpa", None, False),
    ("dense, bias folded into the dot product (flash)", "flash", None, False),
    ("dense, bias inside one Triton flash kernel", "sdpa", None, True),
    ("sparse (64, 1): 8 local segments", "sdpa", ((64, 1),), False),
    ("sparse (64, 1) + (512, 8) mixed", "sdpa", ((64, 1), (512, 8)), False),
)


def variant_model(base, attention: str, sparse, relpos_kernel: bool, dtype: torch.dtype):
    """A copy of ``base`` with the variant's attention, prepared in ``dtype`` unless it is the
    reference; None where the variant cannot run here (the Triton kernel off CUDA)."""
    model = copy.deepcopy(base)
    if sparse is not None:
        config = base.config.replace(sparse_attention=sparse)
        model = build_model(config).to(base.device)
        model.load_state_dict(base.state_dict())
        model.eval()
    if attention == "math" and sparse is None:
        return model
    model.prepare_inference(dtype=dtype, attention=attention, cuda_graphs=False)
    layers = [m for m in model.image_encoder.modules() if isinstance(m, RelPosAttention3D)]
    for layer in layers:
        layer.relpos_kernel = relpos_kernel and layer.use_relpos_kernel()
    if relpos_kernel and not any(layer.relpos_kernel for layer in layers):
        return None
    return model


def speed(config_name: str, device: torch.device, batches, repeats: int, dtype) -> list[dict]:
    """Encoder median ms and peak MiB of every variant at each batch size."""
    rows = []
    base = build_model(get_config(config_name)).eval().to(device)
    for name, *variant in VARIANTS:
        model = variant_model(base, *variant, dtype)
        if model is None:
            continue
        for batch in batches:
            x = torch.randn(batch, 1, 128, 128, 128, device=device)
            run = functools.partial(model.encode, x)
            with torch.inference_mode():
                ms = time_median(run, device, repeats, 3)
                peak = _peak_mib(run, device)
            rows.append(
                {"config": config_name, "variant": name, "batch": batch, "ms": ms, "peak_mib": peak}
            )
    return rows


def dice(model_name: str, images: str, labels: str, clicks: int, device: str, dtype) -> list[dict]:
    """Mean Dice per click of every variant on the labelled cases (fastsam3d protocol)."""
    base = load_model(model_name, device=device, progress=False)
    options = argparse.Namespace(
        structures=None, min_voxels=200, seed=0, clicks=clicks, protocol="fastsam3d", scoring="roi"
    )
    rows = []
    for name, *variant in VARIANTS:
        model = variant_model(base, *variant, dtype)
        if model is None:
            continue
        segmenter = SamSegmenter(model, newest_only=False)
        results = []
        for index, case in enumerate(find_cases(labels, images)):
            results += evaluate_case(segmenter, case, options, index, base.config.intensity_clip)
        per_click = [statistics.mean(r["dice"][i] for r in results) for i in range(clicks)]
        rows.append({"variant": name, "structures": len(results), "mean_dice": per_click})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["fastsam3d", "fastsam3d-lite"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--model", help="weights for the Dice columns")
    parser.add_argument("--images")
    parser.add_argument("--labels")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the prepared variants' encoder dtype (default: bfloat16 on CUDA, else float32)",
    )
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    report = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "dtype": str(dtype),
    }
    if not args.no_speed:
        report["speed"] = [
            row
            for name in args.configs
            for row in speed(name, device, args.batches, args.repeats, dtype)
        ]
    if args.model:
        report["dice"] = dice(args.model, args.images, args.labels, args.clicks, args.device, dtype)
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
