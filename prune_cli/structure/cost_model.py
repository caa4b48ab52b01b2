"""Latency cost model: a network's latency predicted from its layers' kept widths, for ``prune.target=latency``
(docs/methods.md "Latency targets").

- **Layers.** Every conv (dense, depthwise or grouped) and linear layer, with the size of its input, found by one
  forward (``find_layers``).
- **Tables.** A layer's *probe* is the layer alone at given widths: a conv followed by BatchNorm and ReLU (the
  elementwise work that shrinks with its outputs), a linear layer alone. It is timed on the run's device, thread
  count, dtype and memory format at the latency batch, on a grid of (input, output) widths, every width of a table
  interleaved with the others, and interpolated bilinearly in between (a depthwise conv has one width). Output
  widths on multiples of ``ALIGN`` are a curve of their own: a conv to 32 channels can run faster than to 25-31.
- **Cache.** A table is keyed by what changes the time but the widths (kind, kernel, stride, padding, dilation, input
  size, bias, dense widths, grid) and by the setting (batch, device, torch version, threads, dtype, memory format).
  It is stored as JSON in the cache directory, so identical layers (a ResNet's repeated blocks) share one and later
  runs measure nothing.
- **Calibration.** The sum of the layer times misses what the tables do not see: the framework's overhead, residual
  additions, pooling. So the whole network is timed dense and at uniformly narrowed widths (summed as those widths
  run), and the latency predicted is ``a + b * sum``, fitted by least squares over those points. The points are
  cached too, keyed by the network, so a resumed run predicts, and selects, exactly as before.
- **Giving back.** The selections search by prices that never rise as channels go (stairs: a width just below a
  multiple of ``ALIGN`` priced as the multiple where that runs faster); the widths a selection leaves are then
  widened, group by group, to the multiple above where the network, priced as it runs, is faster so
  (``give_back``).

- **Aiming.** What a network of non-uniform widths runs at can still stray from the line fitted on uniform ones,
  so a selection to a latency is checked against the clock (``aim``): the network selected to a predicted share is
  timed against the dense one (``DeviceTimer.compare``: until their ratio is known to ``PRECISION``), and the
  share asked of the selection corrected (scaled, then by secants: through the latest two while all are on one
  side, then within the tightest bracket of one timed too slow and one too fast) until the measured latency is
  within ``AIM_BAND`` of the target (in two timings) or ``AIM_ROUNDS`` selections were timed; the one closest to
  the target is kept.

Measuring goes through a timer object (``DeviceTimer``); tests inject one of known costs.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prune_cli.core.atomic import write_text
from prune_cli.core.timing import model_dtype, record_calls

FULL_GRID, QUICK_GRID = 6, 3  # widths measured per axis (latency on / smoke runs with latency off)
EXACT = 8  # an axis of at most this many multiples of the rounding measures them all
ALIGN = 8  # output widths on multiples of this are timed as a curve of their own (``out_axes``)
FULL_SHARES, QUICK_SHARES = (1.0, 0.8, 0.6, 0.4, 0.25), (1.0, 0.5)  # uniform widths the network is timed at
PROBE_MS = {False: 30.0, True: 10.0}  # time spent per grid point (full / quick), 3 to 15 rounds of a table
CALIBRATION_MS = {False: 8000.0, True: 500.0}  # time spent timing networks (full / quick)
NETWORK_REPEATS = {False: (15, 300), True: (3, 21)}  # interleaved forwards per network timing, least and most
LOW = 0.1  # the quantile of a network's forwards taken for its time (other work on the machine only adds time)
PAIRED = 100  # with fewer forwards each, networks are compared by the median of their ratios round by round
# networks compared (a selection aimed at the clock, a pruned network checked): timed on, a timing's worth of forwards
# at a time, until each one's ratio to the first has this relative standard error, or for this many timings' worth
PRECISION, BLOCKS = 0.01, 4
# one untimed forward at this many times the batch first: a ResNet-20 at batch 64 timed 30 ms in a fresh process and
# 25 ms once a batch of 1000 had run (the memory allocator's state); after a forward at 4x the batch, 25 ms either way
STEADY = 4
AIM_ROUNDS, AIM_BAND = 8, 0.02  # selections timed at most to meet a latency; the error that ends the search
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass(frozen=True)
class Layer:
    """One timed layer: ``kind`` conv | depthwise | grouped | linear, its dense weight dims and input size."""

    name: str
    kind: str
    out0: int  # dense weight dim 0 (output channels / features)
    in1: int  # dense weight dim 1 (input channels per group / input features)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    size: tuple[int, ...] = ()  # conv: the input's (H, W); linear: the positions it runs at per image
    bias: bool = False

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def step(self) -> int:
        """The output widths a probe can take come in multiples of this (a grouped conv's groups)."""
        return self.groups if self.kind == "grouped" else 1


def find_layers(model: nn.Module, input_shape) -> list[Layer]:
    """The conv and linear layers one eval-mode forward of a zero image runs through, in order."""
    found: dict[str, Layer] = {}

    def record(name):
        def hook(m, inputs, _):
            x = inputs[0]
            if isinstance(m, nn.Conv2d):
                depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                kind = "depthwise" if depthwise else "grouped" if m.groups > 1 else "conv"
                found[name] = Layer(
                    name,
                    kind,
                    m.weight.shape[0],
                    m.weight.shape[1],
                    tuple(m.kernel_size),
                    tuple(m.stride),
                    tuple(m.padding) if not isinstance(m.padding, str) else (m.padding,),
                    tuple(m.dilation),
                    m.groups,
                    tuple(x.shape[-2:]),
                    m.bias is not None,
                )
            else:
                positions = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
                found[name] = Layer(name, "linear", m.weight.shape[0], m.weight.shape[1], size=(positions,))

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return list(found.values())


def axis(n: int, step: int, points: int) -> list[int]:
    """``points`` widths from ``step`` to ``n``, evenly spread, multiples of ``step``, ``n`` among them (every
    multiple where there are at most ``EXACT`` of them: every width a selection rounding to ``step`` can leave)."""
    if n <= step:
        return [n]
    if n // step <= EXACT:
        return sorted(set(range(step, n + 1, step)) | {n})
    chosen = {int(round(v / step)) * step for v in np.linspace(step, n, points)}
    return sorted({min(max(v, step), n) for v in chosen} | {n})


def out_axes(n: int, step: int, points: int) -> tuple[list[int], list[int]]:
    """(output widths timed off multiples of ``ALIGN``, those timed on them) of a layer with ``n`` outputs whose
    widths are multiples of ``step``: two curves, each spread as ``axis`` spreads one, where a selection can leave
    both kinds; else ``(axis(n, step, points), [])``.

    Why two: at batch 64 on this CPU (channels-last, 2 threads) a 3x3 conv to 24, 32 or 40 channels ran 20-30%
    faster than to the widths just below, and each multiple of 8 faster than every width of the seven below it
    (64 -> w channels at 8x8: 1.34 ms at 24, 1.84-1.99 at 25-31, 1.52 at 32, 2.24-2.49 at 33-39, 2.12 at 40); one
    interpolated curve through both kinds sees neither the dips nor the steps."""
    block = math.lcm(step, ALIGN)
    if block == step or n < block:  # every width a selection can leave is on the multiples, or none is
        return axis(n, step, points), []
    others = [w for w in range(step, n + 1, step) if w % block]
    if n not in others and n % block:  # n not a multiple of step: the dense width is among the others
        others.append(n)
    if len(others) > EXACT:
        others = sorted({others[int(round(i))] for i in np.linspace(0, len(others) - 1, points)})
    return others, axis(n // block * block, block, points)


@dataclass
class Table:
    """A probe's times (ms) on the grid ``ins`` x ``outs`` of weight dims 1 and 0 (depthwise: ``ins`` is [1]), and,
    where a selection can leave output widths both on and off multiples of ``ALIGN``, on ``ins`` x ``aligned`` (the
    multiples; ``outs`` then holds none): two curves, each interpolated on its own (``at``)."""

    ins: list[int]
    outs: list[int]
    ms: list[list[float]]  # [len(ins)][len(outs)]
    aligned: list[int] = field(default_factory=list)
    aligned_ms: list[list[float]] = field(default_factory=list)  # [len(ins)][len(aligned)]

    def envelope(self) -> Table:
        """The table made non-decreasing in both widths, each curve on its own: each time the least of it and every
        wider point's.

        A narrower layer is sometimes measured slower (noise; a kernel's slow path for one or two channels, e.g.
        channels-last convs to one channel); prices that rise as channels go would make the selection's removed
        amount fall back as it removes more, and its search assumes it grows. What the envelope hides is met by
        aiming at the measured latency (``aim``). It does not hide what the two curves tell apart: a multiple of
        ``ALIGN`` that runs faster than the widths just below it."""
        return Table(self.ins, self.outs, _envelope(self.ms), self.aligned, _envelope(self.aligned_ms))

    def at(self, d1: float, d0: float, stairs: bool = True) -> float:
        """The price of kept weight dims (d1, d0): bilinear between grid points, the nearest edge outside them; with
        two curves, the least that ``d0`` or a wider output width is timed at: off the multiples of ``ALIGN``, its
        own curve or the multiples' at the first multiple above; on one, the multiples' curve or, where wider
        widths off the multiples are on the grid, theirs. ``stairs=False``: the time of ``d0`` itself, on its own
        curve (what a network of these widths runs at: the calibration's sums, ``give_back``'s choice).

        Why the least: a width just below a multiple can run slower than the multiple (a conv to 25-31 channels
        against 32), and a price that rose as channels go would break the searches, which take the narrowest widths
        for the fastest and assume the amount removed grows. So such a width is priced as the multiple above it, the
        time it could run at keeping more channels: the multiples are priced as timed, the steps between them are
        stairs, and aiming at the clock meets what the stairs hide."""
        others = _bilinear(self.ins, self.outs, self.ms, d1, d0)
        if not self.aligned:
            return others
        if not stairs:
            on = d0 % ALIGN == 0 and d0 <= self.aligned[-1]  # a multiple (the dense width may be off the grid's)
            return _bilinear(self.ins, self.aligned, self.aligned_ms, d1, d0) if on else others
        up = math.ceil(d0 / ALIGN) * ALIGN
        if up > self.aligned[-1]:
            return others
        multiple = _bilinear(self.ins, self.aligned, self.aligned_ms, d1, up)
        if up == d0 and d0 >= self.outs[-1]:  # no wider width off the multiples
            return multiple
        return min(others, multiple)


def _envelope(ms: list[list[float]]) -> list[list[float]]:
    """``ms`` ([ins][outs]) made non-decreasing along both axes: each point the least of itself and every wider."""
    ms = [row[:] for row in ms]
    for i in reversed(range(len(ms))):
        for j in reversed(range(len(ms[i]))):
            if i + 1 < len(ms):
                ms[i][j] = min(ms[i][j], ms[i + 1][j])
            if j + 1 < len(ms[i]):
                ms[i][j] = min(ms[i][j], ms[i][j + 1])
    return ms


def _bilinear(ins: list[int], outs: list[int], ms: list[list[float]], d1: float, d0: float) -> float:
    i, u = _bracket(ins, d1)
    j, v = _bracket(outs, d0)
    row, nxt = ms[i], ms[min(i + 1, len(ins) - 1)]
    low = row[j] + v * (row[min(j + 1, len(outs) - 1)] - row[j])
    high = nxt[j] + v * (nxt[min(j + 1, len(outs) - 1)] - nxt[j])
    return low + u * (high - low)


def _bracket(points: list[int], x: float) -> tuple[int, float]:
    """(index of the grid point at or below ``x``, the fraction of the way to the next one), clamped to the grid."""
    if x <= points[0] or len(points) == 1:
        return 0, 0.0
    if x >= points[-1]:
        return len(points) - 1, 0.0
    i = bisect.bisect_right(points, x) - 1
    return i, (x - points[i]) / (points[i + 1] - points[i])


@dataclass(frozen=True)
class Setting:
    """What a latency is measured under: the batch, device, threads, dtype, memory format and grid."""

    batch: int
    device: str
    dtype: str
    memory_format: str
    threads: int
    quick: bool = False

    def key(self) -> dict:
        """The setting and the machine facts that change a time (torch version, CPU kernels or GPU model)."""
        device = torch.device(self.device)
        if device.type == "cuda":
            hardware = torch.cuda.get_device_name(device)
        else:
            hardware = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
        return {**asdict(self), "torch": torch.__version__, "hardware": hardware}


def setting_of(model: nn.Module, batch: int, memory_format: str, quick: bool) -> Setting:
    """The setting ``model`` runs under now: its device and dtype, torch's thread count."""
    p = next(model.parameters())
    return Setting(batch, str(p.device), str(model_dtype(model)), memory_format, torch.get_num_threads(), quick)


class DeviceTimer:
    """Measures probes and networks for real under a ``Setting``."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.device = torch.device(setting.device)
        self.dtype = getattr(torch, setting.dtype.removeprefix("torch."))
        self.layout = MEMORY_FORMATS[setting.memory_format]

    def table(self, layer: Layer, ins: list[int], outs: list[int]) -> list[list[float]]:
        """Milliseconds of the layer's probe at every weight dims (d1 in ``ins``, d0 in ``outs``): the median of
        3-15 rounds that run each once, after a warm-up round. Interleaved, so a slow spell of the machine falls on
        every width alike and the curves keep their shape: the output widths of a conv at batch 64 timed one after
        the other, 60 ms each, put 56 channels at 5.6 ms between 2.9 at 55 and 3.6 at 58; timed interleaved, the
        widths 20-44 fell on a smooth curve and its dips at the multiples of 8."""
        inputs, calls = {}, []
        for d1 in ins:
            for d0 in outs:
                probe, shape = self._probe(layer, d1, d0)
                if shape not in inputs:
                    x = torch.randn(*shape)
                    inputs[shape] = (x.contiguous(memory_format=self.layout) if x.dim() == 4 else x).to(
                        self.device, self.dtype
                    )
                calls.append(lambda probe=probe, x=inputs[shape]: probe(x))
        once = float(record_calls(calls, self.device, warmup=0, repeats=1).sum())  # the warm-up round, timed
        repeats = int(min(15, max(3, PROBE_MS[self.setting.quick] * len(calls) / max(once, 1e-3))))
        ms = np.median(record_calls(calls, self.device, warmup=0, repeats=repeats), axis=0)
        return ms.reshape(len(ins), len(outs)).tolist()

    def _probe(self, layer: Layer, d1: int, d0: int) -> tuple[nn.Module, tuple[int, ...]]:
        """The layer's probe with weight dims (d1, d0) on the device, and the shape of its input."""
        b = self.setting.batch
        if layer.kind == "linear":
            probe = nn.Linear(d1, d0, bias=layer.bias)
            shape = (b, *([layer.size[0]] if layer.size[0] > 1 else []), d1)
        else:
            groups = d0 if layer.kind == "depthwise" else layer.groups
            cin = d0 if layer.kind == "depthwise" else d1 * groups
            padding = layer.padding[0] if isinstance(layer.padding[0], str) else layer.padding
            conv = nn.Conv2d(cin, d0, layer.kernel, layer.stride, padding, layer.dilation, groups, layer.bias)
            probe = nn.Sequential(conv, nn.BatchNorm2d(d0), nn.ReLU(inplace=True))
            shape = (b, cin, *layer.size)
        return probe.to(self.device, self.dtype, memory_format=self.layout).eval(), shape

    def models(self, models: list[nn.Module], input_shape, precision: float | None = None) -> list[float]:
        """Milliseconds of one forward of each network at the batch: after one untimed forward at ``STEADY`` times the
        batch, ``CALIBRATION_MS`` of interleaved forwards (15-300 of each), summed up by ``network_times``; with a
        ``precision`` (not in a smoke run), as many more as ``until_precise`` takes. Eval mode; the models are copied
        into the memory format, left as they are."""
        shape = (self.setting.batch, *input_shape)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)
        copies = []
        for m in models:
            m = copy.deepcopy(m).to(self.device, self.dtype).eval()
            if x.dim() == 4:
                m = m.to(memory_format=self.layout)
            copies.append(m)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.layout)
        with torch.no_grad():  # the allocator to its steady state: what ran before (a batch of 1000) changes it
            big = torch.cat([x] * STEADY)
            for m in copies:
                m(big)
        calls = [lambda m=m: m(x) for m in copies]
        once = float(record_calls(calls, self.device, warmup=1, repeats=1).sum())
        least, most = NETWORK_REPEATS[self.setting.quick]
        repeats = int(min(most, max(least, CALIBRATION_MS[self.setting.quick] / max(once, 1e-3))))
        paired = repeats < PAIRED  # by one timing's rounds: every timing of these networks sums up alike

        def record():
            return record_calls(calls, self.device, warmup=0, repeats=repeats)

        if precision is None or self.setting.quick:
            return network_times(record(), paired)
        return network_times(until_precise(record, paired, precision), paired)

    def compare(self, models: list[nn.Module], input_shape) -> list[float]:
        """``models`` timed to ``PRECISION``: networks whose times are compared, not fitted."""
        return self.models(models, input_shape, PRECISION)


