"""The merge actor: collects subset checkpoints as their jobs finish, then merges them (mergekit's methods).
``orchestrator.stages.merge.start_merge_actor`` starts it holding the memory its merge needs
(``jobs.merge.merge_memory_bytes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import ray

from jobs.merge import merge_models, rewrite_merged
from jobs.shards import DEFAULT_MAX_SHARD_SIZE
from jobs.spec import MergeSpec
from jobs.unlearn.methods import build_method


@ray.remote(num_cpus=1, max_concurrency=2)  # a second thread answers ``progress`` while ``merge`` runs
class MergeActor:
    """Owns merging. ``add`` is called as each unlearning job finishes; ``merge`` runs mergekit once all
    expected checkpoints are in; ``progress`` says how far it has come."""

    def __init__(self, base_model_path: str, expected: list[str]) -> None:
        self.base_model_path = base_model_path
        self.expected = list(expected)
        self.checkpoints: dict[str, str] = {}
        self.written = (0, 0)

    def add(self, name: str, path: str) -> int:
        if name not in self.expected:
            raise ValueError(f"merge actor: unexpected checkpoint {name!r}; expected {self.expected}")
        self.checkpoints[name] = path
        return len(self.checkpoints)

    def progress(self) -> tuple[int, int]:
        """(tensors merged, of the total) of the merge running; (0, 0) before its first tensor or for mergekit's
        run_merge, which reports nothing."""
        return self.written

    def missing(self) -> list[str]:
        return [n for n in self.expected if n not in self.checkpoints]

    def merge(
        self,
        method: str,
        parameters: dict[str, Any],
        model_parameters: dict[str, dict[str, Any]],
        dtype: str,
        output_dir: str,
        unlearn_method: Optional[tuple[str, dict]] = None,
        output: str = "full",
        max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    ) -> str:
        """Merge onto the base model (a hub name: its snapshot in the Hugging Face cache, fetched on this
        node). ``unlearn_method`` (name, params) lets the unlearning method pick which folder of each job is
        merged and rewrite the merged weights (task-vector negation). LoRA jobs' adapters merge as adapters
        (``output``: a full model or a merged adapter). The merged weights are written in shards of at most
        ``max_shard_size``."""
        if self.missing():
            raise RuntimeError(f"merge actor: checkpoints missing for {self.missing()}")
        unlearn = build_method(*unlearn_method) if unlearn_method else None
        sub = unlearn.merge_input() if unlearn else None
        spec = MergeSpec(
            base_model_path=self.base_model_path,
            model_paths={
                n: str(Path(self.checkpoints[n]) / sub) if sub else self.checkpoints[n] for n in self.expected
            },
            method=method,
            parameters=parameters,
            model_parameters=model_parameters,
            dtype=dtype,
            output=output,
            max_shard_size=max_shard_size,
            output_dir=output_dir,
        )
        post = None
        if unlearn is not None and unlearn.rewrites_merge():
            post = lambda folder: rewrite_merged(
                folder,
                self.base_model_path,
                unlearn,
                dtype,  # noqa: E731
                max_shard_size,
            )
        self.written = (0, 0)
        return merge_models(spec, post, progress=lambda done, total: setattr(self, "written", (done, total)))
