"""The training loop: ``fit`` runs a stage's ``Trainer`` epoch by epoch, ``train_epoch`` is one pass of steps.

The steps are a plain PyTorch loop: data is already on the device, the regularizer adds one term to the loss, and
statistics stay on the device until the epoch ends (no per-step host sync), so it costs nothing over a
hand-written loop. The optimizer and the lr schedule come from their registries (``optimizers``, ``schedules``);
training hooks (``hooks``: extra networks, per-network lr, work after an epoch) act between epochs only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prune_cli.core import distributed
from prune_cli.core.errors import UserError
from prune_cli.core.seeds import NETWORK_STRIDE, epoch_generator
from prune_cli.data import Data, batches
from prune_cli.data.container import shards
from prune_cli.engine.distill import Distiller
from prune_cli.engine.evaluate import evaluate
from prune_cli.engine.optimizers import make_optimizer
from prune_cli.engine.schedules import lr_at
from prune_cli.engine.settings import MEMORY_FORMATS, resolve_memory_format
from prune_cli.importance.regularizers import Regularizer


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
    aux_loss=None,
    distill: Distiller | None = None,
) -> dict:
    """One pass over the training split; returns mean train loss, train accuracy and the regularizer's value.

    ``memory_format`` (channels_last | contiguous): the batches' layout, the one the model was put in.
    ``aux_loss(y)``: the network's auxiliary heads' weighted loss of the step's forward (or None), added to the loss.
    ``distill``: a teacher whose outputs join the labels in the loss (``Distiller.loss``), or None (cross-entropy).
    Distributed (``model`` wrapped by :func:`distributed.wrap`): every rank draws the same global batches and
    trains on its shard; the epoch's statistics are summed over ranks once, at the end."""
    model.train()
    device = data.train.x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    steps = math.ceil(len(data.train) / batch_size)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    for x, y, batch, weight in tqdm(  # this rank's shard of each global batch (all of it, weight 1, when alone)
        shards(
            data.train, data, batch_size, generator=generator, train=True, memory_format=MEMORY_FORMATS[memory_format]
        ),
        total=steps,
        desc=desc,
        disable=not progress,
        leave=False,
        file=sys.stderr,
    ):
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y) if distill is None else distill.loss(logits, x, y)
            aux = aux_loss(y) if aux_loss is not None else None
            if aux is not None:
                loss = loss + aux
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


