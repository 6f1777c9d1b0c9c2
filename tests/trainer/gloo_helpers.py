"""Running a function on several gloo processes of this machine (CPU), each with its own Dist."""

from __future__ import annotations

import sys
from pathlib import Path


def _on_rank(rank: int, world: int, work_dir: str, work, args: tuple, local_world: int) -> None:
    import torch
    import torch.distributed as dist

    from forge_trainer.runtime.dist import Dist, shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{work_dir}/init", rank=rank, world_size=world)
    d = Dist(rank=rank, world=world, local_rank=rank % local_world, local_world=local_world,
             setup_group=dist.new_group(backend="gloo"), checkpoint_group=dist.new_group(backend="gloo"))
    try:
        torch.save(work(d, *args), Path(work_dir, f"result-{rank}.pt"))
    finally:
        shutdown(d, sys.exc_info()[1])  # an error of this rank alone: the others fail too, none waits forever


def on_ranks(tmp_path: Path, work, *args, world: int = 2, local_world: int | None = None) -> list:
    """``work(d, *args)`` on ``world`` processes (gloo); what each returned (torch.save-able), by rank.
    ``local_world``: processes per "node" (default: all on one)."""
    import torch
    import torch.multiprocessing as mp

    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_on_rank, args=(world, str(tmp_path), work, args, local_world or world), nprocs=world, join=True)
    return [torch.load(tmp_path / f"result-{r}.pt", weights_only=False) for r in range(world)]
