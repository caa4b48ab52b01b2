"""Overhead of the pipeline's training loop over a minimal hand-written PyTorch loop.

Trains ResNet-20 on synthetic CIFAR-shaped data (3x32x32, on the device) for a
fixed number of steps through ``prune_cli.train.train_epoch`` and through a plain
loop (same model, batch, optimizer, device), interleaved, and prints
``overhead_ratio = pipeline images/s / plain images/s`` (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prune_cli.data import load_data, normalize
from prune_cli.models import build_model
from prune_cli.regularizers import Regularizer
from prune_cli.train import train_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved measurements of each loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.steps * args.batch
    cfg = OmegaConf.create(
        {
            "name": "synthetic",
            "channels": 3,
            "image_size": 32,
            "num_classes": 10,
            "train_size": n,
            "test_size": args.batch,
            "pad": 0,
            "flip": False,
        }
    )
    data = load_data(cfg, seed=0, device=device)

    torch.manual_seed(0)
    model = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3}).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    none = Regularizer(model)

    def pipeline_loop() -> None:
        g = torch.Generator(device=device).manual_seed(0)
        train_epoch(model, data, args.batch, optimizer, none, g, "fp32", progress=False)

    def plain_loop() -> None:
        model.train()
        order = torch.randperm(n, device=device)
        for i in range(0, n, args.batch):
            idx = order[i : i + args.batch]
            x, y = normalize(data.train.x[idx], data), data.train.y[idx]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - tic)

    timed(plain_loop), timed(pipeline_loop)  # warm-up
    pipe, plain = [], []
    for r in range(args.repeats):  # alternate which goes first, so drifts in machine load hit both
        first, second = (pipeline_loop, plain_loop) if r % 2 == 0 else (plain_loop, pipeline_loop)
        a, b = timed(first), timed(second)
        (pipe if first is pipeline_loop else plain).append(a)
        (plain if first is pipeline_loop else pipe).append(b)
    ratios = [p / q for p, q in zip(pipe, plain)]
    print(f"device = {device}, threads = {torch.get_num_threads()}, steps = {args.steps}, batch = {args.batch}")
    print(f"pipeline_images_per_s = {statistics.median(pipe):.1f}")
    print(f"plain_images_per_s = {statistics.median(plain):.1f}")
    print(
        f"overhead_ratio = {statistics.median(ratios):.3f}  (target >= 0.95; per repeat: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + ")"
    )


if __name__ == "__main__":
    main()
