"""Seconds each channel criterion needs on ResNet-56 (random init) on CPU.

Data-driven criteria get synthetic 32x32 images and use their configured default
sample sizes (conf/criterion/<name>.yaml). Usage:

    python scripts/bench_criteria.py [--threads N] [--only l1 fpgm ...] [--model resnet56]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from prune_cli.importance.criteria import CRITERIA, Sample, build_criterion
from prune_cli.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "criterion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--only", nargs="*", help="criteria to time (default: every conf/criterion/*.yaml)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model({"name": args.model, "num_classes": 10, "in_channels": 3})
    names = args.only or sorted(p.stem for p in CONF.glob("*.yaml") if p.stem in CRITERIA)
    crits = {n: build_criterion(OmegaConf.load(CONF / f"{n}.yaml")) for n in names}
    n_images = max([c.sample_size for c in crits.values()] + [1])
    sample = Sample(torch.randn(n_images, 3, 32, 32), torch.randint(0, 10, (n_images,)))
    print(
        f"model {args.model}, {sum(model.widths)} channels in {len(model.widths)} groups, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print("wall = elapsed seconds; cpu = this process's CPU seconds (wall ~ cpu / threads on an idle machine)")
    print(f"{'criterion':<12} {'images':>6} {'wall_s':>8} {'cpu_s':>8}  options")
    for name, crit in crits.items():
        t, c = time.perf_counter(), time.process_time()
        crit.scores(model, sample=sample if crit.needs_data else None)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(f"{name:<12} {crit.sample_size:>6} {wall:>8.2f} {cpu:>8.2f}  {crit.hparams}", flush=True)


if __name__ == "__main__":
    main()
