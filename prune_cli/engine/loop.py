"""One training stage: optimizer, per-epoch learning rate, the epoch loop, and a progress bar.

The loop is a plain PyTorch loop: data is already on the device, the regularizer
adds one term to the loss, and statistics stay on the device until the epoch ends
(no per-step host sync), so it costs nothing over a hand-written loop.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prune_cli.core import distributed
from prune_cli.core.errors import UserError
from prune_cli.core.seeds import NETWORK_STRIDE, epoch_generator
from prune_cli.data import Data, batches
from prune_cli.engine.evaluate import evaluate
from prune_cli.engine.settings import MEMORY_FORMATS, resolve_memory_format
from prune_cli.importance.regularizers import Regularizer
from prune_cli.methods.grafting import graft_internal, graft_noise, graft_ring, lr_schedules
from prune_cli.methods.grda import GRDA


def make_optimizer(params, st) -> torch.optim.Optimizer:
    if st.optimizer == "grda":  # no momentum and no weight decay: the threshold is its regularization
        return GRDA(params, lr=st.lr, c=st.grda.c, mu=st.grda.mu)
    if st.optimizer == "adam":
        return torch.optim.Adam(params, lr=st.lr, betas=(st.momentum, 0.999), weight_decay=st.weight_decay)
    return torch.optim.SGD(params, lr=st.lr, momentum=st.momentum, nesterov=st.nesterov, weight_decay=st.weight_decay)


def lr_at(st, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based) in a stage of ``epochs`` epochs.

    A pure function, so resuming needs no state."""
    if st.lr_schedule == "multistep":
        return st.lr * st.gamma ** sum(epoch >= round(m * epochs) for m in st.milestones)
    if st.lr_schedule == "step":
        return st.lr * st.gamma ** (epoch // max(1, round(st.step_size * epochs)))
    if st.lr_schedule == "cosine":
        return 0.5 * st.lr * (1 + math.cos(math.pi * epoch / epochs))
    if st.lr_schedule == "linear":  # held, then a straight ramp to lr * gamma, then held (gRDA's schedule)
        start, end = round(st.milestones[0] * epochs), round(st.milestones[1] * epochs)
        share = min(max((epoch - start) / max(end - start, 1), 0.0), 1.0)
        return st.lr + (st.lr * st.gamma - st.lr) * share
    return st.lr


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def show_progress(setting) -> bool:
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def train_epoch(
    model,
    data: Data,
    batch_size: int,
    optimizer,
    regularizer,
    generator,
    precision: str,
    progress: bool,
    desc: str = "",
    memory_format: str = "contiguous",
) -> dict:
    """One pass over the training split; returns mean train loss, train accuracy and the regularizer's value.

    ``memory_format`` (channels_last | contiguous): the batches' layout, the one the model was put in.
    Distributed (``model`` wrapped by :func:`distributed.wrap`): every rank draws the same global batches and
    trains on its shard; the epoch's statistics are summed over ranks once, at the end."""
    model.train()
    device = data.train.x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    steps = math.ceil(len(data.train) / batch_size)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    for x, y in tqdm(
        batches(
            data.train, data, batch_size, generator=generator, train=True, memory_format=MEMORY_FORMATS[memory_format]
        ),
        total=steps,
        desc=desc,
        disable=not progress,
        leave=False,
        file=sys.stderr,
    ):
        batch = len(y)
        x, y, weight = distributed.shard(x, y)
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        reg = regularizer.penalty()
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks: each rank adds world x its share of the global batch's mean loss
        share = len(y) * weight * distributed.world() / batch
        scaler.scale(loss * share + reg).backward()  # (share is 1.0 in one process: the same numbers)
        if regularizer.edits_gradients:  # it edits true gradients: undo fp16 loss scaling first
            scaler.unscale_(optimizer)
            regularizer.before_step()
        scaler.step(optimizer)
        scaler.update()
        regularizer.after_step()
        loss_sum += loss.detach() * (len(y) * weight)
        reg_sum += reg.detach()
        correct += (logits.detach().argmax(1) == y).sum() * weight
    distributed.all_sum(loss_sum, correct)
    n = len(data.train)
    return {"train_loss": loss_sum.item() / n, "train_acc": 100.0 * correct.item() / n, "reg": reg_sum.item() / steps}


def check_finite(model, stats: dict, stage: str, epoch: int, lr: float, lr_option: str | None) -> None:
    """Stop a diverged stage: the epoch's mean loss, or a weight or BN statistic, is not finite.

    One device-side reduction and one host read per epoch (no per-batch sync).
    """
    loss = stats["train_loss"] + stats["reg"]
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    finite_state = bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True
    if not (math.isfinite(loss) and finite_state):
        what = f"the training loss became {loss}" if not math.isfinite(loss) else "the weights became non-finite"
        raise diverged(what, stage, epoch, lr, lr_option)


def diverged(what: str, stage: str, epoch: int, lr: float, lr_option: str | None) -> UserError:
    return UserError(
        lr_option or f"schedule.{stage}.lr",
        f"{what} in epoch {epoch + 1} of {stage} at lr {lr:g}; the stage stopped there "
        "(nothing was pruned on it): lower the learning rate",
    )


def lr_functions(st, n_models: int, epochs: int) -> list[Callable[[int], float]]:
    """One epoch -> lr function per network: the stage's schedule, or grafting's slr / dlr schedules."""
    if n_models > 1 and st.graft.lr_schedules != "stage":
        return lr_schedules(n_models, st.graft.lr_schedules, st.lr, epochs, gamma=st.gamma)
    return [lambda e: lr_at(st, e, epochs)] * n_models


def graft(models: list, g, epoch: int, generator: torch.Generator) -> None:
    """Filter grafting after an epoch (Meng et al. 2020): the ring between networks, or a single-network variant."""
    if g.variant == "external":
        graft_ring(models, A=g.A, c=g.c, scope=g.scope)
    elif g.variant == "noise":
        graft_noise(
            models[0],
            epoch,
            sigma0=g.noise_sigma0,
            decay=g.noise_decay,
            threshold=g.noise_threshold,
            generator=generator,
        )
    elif g.variant == "internal":
        graft_internal(models[0], share=g.internal_share, A=g.A, c=g.c)


def compiled(net, trainer):
    """``net`` through torch.compile when ``trainer.compile`` (the module itself stays as it was: its parameters
    are the compiled graph's, so its state_dict is what checkpoints save)."""
    if not trainer.get("compile", False):
        return net
    return torch.compile(net, backend=trainer.get("compile_backend", "inductor"))


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (0 when torch does not say)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without the metric
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))  # the outermost timing: no overlaps


