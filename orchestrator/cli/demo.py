"""``spunge demo``: build (or reuse) the offline benchmark and write a ready pipeline config for it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

# Per size: what the pipeline runs: the demo recipe (README "The offline demo benchmark": NPO beta 0.1 + retain
# NLL, lr 3e-4, TIES density 0.5 normalised), with max_steps rather than epochs so that a subset job gets the
# unsplit job's step budget; docs/benchmarks.md "The demo recipe: a step budget, not epochs" has the runs.
RECIPES: dict[str, dict[str, Any]] = {
    "small": {"max_steps": 150, "lr": 3e-4, "batch_size": 8},
    "tiny": {"max_steps": 150, "lr": 3e-4, "batch_size": 8},
}


def demo_config(bench: Path, meta: dict, size: str, run_dir: Path) -> dict[str, Any]:
    """The pipeline config for a built benchmark (paths relative to the config file in ``bench.parent``)."""
    r = RECIPES[size]
    rel = lambda p: str(Path(p).relative_to(run_dir.parent)) if Path(p).is_relative_to(run_dir.parent) else str(p)
    data = bench / "data"
    return {
        "name": f"demo-{size}",
        "model": {"path": rel(bench / "models" / "base"), "dtype": "float32"},
        "data": {
            "forget": rel(data / "forget.jsonl"),
            "retain": rel(data / "retain.jsonl"),
            "holdout": rel(data / "holdout.jsonl"),
            "general": rel(data / "general.jsonl"),
            "mc": rel(data / "mc.jsonl"),
            "template": meta["template"],
        },
        "split": {"attribute": meta["split_attribute"], "baseline": "unsplit"},
        "unlearn": {
            "method": "npo",
            "params": {"beta": 0.1, "alpha": 1.0},
            "optimizer": {"name": "adamw", "lr": r["lr"]},
            "max_steps": r["max_steps"],
            "batch_size": r["batch_size"],
            "max_length": 128,
        },
        "deepspeed": {"zero_optimization": {"stage": 0}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "merge": {"method": "ties", "parameters": {"density": 0.5, "normalize": True}},
        "eval": {"suites": ["qa", "mc", "perplexity"], "oracle": rel(bench / "models" / "oracle")},
        "tracking": {"experiment": "spunge-demo"},
        "storage": {"output_dir": rel(run_dir)},
    }


def prepare_demo(output_dir: Path, size: str, seed: int, console: Console) -> Path:
    """Build the benchmark under ``output_dir/benchmark`` (cached) and write ``output_dir/demo.yaml``."""
    from jobs.data.demo_train import build_benchmark

    last = [0.0]

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if time.time() - last[0] >= 5 or done == total:
            last[0] = time.time()
            extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            console.print(
                f"[{time.strftime('%H:%M:%S')}] benchmark {stage}: {done}/{total} {extra}",
                highlight=False,
                markup=False,
            )

    bench = output_dir / "benchmark"
    t0 = time.time()
    console.print(
        f"building the offline benchmark (size {size}, seed {seed}) in {bench}", highlight=False, markup=False
    )
    meta = build_benchmark(bench, size=size, seed=seed, progress=progress)
    base = meta["stats"]["base"]
    console.print(
        f"benchmark ready in {time.time() - t0:.0f}s: base forget_prob {base['forget_prob']:.3f}, "
        f"oracle forget_prob {meta['stats']['oracle']['forget_prob']:.3f}",
        highlight=False,
    )
    cfg = demo_config(bench, meta, size, output_dir / "run")
    path = output_dir / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
