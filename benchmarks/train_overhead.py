"""Training overhead: one unlearning job through spunge (Ray Train + DeepSpeed) vs a bare PyTorch loop.

For each model (``--model tiny`` the tests' random tiny Llama, ``--model smollm2`` SmolLM2-135M-Instruct;
both by default; ``smollm2-random`` its architecture with random weights) on the CPU, or both loops on the
GPU with ``--gpu``, and one method (``--method grad_diff``), with a fixed micro batch and sequence length
(every answer is long enough to be cut at ``--seq-len``):

- **bare**: the model in this process, the same method object (``build_method``), the same batches (the
  loop's own ``encode_rows``/``StepBatches``), torch AdamW with the job's schedule, ``clip_grad_norm_`` at the
  job's clipping (1.0); no Ray, no DeepSpeed. ``--warmup`` steps, then ``--steps`` timed steps.
- **spunge**: the same job as the pipeline runs it: ``orchestrator.remote.runners.run_unlearn_job`` (a Ray
  Train ``TorchTrainer`` with one worker running ``jobs.unlearn.loop.train_loop_per_worker``, DeepSpeed
  ZeRO stage 0, default ``report_interval_s``), ``warmup + steps`` steps. Steady-state tokens/s comes from
  the job's own step rows (``steps.jsonl``): the tokens and ``elapsed_s`` between the last warm-up step
  and the last step, so Ray start-up, DeepSpeed init and the model load are excluded; they are reported
  apart (``startup_s``: from ``fit`` to the worker's first step, ``worker_start_s``: to the worker's
  ``attempts.jsonl`` stamp).

Tokens are attention-mask tokens of every batch the step reads (forget and retain), as the loop counts
them. Prints a table and writes ``benchmarks/results/train_overhead.json`` (ratio = spunge / bare tokens/s).
Usage::

    python benchmarks/train_overhead.py [--model tiny smollm2] [--method grad_diff] [--batch-size 4]
        [--seq-len 64] [--warmup 5] [--steps 20] [--threads 1] [--repeats 1] [--label after]

The bare loop runs ``--repeats`` times before the spunge job and as many times after it (their mean is
the bare figure): on a shared machine the load drifts. ``median-step ratio`` compares the median
per-step tokens/s of both, which a burst of load on a few steps does not move.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# per model: (micro batch, sequence length, warm-up steps, timed steps) unless given on the command line
DEFAULTS = {"tiny": (8, 64, 10, 200), "smollm2": (2, 32, 3, 20), "smollm2-random": (2, 32, 3, 20)}


def model_dir(name: str, work: Path) -> Path:
    """A Hugging Face folder: the tests' tiny model (built into ``work``), the cached SmolLM2-135M, or
    ``smollm2-random``: SmolLM2-135M's architecture with random weights and the tiny model's tokenizer."""
    if name in ("tiny", "smollm2-random"):
        from jobs.data.tiny import make_tiny

        d = work / "tiny"
        d.mkdir(parents=True, exist_ok=True)
        tiny = make_tiny(d) / "model"
        return tiny if name == "tiny" else random_smollm2(tiny, work / "smollm2-random")
    from jobs.models import convert_gguf, packaged_gguf

    return Path(convert_gguf(packaged_gguf(), Path.home() / ".cache" / "spunge" / "smollm2-135m-instruct"))


def random_smollm2(tokenizer_dir: Path, out: Path) -> Path:
    """SmolLM2-135M's configuration (its config.json's shape) with random weights, saved with the tokenizer
    of ``tokenizer_dir`` (whose ids are all below the 49152-token vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.models import load_tokenizer, save_model

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    save_model(model, tok, out)
    return out


def write_data(work: Path, rows: int = 64) -> tuple[Path, Path]:
    """Forget and retain QA files whose answers are long enough to fill any ``--seq-len``."""
    from jobs.data.io import write_jsonl
    from jobs.data.tiny import AUTHORS, TOWNS

    def qa(i: int) -> dict:
        name, town = AUTHORS[i % len(AUTHORS)], TOWNS[i % len(TOWNS)]
        answer = " ".join(f"{name} was born in {TOWNS[(i + k) % len(TOWNS)]}." for k in range(40))
        return {"question": f"Where was {name} born ({i})?", "answer": f"{name} was born in {town}. {answer}"}

    return (
        write_jsonl(work / "forget.jsonl", [qa(i) for i in range(rows)]),
        write_jsonl(work / "retain.jsonl", [qa(i + rows) for i in range(rows)]),
    )


def job_spec(args, name: str, path: Path, forget: Path, retain: Path, out: Path, batch: int, seq: int, steps: int):
    from jobs.spec import UnlearnSpec

    return UnlearnSpec(
        name=f"bench/{name}",
        model_path=str(path),
        forget_path=str(forget),
        retain_path=str(retain),
        method=args.method,
        optimizer={"lr": 1e-5},
        max_steps=steps,
        batch_size=batch,
        max_length=seq,
        threads_per_worker=args.threads,
        output_dir=str(out),
        deepspeed={"zero_optimization": {"stage": 0}},
    )


def bare(spec, warmup: int, steps: int, device: str = "cpu") -> dict:
    """tokens/s of ``steps`` timed steps of a plain torch loop after ``warmup`` steps, on ``device``."""
    import copy

    import torch

    from jobs.data.io import load_jsonl
    from jobs.models import load_model, load_tokenizer
    from jobs.unlearn.data import StepBatches, encode_rows
    from jobs.unlearn.engine import make_optimizer, make_schedule
    from jobs.unlearn.methods import build_method

    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(spec.seed)
    t_load = time.perf_counter()
    method = build_method(spec.method, spec.method_params)
    tok = load_tokenizer(spec.model_path)
    model = load_model(spec.model_path, spec.dtype).to(device)
    model.config.use_cache = False
    method.setup(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if method.needs_reference else None
    on = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    data = StepBatches(
        encode_rows(load_jsonl(spec.forget_path), tok, spec, "forget", method),
        encode_rows(load_jsonl(spec.retain_path), tok, spec, "retain"),
        spec.seed,
        spec.batch_size,
        1,
        0,
        1,
        tok.pad_token_id,
    )  # the job's rows, one rank
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, spec.optimizer)
    sched = make_schedule(opt, spec.optimizer, warmup + steps)
    model.train()
    load_s = time.perf_counter() - t_load
    tokens, t0, per_step = 0, None, []
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            sync()
            tokens, t0 = 0, time.perf_counter()
        t_step = time.perf_counter()
        (host,) = data.micro_batches(step)
        batch = {k: None if v is None else on(v) for k, v in host.items()}
        out = method.loss(model, batch, ref)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        n = sum(int(v["attention_mask"].sum()) for v in host.values() if v is not None)
        tokens += n  # int(): one host sync per step, as the spunge loop's one read per step
        if step > warmup:
            per_step.append(n / (time.perf_counter() - t_step))
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / seconds,
        "median_step_tokens_per_s": statistics.median(per_step),
        "timed_s": seconds,
        "timed_tokens": tokens,
        "load_s": load_s,
    }


