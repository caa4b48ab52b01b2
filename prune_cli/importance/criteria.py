"""Channel-importance criteria: one score per channel of every channel group.

Convention: a LOW score means "prune first". Criteria whose natural quantity is
"high = bad" return its negation (APoZ returns ``-apoz``).

Two granularities for the weight-based criteria (``l1``, ``l2``, ``fpgm``,
``entropy``, ``group_norm``):

- ``filter``: channel c is judged by its producer filter ``conv.weight[c]``;
- ``feature``: by its consumer kernels ``consumer.weight[:, c]``, all consumers
  of the group together (their flattened kernels concatenated into one vector).

``bn_scale``, ``apoz``, ``hrank``, ``taylor`` and ``random`` ignore it.

The activation criteria (``apoz``, ``hrank``, ``taylor``) read a group's norm output (BatchNorm, or a LayerNorm over
the channels); in a network without them, its producer's output (the mask zeroes its rows and biases:
``ChannelGroup.mask_points``), conv or channels-last linear layer; each output's channels along its slot's
``out_dim`` (1, or 3 for a channels-last [B, H, W, C] tensor, read as the [B, C, H, W] maps it holds).
``bn_scale`` refuses a group without BatchNorm, naming it, before any data is read (``check_groups``); so does a
criterion that does not declare ``channels_last`` a group whose channels sit last in a layer's output.

Scores come back as float32 CPU tensors, one 1-D tensor per channel group, in
``model.channel_groups()`` order. Scoring never changes the model: weights,
gradients (``.grad``), train/eval mode of every module and hooks are as before.

Hyperparameters are keyword arguments of the constructor, declared once in each class's
``options`` (the keys of ``conf/criterion/<name>.yaml`` besides ``name``); a bad key or value raises
``UserError("criterion.<key>", why)``. ``choose`` turns scores into keep masks with the selection
engine; a criterion that selects by itself (the loss greedy) overrides it.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float, Int, Option, check_block
from prune_cli.core.registry import Registry
from prune_cli.importance.histogram import histogram_entropy
from prune_cli.models import Prunable
from prune_cli.structure.channels import Structure
from prune_cli.structure.groups import ChannelGroup
from prune_cli.structure.selection import choose_channels

GRANULARITIES = ("filter", "feature")


@dataclass
class Sample:
    """Training images for the data-driven criteria (normalised, on the model's device)."""

    x: torch.Tensor  # float [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    batch_size: int = 128  # chunk size, used when the criterion's own ``batch_size`` is null


# ---------------------------------------------------------------- base class

CRITERIA = Registry("criterion", "criterion.name")


class Criterion(abc.ABC):
    """Scores every channel of every channel group; LOW = pruned first.

    Subclasses declare ``options`` (``Option`` declarations); the constructor validates the keyword
    arguments against them and stores them as attributes (and in ``self.hparams``, for logging).
    """

    name: str = ""
    needs_data: bool = False
    options: tuple[Option, ...] = ()
    # whether it reads a group's outputs where its slots say the channels are (``Slot.out_dim``: 3 for a channels-last
    # [B, H, W, C]), or reads no outputs at all; a criterion that does not say so is refused such groups
    channels_last: bool = False

    def __init__(self, **hparams: Any):
        self.hparams: dict[str, Any] = check_block(hparams, self.options, "criterion")
        for key, value in self.hparams.items():
            setattr(self, key, value)

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """Rules across options, checked before anything runs (``cfg``: the whole checked config)."""
        p = cfg["prune"]
        if p["ratio"] is None and not p["layer_ratios"] and not cls.own_threshold(cfg["criterion"]):
            raise UserError(
                "prune.ratio",
                f"criterion {cls.name} has no threshold of its own; set a ratio in (0, 1) or prune.layer_ratios",
            )

    @classmethod
    def own_threshold(cls, options: Mapping[str, Any]) -> bool:
        """Whether, with these options, the criterion picks its own threshold when ``prune.ratio`` is null."""
        return False

    def check_groups(self, model: Prunable) -> None:
        """Refuse, in one line and before any data is read, channel groups the criterion cannot score: those whose
        channels sit last in a layer's output, unless it reads them there (``channels_last``)."""
        if self.channels_last:
            return
        for group in model.channel_groups():
            if any(s.out_dim != 1 for s in group.mask_points()):
                raise UserError(
                    "criterion.name",
                    f"{self.name} reads the channels of a layer's output in its dim 1; {group.name} holds them last "
                    "([B, H, W, C]) (use l1, apoz, hrank or taylor)",
                )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    @property
    def sample_size(self) -> int:
        """How many training images ``scores`` uses (0 for data-free criteria)."""
        return 0

    def scores(
        self, model: Prunable, granularity: str | None = None, sample: Sample | None = None
    ) -> list[torch.Tensor]:
        """One float32 CPU 1-D tensor per channel group (length = group width); LOW = prune first.

        ``granularity`` (``filter`` | ``feature``) applies to weight-based criteria;
        ``None`` means the criterion's own ``granularity`` option (default ``filter``,
        ``feature`` for ``group_norm``). Others ignore it.
        """
        if granularity is not None and granularity not in GRANULARITIES:
            raise UserError("granularity", f"must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
        if self.needs_data and sample is None:
            raise ValueError(f"criterion {self.name!r} needs a Sample of training images")
        with torch.no_grad():
            out = self._scores(model, granularity, sample)
        groups = model.channel_groups()
        assert len(out) == len(groups)
        return [s.detach().to("cpu", torch.float32) for s in out]

    @abc.abstractmethod
    def _scores(self, model: Prunable, granularity: str | None, sample: Sample | None) -> list[torch.Tensor]:
        """One score vector per channel group (what ``scores`` validates and returns)."""

    def auto_threshold(self, scores: list[torch.Tensor]) -> float | None:
        """A threshold the criterion chooses by itself (channels scoring below it are pruned),
        or None: the caller meets its target instead."""
        return None

    def choose(
        self,
        model: Prunable,
        structure: Structure,
        sample: Sample | None,
        prune: Mapping[str, Any],
        ratio: float | None,
        protect: set[int],
        progress: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """Keep masks, the scores behind them and statistics for ``results.csv``, for one pruning step.

        ``prune``: the checked ``prune.*`` settings; ``ratio``: this step's share (None: the criterion's own
        threshold); ``protect``: indices of groups kept whole; ``progress``: show a progress bar if slow.
        """
        scores = self.scores(model, prune["granularity"], sample)
        names = [g.name for g in model.channel_groups()]
        threshold = self.auto_threshold(scores) if ratio is None and not prune["layer_ratios"] else None
        return choose_channels(scores, structure, names, prune, ratio, protect, threshold), scores, {}


register = CRITERIA.register


def build_criterion(cfg: Mapping[str, Any]) -> Criterion:
    """``cfg`` = ``{"name": ..., **hparams}`` (a dict or an OmegaConf DictConfig)."""
    return CRITERIA.build(cfg)


# ---------------------------------------------------------------- helpers


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def channel_vectors(
    model: Prunable, group: ChannelGroup, granularity: str, modules: dict[str, nn.Module] | None = None
) -> torch.Tensor:
    """[C, D]: row c holds the weights that judge channel c.

    ``filter``: the producer filter ``conv.weight[c]`` flattened.
    ``feature``: the consumer kernels ``W[:, c]`` of every consumer (conv or linear), each
    flattened, concatenated in ``group.consumers`` order.
    A group that several layers produce (a residual stream, a depthwise chain) concatenates the rows of all its
    producers (or the columns of all its consumers): the L1 norm of the channel is then the sum of its members'.
    """
    modules = modules if modules is not None else _modules(model)
    role = "producer" if granularity == "filter" else "consumer"
    slots = group.role(role)
    if not slots:
        raise UserError("prune.granularity", f"{group.name} has no consumer layer to judge its channels by; use filter")
    width = group.width(modules)
    parts = []
    for slot in slots:
        w = modules[slot.module].weight
        rows = w.flatten(1) if role == "producer" else w.transpose(0, 1).flatten(1)
        if slot.positions is not None:  # a channel's positions, side by side
            rows = rows[slot.index().to(w.device)].reshape(width, -1)
        elif rows.shape[0] != width:
            raise ValueError(f"{slot.module} has {rows.shape[0]} channels, group {group.name} has {width}")
        parts.append(rows)
    return torch.cat(parts, dim=1)


def _per_group_vectors(model: Prunable, granularity: str) -> Iterator[torch.Tensor]:
    modules = _modules(model)
    for group in model.channel_groups():
        yield channel_vectors(model, group, granularity, modules)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _bn_hooks(model: Prunable, hook: Callable[[int, torch.Tensor, torch.Tensor | None, int], None]) -> Iterator[None]:
    """Calls ``hook(group_index, bn_output, index, dim)`` on every forward of every norm of every group (a group
    without one: of every producer, whose output the mask zeroes; ``ChannelGroup.mask_points``) (``index``: where
    the group's channels are in that output, [channels, positions per channel]; None: all of it, in order;
    ``dim``: the output's dim holding them, ``channels_first`` moves it to 1); removed on exit. A hook of a group
    with several norms (a residual stream) is called once per norm: what it sums is summed over them (``_at``)."""
    modules = _modules(model)
    handles = []
    try:
        for g, group in enumerate(model.channel_groups()):
            for slot in group.mask_points():
                index = slot.index()
                handles.append(
                    modules[slot.module].register_forward_hook(
                        lambda m, inp, out, g=g, i=index, d=slot.out_dim: hook(
                            g, out, None if i is None else i.to(out.device), d
                        )
                    )
                )
        yield
    finally:
        for h in handles:
            h.remove()


def channels_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its channels, held in ``dim``, in dim 1 (a channels-last [B, H, W, C] as [B, C, H, W])."""
    return t if dim == 1 else t.movedim(dim, 1)


def _at(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """A per-channel statistic of a whole BN output at the group's channels (summed over a channel's positions:
    a conv group of a grouped conv is one channel)."""
    return values if index is None else values[index].sum(-1)


def _batches(
    sample: Sample, n: int, batch_size: int | None, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of ``sample`` (all of them if fewer) in chunks."""
    bs = batch_size or sample.batch_size
    n = min(n, len(sample.x))
    if n == 0:
        raise ValueError("empty sample")
    for i in range(0, n, bs):
        j = min(i + bs, n)
        yield sample.x[i:j].to(device), sample.y[i:j].to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _widths(model: Prunable) -> list[int]:
    modules = _modules(model)
    return [g.width(modules) for g in model.channel_groups()]


def _granularity_option(default: str) -> Option:
    return Choice(
        "granularity",
        default,
        GRANULARITIES,
        "filter: judge channel c by conv.weight[c]; feature: by every consumer's W[:, c] "
        "(prune.granularity overrides it)",
    )


# ---------------------------------------------------------------- weight criteria


class _WeightCriterion(Criterion):
    """Criteria computed from ``channel_vectors`` one group at a time."""

    options = (_granularity_option("filter"),)
    channels_last = True  # weights only
    granularity: str

    def _scores(self, model, granularity, sample):
        gran = granularity or self.granularity
        return [self._score_vectors(v) for v in _per_group_vectors(model, gran)]

    @abc.abstractmethod
    def _score_vectors(self, v: torch.Tensor) -> torch.Tensor:
        """[C, D] per-channel weight vectors -> [C] scores."""


@register("l1")
class L1(_WeightCriterion):
    """L1 norm of the filter (Li et al., PFEC) or of the consumer kernels."""

    def _score_vectors(self, v):
        return v.abs().sum(dim=1)


@register("l2")
class L2(_WeightCriterion):
    """L2 norm of the filter or of the consumer kernels."""

    def _score_vectors(self, v):
        return torch.linalg.vector_norm(v, dim=1)


@register("group_norm")
class GroupNorm(L2):
    """The criterion matching group lasso / HGSR: the L2 norm of the channel's group.

    ``feature`` (default): sqrt of the sum of squares of all consumers' ``W[:, c]`` (the
    feature-wise group the regularizer drives to zero); ``filter``: of ``conv.weight[c]``.
    """

    options = (_granularity_option("feature"),)


def fpgm_distances(v: torch.Tensor) -> torch.Tensor:
    """FPGM score of each row: sum_j ||v_i - v_j||_2.

    ``torch.cdist`` in float64 with the matrix-multiplication form
    (||a||^2 + ||b||^2 - 2ab, 20x faster than the direct form on VGG-16; float64 keeps it
    accurate to ~1e-8 relative), the diagonal set to exactly 0.
    """
    v64 = v.detach().double().unsqueeze(0)
    d = torch.cdist(v64, v64, compute_mode="use_mm_for_euclid_dist")[0]
    d.fill_diagonal_(0.0)
    return d.sum(dim=1).to(v.dtype)


def _max_normalised(s: torch.Tensor) -> torch.Tensor:
    m = s.max()
    return s / m if m > 0 else torch.zeros_like(s)


@register("fpgm")
class FPGM(_WeightCriterion):
    """FPGM (He et al., CVPR 2019): filters near the layer's geometric median are redundant.

    score_i = sum_j ||F_i - F_j||_2 within the layer. With ``mix`` > 0 (FPGM-mix):
    ``mix * fpgm / max_layer(fpgm) + (1 - mix) * l2 / max_layer(l2)``, i.e. each term is
    divided by its maximum over the layer's channels (both in [0, 1], an all-zero term stays 0).
    ``mix`` = 0 (default) is pure FPGM, unnormalised.
    """

    options = (
        _granularity_option("filter"),
        Float("mix", 0.0, "FPGM-mix weight: mix * fpgm/max + (1 - mix) * l2/max; 0 = pure FPGM", lo=0.0, hi=1.0),
    )
    mix: float

    def _score_vectors(self, v):
        dist = fpgm_distances(v)
        if self.mix == 0.0:
            return dist
        norm = torch.linalg.vector_norm(v, dim=1)
        return self.mix * _max_normalised(dist) + (1.0 - self.mix) * _max_normalised(norm)


@register("entropy")
class Entropy(_WeightCriterion):
    """Weight entropy (filter grafting): 10-bin histogram of each filter's weights; low = little information."""

    options = (_granularity_option("filter"), Int("bins", 10, "histogram bins (10 in filter grafting)", lo=2))
    bins: int

    def _score_vectors(self, v):
        return histogram_entropy(v.double(), self.bins)


@register("random")
class Random(Criterion):
    """Uniform random scores from ``torch.Generator().manual_seed(seed)``: the control."""

    options = (Int("seed", 0, "seed of the random scores: same seed, same scores", lo=0),)
    channels_last = True  # no outputs read
    seed: int

    def _scores(self, model, granularity, sample):
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(w, generator=gen) for w in _widths(model)]


# ---------------------------------------------------------------- BN scale + polarization


def polarization_threshold(values: torch.Tensor, bin_width: float = 0.01) -> float:
    """Polarization's cut (Zhuang et al., NeurIPS 2020): the first local minimum of the histogram.

    Histogram: bin k = [k*w, (k+1)*w) for k = 0 .. floor(max/w), w = ``bin_width``
    (values must be finite and >= 0). Runs of consecutive bins with equal counts are
    *plateaus* (a single bin is a plateau of length 1). A plateau of bins i..j is a
    *local minimum* when it has a neighbour bin on both sides (i > 0 and j < last bin)
    and both neighbours, h[i-1] and h[j+1], have strictly larger counts. Bin 0 and the
    last bin are never minima; a descending or ascending staircase has none.
    The *first* local minimum is the one with the smallest i.

    Returned threshold: the centre of that plateau, (i + j + 1) / 2 * w. For a valley of
    empty bins between the two modes (the polarized case) every cut in [i*w, (j+1)*w]
    prunes the same channels and the centre keeps the largest margin to both modes;
    for a one-bin valley it is the bin centre. Channels with value < threshold are pruned.

    Raises ValueError when there is no local minimum (e.g. a unimodal, not polarized
    distribution) or the input is empty / negative / not finite.
    """
    v = values.detach().flatten().double().cpu()
    if v.numel() == 0:
        raise ValueError("polarization_threshold: no values")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError("polarization_threshold: values must be finite and >= 0")
    if not bin_width > 0:
        raise ValueError("polarization_threshold: bin_width must be > 0")
    counts = torch.bincount(torch.floor(v / bin_width).long())
    levels, run_len = torch.unique_consecutive(counts, return_counts=True)
    ends = torch.cumsum(run_len, 0)  # one past the last bin of each plateau
    starts = ends - run_len
    lv = levels.tolist()
    for r in range(1, len(lv) - 1):
        if lv[r - 1] > lv[r] < lv[r + 1]:
            return float((int(starts[r]) + int(ends[r])) / 2 * bin_width)
    raise ValueError("polarization_threshold: the histogram has no local minimum (not polarized?)")


@register("bn_scale")
class BNScale(Criterion):
    """|gamma_c| of the group's BatchNorm (Network Slimming; Polarization).

    ``rule``: ``ratio`` / ``slimming`` - the caller meets its target with one global
    threshold on |gamma| (``auto_threshold`` returns None); ``polarization`` -
    ``auto_threshold`` returns ``polarization_threshold`` of all groups' |gamma| together.
    """

    options = (
        Choice(
            "rule",
            "ratio",
            ("ratio", "slimming", "polarization", "nonzero"),
            "ratio | slimming: one global |gamma| threshold meets the target; polarization: the first local "
            "minimum of the |gamma| histogram; nonzero: exactly the channels with gamma = 0 go (RMNet's learned "
            "factors); the last two need prune.ratio=null",
        ),
        Float("bin_width", 0.01, "histogram bin width of the polarization rule", lo=0.0, lo_open=True),
    )
    rule: str
    bin_width: float

    OWN_RULES = {"polarization": "the first local minimum of the |gamma| histogram", "nonzero": "gamma = 0"}

    @classmethod
    def own_threshold(cls, options):
        return options["rule"] in cls.OWN_RULES

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        rule = cfg["criterion"]["rule"]
        if rule in cls.OWN_RULES and cfg["prune"]["ratio"] is not None:
            raise UserError(
                "prune.ratio",
                f"criterion.rule={rule} sets its own threshold ({cls.OWN_RULES[rule]}); set prune.ratio=null, "
                "or use criterion.rule=ratio to meet a ratio",
            )

    def check_groups(self, model):
        modules = _modules(model)
        for group in model.channel_groups():
            norms = group.role("norm")
            other = next((modules[s.module] for s in norms if not isinstance(modules[s.module], nn.BatchNorm2d)), None)
            if not norms or other is not None:
                # a group without BatchNorm names its conv as its norm; a LayerNorm's weight is no BN scale
                has = f"a {type(other).__name__}" if isinstance(other, nn.LayerNorm) else "none"
                raise UserError(
                    "criterion.name",
                    f"bn_scale needs a BatchNorm after every pruned conv; {group.name} has {has} (use l1, or a "
                    "criterion reading activations)",
                )

    def _scores(self, model, granularity, sample):
        self.check_groups(model)
        modules = _modules(model)
        norms = [g.role("norm") for g in model.channel_groups()]
        # a group with several BatchNorms (a residual stream): the sum of its |gamma| in each
        return [sum(_at(modules[s.module].weight.abs(), s.index()) for s in slots) for slots in norms]

    def auto_threshold(self, scores):
        if self.rule == "nonzero":  # only exact zeros score below the smallest positive float
            return float(torch.finfo(torch.float32).tiny)
        if self.rule != "polarization":
            return None
        try:
            return polarization_threshold(torch.cat([s.flatten().cpu() for s in scores]), self.bin_width)
        except ValueError as e:
            raise UserError("criterion.rule", f"polarization: {e}") from None


# ---------------------------------------------------------------- data-driven criteria

_BATCH = Int(
    "batch_size", 128, "images per forward pass (memory only, not the score); null = the sample's", lo=1, nullable=True
)


class _ActivationCriterion(Criterion):
    """Scores from the activations of ``num_images`` training images."""

    needs_data = True
    channels_last = True  # _bn_hooks hands each output's dim holding the channels
    options = (Int("num_images", 1024, "training images the score runs over", lo=1), _BATCH)
    num_images: int
    batch_size: int | None

    @property
    def sample_size(self) -> int:
        return self.num_images


@register("apoz")
class APoZ(_ActivationCriterion):
    """Average Percentage of Zeros (Hu et al. 2016) of relu(BN output); score = -APoZ.

    Over the first ``num_images`` images of the sample: share of the channel's
    post-ReLU activations (all images and positions) that are exactly 0.
    """

    def _scores(self, model, granularity, sample):
        zeros: list[torch.Tensor | None] = [None] * len(model.channel_groups())
        total = [0] * len(zeros)

        def hook(g, out, index, dim):
            out = channels_first(out, dim)
            dims = (0, 2, 3) if out.dim() == 4 else (0,)
            z = _at((F.relu(out) == 0).sum(dim=dims).double(), index)  # relu(a) == 0  <=>  a <= 0
            zeros[g] = z if zeros[g] is None else zeros[g] + z
            total[g] += out.numel() // out.shape[1] * (1 if index is None else index.shape[1])

        with _eval_mode(model), _bn_hooks(model, hook):
            for xb, _ in _batches(sample, self.num_images, self.batch_size, _device(model)):
                model(xb)
        return [-(z / t) for z, t in zip(zeros, total)]


def feature_map_ranks(fmaps: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] matrix rank of every H x W map, one batched call
    (``torch.linalg.matrix_rank``, default tolerance sigma_max * max(H, W) * eps)."""
    return torch.linalg.matrix_rank(fmaps)


@register("hrank")
class HRank(Criterion):
    """HRank (Lin et al., CVPR 2020): mean rank of the channel's post BN+ReLU feature maps
    over ``batches`` batches of ``batch_size`` images; low rank = pruned first."""

    needs_data = True
    channels_last = True
    options = (Int("batches", 5, "batches averaged over (5 in the paper)", lo=1), _BATCH)
    batches: int
    batch_size: int | None

    @property
    def sample_size(self) -> int:
        return self.batches * (self.batch_size or Sample.batch_size)

    def _scores(self, model, granularity, sample):
        bs = self.batch_size or sample.batch_size
        sums: list[torch.Tensor | None] = [None] * len(model.channel_groups())
        images = 0

        def hook(g, out, index, dim):
            r = _at(feature_map_ranks(F.relu(channels_first(out, dim)).float()).sum(dim=0).double(), index)
            sums[g] = r if sums[g] is None else sums[g] + r

        with _eval_mode(model), _bn_hooks(model, hook):
            for xb, _ in _batches(sample, self.batches * bs, bs, _device(model)):
                model(xb)
                images += len(xb)
        return [s / images for s in sums]


@register("taylor")
class Taylor(_ActivationCriterion):
    """First-order Taylor (Molchanov et al.): |sum over images and positions of a * dL/da|.

    a = the group's BN output, L = cross-entropy summed over the images (so the sum does not
    depend on how the sample is chunked), over the first ``num_images`` images; divided by
    the number of images. It is the first-order estimate of |change of the sample's loss|
    when the channel is zeroed (masking zeroes exactly the BN output). Gradients are taken
    with ``torch.autograd.grad`` w.r.t. the activations only: no parameter ``.grad`` changes.
    """

    def _scores(self, model, granularity, sample):
        n_groups = len(model.channel_groups())
        sums: list[torch.Tensor | None] = [None] * n_groups
        acts: list[tuple[int, torch.Tensor, torch.Tensor | None, int]] = []  # (group, BN output, index, dim)
        images = 0

        def hook(g, out, index, dim):
            acts.append((g, out, index, dim))  # the output itself: the loss's gradient reaches it, not a view

        with torch.enable_grad(), _eval_mode(model), _bn_hooks(model, hook):
            for xb, yb in _batches(sample, self.num_images, self.batch_size, _device(model)):
                xb = xb.detach().requires_grad_(True)  # a graph even if parameters are frozen
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                grads = torch.autograd.grad(loss, [a for _, a, _, _ in acts], allow_unused=True)
                for (g, a, index, dim), d in zip(acts, grads):
                    a = channels_first(a.detach(), dim)
                    dims = (0, 2, 3) if a.dim() == 4 else (0,)
                    s = (
                        (a * channels_first(d, dim)).sum(dim=dims).double()
                        if d is not None
                        else torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
                    )
                    s = _at(s, index)  # a stream's BNs: the sum of its members' a * dL/da, then |.|
                    sums[g] = s if sums[g] is None else sums[g] + s
                acts.clear()  # free this batch's graph
                images += len(xb)
        return [s.abs() / images for s in sums]
