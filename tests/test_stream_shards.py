"""A streamed imagefolder's shards as each rank of 3 sees them (the decoding under torchrun, 2 CPU processes, is
checked in test_distributed.py, in the launch its other checks share)."""

from __future__ import annotations

import torch
from test_imagefolder import folder_config, make_folder

from prune_cli.core import distributed
from prune_cli.data import batches, load_data
from prune_cli.data.container import shards


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
