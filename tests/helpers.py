"""Helpers the test modules share (test modules never import each other): composing configs in-process,
running the installed command, and a tiny synthetic run."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import fakedata
from prune_cli.cli.run import CONF_DIR
from prune_cli.run.tables import timing_column
from prune_cli.structure.attention import form

ROOT = Path(__file__).resolve().parent.parent
# results tables captured before the architecture changed; their cells are exact, and a CPU whose kernels round
# otherwise (torch's AVX2 kernels against AVX-512's) has its own, in a folder named by its capability
GOLDEN_ROOT = ROOT / "tests" / "golden"
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
GOLDEN_DIR = GOLDEN_ROOT / _CAPABILITY if (GOLDEN_ROOT / _CAPABILITY).is_dir() else GOLDEN_ROOT

# a tiny synthetic run: the whole pipeline in a second or two
TINY = [
    "dataset=synthetic",
    "dataset.train_size=96",
    "dataset.test_size=48",
    "dataset.image_size=16",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=48",
    "trainer.progress=false",
    "trainer.threads=1",  # two test workers on two cores: more threads per run would oversubscribe them
    "latency=off",  # timing is tested on its own (test_latency.py); elsewhere it only costs seconds
]


# a run directory written by prune_cli before checkpoints had a schema version (pretrain and prune done,
# finetune not run), and the overrides of the command that wrote it
SCHEMA1_RUN = ROOT / "tests" / "data" / "run_schema1"
SCHEMA1_OVERRIDES = [
    "dataset=synthetic",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "dataset.image_size=8",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=32",
    "trainer.progress=false",
    "model.width_mult=0.25",
    "schedule.pretrain.epochs=1",
    "schedule.finetune.epochs=1",
]


def calibrated(model, shape, seed=0):
    """Random weights with realistic BN statistics (a few batches in training mode), returned in eval mode, so
    logits are of ordinary size and masked-versus-pruned comparisons mean something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(16, *shape))
    return model.eval()


def compose_config(*overrides):
    """The config ``prune-cli`` composes for these overrides (Hydra's compose API, in-process)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run_cli(*args, cwd, env=None, timeout=300):
    """``python -m prune_cli ARGS`` as a user runs it."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prune_cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def make_preset_data(root: Path) -> Path:
    """Small CIFAR-10/100 and TinyImageNet files in the real formats, for the presets' smoke runs."""
    fakedata.make_cifar10(root, n_train=120, n_test=64)
    fakedata.make_cifar100(root, n_train=200, n_test=100)
    fakedata.make_tinyimagenet(root, n_classes=3, n_train_per_class=4, n_val_per_class=2)
    fakedata.make_knockoff_generator(root / "netG_cifar.pth")
    return root


# every golden run (a preset's smoke run, the demo) trains contiguous: the tables hold exact floats of the CPU's
# kernels, and contiguous reproduces earlier versions' results bit for bit (auto trains channels_last on the CPU
# now, whose kernels round otherwise), so the tables captured on other CPUs still hold
GOLDEN_LAYOUT = "trainer.memory_format=contiguous"
# the plain ``prune-cli`` demo as the golden table holds it (latency off: its columns are not compared)
DEMO_OVERRIDES = ["trainer.progress=false", "latency=off", GOLDEN_LAYOUT]


def smoke_overrides(preset: str, root) -> list[str]:
    """A preset's smoke run on the files of ``make_preset_data(root)``: the preset tests' and golden tables' run."""
    out = [f"experiment={preset}", "debug=smoke", f"dataset.root={root}", "trainer.progress=false", GOLDEN_LAYOUT]
    if "tinyimagenet" in preset:  # 12 train / 6 val images of 64x64: use them all
        out += ["dataset.subset=null", "dataset.test_subset=null"]

    else:
        out += ["dataset.check_md5=false"]
    if preset.startswith("pfs"):
        out += ["dataset.val_split=16"]
    if preset.startswith("hgsr"):
        # the loss greedy itself on a quarter-width network with 8 images and half the remaining channels per round:
        # seconds (VGG-14: 1,056 channels to 85% of params); the full width takes minutes (scripts/bench_prune.py)
        out += ["model.width_mult=0.25", "criterion.num_images=8", "criterion.channels_per_round=0.5"]
    if preset.startswith("polarization"):
        # the paper's lambda (5e-5) needs many epochs to polarize the gammas; four steps at lambda 1.0 do it, so
        # the smoke run exercises the histogram rule itself (its first local minimum sets the threshold)
        out += ["regularizer.lam=1.0", "schedule.sparse_train.batch_size=16"]
    if preset.startswith("swp"):
        # the paper's alpha (1e-5) kills stripes over many epochs; in four steps only a threshold just below the
        # skeleton's starting value 1 does, so the smoke run removes dead filters and stripes for real
        out += [
            "schedule.sparse_train.batch_size=16",
            "regularizer.threshold=0.99995",
            "schedule.stripe.threshold=0.99995",
        ]
    if preset.startswith("scop"):  # the generator's file in the official format, random weights (a stand-in)
        out += [f"schedule.scop.generator_path={Path(root) / 'netG_cifar.pth'}"]
    if preset.startswith("pfp"):  # sensitivities of one image (full VGG-16 widths: 0.4 s an image and step)
        out += ["schedule.pfp.sample_size=1"]
    if preset.startswith("rmnet"):  # as for swp: in one step the learned factors die only near their start, 1
        out += ["regularizer.threshold=0.9999"]
    return out


