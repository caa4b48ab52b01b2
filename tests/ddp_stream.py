"""Train a BatchNorm-free network for one epoch on a tiny imagefolder, streamed and in memory, with
``prune_cli.engine.loop.fit``, counting the files each process decodes for the batches (a helper the streamed-shard
test runs alone and as 2 processes under torchrun with the gloo backend).

    python tests/ddp_stream.py ROOT OUT        one process
    torchrun --nproc_per_node 2 tests/ddp_stream.py ROOT OUT   two processes; each writes OUT.<rank>

ROOT holds the folder (``test_imagefolder.make_folder`` less one train image: 11 train images, 4 test). OUT gets
``{"streamed": history, "memory": history, "decoded": files decoded by the streamed run's batches}``.
"""

from __future__ import annotations

import sys

import torch
from ddp_fit import plain_net  # run as a script: its directory, tests/, is on the path

from helpers import compose_config
from prune_cli.core import distributed
from prune_cli.data import load_data, stream
from prune_cli.engine.loop import fit

BATCH, EVAL_BATCH = 5, 3  # 11 train images: batches of 5, 5 and 1 (one image: both ranks use it); test: 3 and 1


def history(root: str, mode: str) -> list[dict]:
    """One epoch's history row of the run on ``root`` with ``dataset.stream=mode`` (pad 1 + flip augmentation)."""
    cfg = compose_config(
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=8",
        "dataset.pad=1",
        "dataset.flip=true",
        f"dataset.stream={mode}",
        "dataset.workers=0",  # decoded in this process: the counter sees every file
        f"trainer.eval_batch_size={EVAL_BATCH}",
    )
    data = load_data(cfg.dataset, 0, "cpu")
    model = plain_net(data, [4, 8])
    st = cfg.schedule.pretrain
    st.batch_size, st.lr, st.lr_schedule = BATCH, 0.05, "constant"
    return fit([model], data, st, stage="pretrain", epochs=1, seed=0, trainer=cfg.trainer)


def main(root: str, out: str) -> None:
    distributed.start()
    torch.set_num_threads(1)
    memory = history(root, "never")
    decoded = []
    decode = stream.decode_image
    stream.decode_image = lambda path, *args: decoded.append(path) or decode(path, *args)
    try:
        streamed = history(root, "always")
    finally:
        stream.decode_image = decode
    name = f"{out}.{distributed.rank()}" if distributed.active() else out
    torch.save({"streamed": streamed, "memory": memory, "decoded": len(decoded)}, name)


if __name__ == "__main__":
    main(*sys.argv[1:])
