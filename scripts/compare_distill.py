"""Finetuning a pruned network with and without knowledge distillation from its dense model, on Fashion-MNIST.

For each seed: ResNet-20 is trained dense (``pretrain``), then pruned to each ``--ratios`` share of its params by
L1-norm (from the dense model) and by HGSR's loss greedy (from a HGSR sparse-trained copy, ``sparse_train``), and
each pruned network is finetuned with labels alone and distilled from the model it was pruned from
(``schedule.finetune.distill.alpha``; teacher ``dense``); HGSR's also distilled from the dense model before sparse
training (an explicit teacher). The dense and sparse models are trained once per seed and shared through
``init_from``. Prints the final top-1 (mean ± sample std over the seeds) per method, ratio and
finetune, and writes every run under ``--out``.

    python scripts/compare_distill.py --out runs/kd --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from prune_cli.cli.run import CONF_DIR
from prune_cli.run import pipeline

METHODS = {  # method: (the checkpoint it prunes, its criterion and selection overrides)
    "l1": ("pretrain", ["criterion=l1", "prune.scope=layer"]),
    "hgsr": ("sparse_train", ["criterion=loss", "prune.scope=global", "prune.protect_last=false"]),
}


def config(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def run(out: Path, overrides: list[str]) -> pd.DataFrame:
    """One run into ``out`` (resumed or taken as done when it is there already); its results table."""
    pipeline.run(config(overrides), out)
    return pd.read_csv(out / "results.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compare_distill"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7], help="shares of the params removed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--train", type=int, default=10000, help="training images (a stratified subset)")
    ap.add_argument("--test", type=int, default=10000, help="test images")
    ap.add_argument("--epochs", type=int, nargs=3, default=[10, 5, 5], help="pretrain, sparse_train, finetune")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pre, sparse, fine = args.epochs
    common = [
        "model=resnet20",
        "dataset=fashion_mnist",
        f"dataset.subset={args.train}",
        f"dataset.test_subset={args.test}",
        "trainer.progress=false",
        f"trainer.threads={args.threads}",
        "latency=off",
    ]
    training = ["lr=0.05", "lr_schedule=cosine", "batch_size=128"]
    results = []
    for seed in args.seeds:
        base = [*common, f"seed={seed}"]
        dense = args.out / f"seed{seed}" / "dense"
        run(
            dense,
            [
                *base,
                "schedule=pretrain",
                f"schedule.pretrain.epochs={pre}",
                *(f"schedule.pretrain.{o}" for o in training),
            ],
        )
        sparse_dir = args.out / f"seed{seed}" / "hgsr_sparse"
        if "hgsr" in args.methods:
            run(
                sparse_dir,
                [
                    *base,
                    "schedule=sparse",
                    "schedule.stages=[sparse_train]",
                    "regularizer=hgsr",
                    f"init_from={dense / 'checkpoints' / 'pretrain.pt'}",
                    f"schedule.sparse_train.epochs={sparse}",
                    *(f"schedule.sparse_train.{o}" for o in training),
                ],
            )
        for method, (source, selection) in ((m, METHODS[m]) for m in args.methods):
            start = (dense if source == "pretrain" else sparse_dir) / "checkpoints" / f"{source}.pt"
            # finetunes: with labels; distilled from the model pruned; HGSR also from the dense model before
            # sparse training (the sparse-trained model it prunes is a weaker teacher)
            variants = {"plain": (0.0, "dense"), "kd": (args.alpha, "dense")}
            if source != "pretrain":
                variants["kd_pretrain"] = (args.alpha, str(dense / "checkpoints" / "pretrain.pt"))
            for ratio in args.ratios:
                for variant, (alpha, teacher) in variants.items():
                    name = f"{method}_{ratio:g}_{variant}"
                    table = run(
                        args.out / f"seed{seed}" / name,
                        [
                            *base,
                            *selection,
                            f"init_from={start}",
                            "schedule=finetune",
                            "schedule.stages=[prune,finetune]",
                            "prune.target=params",
                            f"prune.ratio={ratio}",
                            f"schedule.finetune.epochs={fine}",
                            "schedule.finetune.lr=0.01",
                            "schedule.finetune.lr_schedule=cosine",
                            f"schedule.finetune.distill.alpha={alpha}",
                            f"schedule.finetune.distill.temperature={args.temperature}",
                            f"schedule.finetune.distill.teacher={teacher}",
                        ],
                    )
                    final = table.iloc[-1]
                    row = {"method": method, "ratio": ratio, "finetune": variant, "seed": seed, "top1": final.top1}
                    results.append({**row, "params": final.params, "teacher_top1": teacher_top1(table, teacher)})
                    print(f"seed {seed} {name}: top1 {final.top1:.2f} params {final.params}", flush=True)
    frame = pd.DataFrame(results)
    frame.to_csv(args.out / "compare_distill.csv", index=False)
    print("\n| method | params removed | finetune | teacher top-1 | top-1 (mean ± std) | seeds |")
    print("|---|---|---|---|---|---|")
    for (method, ratio, variant), group in frame.groupby(["method", "ratio", "finetune"]):
        values = list(group.top1)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        teacher = "-" if variant == "plain" else f"{group.teacher_top1.mean():.2f}"
        top1 = f"{statistics.mean(values):.2f} ± {std:.2f}"
        print(f"| {method} | {ratio:.0%} | {variant} | {teacher} | {top1} | {len(values)} |")


def teacher_top1(table: pd.DataFrame, teacher: str) -> float:
    """The teacher's test top-1: the row of the stage the pruned model came from, or the checkpoint's own row."""
    if teacher == "dense":
        before = table.index[table.stage == "prune"][0] - 1
        return float(table.top1[before])
    rows = pd.read_csv(Path(teacher).parent.parent / "results.csv")
    return float(rows[rows.stage == Path(teacher).stem].top1.iloc[0])


if __name__ == "__main__":
    main()