def results_table(run_dir: Path) -> str:
    """A run's results.csv as text, every cell as written, without its timing columns (``report.timing_column``:
    wall-clock seconds, latency, speed-up)."""
    df = pd.read_csv(Path(run_dir) / "results.csv", dtype=str, keep_default_na=False)
    return df.drop(columns=[c for c in df.columns if timing_column(c)]).to_csv(index=False)


def run_interrupted(cfg, run_dir: Path, monkeypatch, at_epoch: int) -> None:
    """Run ``cfg`` into ``run_dir`` and interrupt it (Ctrl-C) as its ``at_epoch``-th training epoch starts."""
    import pytest

    from prune_cli.engine import loop
    from prune_cli.run import pipeline

    real_epoch, calls = loop.train_epoch, {"n": 0}

    def dying_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, run_dir)
    monkeypatch.setattr(loop, "train_epoch", real_epoch)


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with its norm layers' affines (and BatchNorm statistics) and its all-zero weights drawn, so every
    channel changes the output (a masked-versus-pruned comparison then means something); returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.GroupNorm) and m.weight is not None:
                n = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        g = torch.Generator().manual_seed(seed + 1)  # a transformer's: the draws above stay as they were
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for p in model.parameters():  # zero at init (ViT's head and class token): they would hide the channels
            if p.dim() > 1 and not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def removal(graph, share: float = 0.5, seed: int = 0) -> set[int]:
    """``share`` of every group of a channel graph's channels (rounded down, at least one kept), at random."""
    g = torch.Generator().manual_seed(seed)
    removed = set()
    for group in graph.groups:
        n = min(int(share * len(group.channels)), len(group.channels) - 1)
        removed |= {group.channels[i] for i in torch.randperm(len(group.channels), generator=g)[:n].tolist()}
    return removed


def layer_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs per image from each conv / linear layer's shapes and output size, seen by hooks in one eval-mode
    forward of ``x[:1]`` (the convention: what inference costs; a linear layer once per position of its input,
    so a channels-last one once per H x W position; self-attention on N tokens: its projections once per token
    and its matmuls QK^T and AV, N x N x (q's width + v's width)). The model's mode is left as it was."""
    macs = []

    def hook(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, torch.nn.Linear):
            macs.append(m.in_features * out[0].numel())
        elif form(m) in ("multihead", "head"):  # torch's applies its projections as functions, ours as modules
            tokens = inputs[0].shape[1 if m.batch_first else 0]
            width = (m.in_proj_weight if form(m) == "multihead" else m.qkv.weight).shape[0] // 3
            functional = m.in_proj_weight.numel() + m.out_proj.weight.numel() if form(m) == "multihead" else 0
            macs.append(tokens * functional + 2 * tokens**2 * width)
        elif form(m) == "swin":  # windows of wh x ww positions over the map padded to their multiples
            (wh, ww), (h, w) = m.window_size, inputs[0].shape[1:3]
            tokens = -(-h // wh) * wh * -(-w // ww) * ww
            functional = 0 if hasattr(m, "head_dim") else m.qkv.weight.numel() + m.proj.weight.numel()
            macs.append(tokens * functional + 2 * tokens * wh * ww * m.qkv.out_features // 3)
        elif form(m) == "maxvit":  # G groups of P positions; its linear layers are hooked themselves
            _, groups, positions, _ = inputs[0].shape
            macs.append(2 * groups * positions**2 * m.to_qkv.out_features // 3)
        else:  # the qkv form: its linear layers are hooked themselves
            macs.append(2 * inputs[0].shape[1] ** 2 * m.qkv.out_features // 3)

    def counted(m) -> bool:
        return isinstance(m, torch.nn.Conv2d | torch.nn.Linear) or form(m) is not None

    inside = set()  # the projections torch's and torchvision's code applies as functions (never called)
    for m in model.modules():
        if form(m) == "multihead":
            inside.add(id(m.out_proj))
        elif form(m) == "swin" and not hasattr(m, "head_dim"):
            inside |= {id(m.qkv), id(m.proj)}
    hooks = [m.register_forward_hook(hook) for m in model.modules() if counted(m) and id(m) not in inside]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return sum(macs)


def shape_count(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(params, MACs per image), counted from the network itself: every parameter's elements, and
    :func:`layer_macs`."""
    return sum(p.numel() for p in model.parameters()), layer_macs(model, x)


# ---------------------------------------------------------------------- small vision transformers


def tiny_vit(num_classes: int = 1000) -> torch.nn.Module:
    """torchvision's ViT: 16 x 16 images in 4 patches, 2 layers of 4 heads on a 16-wide stream, MLPs of 24."""
    torch.manual_seed(0)
    model = VisionTransformer(16, 8, 2, 4, 16, 24, num_classes=num_classes)
    return randomized(model)


def swin(v2: bool, num_classes: int = 10) -> torch.nn.Module:
    """Two stages of two blocks (the second block's windows shifted), 4 x 4 windows on a 8 x 8 map, patch merging."""
    v2_parts = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        [4, 4], 16, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=num_classes, **v2_parts
    )


def maxvit(num_classes: int = 10) -> torch.nn.Module:
    """Two stages of one MaxViT block (MBConv, window and grid attention of 4-wide heads) on 32 x 32 images."""
    return MaxVit((32, 32), 8, 2, [16, 32], [1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=num_classes)
