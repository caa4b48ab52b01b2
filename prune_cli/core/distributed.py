"""Data-parallel training over several processes started by ``torchrun`` (one per device).

``torchrun --nproc_per_node N -m prune_cli ...`` starts N copies of the same command; the launcher's
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) tells each which one it is. Every process runs the whole
pipeline on the same data with the same seeds, so everything outside training (pruning decisions, counts)
is computed identically everywhere. Training splits every global batch of ``batch_size`` images into one
shard per process and averages the gradients (DistributedDataParallel), which is a single-process step on
the whole batch; test evaluation gives each process every N-th batch. A process reads only its part (a streamed
imagefolder decodes only those files). Only rank 0 writes files and prints; the others read rank 0's run
directory. Without the launcher every function here is the single-process identity.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Started by torchrun (or another launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes the run's files and prints its tables."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """A CUDA process uses the device torchrun assigns it (``LOCAL_RANK``); a CPU process the CPU."""
    if active() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def start() -> None:
    """Join the process group when launched by torchrun (gloo for CPU tensors, nccl for CUDA ones).

    Called before Hydra starts: on ranks other than 0 Hydra is pointed at a scratch directory it may fill
    (its own config copy and log), removed when the process ends; the run itself uses rank 0's directory."""
    if not launched() or active():
        return
    launcher = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra/launcher=")), "basic")
    if launcher != "basic":  # its workers would be processes outside the group, each training alone
        _refuse(
            "hydra/launcher", f"{launcher} starts its own worker processes; under torchrun sweep with the basic one"
        )
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend=backend)
    except Exception as e:  # the launcher's environment is incomplete or the rendezvous failed
        _refuse("torchrun", f"cannot join the process group ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    atexit.register(stop)
    if not is_main():
        scratch = tempfile.mkdtemp(prefix=f"prune_cli_rank{rank()}_")
        sys.argv += [
            f"hydra.run.dir={scratch}",
            f"hydra.sweep.dir={scratch}",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
        atexit.register(shutil.rmtree, scratch, True)


def _refuse(option: str, why: str) -> None:
    """The one-line ending of bad input, before Hydra or any data (``__main__`` cannot say it: it has not begun)."""
    print(f"error: {option}: {why}", file=sys.stderr)
    sys.exit(2)


def stop() -> None:
    """Leave the process group at exit, while the interpreter is whole: cyclic garbage still holding it (a DDP
    wrapper inside a cycle) is collected first, since freeing it during finalization can abort the process."""
    if active():
        gc.collect()
        dist.destroy_process_group()


def shared(obj):
    """Rank 0's ``obj`` on every rank (a run directory, a decision): broadcast as a pickled object."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` for training: inside DistributedDataParallel when distributed (rank 0's weights and buffers are
    copied to every rank now, gradients averaged in every backward), else itself."""
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def part(n: int) -> tuple[int, int, float]:
    """This rank's shard of a global batch of ``n`` images, ``(start, stop, weight)``: the rank-th of
    ``torch.tensor_split``'s ``world`` pieces, and the weight its images count with in the epoch's statistics: 1,
    or 1/world for a batch smaller than the world, which every rank uses whole (no rank runs an empty batch)."""
    w = world()
    if w == 1:
        return 0, n, 1.0
    if n < w:
        return 0, n, 1.0 / w
    r, (size, extra) = rank(), divmod(n, w)  # the first ``extra`` pieces hold one image more
    start = r * size + min(r, extra)
    return start, start + size + (r < extra), 1.0


def mine(i: int) -> bool:
    """Whether batch ``i`` of a sequence is this rank's (every world-th, from its rank): always when alone."""
    return i % world() == rank()


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over ranks in place (one collective each; called once per epoch, not per batch)."""
    if active():
        for t in tensors:
            dist.all_reduce(t)


def sync_batchnorm(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    """BatchNorm layers whose statistics span every rank's shard (``trainer.sync_bn``, CUDA), or back to plain
    BatchNorm so the model leaves training as it came. Either way the layers keep their parameter and buffer
    tensors (torch's conversion does too), so whatever holds a reference to them (a regularizer) stays valid."""
    if on:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.SyncBatchNorm):
                plain = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
                for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                    setattr(plain, key, value)
                plain.train(child.training)
                setattr(module, name, plain)
    return model
