"""Live progress: jobs' reported steps reach the driver through a small Ray actor.

Ray Train calls ``ProgressCallback.after_report`` on each job's controller with rank 0's metrics; the
callback forwards them to the ``ProgressBoard`` actor, which the driver polls to draw progress bars and
to log step metrics to MLflow (the driver is MLflow's only writer).
"""

from __future__ import annotations

from typing import Any

import ray
import ray.train
from ray.actor import ActorHandle


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Holds every job's reported metrics, in order; ``since`` returns what a reader has not seen yet."""

    def __init__(self) -> None:
        self.history: dict[str, list[dict[str, Any]]] = {}

    def push(self, job: str, rows: list[dict[str, Any]]) -> None:
        self.history.setdefault(job, []).extend(rows)

    def since(self, seen: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
        return {job: rows[seen.get(job, 0) :] for job, rows in self.history.items() if len(rows) > seen.get(job, 0)}


class ProgressCallback(ray.train.UserCallback):
    """Forward the step rows of each report of one unlearning job to the board (runs on the Train
    controller). A report carries every step since the previous one under ``history``."""

    def __init__(self, board: ActorHandle, job: str) -> None:
        self.board = board
        self.job = job

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            rank0 = metrics[0]
            self.board.push.remote(self.job, list(rank0.get("history") or [rank0]))
