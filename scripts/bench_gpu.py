"""GPU throughput: training and evaluation images/s of ResNet-56 and VGG-16, and what an epoch and a schedule cost.

Synthetic CIFAR-shaped data (3x32x32, 10 classes, random tensors already on the device). A training step is the
project's step (``prune_cli.engine.loop.train_epoch`` without a regularizer): forward and cross-entropy under
``prune_cli.engine.loop.autocast(device, precision)``, backward, SGD (momentum 0.9, weight decay 5e-4); evaluation is a
forward under ``torch.inference_mode()``. Variants: precision fp32 / bf16 (autocast), memory format contiguous /
channels_last (model and inputs), eager / ``torch.compile`` (compile time reported separately: the warm-up steps that
compile are excluded from images/s). Each variant gets a fresh model (seed 0); ``--warmup`` steps, then ``--steps``
timed steps, with ``torch.cuda.synchronize()`` around the timing on CUDA.

Prints a table (model, variant, train img/s, eval img/s, compile s), then per model the time one CIFAR-10 epoch
(50,000 training + 10,000 test images) takes at its best variant, and the full HGSR ResNet-56 schedule (the
pretrain / sparse_train / scratch epochs of ``conf/experiment/hgsr_resnet56_cifar10.yaml``) x that epoch time.

Without CUDA (or with ``--device cpu``) it is a short CPU dry run of the same code (defaults: 2 steps, 1 warm-up,
batch 16) that prints the same table and says that the GPU figures need a GPU. Usage:

    python scripts/bench_gpu.py [--device cuda] [--models resnet56 vgg16] [--batch 128] [--steps 50] [--warmup 10]
                                [--precision fp32 bf16] [--memory-format contiguous channels_last] [--no-compile]
                                [--width-mult 1.0] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from prune_cli.engine.loop import autocast
from prune_cli.models import build_model

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "conf" / "experiment" / "hgsr_resnet56_cifar10.yaml"
HGSR_STAGES = ("pretrain", "sparse_train", "scratch")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
GPU_DEFAULTS = {"batch": 128, "steps": 50, "warmup": 10}
CPU_DEFAULTS = {"batch": 16, "steps": 2, "warmup": 1}
NEEDS_GPU = "GPU figures need a GPU: no CUDA here, so this was a CPU dry run of the same code (not a GPU estimate)."


def hgsr_epochs(preset: Path = PRESET) -> dict[str, int]:
    """Epochs of each training stage of the HGSR preset; a stage the preset leaves out falls back to its schedule."""
    conf = OmegaConf.to_container(OmegaConf.load(preset))
    schedule = conf.get("schedule", {})
    fallback = {}
    for entry in conf.get("defaults", []):
        if isinstance(entry, dict) and "override /schedule" in entry:
            fallback = OmegaConf.to_container(
                OmegaConf.load(ROOT / "conf" / "schedule" / f"{entry['override /schedule']}.yaml")
            )
    epochs = {}
    for stage in HGSR_STAGES:
        value = schedule.get(stage, {}).get("epochs", fallback.get(stage, {}).get("epochs"))
        if value is None:
            raise SystemExit(f"{preset}: no epochs for stage {stage}")
        epochs[stage] = int(value)
    return epochs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args, device: torch.device, precision: str, fmt: str, compiled: bool) -> dict:
    """Images/s of training and evaluation for one variant; compile time (s) when compiled."""
    torch.manual_seed(0)
    arch = {"name": name, "num_classes": 10, "in_channels": 3}
    if args.width_mult != 1.0:
        arch["width_mult"] = args.width_mult
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = build_model(arch).to(device).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch,), device=device)
    run = torch.compile(model) if compiled else model

    def train_step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            run(x)

    def timed(step, mode: bool, n: int) -> float:
        model.train(mode)
        sync(device)
        tic = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        return time.perf_counter() - tic

    compile_s = timed(train_step, True, 1) + timed(eval_step, False, 1)  # the first calls compile, when compiled
    timed(train_step, True, max(args.warmup - 1, 0))
    timed(eval_step, False, max(args.warmup - 1, 0))
    n = args.steps * args.batch
    return {
        "train": n / timed(train_step, True, args.steps),
        "eval": n / timed(eval_step, False, args.steps),
        "compile": compile_s if compiled else None,
    }


def hms(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"])
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 128 on CUDA, 16 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50 on CUDA, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 10 on CUDA, 1 on CPU)")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument(
        "--memory-format", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous", "channels_last"]
    )
    ap.add_argument("--no-compile", action="store_true", help="eager only (skip the torch.compile variants)")
    ap.add_argument("--width-mult", type=float, default=1.0, help="shrink the models (for quick dry runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (use --device cpu for the dry run)")
    gpu = device.type == "cuda"
    for key, value in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        raise SystemExit("--batch and --steps must be >= 1, --warmup >= 0")

    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} thread(s), DRY RUN"
    print(
        f"torch {torch.__version__} on {device} ({where}); batch {args.batch}, {args.warmup} warm-up + "
        f"{args.steps} timed steps per variant, width_mult {args.width_mult}"
    )
    header = f"{'model':<9} {'variant':<28} {'train img/s':>11} {'eval img/s':>10} {'compile s':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    for name in args.models:
        for precision, fmt, mode in itertools.product(args.precision, args.memory_format, modes):
            variant = f"{precision}/{fmt}/{mode}"
            try:
                r = measure(name, args, device, precision, fmt, mode == "compile")
            except Exception as e:  # torch.compile may fail (no C++ compiler, unsupported op)
                if mode != "compile":
                    raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
                print(f"{name:<9} {variant:<28} skipped: {type(e).__name__}: {reason}", flush=True)
                rows.append({"model": name, "variant": variant, "skipped": reason})
                continue
            compile_s = f"{r['compile']:.1f}" if r["compile"] is not None else "-"
            print(f"{name:<9} {variant:<28} {r['train']:>11.1f} {r['eval']:>10.1f} {compile_s:>9}", flush=True)
            rows.append({"model": name, "variant": variant, **r})

    epochs = hgsr_epochs()
    total = sum(epochs.values())
    label = "" if gpu else " [CPU dry-run figures, not GPU estimates]"
    print()
    for name in args.models:
        done = [r for r in rows if r["model"] == name and "train" in r]
        if not done:
            continue
        best = max(done, key=lambda r: r["train"])
        epoch_s = CIFAR_TRAIN / best["train"] + CIFAR_TEST / best["eval"]
        print(
            f"{name}: one CIFAR-10 epoch ({CIFAR_TRAIN:,} train + {CIFAR_TEST:,} test images) at the best variant "
            f"{best['variant']}: {hms(epoch_s)} ({epoch_s:.1f} s){label}"
        )
        if name == "resnet56":
            stages = " + ".join(f"{s} {e}" for s, e in epochs.items())
            print(
                f"{name}: full HGSR schedule ({PRESET.relative_to(ROOT)}: {stages} = {total} epochs) x "
                f"{epoch_s:.1f} s = {hms(total * epoch_s)}{label}"
            )
    if not gpu:
        print(NEEDS_GPU)
    return rows


if __name__ == "__main__":
    main()
