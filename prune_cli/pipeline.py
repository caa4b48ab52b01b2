"""The stage loop: build or load the model, run each stage of the schedule, write results.

Every finished stage leaves ``checkpoints/<stage>.pt``; a training stage also
rewrites its checkpoint after every epoch. Re-running the same command into the
same run directory therefore skips finished stages and resumes the interrupted
one from its last epoch.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import report
from .atomic import save_torch, write_text
from .config import resolve_device, validate
from .criteria import Sample, build_criterion
from .data import batches, describe, load_data, normalize
from .errors import UserError
from .gates import Gates, select_top_gates, train_gates
from .loss_selection import loss_greedy_select
from .measure import count_macs, count_params, evaluate
from .models import build_model
from .pruning import prune_channels, structure
from .regularizers import ZERO_THRESHOLD, build_regularizer, sparsity_stats
from .selection import Budget, matching, select, select_per_layer
from .train import epoch_generator, fit, show_progress

# options that may change between a run and its resumption without changing its results
RESUMABLE_DIFFERENCES = ("trainer.device", "trainer.progress", "trainer.threads", "trainer.eval_batch_size")


class Run:
    """One run directory: its checkpoints, tables and status."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.dir = cfg, Path(run_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.rows: list[dict] = []
        self.histories: dict[str, list[dict]] = {}

    def checkpoint(self, stage: str) -> dict | None:
        path = self.ckpt_dir / f"{stage}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def guard(self) -> None:
        """Refuse a directory that holds checkpoints of a different config: never overwrite other results."""
        for path in sorted(self.ckpt_dir.glob("*.pt")):
            old = torch.load(path, map_location="cpu", weights_only=True)["config"]
            diff = config_differences(old, self.config)
            if diff:
                raise UserError("hydra.run.dir", f"{self.dir} holds a run with a different config "
                                f"({', '.join(diff[:5])}); choose another directory, or repeat that run's command to resume it")
            return

    def save(self, stage: str, models: list, *, done: bool, epoch: int = 0, optimizers=(), extra: dict | None = None):
        """``state_dict`` is the model that continues; ``states`` / ``optimizers`` hold every network of the stage."""
        save_torch(self.ckpt_dir / f"{stage}.pt", {
            "config": self.config, "stage": stage, "done": done, "arch": models[0].arch,
            "state_dict": models[0].state_dict(), "states": [m.state_dict() for m in models],
            "optimizer": optimizers[0].state_dict() if optimizers else None,
            "optimizers": [o.state_dict() for o in optimizers],
            "epoch": epoch, "rows": self.rows, "histories": self.histories, **(extra or {})})

    def write_tables(self) -> None:
        identity = report.identity(self.cfg)
        report.write_csv(self.dir / "results.csv", [{**row, **identity} for row in self.rows])
        report.write_csv(self.dir / "metrics.csv", [h for hist in self.histories.values() for h in hist])


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        if name in RESUMABLE_DIFFERENCES:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


class Context:
    """What the stages share: config, device, data (loaded lazily), input shape and class count."""

    def __init__(self, cfg, run: Run):
        self.cfg, self.run = cfg, run
        self.device = resolve_device(cfg.trainer.device)
        self.input_shape, self.num_classes = describe(cfg.dataset)
        self._data = None

    @property
    def data(self):
        if self._data is None:
            self._data = load_data(self.cfg.dataset, self.cfg.seed, self.device)
        return self._data

    def measure(self, stage: str, model, top1=float("nan"), loss=float("nan"), best_top1=float("nan"),
                epochs: int = 0, seconds: float = 0.0) -> dict:
        return {"stage": stage, "top1": top1, "best_top1": best_top1, "loss": loss,
                "params": count_params(model), "macs": count_macs(model, self.input_shape),
                "epochs": epochs, "seconds": round(seconds, 2)}

    def reference_macs(self) -> int:
        """MACs of the standard (unexpanded, unpruned) model: what PFS targets and Scratch-B budgets refer to."""
        arch = {**model_arch(self.cfg, self), "width_mult": 1.0}
        return count_macs(build_model(arch), self.input_shape)

    def test(self, model) -> tuple[float, float]:
        return evaluate(model, batches(self.data.test, self.data, self.cfg.trainer.eval_batch_size))