def fit(
    models: list,
    data: Data,
    st,
    *,
    stage: str,
    epochs: int,
    seed: int,
    trainer,
    regularizer=None,
    start_epoch: int = 0,
    optimizer_states: list | None = None,
    history: list | None = None,
    on_epoch_end: Callable[[int, list, list], None] | None = None,
    lr_option: str | None = None,
) -> list[dict]:
    """Train ``epochs`` epochs (from ``start_epoch`` when resuming); returns the per-epoch history.

    Usually ``models`` holds one network. With external grafting it holds N, trained side by side with
    their own data order (seed offset per network) and grafted after every epoch; history rows carry ``net``.
    A non-finite training loss ends the stage with a UserError naming ``lr_option`` (default
    ``schedule.<stage>.lr``), before the epoch is checkpointed: nothing downstream sees NaN weights.

    The networks train in ``trainer.memory_format`` and are returned contiguous, as a network rebuilt from a
    checkpoint is: what a later stage computes on them does not depend on whether the run was resumed.
    The training steps run through DDP under torchrun and through torch.compile with ``trainer.compile``; the
    networks themselves (what checkpoints save) stay plain modules.
    """
    device = data.train.x.device
    layout = resolve_memory_format(trainer.get("memory_format", "auto"), device)
    sync_bn = distributed.active() and trainer.get("sync_bn", False)
    for model in models:
        model.to(memory_format=MEMORY_FORMATS[layout])
        distributed.sync_batchnorm(model, sync_bn)
    nets = [compiled(distributed.wrap(m), trainer) for m in models]  # what runs the training steps
    regularizers = [regularizer or Regularizer(models[0])] + [Regularizer(m) for m in models[1:]]
    optimizers = [make_optimizer([p for p in m.parameters() if p.requires_grad], st) for m in models]
    for opt, state in zip(optimizers, optimizer_states or []):
        if state is not None:
            opt.load_state_dict(state)
    lrs = lr_functions(st, len(models), epochs)
    history = list(history or [])
    progress = show_progress(trainer.progress) and distributed.is_main()
    for epoch in range(start_epoch, epochs):
        rows = []
        for k, (net, optimizer, reg) in enumerate(zip(nets, optimizers, regularizers)):
            tic, compiling = time.perf_counter(), compile_seconds()
            lr = lrs[k](epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            which = f" net {k}" if len(models) > 1 else ""
            stats = train_epoch(
                net,
                data,
                st.batch_size,
                optimizer,
                reg,
                epoch_generator(device, seed + NETWORK_STRIDE * k, stage, epoch),
                trainer.precision,
                progress,
                desc=f"{stage}{which} {epoch + 1}/{epochs}",
                memory_format=layout,
            )
            check_finite(models[k], stats, stage, epoch, lr, lr_option)
            rows.append(
                {
                    "stage": stage,
                    "epoch": epoch + 1,
                    **({"net": k} if len(models) > 1 else {}),
                    "lr": lr,
                    **stats,
                    "seconds": time.perf_counter() - tic,
                    **({"compile_seconds": compile_seconds() - compiling} if trainer.get("compile") else {}),
                }
            )
        if st.graft.variant != "none":
            tic = time.perf_counter()
            graft(models, st.graft, epoch, epoch_generator("cpu", seed, "graft", epoch))
            rows[-1]["seconds"] += time.perf_counter() - tic
        last = epoch == epochs - 1
        for model, row in zip(models, rows):
            tic = time.perf_counter()
            if last or (epoch + 1) % trainer.eval_every == 0:
                test = batches(data.test, data, trainer.eval_batch_size, memory_format=MEMORY_FORMATS[layout])
                top1, loss = evaluate(model, distributed.my_batches(test), shared=distributed.active())
                if not math.isfinite(loss):  # the outputs overflow although the weights are still finite
                    raise diverged(f"the test loss became {loss}", stage, epoch, row["lr"], lr_option)
            else:
                top1, loss = float("nan"), float("nan")
            row.update(test_loss=loss, test_acc=top1)
            row["seconds"] += time.perf_counter() - tic
        history += rows
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, optimizers, history)
    for model in models:
        distributed.sync_batchnorm(model, False)
        model.to(memory_format=torch.contiguous_format)
    return history
