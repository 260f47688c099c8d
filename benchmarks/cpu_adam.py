"""ZeRO-Offload's optimizer step on the CPU: DeepSpeed's ``DeepSpeedCPUAdam`` against torch's AdamW.

Under ``offload_optimizer`` the Adam step of every worker runs on the host over its fp32 states. spunge hands
DeepSpeed its ``DeepSpeedCPUAdam`` there (``jobs.unlearn.engine.make_optimizer``) and falls back to torch's
AdamW where the ``cpu_adam`` op cannot be built. This script times one ``step()`` of each over
SmolLM2-135M-Instruct's parameters (their shapes read from the cached converted folder; random fp32 weights
and gradients), with AdamW's update (lr 1e-5, weight decay 0.01):

- ``ds_cpu_adam``: ``DeepSpeedCPUAdam(adamw_mode=True)``, what spunge uses;
- ``torch``: ``torch.optim.AdamW`` as the fallback builds it (on the CPU torch's default is the per-tensor loop);
- ``torch_foreach``: ``foreach=True`` (multi-tensor ops); ``torch_fused``: ``fused=True`` (one fused kernel).

Two layouts: ``params``, the model's tensors as they are (what a plain torch optimizer steps), and ``flat``,
all of them in one tensor (what ZeRO-1/2 offload steps: one flat fp32 partition per parameter group). Each
thread count (``torch.set_num_threads``, which the op's OpenMP loop follows too) times every optimizer once per
round, round-robin, after a first step that creates the states; the figure is the median over rounds, and
``vs_cpu_adam`` is an optimizer's median over DeepSpeedCPUAdam's in the same run. Prints a table and writes
``benchmarks/results/cpu_adam.json``. Usage::

    python benchmarks/cpu_adam.py [--threads 1 2] [--rounds 7] [--layouts params flat]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

RESULTS = ROOT / "benchmarks" / "results" / "cpu_adam.json"
OPTIMIZERS = ("ds_cpu_adam", "torch", "torch_foreach", "torch_fused")
LR, WEIGHT_DECAY = 1e-5, 0.01


def smollm2_shapes() -> list[tuple[int, ...]]:
    """The shape of every tensor of SmolLM2-135M-Instruct's safetensors (the tied embedding once)."""
    from safetensors import safe_open

    from jobs.models import convert_gguf, packaged_gguf

    folder = Path(os.environ.get("SPUNGE_CACHE", Path.home() / ".cache" / "spunge")) / "smollm2-135m-instruct"
    shapes = []
    for f in sorted(convert_gguf(packaged_gguf(), folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            shapes += [tuple(st.get_slice(k).get_shape()) for k in st.keys()]
    return shapes


def make(name: str, params):
    import torch

    if name == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True)
    extra = {"torch": {}, "torch_foreach": {"foreach": True}, "torch_fused": {"fused": True}}[name]
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **extra)


def time_layout(shapes, threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of every optimizer over ``shapes``, ``rounds`` times each, round-robin."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]  # read, never written, by AdamW's step
    opts = {}
    for name in OPTIMIZERS:  # each its own weights (a step changes them), all with the same values
        gen.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opts[name] = make(name, params)
        opts[name].step()  # creates exp_avg and exp_avg_sq
    times = {name: [] for name in OPTIMIZERS}
    for _ in range(rounds):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    del opts
    gc.collect()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layouts", nargs="+", default=["params", "flat"], choices=["params", "flat"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    from jobs.unlearn.engine import cpu_adam_unavailable, import_deepspeed

    deepspeed = import_deepspeed()
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    why = cpu_adam_unavailable()  # builds the op if ~/.cache/torch_extensions has none
    op_load_s = time.perf_counter() - t
    if why:
        sys.exit(f"the cpu_adam op is unavailable: {why}")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    shapes = smollm2_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"SmolLM2-135M: {n:,} fp32 parameters in {len(shapes)} tensors; cpu_adam op ready in {op_load_s:.1f}s "
        f"(load average {load0:.1f})",
        flush=True,
    )
    rows = []
    for layout in args.layouts:
        for threads in args.threads:
            times = time_layout(shapes if layout == "params" else [(n,)], threads, args.rounds)
            base = statistics.median(times["ds_cpu_adam"])
            for name in OPTIMIZERS:
                med = statistics.median(times[name])
                rows.append(
                    {
                        "layout": layout,
                        "threads": threads,
                        "optimizer": name,
                        "median_s": med,
                        "vs_cpu_adam": med / base,
                        "params_per_s": n / med,
                        "steps_s": times[name],
                    }
                )
                print(f"{layout:<7} {threads} thread(s) {name:<14} {med:8.3f} s  {med / base:5.2f}x", flush=True)

    print(f"\none AdamW step over {n / 1e6:.1f}M fp32 parameters, median of {args.rounds}; x = / DeepSpeedCPUAdam")
    print(f"{'layout':<8}{'threads':>8}" + "".join(f"{o:>16}" for o in OPTIMIZERS))
    for layout in args.layouts:
        for threads in args.threads:
            sel = {r["optimizer"]: r for r in rows if r["layout"] == layout and r["threads"] == threads}
            print(
                f"{layout:<8}{threads:>8}"
                + "".join(f"{sel[o]['median_s']:>8.3f}s {sel[o]['vs_cpu_adam']:>5.2f}x" for o in OPTIMIZERS)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "cpu_adam",
                "model": "SmolLM2-135M-Instruct",
                "parameters": n,
                "tensors": len(shapes),
                "dtype": "float32",
                "lr": LR,
                "weight_decay": WEIGHT_DECAY,
                "rounds": args.rounds,
                "op_ready_s": op_load_s,
                "op_simd": CPUAdamBuilder().simd_width(),
                "rows": rows,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__,
                    "load_avg_1min_start": load0,
                    "load_avg_1min_end": os.getloadavg()[0],
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
