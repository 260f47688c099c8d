"""What the driver shows while it works: rich progress bars on a terminal, timestamped lines otherwise.

Either way no running stage stays silent for more than ``HEARTBEAT_S`` seconds.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

HEARTBEAT_S = 10.0


class Display:
    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:
            self.console.width = max(self.console.width, 160)
        self.live = self.console.is_terminal
        self.tasks: dict[str, Any] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.last_line = 0.0
        self.progress = (
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            if self.live
            else None
        )

    def __enter__(self) -> "Display":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def log(self, msg: str) -> None:
        """A timestamped line (above the progress bars when they are live)."""
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", highlight=False, markup=False)

    def add(self, key: str, label: str, total: Optional[int] = None) -> None:
        self.state[key] = {"label": label, "done": 0, "total": total, "info": "waiting", "t0": time.time()}
        if self.progress:
            self.tasks[key] = self.progress.add_task(label, total=total, info="waiting")

    def update(self, key: str, done: Optional[int] = None, total: Optional[int] = None, info: str = "") -> None:
        st = self.state[key]
        st.update({k: v for k, v in (("done", done), ("total", total)) if v is not None}, info=info)
        if self.progress:
            self.progress.update(self.tasks[key], completed=st["done"], total=st["total"], info=info)

    def finish(self, key: str, info: str = "done") -> None:
        st = self.state[key]
        st["info"] = info
        st["finished"] = True
        if self.progress:
            total = st["total"] or 1
            self.progress.update(self.tasks[key], completed=total, total=total, info=info)
        else:
            self.log(f"{st['label']}: {info}")

    def heartbeat(self) -> None:
        """On a plain stream, one status line of every running stage at most every HEARTBEAT_S seconds."""
        if self.progress or time.time() - self.last_line < HEARTBEAT_S:
            return
        self.last_line = time.time()
        parts = []
        for st in self.state.values():
            if not st.get("finished"):
                frac = f" {st['done']}/{st['total']}" if st["total"] else ""
                parts.append(f"{st['label']}{frac} {st['info']} ({time.time() - st['t0']:.0f}s)")
        if parts:
            self.log("running: " + "; ".join(parts))
