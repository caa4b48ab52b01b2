"""A file is data: nothing a dataset file or a checkpoint names is imported or called unless the user allowed it."""

import os
import pickle

import pytest

import fakedata
from prune_cli import data as D
from prune_cli.core.errors import UserError


class _RunsACommand:
    """What a crafted pickle holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    root = tmp_path / "data"
    fakedata.make_cifar10(root, n_train=20, n_test=10)
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _RunsACommand(marker), "labels": [0]}, protocol=2))
    with pytest.raises(UserError) as e:  # md5 unchecked: the one way torchvision's loader would have unpickled it
        D.load_data(fakedata.cifar_cfg("cifar10", root), seed=0, device="cpu")
    assert e.value.option == "dataset.root"
    assert e.value.why.startswith(f"cannot read {batch} (UnpicklingError: ")
    assert "system is not part of a CIFAR batch" in e.value.why
    assert not marker.exists()
