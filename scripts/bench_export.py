"""INT8 against fp32 on this machine's CPU: ONNX Runtime latency of pruned ResNet-56 and VGG-16.

Each network (random weights, CIFAR shape) is pruned to ``--ratio`` of its params (``prune_cli.prune``, L1),
exported to ONNX (``prune_cli.deploy.export``) and quantized to INT8 as ``prune-cli-export --quantize int8`` does
(QDQ, per-channel weights, min-max calibration; here on random images: latency does not depend on the weights'
values). Both files are timed interleaved at batch 1 and ``--batch`` (median of 15 forwards after 3) with
``--threads`` ONNX Runtime threads. Prints each latency and the speed-up fp32 / int8.

    python scripts/bench_export.py --threads 2
"""

from __future__ import annotations

import argparse

import torch

import prune_cli
from prune_cli.deploy.export import export
from prune_cli.deploy.quantize import fp32_bytes, latencies, quantize, session
from prune_cli.models import build_model

SHAPE = (3, 32, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the params pruned away")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(max(args.batch, 64), *SHAPE)
    print(f"ONNX Runtime CPU, {args.threads} threads; networks pruned to {1 - args.ratio:.0%} of their params")
    for name in args.models:
        dense = build_model({"name": name, "num_classes": 10, "in_channels": 3}).eval()
        pruned, table = prune_cli.prune(dense, x[:1], args.ratio)
        fp32 = fp32_bytes(lambda path, net=pruned: export(net, path, "onnx", SHAPE))
        int8, left = quantize(fp32, x[:64].numpy())
        sessions = {kind: session(model, args.threads) for kind, model in (("fp32", fp32), ("int8", int8))}
        timed = latencies(sessions, x.numpy(), [1, args.batch])
        for key in timed["fp32"]:
            a, b = timed["fp32"][key], timed["int8"][key]
            print(f"{name:9s} {key[len('latency_ms_') :]:5s} fp32 {a:8.3f} ms  int8 {b:8.3f} ms  speed-up {a / b:.2f}x")
        if left:
            print(f"{name:9s} left in float: {', '.join(left)}")


if __name__ == "__main__":
    main()