def seeded(seed: int, salt: str) -> int:
    return seed * 7919 + sum(map(ord, salt))


def run(cfg, run_dir: Path) -> list[dict]:
    """Run (or resume) the whole schedule of ``cfg`` in ``run_dir``; returns the results rows."""
    validate(cfg)
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    run_ = Run(cfg, run_dir)
    run_.guard()
    ctx = Context(cfg, run_)
    stages = list(cfg.schedule.stages)
    # build every component first, so a bad option fails before any training
    if "sparse_train" in stages:
        build_regularizer(cfg.regularizer, build_model(model_arch(cfg, ctx)))
    if "prune" in stages:
        check_loss_criterion(cfg.criterion) if cfg.criterion.name == "loss" else build_criterion(cfg.criterion)

    torch.manual_seed(seeded(cfg.seed, "init"))
    model = build_model(model_arch(cfg, ctx)).to(ctx.device)
    start = 0
    if cfg.init_from is not None:
        try:
            ck = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
            model = load_model(ck, ctx.device)
        except Exception as e:
            raise UserError("init_from", f"{cfg.init_from} is not a prune_cli checkpoint ({type(e).__name__}: {e})")
        run_.rows, run_.histories = list(ck["rows"]), dict(ck["histories"])
        start = stages.index(ck["stage"]) + 1 if ck["stage"] in stages else 0
    else:
        top1, loss = ctx.test(model) if stages else (float("nan"), float("nan"))
        run_.rows = [ctx.measure("init", model, top1, loss)]

    report.write_status(run_dir, "running")
    for stage in stages[start:]:
        ck = run_.checkpoint(stage)
        if ck is not None and ck["done"]:  # finished earlier: take its model and tables
            model = load_model(ck, ctx.device)
            run_.rows, run_.histories = list(ck["rows"]), dict(ck["histories"])
            continue
        if stage == "prune":
            model = prune_stage(model, ctx)
        elif stage == "gates":
            model = gates_stage(model, ctx)
        else:
            model = train_stage(stage, model, ctx, ck)
        run_.write_tables()
    run_.write_tables()
    summary = report.summary_markdown(run_.rows, report.identity(cfg))
    write_text(Path(run_dir) / "summary.md", summary)
    report.write_status(run_dir, "done")
    print(summary)
    return run_.rows


def load_model(ck: dict, device):
    """Rebuild a checkpoint's model from its arch (widths included) and load its weights."""
    model = build_model(ck["arch"]).to(device)
    model.load_state_dict(ck["state_dict"])
    return model


def model_arch(cfg, ctx: Context) -> dict:
    arch = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()}
    return {**arch, "num_classes": ctx.num_classes, "in_channels": ctx.input_shape[0]}


