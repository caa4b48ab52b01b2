"""A streamed imagefolder under torchrun (2 CPU processes, gloo): each process decodes only its shard of every
training batch and only its own evaluation batches, and the epoch's table is the in-memory one and the
single-process one."""

from __future__ import annotations

import pytest
import torch
from test_distributed import HERE, TORCHRUN, launch
from test_imagefolder import folder_config, make_folder

from prune_cli.core import distributed
from prune_cli.data import batches, load_data
from prune_cli.data.container import shards

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def shard_sizes(n: int, batch: int, rank: int, world: int = 2) -> int:
    """Images rank ``rank`` reads of ``n`` in training batches of ``batch``: its ``torch.tensor_split`` shard of each
    batch, a batch smaller than the world whole."""
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    return sum(b if b < world else len(torch.arange(b).tensor_split(world)[rank]) for b in sizes)


def own_batches(n: int, batch: int, rank: int, world: int = 2) -> int:
    """Images rank ``rank`` reads of ``n`` in evaluation batches of ``batch``: every world-th batch, from its rank."""
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    return sum(sizes[rank::world])


def test_the_ranks_shards_put_together_are_the_batches(tmp_path, monkeypatch):
    """In one process, as each rank of 3 sees it: its shards of the 12 train images in batches of 5 (5, 5 and 2:
    a batch smaller than the world, used whole) joined over the ranks are the augmented batches, and its
    evaluation batches are every third one."""
    make_folder(tmp_path)
    data = load_data(folder_config(tmp_path, "dataset.pad=1", "dataset.flip=true", "dataset.stream=always"), 0, "cpu")
    whole = list(batches(data.train, data, 5, generator=torch.Generator().manual_seed(3), train=True))
    tests = list(batches(data.test, data, 1))
    parts, mine = [], []
    monkeypatch.setattr(distributed, "world", lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        parts.append(list(shards(data.train, data, 5, generator=torch.Generator().manual_seed(3), train=True)))
        mine.append(list(batches(data.test, data, 1, mine=True)))
    ends = [(2, 2, 1 / 3)]  # (shard, batch, weight)
    want = [[(2, 5, 1.0), (2, 5, 1.0), *ends]] * 2 + [[(1, 5, 1.0), (1, 5, 1.0), *ends]]
    assert [[(len(y), n, w) for _, y, n, w in p] for p in parts] == want
    for k, (x, y) in enumerate(whole[:2]):  # the full batches: the ranks' shards in rank order
        assert torch.equal(torch.cat([p[k][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[k][1] for p in parts]), y)
    assert all(torch.equal(p[2][0], whole[2][0]) for p in parts)  # the batch of 2: every rank's, whole
    assert [len(m) for m in mine] == [2, 1, 1]
    assert all(torch.equal(a[0], b[0]) for r in range(3) for a, b in zip(mine[r], tests[r::3]))


@pytest.mark.slow  # torchrun starts three processes
def test_each_rank_decodes_its_shard_and_the_table_is_unchanged(tmp_path):
    import ddp_stream

    root = tmp_path / "images"
    make_folder(root)
    (root / "train" / "eel" / "3.png").unlink()  # 11 train images: a last batch of one, which both ranks use whole
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    threads = torch.get_num_threads()
    try:
        ddp_stream.main(str(root), str(one))  # the single process: this one
    finally:
        torch.set_num_threads(threads)
    r = launch([*TORCHRUN, str(HERE / "ddp_stream.py"), str(root), str(two)], tmp_path)
    assert r.returncode == 0, r.stderr
    alone, ranks = torch.load(one), [torch.load(f"{two}.{rank}") for rank in (0, 1)]
    assert alone["decoded"] == 11 + 4  # every train image once, every test image once
    for rank, got in enumerate(ranks):
        want = shard_sizes(11, ddp_stream.BATCH, rank) + own_batches(4, ddp_stream.EVAL_BATCH, rank)
        assert got["decoded"] == want, rank  # 7 + 3 and 5 + 1 (every rank decoded 15 when it read whole batches)
        for metric in METRICS:
            row, memory, single = got["streamed"][0], got["memory"][0], alone["streamed"][0]
            assert row[metric] == memory[metric], metric  # the same numbers as the in-memory run of two
            assert abs(row[metric] - single[metric]) < 1e-5, metric
    assert [row[metric] for metric in METRICS for row in alone["memory"]] == [
        row[metric] for metric in METRICS for row in alone["streamed"]
    ]
