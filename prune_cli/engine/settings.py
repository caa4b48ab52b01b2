"""The ``trainer.*`` options (where and how every stage trains), the device they name, and the
process-wide settings they make (threads, deterministic kernels)."""

from __future__ import annotations

import re

import torch

from prune_cli.core.errors import UserError
from prune_cli.core.options import Bool, Choice, Int, Str

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def device_name_error(name) -> str | None:
    """Why ``name`` is not a device name prune_cli understands (None when it is one)."""
    ok = re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name))
    return None if ok else f"must be {DEVICES}; got {name!r}"


OPTIONS = (
    Str(
        "device",
        "auto",
        "auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps",
        rule=device_name_error,
        rule_doc=DEVICES,
    ),
    Int("batch_size", 128, "default batch size of every stage (a stage may set its own)", lo=1),
    Int("eval_batch_size", 1000, "batch size for evaluation", lo=1),
    Int("threads", 0, "CPU threads for torch (0: torch's default)", lo=0),
    Choice(
        "memory_format",
        "auto",
        ("auto", "channels_last", "contiguous"),
        "layout of conv weights and batches while training; auto: when resuming, the run's recorded one (runs "
        "older than the option: contiguous), else channels_last on cpu and cuda, contiguous on mps (channels_last "
        "trains ResNet-56 24-31% faster on a 2-core CPU; contiguous reproduces earlier versions' CPU results bit for "
        "bit)",
        absent="auto",
    ),
    Bool(
        "compile",
        False,
        "train through torch.compile (the first epoch includes the compile time, reported as compile_seconds; "
        "checkpoints hold the uncompiled network's weights)",
        absent=False,
    ),
    Choice(
        "compile_backend",
        "inductor",
        ("inductor", "aot_eager", "eager"),
        "torch.compile's backend: inductor (generated kernels, the speed-up; needs a C++ compiler on the CPU) | "
        "aot_eager, eager (trace only: check that a network compiles, no speed-up)",
        absent="inductor",
    ),
    Choice("precision", "fp32", ("fp32", "bf16", "fp16"), "autocast precision (fp16 needs cuda)"),
    Bool(
        "sync_bn",
        False,
        "distributed runs on CUDA (torchrun): BatchNorm statistics over every process's shard (SyncBatchNorm) "
        "instead of each process's own",
        absent=False,
    ),
    Bool("deterministic", False, "deterministic kernels (slower on GPU); CPU runs are reproducible anyway"),
    Int("max_epochs", None, "cap every stage's epochs (smoke runs)", lo=1, nullable=True),
    Int("eval_every", 1, "evaluate on the test split every N epochs (and always at the last)", lo=1),
    Choice("progress", "auto", ("auto", True, False), "a progress bar per epoch: auto = on a terminal"),
)


def resolve_device(name: str) -> torch.device:
    """The torch device ``trainer.device`` names, refused in one line when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = device_name_error(name)
    if why:
        raise UserError("trainer.device", why)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("trainer.device", "CUDA is not available on this machine; use trainer.device=cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError("trainer.device", f"{name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device", "MPS is not available on this machine")
    return torch.device(name)


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def resolve_memory_format(name: str, device: torch.device, recorded: dict | None = None) -> str:
    """The layout ``trainer.memory_format`` means on ``device``: channels_last or contiguous.

    ``recorded``: the provenance of the run being resumed (None: a new run); ``auto`` keeps its format, so a
    resumed run trains exactly as it began (a run recorded before the option existed trained contiguous)."""
    if name != "auto":
        return name
    if recorded is not None:
        return recorded.get("memory_format", "contiguous")
    # channels_last: the faster conv kernels on CPU and CUDA (its results differ from contiguous by float rounding
    # only; pass contiguous for earlier versions' CPU results bit for bit); MPS: contiguous as before, channels_last
    # has not been measured there
    return "channels_last" if torch.device(device).type in ("cpu", "cuda") else "contiguous"


def capped_epochs(epochs: int, trainer) -> int:
    """A stage's epochs under ``trainer.max_epochs`` (smoke runs cap every stage)."""
    return epochs if trainer.max_epochs is None else min(epochs, trainer.max_epochs)


def check_config(cfg) -> None:
    t = cfg["trainer"]
    device = resolve_device(t["device"])
    if t["precision"] == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision", "fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if t["sync_bn"] and device.type != "cuda":
        raise UserError("trainer.sync_bn", "SyncBatchNorm needs CUDA devices; on the CPU each process uses its shard")


def apply(trainer) -> None:
    """Process-wide settings of a run: torch's thread count and deterministic kernels."""
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
