"""Train a BatchNorm-free network for one epoch with ``prune_cli.engine.loop.fit``, plainly and distilled from a
teacher, and save the weights (a helper the distributed tests run twice: alone, and as 2 processes under torchrun
with the gloo backend, where each rank runs the teacher on its shard).

    python tests/ddp_fit.py OUT.pt [ROOT]            one process, global batch 32
    torchrun --nproc_per_node 2 tests/ddp_fit.py OUT.pt [ROOT]   two processes, 16 images each per step
"""

from __future__ import annotations

import sys

import torch

from helpers import compose_config  # run as a script: its directory, tests/, is on the path
from prune_cli.core import distributed
from prune_cli.data import load_data
from prune_cli.engine.distill import Distiller
from prune_cli.engine.loop import fit
from prune_cli.models import build_model


def plain_net(data, widths: list[int]):
    """The BatchNorm-free two-conv network the distributed workers train, seeded so every process builds the same."""
    torch.manual_seed(0)
    return build_model(
        {
            "name": "plain",
            "num_classes": data.num_classes,
            "in_channels": data.input_shape[0],
            "widths": widths,
            "strides": [1, 2],
            "bn": False,
        }
    )


def main(out: str, root: str | None = None) -> None:
    """The fits into ``out``; with ``root`` (an image folder) also the streamed-shard run of ``ddp_stream`` into
    ``<out>.stream`` (one launch of the processes for both)."""
    distributed.start()
    torch.set_num_threads(1)
    cfg = compose_config("dataset=synthetic", "dataset.subset=200", "dataset.test_subset=50")
    data = load_data(cfg.dataset, 0, "cpu")
    model = plain_net(data, [8, 16])
    st = cfg.schedule.pretrain
    st.batch_size, st.lr, st.lr_schedule = 32, 0.05, "constant"  # 200 images: 6 steps of 32 and one of 8
    history = fit([model], data, st, stage="pretrain", epochs=1, seed=0, trainer=cfg.trainer)
    student, teacher = plain_net(data, [8, 16]), plain_net(data, [12, 8])
    kd = Distiller(teacher, alpha=0.5, temperature=2.0)
    taught = fit([student], data, st, stage="finetune", epochs=1, seed=0, trainer=cfg.trainer, distill=kd)
    if distributed.is_main():
        saved = {"state": model.state_dict(), "history": history}
        torch.save({**saved, "distilled": {"state": student.state_dict(), "history": taught}}, out)
    if root is not None:
        import ddp_stream  # it imports this module: imported here, not at the top

        ddp_stream.main(root, f"{out}.stream")


if __name__ == "__main__":
    main(*sys.argv[1:])