def train_stage(stage: str, model, ctx: Context, ck: dict | None):
    cfg, run_ = ctx.cfg, ctx.run
    st = cfg.schedule[stage]
    epochs = st.epochs
    if stage == "scratch":  # the pruned architecture, freshly initialised (Liu et al. 2019)
        torch.manual_seed(seeded(cfg.seed, "scratch"))
        model = build_model(model.arch).to(ctx.device)
        if st.budget == "B":  # same compute as the dense model: scale epochs by MACs_dense / MACs_pruned
            epochs = round(epochs * ctx.reference_macs() / count_macs(model, ctx.input_shape))
    if cfg.trainer.max_epochs is not None:
        epochs = min(epochs, cfg.trainer.max_epochs)
    for p in model.parameters():  # a model coming from the gates stage was frozen
        p.requires_grad_(True)
    models = [model] + grafting_partners(stage, model, st, cfg.seed)
    if ck is not None:
        models = [build_model(ck["arch"]).to(ctx.device) for _ in models]
    # built before a resumed state is loaded: a regularizer may initialise weights (e.g. BN gamma = 0.5)
    regularizer = build_regularizer(cfg.regularizer, models[0]) if stage == "sparse_train" else None
    start, optimizer_states, history = 0, None, []
    if ck is not None:  # an interrupted stage: continue after its last finished epoch
        for m, state in zip(models, ck["states"]):
            m.load_state_dict(state)
        start, optimizer_states, history = ck["epoch"], ck["optimizers"], ck["histories"].get(stage, [])
        run_.rows, run_.histories = list(ck["rows"]), dict(ck["histories"])

    def checkpoint(epoch, optimizers, hist):
        run_.histories[stage] = hist
        run_.save(stage, models, done=False, epoch=epoch, optimizers=optimizers)
        run_.write_tables()

    history = fit(models, ctx.data, st, stage=stage, epochs=epochs, seed=cfg.seed, trainer=cfg.trainer,
                  regularizer=regularizer, start_epoch=start, optimizer_states=optimizer_states, history=history,
                  on_epoch_end=checkpoint)
    run_.histories[stage] = history
    row = finished_row(stage, models, history, epochs, ctx)
    model = models[row.get("continued", 0)]
    if stage == "sparse_train":
        overall, per_layer = sparsity_stats(model)
        row.update(overall)
        report.write_csv(run_.dir / "sparsity.csv", per_layer)
    run_.rows.append(row)
    run_.save(stage, [model], done=True, epoch=epochs)
    return model


def grafting_partners(stage: str, model, st, seed: int) -> list:
    """The other networks of external grafting: fresh initialisations, or copies when finetuning."""
    if st.graft.variant != "external":
        return []
    partners = []
    for k in range(1, st.graft.networks):
        torch.manual_seed(seeded(seed + k, stage))
        partner = copy.deepcopy(model) if stage == "finetune" else build_model(model.arch)
        partners.append(partner.to(next(model.parameters()).device))
    return partners


def finished_row(stage: str, models: list, history: list[dict], epochs: int, ctx: Context) -> dict:
    """The stage's results row; with several grafted networks, every one's accuracy and the best one continues."""
    seconds = sum(h["seconds"] for h in history)
    per_net = [[h for h in history if h.get("net", 0) == k] for k in range(len(models))]
    finals = [(h[-1]["test_acc"], h[-1]["test_loss"]) if h else ctx.test(m) for h, m in zip(per_net, models)]
    best_net = max(range(len(models)), key=lambda k: (finals[k][0], -k))
    top1, loss = finals[best_net]
    best = max((h["test_acc"] for h in per_net[best_net] if h["test_acc"] == h["test_acc"]), default=top1)
    row = ctx.measure(stage, models[best_net], top1, loss, best, epochs, seconds)
    if len(models) > 1:
        row.update({f"top1_net{k}": finals[k][0] for k in range(len(models))}, continued=best_net)
    return row


def gates_stage(model, ctx: Context):
    """Pruning from Scratch: gates trained on the frozen random init, then the top gates to the MACs target."""
    cfg, run_ = ctx.cfg, ctx.run
    st, data = cfg.schedule.gates, ctx.data
    tic = time.perf_counter()
    gates = Gates(model)

    def train_batches(epoch):
        return batches(data.train, data, st.batch_size, train=True,
                       generator=epoch_generator(ctx.device, cfg.seed, "gates", epoch))

    def val_accuracy(m):
        return evaluate(m, batches(data.val, data, cfg.trainer.eval_batch_size))[0]

    epochs = min(st.epochs, cfg.trainer.max_epochs or st.epochs)
    result = train_gates(model, gates, train_batches, val_accuracy, epochs=epochs, lr=st.lr, lam=st.lam,
                         target_density=st.density, device=ctx.device, density_key=st.density_key)
    values = gates.values()
    gates.remove()
    keep, info = select_top_gates(values, structure(model, ctx.input_shape), ctx.reference_macs(),
                                  cfg.prune.ratio, min_channels=cfg.prune.min_channels)
    run_.histories["gates"] = [{"stage": "gates", **h} for h in result["history"]]
    if not info.get("met", True) or not result["qualified"]:
        print(f"note: gates stage: {result.get('note', '')} selection {info.get('how')}, "
              f"MACs reduction {info['reduction']:.4f} for a target of {cfg.prune.ratio}", file=sys.stderr)
    return finish_pruning(model, keep, values, ctx, "gates", time.perf_counter() - tic,
                          extra={"chosen_epoch": result["epoch"] + 1, "gates_qualified": result["qualified"]})


