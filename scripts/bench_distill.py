"""What knowledge distillation costs a training epoch: no more than the teacher's forward passes.

ResNet-56 (random weights, CIFAR shape, synthetic images on the device) is pruned to half its params
(``prune_cli.prune``, L1) and trained an epoch through the pipeline's ``train_epoch`` without a teacher and
distilled from the dense network (``Distiller``), in the layout ``trainer.memory_format=auto`` picks; the dense
teacher's forward passes over the same batches (eval mode, inference mode) are timed alone. The three are
interleaved, ``--repeats`` times in rotating order, and the medians printed, with

    ratio = epoch with KD / (epoch without KD + the teacher's forwards alone)    (target <= 1.10)

    python scripts/bench_distill.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

import prune_cli
from prune_cli.core.timing import synchronize
from prune_cli.data import load_data
from prune_cli.data.container import shards
from prune_cli.engine.distill import Distiller
from prune_cli.engine.loop import train_epoch
from prune_cli.engine.settings import MEMORY_FORMATS, resolve_memory_format
from prune_cli.importance.regularizers import Regularizer
from prune_cli.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.steps * args.batch
    spec = {"name": "synthetic", "channels": 3, "image_size": 32, "num_classes": 10, "train_size": n}
    data = load_data(OmegaConf.create({**spec, "test_size": args.batch, "pad": 4, "flip": True}), 0, device)
    layout = resolve_memory_format("auto", device)
    fmt = MEMORY_FORMATS[layout]

    torch.manual_seed(0)
    teacher = build_model({"name": "resnet56", "num_classes": 10, "in_channels": 3}).eval()
    student, table = prune_cli.prune(teacher, torch.randn(1, 3, 32, 32), 0.5)
    teacher, student = teacher.to(device), student.to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    kd = Distiller(teacher, alpha=0.9, temperature=4.0)
    kd.ready(fmt, lambda net: net)
    none = Regularizer(student)

    def epoch(distill) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        train_epoch(student, data, args.batch, optimizer, none, g, "fp32", False, memory_format=layout, distill=distill)

    def teacher_alone() -> None:
        g = torch.Generator(device=device).manual_seed(0)
        with torch.inference_mode():
            for x, *_ in shards(data.train, data, args.batch, generator=g, train=True, memory_format=fmt):
                teacher(x)

    variants = {"without KD": lambda: epoch(None), "with KD": lambda: epoch(kd), "teacher alone": teacher_alone}

    def timed(fn) -> float:
        synchronize(device)
        tic = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - tic

    for fn in variants.values():  # warm-up
        timed(fn)
    seconds = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(timed(variants[name]))
    print(
        f"student: ResNet-56 pruned to {table['params_pruned']:,} of {table['params']:,} params; "
        f"device = {device}, threads = {torch.get_num_threads()}, layout = {layout}, batch = {args.batch}, "
        f"steps = {args.steps}"
    )
    for name, s in seconds.items():
        print(f"{name:14s} {statistics.median(s):7.3f} s / epoch")
    together = zip(seconds["with KD"], seconds["without KD"], seconds["teacher alone"])
    ratios = [with_kd / (plain + alone) for with_kd, plain, alone in together]
    print(
        f"ratio = {statistics.median(ratios):.3f}  (with KD / (without KD + teacher alone); target <= 1.10; "
        "per repeat: " + ", ".join(f"{r:.3f}" for r in ratios) + ")"
    )


if __name__ == "__main__":
    main()