def start_bench_ray(num_cpus: int, gpu: bool = False, dashboard: bool = True) -> None:
    """The driver's local Ray (``orchestrator.remote.ray_init.start_ray``); without ``dashboard``, a plain local Ray for
    a machine whose Ray lacks the dashboard's packages (Ray Train runs; its stopped jobs' cleanup may not)."""
    import ray

    from orchestrator.remote.ray_init import start_ray

    if dashboard:
        start_ray(num_cpus=num_cpus, use_gpu=gpu)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}},
    )


def spunge(spec, warmup: int, storage: Path, num_cpus: int, gpu: bool = False, dashboard: bool = True) -> dict:
    """Steady-state tokens/s of the job run the pipeline's way, from its ``steps.jsonl`` rows."""
    import ray

    from jobs.data.io import load_jsonl
    from jobs.unlearn.outputs import ATTEMPTS_FILE, STEPS_FILE
    from orchestrator.config.schema import ScalingConfig
    from orchestrator.remote.progress import ProgressBoard
    from orchestrator.remote.runners import run_unlearn_job

    start_bench_ray(num_cpus, gpu, dashboard)
    try:
        board = ProgressBoard.remote()
        scaling = ScalingConfig(num_workers=1, cpus_per_worker=spec.threads_per_worker, use_gpu=gpu).model_dump()
        t_fit = time.time()
        ray.get(run_unlearn_job.remote(spec.model_dump(), scaling, str(storage), "bench", board))
        t_end = time.time()
    finally:
        ray.shutdown()
    out = Path(spec.output_dir)
    rows = {r["step"]: r for r in load_jsonl(out / STEPS_FILE)}
    started = json.loads((out / ATTEMPTS_FILE).read_text().splitlines()[0])["started"]
    cum = {s: r["tokens_per_s"] * r["elapsed_s"] for s, r in rows.items()}  # tokens since the first step began
    last = max(rows)
    seconds = rows[last]["elapsed_s"] - rows[warmup]["elapsed_s"]
    tokens = cum[last] - cum[warmup]
    # the worker's clock starts at its first step: fit -> first step = Ray + worker + model load + DeepSpeed init
    first_step_wall = t_end - (rows[last]["elapsed_s"])  # upper bound: the save after the last step is included
    per_step = [
        (cum[s] - cum[s - 1]) / (rows[s]["elapsed_s"] - rows[s - 1]["elapsed_s"]) for s in range(warmup + 1, last + 1)
    ]
    return {
        "tokens_per_s": tokens / seconds,
        "median_step_tokens_per_s": statistics.median(per_step),
        "timed_s": seconds,
        "timed_tokens": round(tokens),
        "worker_start_s": started - t_fit,
        "startup_and_save_s": first_step_wall - t_fit,
        "fit_wall_s": t_end - t_fit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["tiny", "smollm2"], choices=sorted(DEFAULTS))
    ap.add_argument("--method", default="grad_diff")
    ap.add_argument("--batch-size", type=int, help="micro batch (default per model: tiny 8, smollm2 2)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default per model: tiny 64, smollm2 32)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default per model: tiny 10, smollm2 3)")
    ap.add_argument("--steps", type=int, help="timed steps (default per model: tiny 200, smollm2 20)")
    ap.add_argument("--repeats", type=int, default=1, help="bare runs before and as many after the spunge job")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the worker gets as many CPUs)")
    ap.add_argument("--gpu", action="store_true", help="both loops on the GPU (the job with scaling.use_gpu)")
    ap.add_argument("--no-dashboard", action="store_true", help="a Ray without its dashboard packages")
    ap.add_argument("--label", default="current", help="name of this measurement in the JSON (e.g. before/after)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "train_overhead.json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if args.gpu else "cpu"
    os.environ["DS_ACCELERATOR"] = device

    results, load0 = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="spunge-overhead-") as tmp:
        work = Path(tmp)
        forget, retain = write_data(work)
        for name in args.model:
            d_batch, d_seq, d_warm, d_steps = DEFAULTS[name]
            batch, seq = args.batch_size or d_batch, args.seq_len or d_seq
            warm, steps = args.warmup or d_warm, args.steps or d_steps
            path = model_dir(name, work)
            spec = job_spec(args, name, path, forget, retain, work / f"out-{name}", batch, seq, warm + steps)
            # bare runs before and after the spunge job, averaged: the shared machine's load drifts
            runs = [bare(spec, warm, steps, device) for _ in range(args.repeats)]
            s = spunge(
                spec,
                warm,
                work / f"ray-{name}",
                num_cpus=max(2, args.threads),
                gpu=args.gpu,
                dashboard=not args.no_dashboard,
            )
            runs += [bare(spec, warm, steps, device) for _ in range(args.repeats)]
            b = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            b["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
            results.append(
                {
                    "model": name,
                    "method": args.method,
                    "batch_size": batch,
                    "seq_len": seq,
                    "warmup_steps": warm,
                    "timed_steps": steps,
                    "bare": b,
                    "spunge": s,
                    "ratio": s["tokens_per_s"] / b["tokens_per_s"],
                    "ratio_median_step": s["median_step_tokens_per_s"] / b["median_step_tokens_per_s"],
                }
            )
            print(
                f"{name}: bare {b['tokens_per_s']:.1f} tok/s, spunge {s['tokens_per_s']:.1f} tok/s, "
                f"ratio {results[-1]['ratio']:.3f}",
                flush=True,
            )

    print(
        "\n| model | batch x seq | timed steps | bare tok/s | spunge tok/s | spunge/bare | median-step ratio "
        "| spunge start-up+save s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['batch_size']} x {r['seq_len']} | {r['timed_steps']} | "
            f"{r['bare']['tokens_per_s']:.1f} | {r['spunge']['tokens_per_s']:.1f} | {r['ratio']:.3f} | "
            f"{r['ratio_median_step']:.3f} | {r['spunge']['startup_and_save_s']:.1f} |"
        )
    record = {
        "label": args.label,
        "threads": args.threads,
        "device": device,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "load_avg_1min_start": load0,
        "results": results,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = {k: v for k, v in previous.get("runs", {}).items() if k != args.label}
    runs[args.label] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"latest": args.label, "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