def prune_stage(model, ctx: Context):
    """Score, select and remove channels; with ``prune.steps`` > 1, in steps with a short finetune between them."""
    cfg, p = ctx.cfg, ctx.cfg.prune
    tic = time.perf_counter()
    dense_widths = model.widths
    dense_amount = Budget(structure(model, ctx.input_shape), dense_widths, p.target).total
    extra = {}
    for step in range(1, p.steps + 1):
        ratio = p.ratio
        if ratio is not None and p.steps > 1:  # cumulative share of the DENSE amount, as a share of the current one
            current = Budget(structure(model, ctx.input_shape), model.widths, p.target).total
            ratio = 1 - dense_amount * (1 - p.ratio * step / p.steps) / current
        keep, scores, stats = choose_channels(model, ctx, ratio)
        extra.update(stats)
        if step < p.steps:
            model = prune_channels(model, keep)
            st = step_finetune_settings(cfg)
            ctx.run.histories[f"prune_step{step}"] = fit(
                [model], ctx.data, st, stage=f"prune_step{step}", epochs=st.epochs, seed=cfg.seed, trainer=cfg.trainer)
    return finish_pruning(model, keep, scores, ctx, "prune", time.perf_counter() - tic, extra, dense_widths)


def step_finetune_settings(cfg):
    """Iterative pruning's short finetune: the schedule's finetune (or first training) block, with prune.step_*."""
    base = next(cfg.schedule[s] for s in ("finetune", "scratch", "pretrain", "sparse_train") if s in cfg.schedule)
    return OmegaConf.merge(base, {"epochs": cfg.prune.step_epochs, "lr": cfg.prune.step_lr,
                                  "lr_schedule": "constant", "graft": {"variant": "none"}})


def choose_channels(model, ctx: Context, ratio: float | None):
    """Keep masks, the scores behind them and the selection's statistics for one pruning step."""
    cfg, p = ctx.cfg, ctx.cfg.prune
    model.eval()
    st = structure(model, ctx.input_shape)
    groups = model.channel_groups()
    names = [g.name for g in groups]
    protect = matching(names, p.skip)
    if p.protect_last and model.arch["name"].startswith("vgg"):
        protect.add(len(groups) - 1)
    if cfg.criterion.name == "loss":
        return loss_selection(model, ctx, st, ratio, protect)
    criterion = build_criterion(cfg.criterion)
    sample = make_sample(ctx, criterion.sample_size) if criterion.needs_data else None
    scores = criterion.scores(model, p.granularity, sample)
    if p.layer_ratios:
        return select_per_layer(scores, names, dict(p.layer_ratios), p.min_channels), scores, {}
    threshold = criterion.auto_threshold(scores) if ratio is None else None
    if ratio is None and threshold is None:
        raise UserError("prune.ratio", f"criterion {cfg.criterion.name} has no threshold of its own; "
                        "set a ratio in (0, 1) or prune.layer_ratios")
    keep = select(scores, st, target=p.target, ratio=ratio, scope=p.scope, normalize=p.normalize,
                  min_channels=p.min_channels, protect=protect, tolerance=p.tolerance, threshold=threshold)
    return keep, scores, {}


