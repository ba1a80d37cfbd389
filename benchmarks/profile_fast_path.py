"""Where the fast path spends its time: top kernels of one encoder call and one click.

Usage: ``python benchmarks/profile_fast_path.py [--device cuda] [--model fastsam3d]``.
"""

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from fastsam3d.modeling.configs import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="fastsam3d")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args.model).eval().to(device)
    fast = copy.deepcopy(model).prepare_inference(cuda_graphs=False)
    x = torch.randn(1, 1, 128, 128, 128, device=device)
    points = torch.tensor([[[64.0, 60.0, 70.0]]], device=device)
    labels = torch.ones(1, 1, dtype=torch.int64, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.inference_mode():
        emb = fast.encode(x)
        fast.decode(emb, points, labels)
        for name, fn in [
            ("encoder", lambda: fast.encode(x)),
            ("click", lambda: fast.decode(emb, points, labels)),
        ]:
            with profile(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            print(f"== {args.model} fast {name} on {device}")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
