"""Process-group setup: the same code runs as one process or under torchrun.

One process opens a process group of its own (one rank, in memory), so that the model is sharded with
FSDP2 as on many workers: the same mixed precision, the same checkpoints, one code path."""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..contract import TrainerError, error_named

# Rank 0 may tokenize a large corpus while the others wait: give that wait (and
# only that one) a long timeout on a side group, keeping the default elsewhere.
SETUP_TIMEOUT = timedelta(hours=12)
# The training's own collectives (the default group, and any other group the model's parallelism makes):
# long while set-up and export run (rank 0 alone reads a base model or writes the exported one while the
# others wait in a collective), tightened after the first step of each run, so that a rank that hangs or
# died fails the others within minutes rather than an hour.
SLOW_TIMEOUT = timedelta(hours=1)
STEP_TIMEOUT = timedelta(minutes=10)
# How long a rank leaving the process group waits for the others to leave too (see shutdown).
TEARDOWN_TIMEOUT = timedelta(minutes=2)

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    setup_group: object = None
    group_of_one: bool = False
    """One process with a one-rank process group of its own (init_distributed): FSDP2 applies as on many."""
    checkpoint_group: object = None
    """A gloo group of its own for the checkpoints' collectives: a checkpoint written in the background
    (runtime/checkpoint.py) runs them in another thread, beside the training's, and keeps SETUP_TIMEOUT."""
    control_group: object = None
    """A gloo group for the loop's decisions (max_flags): host values reduced on the host, so that
    taking them never waits for the device's queued work. None: the default group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """The model is sharded with FSDP2: under torchrun, or in one process with its own group."""
        return self.distributed or self.group_of_one

    @property
    def nodes(self) -> int:
        """Nodes of the run, as torchrun starts the same number of workers on each (LOCAL_WORLD_SIZE)."""
        return max(self.world // max(self.local_world, 1), 1)

    def barrier(self, group=None) -> None:
        if self.distributed:
            dist.barrier(group=group)

    def broadcast_object(self, obj, src: int = 0, group=None):
        """obj from src on every rank (a no-op in one process)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def all_gather_object(self, obj, group=None) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=group)
        return out

    def on_main(self, work, what: str):
        """Rank 0 runs ``work()`` (on shared storage, or a choice every rank must share) while the others
        wait, and every rank gets its result. When it fails, every rank fails: rank 0 with its own
        error, the others with the same TrainerError (same exit code) or a RuntimeError naming ``what``."""
        if not self.distributed:
            return work()
        outcome, original = None, None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except Exception as e:
                outcome, original = ("failed", *_describe(e)), e
        outcome = self.broadcast_object(outcome, group=self.setup_group)
        if outcome[0] == "ok":
            return outcome[1]
        raise _on_every_rank_too(original if self.is_main else _shared_error(0, what, *outcome[1:]))

    def on_every_rank(self, check, what: str) -> None:
        """Every rank runs ``check()`` (it reads this rank's own machine: free memory, its data); when it
        fails on any rank it fails on all, so none goes on alone into a collective."""
        if not self.distributed:
            check()
            return
        failure, original = None, None
        try:
            check()
        except Exception as e:
            failure, original = _describe(e), e
        failures = [(r, f) for r, f in enumerate(self.all_gather_object(failure, group=self.setup_group)) if f]
        if original is not None:
            raise _on_every_rank_too(original)
        if failures:
            rank, (kind, message) = failures[0]
            raise _on_every_rank_too(_shared_error(rank, what, kind, message))

    def set_timeout(self, timeout: timedelta) -> None:
        """``timeout`` for the training's collectives from now on: the default group and every group
        the model's parallelism made, not the side groups (set-up, checkpoints). Every rank calls it at
        the same point; a barrier first lets each finish what ran under the previous timeout."""
        if not (self.distributed and dist.is_initialized()):
            return
        self.barrier()
        self.synchronize()
        side = {id(self.setup_group), id(self.checkpoint_group)}
        groups = [dist.group.WORLD, *getattr(dist.distributed_c10d._world, "pg_map", {})]
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.12
        for group in {id(g): g for g in groups if id(g) not in side}.values():
            set_timeout(timeout, group)

    def synchronize(self) -> None:
        """Wait until this worker's device has run everything queued on it (nothing to wait for on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def max_flags(self, flags: list[int]) -> list[int]:
        """Element-wise max over ranks, so every rank takes the same decision. The flags are the host's
        (SIGTERM, clocks): reduced on the host over the gloo control group, never through the device,
        whose queue a read-back would have to drain every step."""
        if not self.distributed:
            return flags
        t = torch.tensor(flags, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


SHARED = "_forge_raised_on_every_rank"


def _on_every_rank_too(e: Exception) -> Exception:
    """Mark an error that every rank raises at the same point (on_main, on_every_rank): the ranks
    still leave the process group together after it (shutdown)."""
    setattr(e, SHARED, True)
    return e


def _describe(e: Exception) -> tuple[str, str]:
    """An error as (class name, message) to send to the other ranks."""
    if isinstance(e, TrainerError) and e.args:
        return type(e).__name__, e.args[0]
    return type(e).__name__, f"{type(e).__name__}: {e}"


def _shared_error(rank: int, what: str, kind: str, message: str) -> Exception:
    """Another rank's error on this one: the same TrainerError, or a RuntimeError naming that rank."""
    return error_named(kind, message) or RuntimeError(f"rank {rank} failed {what}: {message}")