def network_times(times: np.ndarray, paired: bool | None = None) -> list[float]:
    """Each network's milliseconds from interleaved forwards (a row per round, a column per network; the first is
    the one compared to). ``paired`` (by default: fewer than ``PAIRED`` rounds, long forwards): the first's median,
    and each other's as it over the median of their ratios round by round; else the ``LOW`` quantile of each.

    Why so: at batch 1 on a shared 2-core CPU the machine passes through slow spells of seconds (one pair's dense
    network 8 ms, then 14 ms) that slow a small network more than a large one. Over 120 s of one ResNet-56 pair,
    timings as the median of five blocks' least of 21 forwards spread 1.28-1.68x (cv 4.7%); as the 0.1 quantile of
    300, 1.50-1.58x (cv 1.5%; mobilenet_v2: cv 3.0% and 0.8%, the median of ratios 1.8%). Forwards of 100 ms and more
    (batch 64) each span such spells, and only a few fall below a low quantile, but two neighbours see the same
    machine: over 240 s of a ResNet-56 pair at batch 64, timings of 35 rounds spread 1.77-1.99x (cv 2.9%) as the
    0.1 quantile, 1.79-1.90x (cv 1.3%) as the median of ratios."""
    paired = len(times) < PAIRED if paired is None else paired
    return [float(t) for t in _summed(times, paired)]


