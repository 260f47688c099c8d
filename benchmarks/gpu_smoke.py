"""GPU smoke check: the tiny demo pipeline on one GPU with ``use_gpu: true``, bf16, at ZeRO 2 and ZeRO 3
(and ZeRO 3 with LoRA), each checked on its report. Not a test (CI has no GPU): run it where a GPU is.

    python benchmarks/gpu_smoke.py [--output-dir gpu-smoke] [--steps 40]

It builds (or reuses) the tiny offline benchmark, runs each variant through the real pipeline (Ray Train
with NCCL, DeepSpeed, mergekit, MLflow sqlite in the output folder), checks that every metric is finite,
that the merged model forgets (forget_prob below the base's) and keeps the retain set (retain_prob at
least half the base's), prints a table and writes ``<output-dir>/gpu_smoke.json``. Exit code 1 when a
check fails, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

VARIANTS = {
    "zero2-bf16": {"deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}},
    "zero3-bf16": {
        "deepspeed": {
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": True},
        }
    },
    "zero3-bf16-lora": {
        "deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
        "unlearn.lora": {"r": 8, "alpha": 16},
        "unlearn.optimizer.lr": 1e-3,
    },
}


def config_for(bench: Path, meta: dict, out: Path, name: str, changes: dict, steps: int) -> dict:
    from orchestrator.cli.demo import demo_config
    from orchestrator.config.schema import apply_overrides

    cfg = demo_config(bench, meta, "tiny", out / name)
    cfg = {**cfg, "deepspeed": changes["deepspeed"]}
    overrides = {k: v for k, v in changes.items() if k != "deepspeed"}
    overrides.update(
        {
            "name": f"gpu-smoke/{name}",
            "model.dtype": "bfloat16",
            "model.attn_implementation": "sdpa",
            "unlearn.max_steps": steps,
            "unlearn.gradient_checkpointing": True,
            "scaling.use_gpu": True,
            "scaling.gpus_per_worker": 1,
            "scaling.cpus_per_worker": 2,
            "eval.gpus_per_task": 0.25,
            "tracking.uri": f"sqlite:///{out / 'mlflow.db'}",
            "storage.output_dir": str(out / name),
        }
    )
    return apply_overrides(cfg, overrides)


def check(report: dict) -> list[str]:
    models, problems = report["models"], []
    for model, metrics in models.items():
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v) and k != "privleak"]
        if bad:
            problems.append(f"{model}: non-finite {', '.join(bad[:5])}")
    base, merged = models["base"], models["merged"]
    if not merged["forget_prob"] < base["forget_prob"]:
        problems.append(f"merged forget_prob {merged['forget_prob']:.3f} is not below base {base['forget_prob']:.3f}")
    if not merged["retain_prob"] >= 0.5 * base["retain_prob"]:
        problems.append(f"merged retain_prob {merged['retain_prob']:.3f} < 0.5 x base {base['retain_prob']:.3f}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", type=Path, default=Path("gpu-smoke"))
    ap.add_argument("--steps", type=int, default=40, help="unlearning steps per job")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jobs.data.demo_train import build_benchmark
    from orchestrator.config.parse import parse_config
    from orchestrator.pipeline import run_pipeline

    out = args.output_dir.resolve()
    meta = build_benchmark(out / "benchmark", size="tiny", seed=0)
    results: dict[str, dict] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": {}}
    failed = False
    for name in args.variants:
        t0 = time.perf_counter()
        row: dict = {}
        try:
            cfg = parse_config(config_for(out / "benchmark", meta, out, name, VARIANTS[name], args.steps), out)
            report = run_pipeline(cfg)
            problems = check(report)
            row = {
                f"{m}.{k}": report["models"][m].get(k)
                for m in ("base", "merged", "unsplit")
                for k in ("forget_prob", "retain_prob", "model_utility")
            }
        except Exception as e:  # a smoke check reports every variant, then fails
            problems = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        row.update(seconds=round(time.perf_counter() - t0, 1), problems=problems, ok=not problems)
        results["variants"][name] = row
        failed |= bool(problems)
        print(f"{name}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({row['seconds']} s)", flush=True)
    (out / "gpu_smoke.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
