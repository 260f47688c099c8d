"""Run unlearning jobs in this one process: torch.distributed / DeepSpeed as rank 0 of a world of 1, no Ray.

The tests and the in-process benchmarks call ``jobs.unlearn.loop.run_unlearning`` directly; DeepSpeed needs a
process group for that, and keeps it for the life of the process, so the environment is set once.
"""

from __future__ import annotations

import os
import socket


def single_process_env() -> None:
    """Point torch.distributed at a free local port as rank 0 of 1 (variables already set are kept)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