class Trainer:
    """One training stage's networks with their optimizers, regularizers and lr functions, trained an epoch at a
    time (``fit`` runs it). Everything is set up once per stage: the per-step work is ``train_epoch``'s alone, and
    the hooks act between epochs."""

    def __init__(
        self,
        models: list,
        data: Data,
        st,
        *,
        stage: str,
        epochs: int,
        seed: int,
        trainer,
        regularizer=None,
        hooks: Sequence = (),
        lr_option: str | None = None,
        distill: Distiller | None = None,
    ):
        self.models, self.data, self.st, self.trainer = models, data, st, trainer
        self.stage, self.epochs, self.seed = stage, epochs, seed
        self.hooks, self.lr_option = list(hooks), lr_option
        self.device = data.train.x.device
        self.layout = resolve_memory_format(trainer.get("memory_format", "auto"), self.device)
        self.nets = self.training_networks()
        self.distill = distill
        if distill is not None:
            distill.ready(MEMORY_FORMATS[self.layout], lambda teacher: compiled(teacher, trainer))
        self.regularizers = [regularizer or Regularizer(models[0])] + [Regularizer(m) for m in models[1:]]
        self.optimizers = [make_optimizer([p for p in m.parameters() if p.requires_grad], st) for m in models]
        self.lrs = self.lr_functions()
        self.progress = show_progress(trainer.progress) and distributed.is_main()

    def training_networks(self) -> list:
        """The networks in the training layout (and SyncBatchNorm), wrapped as the steps run them: DDP under
        torchrun, torch.compile with ``trainer.compile``."""
        sync_bn = distributed.active() and self.trainer.get("sync_bn", False)
        for model in self.models:
            model.to(memory_format=MEMORY_FORMATS[self.layout])
            distributed.sync_batchnorm(model, sync_bn)
        return [compiled(distributed.wrap(m), self.trainer) for m in self.models]

    def lr_functions(self) -> list[Callable[[int], float]]:
        """One epoch -> lr function per network: a hook's (per-network schedules), else the stage's schedule."""
        for hook in self.hooks:
            lrs = hook.lr_functions(self.st, len(self.models), self.epochs)
            if lrs is not None:
                return lrs
        # not a closure over self: the trainer holds the DDP wrappers, and a cycle would keep them (and the process
        # group they hold) alive until the collector runs, perhaps at interpreter exit, after the group is gone
        return [functools.partial(lr_at, self.st, epochs=self.epochs)] * len(self.models)

    def load_optimizer_states(self, states: list | None) -> None:
        """Resume: the optimizers as the interrupted stage saved them (None entries start afresh)."""
        for optimizer, state in zip(self.optimizers, states or []):
            if state is not None:
                optimizer.load_state_dict(state)

    def train_network(self, k: int, epoch: int) -> dict:
        """One epoch of network ``k`` in its own data order; its history row (without the test columns)."""
        tic, compiling = time.perf_counter(), compile_seconds()
        lr, optimizer, several = self.lrs[k](epoch), self.optimizers[k], len(self.models) > 1
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_epoch(
            self.nets[k],
            self.data,
            self.st.batch_size,
            optimizer,
            self.regularizers[k],
            epoch_generator(self.device, self.seed + NETWORK_STRIDE * k, self.stage, epoch),
            self.trainer.precision,
            self.progress,
            desc=f"{self.stage}{f' net {k}' if several else ''} {epoch + 1}/{self.epochs}",
            memory_format=self.layout,
            aux_loss=getattr(self.models[k], "aux_loss", None),
            distill=self.distill,
        )
        check_finite(self.models[k], stats, self.stage, epoch, lr, self.lr_option)
        return {
            "stage": self.stage,
            "epoch": epoch + 1,
            **({"net": k} if several else {}),
            "lr": lr,
            **stats,
            "seconds": time.perf_counter() - tic,
            **({"compile_seconds": compile_seconds() - compiling} if self.trainer.get("compile") else {}),
        }

    def after_epoch(self, epoch: int, rows: list[dict]) -> None:
        """The hooks' work after the epoch's training, timed into the last network's row."""
        if not self.hooks:
            return
        tic = time.perf_counter()
        for hook in self.hooks:
            hook.after_epoch(self.models, epoch, self.seed)
        rows[-1]["seconds"] += time.perf_counter() - tic

    def test(self, epoch: int, rows: list[dict]) -> None:
        """Every network's test loss and accuracy into its row: every ``trainer.eval_every`` epochs and at the last
        (NaN in between)."""
        due = epoch == self.epochs - 1 or (epoch + 1) % self.trainer.eval_every == 0
        for model, row in zip(self.models, rows):
            tic = time.perf_counter()
            top1, loss = float("nan"), float("nan")
            if due:
                test = batches(  # this rank's batches only
                    self.data.test,
                    self.data,
                    self.trainer.eval_batch_size,
                    memory_format=MEMORY_FORMATS[self.layout],
                    mine=True,
                )
                top1, loss = evaluate(model, test, shared=distributed.active())
                if not math.isfinite(loss):  # the outputs overflow although the weights are still finite
                    raise diverged(f"the test loss became {loss}", self.stage, epoch, row["lr"], self.lr_option)
            row.update(test_loss=loss, test_acc=top1)
            row["seconds"] += time.perf_counter() - tic

    def release(self) -> None:
        """The networks as a checkpoint rebuilds them: contiguous, plain BatchNorm."""
        for model in self.models:
            distributed.sync_batchnorm(model, False)
            model.to(memory_format=torch.contiguous_format)


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
    hooks: Sequence = (),
    distill: Distiller | None = None,
) -> list[dict]:
    """Train ``epochs`` epochs (from ``start_epoch`` when resuming); returns the per-epoch history.

    Usually ``models`` holds one network. ``hooks`` (training hooks, none by default) may have added more, trained
    side by side with their own data order (seed offset per network) and their own lr functions, and act on them
    after every epoch; history rows then carry ``net``. ``distill`` (a teacher, or None) distils into every network.
    A non-finite training loss ends the stage with a UserError naming ``lr_option`` (default
    ``schedule.<stage>.lr``), before the epoch is checkpointed: nothing downstream sees NaN weights.

    The networks train in ``trainer.memory_format`` and are returned contiguous, as a network rebuilt from a
    checkpoint is: what a later stage computes on them does not depend on whether the run was resumed.
    The training steps run through DDP under torchrun and through torch.compile with ``trainer.compile``; the
    networks themselves (what checkpoints save) stay plain modules.
    """
    run = Trainer(
        models,
        data,
        st,
        stage=stage,
        epochs=epochs,
        seed=seed,
        trainer=trainer,
        regularizer=regularizer,
        hooks=hooks,
        lr_option=lr_option,
        distill=distill,
    )
    run.load_optimizer_states(optimizer_states)
    history = list(history or [])
    for epoch in range(start_epoch, epochs):
        rows = [run.train_network(k, epoch) for k in range(len(models))]
        run.after_epoch(epoch, rows)
        run.test(epoch, rows)
        history += rows
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, run.optimizers, history)
    run.release()
    return history
