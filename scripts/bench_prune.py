"""Cost of HGSR's loss-based global greedy selection (fast mode) on ResNet-56, against the exact greedy.

ResNet-56 (random init, a few SGD steps on synthetic class-patterned 32x32 images, BN statistics
recalibrated), 128 synthetic images, ``loss_greedy_select`` in its default fast mode down to 50% of
params on CPU. Prints seconds, forward passes, image-forward equivalents and the exact greedy's pass
count (computed, not run), and the reduction. If ``prune_cli.importance.criteria`` exists, also the seconds every
other criterion needs on the same model. ``--agreement`` first measures how many of the exact greedy's
channels the fast mode removes, on ResNet-20 (digits, 30% of params, three 16-image samples), sparse-like
and plainly trained (the models of tests/test_loss_selection.py). ``--residual`` selects over the residual
streams too (``prune.residual=true``: the traced network's groups). Usage:

    python scripts/bench_prune.py [--threads 2] [--ratio 0.5] [--target params] [--train-steps 20]
                                  [--images 128] [--set prescreen=16 verify=null ...] [--no-criteria]
                                  [--model vgg16 --head linear --protect-last] [--agreement] [--residual]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from prune_cli.methods.hgsr import loss_greedy_select
from prune_cli.models import build_model, with_shared_groups
from prune_cli.structure.channels import structure

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "criterion"


def agreement() -> None:
    """Fast vs exact on ResNet-20: the share of the exact greedy's removed channels the fast mode removes too."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))  # the test's models: a checkout's script, not part of the package
    from test_loss_selection import digits, removed_set, trained

    x, y = digits(3)
    for decades, kind in ((3, "sparse-like (BN scales over 3 decades)"), (0, "plainly trained")):
        model = trained({"name": "resnet20", "num_classes": 10, "in_channels": 3}, x, y, steps=30, decades=decades)
        st = structure(model, (3, 8, 8))
        shares, gaps = [], []
        for seed in (100, 101, 102):
            i = torch.randperm(1500, generator=torch.Generator().manual_seed(seed))[:16]
            runs = {
                mode: loss_greedy_select(
                    model, x[i], y[i], structure=st, target="params", ratio=0.3, mode=mode, batch_variants=16
                )
                for mode in ("exact", "fast")
            }
            exact, fast = (removed_set(runs[m][0]) for m in ("exact", "fast"))
            shares.append(len(exact & fast) / len(exact))
            gaps.append([abs(runs[m][1]["loss_masked"] - runs[m][1]["loss_original"]) for m in ("exact", "fast")])
        print(
            f"agreement, {kind}: " + ", ".join(f"{a:.3f}" for a in shares) + f" (mean {sum(shares) / 3:.3f}); "
            "|L - L0| exact / fast: " + ", ".join(f"{e:.4f} / {f:.4f}" for e, f in gaps),
            flush=True,
        )


def synthetic(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised 3x32x32 images: a smooth random template per class (the same for every seed) plus noise."""
    templates = F.interpolate(
        torch.randn(classes, 3, 8, 8, generator=torch.Generator().manual_seed(1234)), size=32, mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + 0.7 * torch.randn(n, 3, 32, 32, generator=g), y


def prepare(name: str, steps: int, seed: int = 0, **arch) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({"name": name, "num_classes": 10, "in_channels": 3, **arch})
    x, y = synthetic(64 * max(steps, 4), seed=seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for i in range(steps):
        loss = F.cross_entropy(model(x[64 * i : 64 * (i + 1)]), y[64 * i : 64 * (i + 1)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # recalibrate BN running statistics (cumulative average over 256 images)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for i in range(0, 256, 64):
            model(x[i : i + 64])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--head", default=None, help="VGG classifier head (linear: HGSR's VGG-14)")
    ap.add_argument("--protect-last", action="store_true", help="never prune the groups feeding the classifier")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--target", default="params", choices=["channels", "params", "macs"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=20, help="SGD steps on synthetic data before selecting")
    ap.add_argument("--no-criteria", action="store_true", help="skip timing the other criteria")
    ap.add_argument("--agreement", action="store_true", help="first: fast vs exact on ResNet-20 (about a minute)")
    ap.add_argument("--residual", action="store_true", help="the residual streams are groups too (prune.residual)")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="loss_greedy_select keyword overrides, e.g. prescreen=16 verify=null mode=exact",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.agreement:
        agreement()

    t = time.perf_counter()
    model = prepare(args.model, args.train_steps, **({"head": args.head} if args.head else {}))
    if args.residual:
        model = with_shared_groups(model, (3, 32, 32))
    x, y = synthetic(args.images, seed=2)
    print(
        f"model {args.model}: {sum(model.widths)} channels in {len(model.widths)} groups; "
        f"prepared in {time.perf_counter() - t:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    st = structure(model, (3, 32, 32))
    knobs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    protect = model.last_groups() if args.protect_last else set()
    _, stats = loss_greedy_select(
        model, x, y, structure=st, target=args.target, ratio=args.ratio, protect=protect, progress=True, **knobs
    )
    fast_passes = stats["image_forward_equivalents"] / args.images
    print(
        f"\nloss ({stats['mode']}{', ' + str(knobs) if knobs else ''}) to {args.ratio:.0%} of {args.target}, "
        f"{args.images} images:"
    )
    for key in (
        "seconds",
        "rounds",
        "round_sizes",
        "halvings",
        "forward_passes",
        "backward_passes",
        "images_forwarded",
        "image_forward_equivalents",
        "exact_passes_estimate",
        "channels_removed",
        "removed_fraction",
        "loss_original",
        "loss_masked",
    ):
        v = stats[key]
        print(f"  {key:<26} {v:.4f}" if isinstance(v, float) else f"  {key:<26} {v}")
    print(f"  {'fast pass equivalents':<26} {fast_passes:.1f}  (image_forward_equivalents / {args.images})")
    print(
        f"  {'reduction = exact / fast':<26} {stats['exact_passes_estimate'] / fast_passes:.0f}x  "
        f"(image-forwards; exact = exact_passes_estimate x {args.images} full forwards)"
    )
    exact_hours = stats["seconds"] * stats["exact_passes_estimate"] / fast_passes / 3600
    print(f"  {'exact greedy, estimated':<26} {exact_hours:.0f} h at this run's seconds per image-forward")

    if args.no_criteria:
        return
    try:
        from prune_cli.importance.criteria import CRITERIA, Sample, build_criterion
    except ImportError:
        print("\nprune_cli.criteria not available: other criteria not timed")
        return
    print(f"\nother criteria on the same model ({args.images} images unless their config asks for more):")
    for name in sorted(CRITERIA):
        if name == "loss":
            continue
        try:
            cfg = OmegaConf.load(CONF / f"{name}.yaml") if (CONF / f"{name}.yaml").exists() else {"name": name}
            crit = build_criterion(cfg)
            n = max(getattr(crit, "sample_size", 0), args.images)
            xs, ys = synthetic(n, seed=2)
            t = time.perf_counter()
            crit.scores(model, "filter", Sample(xs, ys))
            print(
                f"  {name:<12} {time.perf_counter() - t:8.2f} s  ({n} images)"
                if crit.needs_data
                else f"  {name:<12} {time.perf_counter() - t:8.2f} s",
                flush=True,
            )
        except Exception as e:  # one broken criterion must not hide the others
            print(f"  {name:<12} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
