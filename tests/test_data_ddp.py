"""Real torch.distributed (gloo, 2 processes): rank/world size come from the process group; shards cover the data."""

from __future__ import annotations

import json

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from fastssl.data import make_loader


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images = np.random.default_rng(0).integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
        loader = make_loader(
            (images, np.arange(30)),
            "weak_cifar",
            4,
            backend="torchvision",
            drop_last=False,
            num_workers=0,
            verbose=False,
        )
        loader.set_epoch(1)
        seen = [i for b in loader for i in b["index"].tolist()]
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(
                {"seen": seen, "rank": loader.order.rank, "world": loader.order.world_size, "len": len(loader)}, f
            )
    finally:
        dist.destroy_process_group()


def test_ddp_shards_from_process_group(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    a, b = set(results[0]["seen"]), set(results[1]["seen"])
    assert not a & b and a | b == set(range(30))  # 30 = 2 x 15: disjoint and covering, no padding
    assert results[0]["len"] == results[1]["len"] == 4  # 15 per rank -> 3 full + 1 partial batch