def _summed(times: np.ndarray, paired: bool) -> np.ndarray:
    """``network_times`` over the last two axes (rounds, networks) of ``times``; leading axes are kept."""
    if not paired:
        return np.quantile(times, LOW, axis=-2)
    reference = np.median(times[..., :1], axis=-2)
    return reference / np.median(times[..., :1] / times, axis=-2)


def ratio_error(times: np.ndarray, paired: bool, resamples: int = 200) -> float:
    """The relative standard error of each network's time over the first's, as ``network_times`` sums them up (the
    largest over the networks): the spread of those ratios over ``resamples`` moving-block resamplings of the rounds
    (seeded: the same times, the same figure).

    Blocks of ``block_length`` consecutive rounds, not single rounds, because neighbouring rounds can share the
    machine's spells: in two recordings of mobilenet_v2 and its pruned half at batch 64, windows of 200 rounds spread
    by 1.6% and 1.9% (cv), where resampling single rounds said 0.9% and 1.1%, and blocks 1.3% and 1.3%. On ResNet-56
    and VGG-16 at batch 64 (132 rounds) the two said 1.0% and 0.9%, 1.0% and 1.1%. Drift over minutes is seen by
    neither: VGG-16's windows spread by 1.4%."""
    if times.shape[1] < 2:
        return 0.0
    n, length = len(times), block_length(len(times))
    starts = np.random.default_rng(0).integers(0, n - length + 1, (resamples, -(-n // length)))
    rounds = (starts[..., None] + np.arange(length)).reshape(resamples, -1)[:, :n]
    summed = _summed(times[rounds], paired)
    ratios = summed[:, 1:] / summed[:, :1]
    return float(np.max(ratios.std(axis=0) / ratios.mean(axis=0)))


def block_length(rounds: int) -> int:
    """Consecutive rounds resampled together: about twice the cube root of their number (the order of the block
    length that estimates a variance best, Hall, Horowitz and Jing 1995), 6 of 33, 11 of 150."""
    return max(1, min(rounds, round(2 * rounds ** (1 / 3))))


def until_precise(record, paired: bool, precision: float, blocks: int = BLOCKS) -> np.ndarray:
    """The rounds of ``record()`` (one timing's interleaved forwards), called again and stacked until their
    ``ratio_error`` is at most ``precision``, ``blocks`` calls at most.

    Why: at batch 64 on a shared 2-core CPU the ratio of VGG-16's forward to its pruned half's varied by 12% round
    by round, with no memory from one round to the next, so timings of 33 rounds spread by 2.5-2.9% (cv, in two
    recordings of 3 and 7 minutes) and two of three runs aimed at 2.0x were checked at 1.84x and 1.86x; timed on to
    1%, the same recordings spread by about 1.5%. A quiet machine stops at the first timing."""
    times = record()
    for _ in range(blocks - 1):
        if ratio_error(times, paired) <= precision:
            break
        times = np.vstack([times, record()])
    return times


def default_cache_dir() -> Path:
    """``$PRUNE_CLI_CACHE/latency``, else ``$XDG_CACHE_HOME/prune_cli/latency``, else ``~/.cache/prune_cli/latency``."""
    if os.environ.get("PRUNE_CLI_CACHE"):
        return Path(os.environ["PRUNE_CLI_CACHE"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prune_cli" / "latency"


class Cache:
    """JSON files named by the hash of their key (the key is stored beside the value and checked on reading)."""

    def __init__(self, directory: Path | str | None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.dir / f"{digest}.json"

    def get(self, key: dict):
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent or unreadable: measured again (and written over)
        return stored.get("value") if stored.get("key") == json.loads(json.dumps(key)) else None

    def put(self, key: dict, value) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self._path(key), json.dumps({"key": key, "value": value}))


@dataclass
class CostModel:
    """Tables by layer name and the calibration ``ms = a + b * sum of the layers' table times``."""

    layers: dict[str, Layer]
    tables: dict[str, Table]
    a: float = 0.0
    b: float = 1.0
    points: list[tuple[float, float]] = field(default_factory=list)  # calibration: (sum of tables, measured ms)
    setting: Setting | None = None  # what it was measured under
    seconds: float = 0.0  # building it: measuring what the cache did not hold
    measured: int = 0  # tables and calibrations measured (0: all from the cache)

    def layer_sum(self, dims: dict[str, tuple[float, float] | None], stairs: bool = True) -> float:
        """The sum of the tables at kept weight dims ``{layer: (dim 1, dim 0)}`` (None: the layer is gone), priced
        as ``Table.at`` prices them (``stairs``)."""
        total = 0.0
        for name, layer in self.layers.items():
            if dims[name] is not None:
                d1, d0 = dims[name]
                total += self.tables[name].at(1 if layer.kind == "depthwise" else d1, d0, stairs)
        return total

    def predict(self, dims: dict[str, tuple[float, float] | None], stairs: bool = True) -> float:
        """Predicted milliseconds of the network with these kept weight dims: with ``stairs``, the price the
        selections search by (never rising as channels go); without, what these very widths run at."""
        return self.a + self.b * self.layer_sum(dims, stairs)

    def fit(self) -> None:
        """a and b by least squares over the calibration points (one point, or a fit that would make time fall as
        layers grow: b alone, through the origin)."""
        s, t = np.array(self.points, dtype=np.float64).T
        if len(s) > 1 and np.ptp(s) > 0:
            b, a = np.polyfit(s, t, 1)
            if b > 0:
                self.a, self.b = float(a), float(b)
                return
        self.a, self.b = 0.0, float(t.sum() / max(s.sum(), 1e-12))


def weight_dims(model: nn.Module, layers) -> dict[str, tuple[int, int] | None]:
    """{layer: (weight dim 1, weight dim 0)} of the layers as ``model`` has them (None: it has not the layer)."""
    modules = dict(model.named_modules())
    return {name: tuple(modules[name].weight.shape[1::-1]) if name in modules else None for name in layers}


def build(
    model: nn.Module,
    input_shape,
    setting: Setting,
    narrowed,
    cache: Cache,
    timer=None,
    step: int = 1,
) -> CostModel:
    """The cost model of ``model`` under ``setting``: tables from the cache or measured (on grids of multiples of
    ``step``: ``prune.round_to``), calibrated on ``model`` and ``narrowed(share)`` (a copy of it keeping ``share``
    of every group's channels) for the shares, or on the cached points of an earlier build."""
    tic = time.perf_counter()
    timer = timer or DeviceTimer(setting)
    with torch.random.fork_rng(devices=[]):  # probes initialise layers and draw inputs: the run's draws stay its own
        cost, measured = _measured(model, input_shape, setting, narrowed, cache, timer, step)
    cost.seconds, cost.measured = time.perf_counter() - tic, measured
    return cost


def _measured(model, input_shape, setting: Setting, narrowed, cache: Cache, timer, step: int):
    """(the cost model, how many tables and calibrations were measured rather than read from the cache)."""
    points = QUICK_GRID if setting.quick else FULL_GRID
    env = {"grid": points, "step": step, "align": ALIGN, **setting.key()}  # what every cached entry is measured on
    layers = {layer.name: layer for layer in find_layers(model, input_shape)}
    tables, measured = {}, 0
    for name, layer in layers.items():
        key = {"table": layer.key(), **env}
        stored = cache.get(key)
        if stored is None:
            table = measure_table(layer, timer, points, step)
            cache.put(key, asdict(table))
            measured += 1
        else:
            table = Table(**stored)
        tables[name] = table.envelope()
    cost = CostModel(layers, tables, setting=setting)
    shares = QUICK_SHARES if setting.quick else FULL_SHARES
    # the sums of what the narrowed networks run at: their widths are mostly off the multiples of ALIGN
    key = {"network": signature(model, input_shape), "shares": list(shares), "sums": "as run", **env}
    stored = cache.get(key)
    if stored is None:
        variants = [model] + [narrowed(share) for share in shares[1:]]
        times = timer.models(variants, input_shape)
        stored = [(cost.layer_sum(weight_dims(m, layers), stairs=False), t) for m, t in zip(variants, times)]
        cache.put(key, stored)
        measured += 1
    cost.points = [tuple(p) for p in stored]
    cost.fit()
    return cost, measured


def measure_table(layer: Layer, timer, points: int, step: int = 1) -> Table:
    """The layer's probe timed on its grid (widths multiples of ``step``, output widths of its groups too; output
    widths off and on multiples of ``ALIGN`` timed as two curves, ``out_axes``)."""
    outs, aligned = out_axes(layer.out0, math.lcm(step, layer.step()), points)
    ins = [1] if layer.kind == "depthwise" else axis(layer.in1, step, points)
    ms = timer.table(layer, ins, outs + aligned)
    return Table(ins, outs, [row[: len(outs)] for row in ms], aligned, [row[len(outs) :] for row in ms])


def signature(model: nn.Module, input_shape) -> str:
    """What identifies a network's calibration: its modules as printed (kinds, widths, options), its parameter
    shapes and its input shape."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    text = json.dumps([repr(model), shapes, list(input_shape)])
    return hashlib.sha256(text.encode()).hexdigest()


class Predictor:
    """A cost model bound to a ``Structure``: predicted milliseconds for any group widths."""

    def __init__(self, cost: CostModel, model: nn.Module, structure):
        self.cost = cost
        params = dict(model.named_parameters())
        self.layers = []  # (name, row of dim 1 or -1, its size, row of dim 0 or -1, its size)
        self.gone = {name: None for name in cost.layers if f"{name}.weight" not in params}  # groups removed whole
        for name in cost.layers:
            if name not in self.gone:
                rows, shape = structure.dim_rows.get(f"{name}.weight", {}), params[f"{name}.weight"].shape
                self.layers.append((name, rows.get(1, -1), shape[1], rows.get(0, -1), shape[0]))
        self.structure = structure

    def ms(self, widths, stairs: bool = True) -> float:
        sizes = self.structure.sizes(widths)
        dims = {
            name: (sizes[r1] if r1 >= 0 else d1, sizes[r0] if r0 >= 0 else d0) for name, r1, d1, r0, d0 in self.layers
        }
        return self.cost.predict({**dims, **self.gone}, stairs)


def give_back(widths, dense, price, step: int = 1) -> list[int]:
    """Kept group widths, each group that stops short of a multiple of ``lcm(ALIGN, step)`` widened to it where the
    network then runs faster: ``price(widths)``, the predicted milliseconds of the widths as run (``stairs=False``),
    decides, group by group in order.

    Why: the selections search by stair prices (``Table.at``), in which a conv to 25-31 channels costs what one to
    32 costs; the network they leave runs 25-31 as they are, slower than 32 would. Given back, those channels make
    the network wider and faster, and what is predicted is what runs."""
    block = math.lcm(ALIGN, step)
    widths = [int(w) for w in widths]
    now = price(widths)
    for g, w in enumerate(widths):
        up = -(-w // block) * block
        if 0 < w < up <= dense[g]:
            trial = [*widths[:g], up, *widths[g + 1 :]]
            ms = price(trial)
            if ms < now:
                widths, now = trial, ms
    return widths


def widened(keep: list[torch.Tensor], scores: list[torch.Tensor], price, step: int = 1) -> list[torch.Tensor]:
    """Keep masks (one per group) with the widths ``give_back`` gives: a widened group gets back its best-scoring
    removed channels."""
    widths = give_back([int(k.sum()) for k in keep], [len(k) for k in keep], price, step)
    out = []
    for k, s, w in zip(keep, scores, widths):
        more = w - int(k.sum())
        if more:
            gone = (~k).nonzero().flatten()
            best = torch.argsort(s.detach().double().cpu()[gone], descending=True, stable=True)[:more]
            k = k.clone()
            k[gone[best]] = True
        out.append(k)
    return out


def aim(
    ratio: float, select_at, time_pair, start: float | None = None, rounds: int = AIM_ROUNDS, band: float = AIM_BAND
):
    """Meet a measured share of latency removed: ``select_at(r)`` selects a candidate to the predicted share ``r``
    (first ``start``, default ``ratio``: an iterative step's share of the current network); ``time_pair(candidate)``
    times it against the dense network, (dense ms, candidate ms). A candidate timed within ``band`` is timed again and
    judged by the mean of the two (a lucky timing among several candidates is not taken for its speed: at batch 1 on
    a shared CPU one timing varies by 2-4%). The share asked is corrected round by round (``_next_share``); returns
    (candidate, the share asked of it, the rounds' (asked, dense ms, ms)) for the candidate measured closest to
    ``1 - ratio`` of the dense latency."""
    want = 1 - ratio  # the latency kept, as a share of the dense one
    asked, tried = ratio if start is None else start, []
    for _ in range(rounds):
        candidate = select_at(asked)
        dense_ms, ms = time_pair(candidate)
        if abs(ms / dense_ms / want - 1) <= band:
            again = time_pair(candidate)
            dense_ms, ms = (dense_ms + again[0]) / 2, (ms + again[1]) / 2
        tried.append((abs(ms / dense_ms / want - 1), asked, candidate, (asked, dense_ms, ms)))
        if tried[-1][0] <= band:
            break
        nxt = _next_share(want, [(1 - a, ms / d) for _, a, _, (_, d, ms) in tried])
        if any(abs(nxt - a) < 1e-4 for _, a, _, _ in tried):
            break  # asking again would select what was timed already
        asked = nxt
    best = min(tried, key=lambda t: t[0])
    return best[2], best[1], [t[3] for t in tried]


def _next_share(want: float, points: list[tuple[float, float]]) -> float:
    """The share to ask next, from the (kept share asked, kept share measured) points so far.

    With points on both sides of ``want``: within the tightest bracket (a point measured too slow and one too fast,
    the closest in share asked), the secant's crossing; its midpoint where the secant falls in the outer quarters
    (noise) or on a share timed already. The tightest, not the two measured closest: narrowed widths can run slower
    than wider ones (ResNet-56 at batch 64 kept 16 or 32 channels ran 2.54x, kept 17 or 35 ran 1.69x), so the two
    closest can bracket a share already timed, and the search would end there.

    With one side only, a step of at most half the way to its bound (half the kept share, or half the rest to 1):
    from one point, the latest scaled by want / measured; from more, the secant through the latest two, which
    crosses a plateau in a step or two where scaling crawls (mobilenet_v2 at batch 1 keeps 0.79-0.72 of its time
    from share 0.2 to 0.75 asked, then 0.61 at 0.8), or the bound when they do not fall together (noise on a
    plateau). Clamped to (0.001, 0.999)."""
    slow = [p for p in points if p[1] > want]  # kept too much latency: ask for less kept
    fast = [p for p in points if p[1] <= want]
    if slow and fast:
        (x0, y0), (x1, y1) = min(((a, b) for a in slow for b in fast), key=lambda ab: abs(ab[0][0] - ab[1][0]))
        x = x0 + (want - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else (x0 + x1) / 2
        lo, hi = sorted((x0, x1))
        if not lo + (hi - lo) / 4 <= x <= hi - (hi - lo) / 4 or any(abs(x - p[0]) < 1e-4 for p in points):
            x = (x0 + x1) / 2
        return 1 - min(max(x, 0.001), 0.999)
    x1, y1 = points[-1]
    bound = x1 / 2 if slow else x1 + (1 - x1) / 2  # at most half the way there in one step
    if len(points) > 1:
        x0, y0 = points[-2]
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
        x = x1 + (want - y1) / slope if slope > 0 else bound
    else:
        x = x1 * want / y1
    x = max(x, bound) if slow else min(x, bound)
    return 1 - min(max(x, 0.001), 0.999)