ALLOCATOR_CONF = "PYTORCH_CUDA_ALLOC_CONF"
ALLOCATOR_CONF_NAMES = (ALLOCATOR_CONF, "PYTORCH_ALLOC_CONF")  # the second: torch's newer, generic name
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def default_allocator_conf(environ=os.environ) -> None:
    """CUDA's caching allocator with expandable segments (one segment per stream that grows, instead of
    fixed blocks that fragment as activation sizes vary: fewer out-of-memory errors with free memory
    left, as torchtitan runs), unless the environment configures the allocator already (the user's
    value stands). torch reads it when CUDA first allocates: this runs before that, and the launcher
    (`forge_trainer.launch`) sets it before torchrun starts the workers, which inherit it."""
    if not any(name in environ for name in ALLOCATOR_CONF_NAMES):
        environ[ALLOCATOR_CONF] = EXPANDABLE_SEGMENTS


def init_distributed() -> Dist:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU), or open a one-rank group of this process's own."""
    default_allocator_conf()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        if dist.is_initialized():  # a caller's own group: leave it as it is, and train unsharded
            return Dist(device=device)
        dist.init_process_group(backend="nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if cuda else None)
        return Dist(device=device, group_of_one=True, checkpoint_group=dist.new_group(backend="gloo"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=SLOW_TIMEOUT)
    setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    checkpoint_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    control_group = dist.new_group(backend="gloo", timeout=SLOW_TIMEOUT)  # tightened with the others after step 1
    return Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        setup_group=setup_group,
        checkpoint_group=checkpoint_group,
        control_group=control_group,
    )


def shutdown(d: Dist, error: BaseException | None = None, timeout: timedelta = TEARDOWN_TIMEOUT) -> None:
    """Leave the process group; ``error`` is what ends the run on this rank, if anything.

    The ranks leave together: a rank that closes its connections while a peer still has a collective
    in flight with it makes that collective fail on the peer, which then ends with an error (or a
    signal) instead of its own exit code. So
    after a run that ended the same way on every rank (finished, preempted, or an error every rank
    raised together), each rank first completes its own outstanding work (a barrier on the default
    group runs after every earlier collective of the group), then waits on the gloo side group until
    every rank is there, at most ``timeout`` (a rank that died never arrives), and only then closes.
    An error of this rank alone skips the waits: the others are stuck in a collective it will never
    join, and torchrun restarts the group once this process exits."""
    if d.group_of_one and dist.is_initialized():
        dist.destroy_process_group()
        d.checkpoint_group = None
        return
    if not (d.distributed and dist.is_initialized()):
        return
    if error is None or getattr(error, SHARED, False):
        try:
            if error is None:
                dist.barrier()
            dist.monitored_barrier(group=d.setup_group, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as e:
            log.warning("rank %d leaves the process group without the others: %s", d.rank, e)
    dist.destroy_process_group()
    # Free the groups' gloo threads now, not during interpreter finalization: an error raised through
    # on_main/on_every_rank keeps this Dist alive in a reference cycle (exception -> traceback ->
    # frame -> exception), and a group destroyed that late aborts the process.
    d.setup_group = d.checkpoint_group = d.control_group = None
    gc.collect()


def hostname() -> str:
    return socket.gethostname()