def finish_pruning(model, keep, scores, ctx: Context, stage: str, seconds: float, extra: dict | None = None,
                   dense_widths: list[int] | None = None):
    """Remove the channels physically, write scores.csv / layers.csv, test, and checkpoint the stage."""
    run_ = ctx.run
    groups = model.channel_groups()
    pruned = prune_channels(model, keep)
    report.write_csv(run_.dir / "scores.csv", [
        {"layer": g.name, "channel": c, "score": float(s[c]), "kept": bool(k[c])}
        for g, s, k in zip(groups, scores, keep) for c in range(len(s))])
    report.write_csv(run_.dir / "layers.csv", [
        {"layer": g.name, "before": before, "after": int(k.sum()), **zero_groups(model, g)}
        for g, k, before in zip(groups, keep, dense_widths or [len(k) for k in keep])])
    top1, loss = ctx.test(pruned)
    run_.rows.append({**ctx.measure(stage, pruned, top1, loss, top1, 0, seconds), **(extra or {})})
    run_.save(stage, [pruned], done=True, extra={"keep": keep})
    return pruned


LOSS_OPTIONS = ("mode", "channels_per_round", "prescreen", "prescreen_factor", "verify", "batch_variants")


def check_loss_criterion(ccfg) -> None:
    if ccfg.mode not in ("fast", "exact"):
        raise UserError("criterion.mode", f"must be fast or exact; got {ccfg.mode!r}")
    if not isinstance(ccfg.num_images, int) or ccfg.num_images < 1:
        raise UserError("criterion.num_images", f"must be an integer > 0; got {ccfg.num_images!r}")


def loss_selection(model, ctx: Context, st, ratio: float | None, protect: set[int]):
    """HGSR's loss-based global greedy selection; scores.csv gets each channel's removal rank."""
    cfg, p = ctx.cfg, ctx.cfg.prune
    if ratio is None or p.layer_ratios:
        raise UserError("prune.ratio", "the loss criterion selects to a target: set prune.ratio in (0, 1)")
    sample = make_sample(ctx, cfg.criterion.num_images)
    options = {k: cfg.criterion[k] for k in LOSS_OPTIONS if k in cfg.criterion}
    try:
        keep, stats = loss_greedy_select(model, sample.x, sample.y, structure=st, target=p.target, ratio=ratio,
                                         min_channels=p.min_channels, protect=protect,
                                         progress=show_progress(cfg.trainer.progress), **options)
    except ValueError as e:
        raise UserError("criterion", str(e)) from None
    record = {f"selection_{k}": v for k, v in stats.items() if isinstance(v, (int, float, str))}
    # score = when the greedy removed the channel (0 = first); kept channels score past the last removal
    scores = [torch.full((len(k),), float(len(stats["removed"]))) for k in keep]
    for rank, (g, c) in enumerate(stats["removed"]):
        scores[g][c] = rank
    return keep, scores, record


def zero_groups(model, group) -> dict:
    """Share of the group's channels whose filter / feature-wise group (all consumers' W[:, c]) is zero (< 1e-3)."""
    filters = model.get_submodule(group.conv).weight.detach().flatten(1).norm(dim=1)
    features = sum(model.get_submodule(c).weight.detach().transpose(0, 1).flatten(1).pow(2).sum(1)
                   for c in group.consumers).sqrt()
    return {"zero_filters": float((filters < ZERO_THRESHOLD).float().mean()),
            "zero_feature_groups": float((features < ZERO_THRESHOLD).float().mean())}


def make_sample(ctx: Context, size: int) -> Sample:
    """A fixed, seeded set of ``size`` training images (at most all of them) for data-driven criteria."""
    data = ctx.data
    n = min(size, len(data.train))
    g = torch.Generator(device=data.train.x.device).manual_seed(seeded(ctx.cfg.seed, "sample"))
    idx = torch.randperm(len(data.train), generator=g, device=data.train.x.device)[:n]
    return Sample(normalize(data.train.x[idx], data), data.train.y[idx])
