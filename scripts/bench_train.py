"""Overhead of the pipeline's training loop over a minimal hand-written PyTorch loop.

Trains ResNet-20 (``--model``: another CIFAR network, e.g. resnet56) on synthetic CIFAR-shaped data
(3x32x32, on the device) for a fixed number of steps through ``prune_cli.engine.loop.train_epoch`` and through a plain
loop (same model, batch, optimizer, device), each in both memory formats (contiguous
and channels_last), interleaved; with ``--compile`` also both through ``torch.compile``
(inductor; compile time reported apart, excluded from images/s). Prints every variant's
images/s (what each trick buys on this machine), pipeline / plain per setting, and
``overhead_ratio`` = the pipeline in its fastest setting / the fastest plain loop (target >= 0.95) and
``default_ratio`` = the pipeline in the layout ``trainer.memory_format=auto`` picks on the device / the fastest
plain loop: what a run with default settings gets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prune_cli.data import load_data, normalize
from prune_cli.engine.loop import compiled, train_epoch
from prune_cli.engine.settings import resolve_memory_format
from prune_cli.importance.regularizers import Regularizer
from prune_cli.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", help="a CIFAR model name (resnet20, resnet56, vgg16...)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved measurements of each loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile variants (about a minute each on a CPU)")
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

    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    settings = list(layouts) + ([f"{k}+compile" for k in layouts] if args.compile else [])
    nets = {}  # per setting and loop: a model (the same initial weights) and its optimizer
    for kind in ("plain", "pipeline"):
        for setting in settings:
            torch.manual_seed(0)
            fmt = layouts[setting.split("+")[0]]
            model = build_model({"name": args.model, "num_classes": 10, "in_channels": 3}).to(device, memory_format=fmt)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            on = OmegaConf.create({"compile": setting.endswith("+compile"), "compile_backend": "inductor"})
            nets[kind, setting] = model, compiled(model, on), optimizer

    def pipeline_loop(setting: str):
        model, net, optimizer = nets["pipeline", setting]
        none, layout = Regularizer(model), setting.split("+")[0]

        def run() -> None:
            g = torch.Generator(device=device).manual_seed(0)
            train_epoch(net, data, args.batch, optimizer, none, g, "fp32", progress=False, memory_format=layout)

        return run

    def plain_loop(setting: str):
        model, net, optimizer = nets["plain", setting]
        layout = setting.split("+")[0]

        def run() -> None:
            model.train()
            order = torch.randperm(n, device=device)
            for i in range(0, n, args.batch):
                idx = order[i : i + args.batch]
                x = normalize(data.train.x[idx].contiguous(memory_format=layouts[layout]), data)
                loss = F.cross_entropy(net(x), data.train.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run

    variants = {f"plain {k}": plain_loop(k) for k in settings} | {f"pipeline {k}": pipeline_loop(k) for k in settings}

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - tic)

    for name, fn in variants.items():  # warm-up (and compiling)
        tic = time.perf_counter()
        timed(fn)
        if name.endswith("+compile"):
            print(f"{name}: first epoch (compiling) {time.perf_counter() - tic:.1f} s", flush=True)
    speeds = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):  # rotate the order, so drifts in machine load hit every variant alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            speeds[name].append(timed(variants[name]))
    print(
        f"model = {args.model}, device = {device}, threads = {torch.get_num_threads()}, steps = {args.steps}, "
        f"batch = {args.batch}"
    )
    for name, s in speeds.items():
        print(f"{name:38s} {statistics.median(s):8.1f} images/s")
    for setting in settings:  # the pipeline against the plain loop in the same setting, repeat by repeat
        r = [p / q for p, q in zip(speeds[f"pipeline {setting}"], speeds[f"plain {setting}"])]
        print(f"ratio {setting:21s} = {statistics.median(r):.3f}  (pipeline / plain, same setting)")
    # the pipeline's fastest setting against the fastest hand-written loop
    best = {
        kind: max(settings, key=lambda k: statistics.median(speeds[f"{kind} {k}"])) for kind in ("plain", "pipeline")
    }
    pipe, plain = speeds[f"pipeline {best['pipeline']}"], speeds[f"plain {best['plain']}"]
    ratios = [p / q for p, q in zip(pipe, plain)]
    print(
        f"overhead_ratio = {statistics.median(ratios):.3f}  (pipeline {best['pipeline']} / plain {best['plain']}; "
        "target >= 0.95; per repeat: " + ", ".join(f"{r:.3f}" for r in ratios) + ")"
    )
    default = resolve_memory_format("auto", device)  # what a run with default settings trains in
    ratios = [p / q for p, q in zip(speeds[f"pipeline {default}"], plain)]
    print(
        f"default_ratio = {statistics.median(ratios):.3f}  (pipeline {default}: trainer.memory_format=auto on "
        f"{device.type}, / plain {best['plain']}; target >= 0.95)"
    )


if __name__ == "__main__":
    main()
