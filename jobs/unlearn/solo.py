"""Run unlearning jobs without Ray Train: in this one process as rank 0 of a world of 1 (``run_in_process``, the
pipeline's ``scaling.num_workers: 0``), or in N fresh local processes that form one gloo group (what a Ray Train
job's workers are, without Ray: the multi-rank tests and ``benchmarks/load_memory.py``).

The tests and the in-process benchmarks call ``jobs.unlearn.loop.run_unlearning`` directly; DeepSpeed needs a
process group for that, and keeps it for the life of the process, so the environment is set once.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from jobs.spec import UnlearnSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment ``init_process_group`` reads (and Ray Train sets) for ``rank`` of ``world`` on one machine."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
    }


def single_process_env() -> None:
    """Point torch.distributed at a free local port as rank 0 of 1 (variables already set are kept)."""
    for k, v in group_env(0, 1, free_port()).items():
        os.environ.setdefault(k, v)


def run_in_process(
    spec: UnlearnSpec, on_rows: Callable[[list[dict[str, Any]]], None], checkpoints: Path, keep: int = 2
) -> None:
    """One job as rank 0 of 1 in this process (``scaling.num_workers: 0``, as Ray Train's local mode): no Ray
    Train controller, worker actor or placement group. ``on_rows`` gets each report's step rows (what Ray
    Train's callbacks would). Checkpoints (``checkpoint_every``) are moved into ``checkpoints``, the newest
    ``keep`` kept; a job started again (a resumed driver) continues after the newest. The process group is
    made once and kept for the process's life, as DeepSpeed keeps its view of it: a Ray task process that runs
    several such jobs one after another reuses it."""
    import torch
    import torch.distributed as dist

    from jobs.unlearn.loop import run_job
    from jobs.unlearn.outputs import checkpoint_name

    if not dist.is_initialized():
        own_group_env()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != 1:
        raise RuntimeError(f"an in-process job needs a process group of 1, this process has {dist.get_world_size()}")

    def send(metrics: dict[str, Any], checkpoint: Optional[str]) -> None:
        if checkpoint is not None:
            keep_checkpoint(Path(checkpoint), checkpoints / checkpoint_name(metrics["step"]), keep)
        on_rows(metrics["history"])

    run_job(spec, 0, send, restore_from=latest_checkpoint(checkpoints))


def own_group_env() -> None:
    """This process as rank 0 of 1 on a free local port, whatever its environment says: a Ray worker inherits
    its node's environment, which may name another process group's port (one its starter made)."""
    os.environ.update(group_env(0, 1, free_port()))


def keep_checkpoint(folder: Path, dest: Path, keep: int) -> None:
    """Move a checkpoint folder to ``dest`` whole or not at all (a ``.partial`` folder renamed last), then drop
    all but the newest ``keep`` beside it."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(partial))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    for old in _checkpoints(dest.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Optional[str]:
    """The newest complete checkpoint under ``folder`` (``keep_checkpoint``'s), or None."""
    found = _checkpoints(folder)
    return str(found[-1]) if found else None


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint_step*") if p.is_dir() and not p.name.endswith(".partial"))


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(group_env(rank, world, port))
    try:
        import torch
        import torch.distributed as dist

        # as Ray Train does before it calls the loop: the process group exists, DeepSpeed's view of it does not
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        results.put((rank, None, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 (the parent re-raises it with the rank's traceback)
        results.put((rank, traceback.format_exc(), None))


class RankError(RuntimeError):
    """A rank raised, or the ranks did not finish in time (a collective one rank never joined hangs the rest)."""


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` fresh processes (spawned: no state shared with this one) whose
    torch.distributed process group is initialised before ``fn`` runs, from MASTER_ADDR/PORT, RANK and WORLD_SIZE,
    as Ray Train's workers are; returns each
    rank's return value, by rank. ``fn`` and its arguments must pickle (a module-level function). A rank that
    raises, or ranks still running after ``timeout`` seconds, raise ``RankError``; every process is killed."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, error, value = results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RankError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise RankError(
                        f"ranks {[r for r in range(world) if r not in out]} still running after "
                        f"{timeout:.0f} s (a hung collective?)"
                    ) from None
                continue
            if error is not None:
                raise RankError(f"rank {rank} raised:\n{error}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world)]
