"""Multiple-choice scoring speed: ours at batch size 1 vs 32, and lm-eval's log-likelihood scoring, in one run.

Scores the demo benchmark's ``mc.jsonl`` (question, 4 choices) with the base model:

- ``ours bs=1``  : :func:`jobs.evaluate.mc.choice_loglikelihoods` one (question, choice) pair per forward pass;
- ``ours bs=32`` : the same, 32 pairs per padded batch (what the ``mc`` suite runs);
- ``lm-eval``    : ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model, batch_size=32)`` on the shipped
  task ``spunge_mc`` (task setup included; it is a small part).

Prints a table (pairs/s, speed-up) and the accuracies (they must agree) and writes
``benchmarks/results/eval_scoring.json``. Usage::

    python benchmarks/eval_scoring.py [--bench DIR] [--size tiny|small] [--questions N] [--threads T]

``--bench`` is a built demo benchmark folder (``spunge demo`` writes ``spunge-demo/benchmark``); without
it the benchmark of ``--size`` is built (or reused) under ``$TMPDIR/spunge-bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, help="built demo benchmark folder (default: build --size under $TMPDIR)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--questions", type=int, default=120, help="first N questions of mc.jsonl (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "eval_scoring.json")
    args = ap.parse_args()

    import torch

    from jobs.data.demo_train import build_benchmark
    from jobs.evaluate import lmeval as LE
    from jobs.evaluate.mc import choice_loglikelihoods, mc_correct
    from jobs.evaluate.suites import SuiteContext, read_jsonl
    from jobs.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    bench = args.bench or Path(tempfile.gettempdir()) / "spunge-bench" / f"demo-{args.size}"
    if args.bench is None:
        build_benchmark(bench, size=args.size, seed=0)
    meta = json.loads((bench / "benchmark.json").read_text())
    rows = read_jsonl(str(bench / meta["files"]["mc"]), args.questions or None)
    model = load_model(str(bench / meta["files"]["base"])).eval()
    tok = load_tokenizer(str(bench / meta["files"]["base"]))
    pairs = sum(len(r["choices"]) for r in rows)

    runs = []

    def record(name: str, seconds: float, acc: float) -> None:
        runs.append({"name": name, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 1), "acc": acc})

    choice_loglikelihoods(model, tok, rows[:4], batch_size=4)  # warm-up
    for bs in (1, 32):
        t0 = time.perf_counter()
        lls = choice_loglikelihoods(model, tok, rows, batch_size=bs)
        record(f"ours bs={bs}", time.perf_counter() - t0, float(mc_correct(lls, rows).mean()))
    t0 = time.perf_counter()
    res = LE.lmeval_suite(SuiteContext(model, tok, batch_size=32), {"mc": rows})
    record("lm-eval bs=32", time.perf_counter() - t0, res["metrics"]["lmeval.spunge_mc.acc"])

    ours32 = runs[1]["seconds"]
    for r in runs:
        r["slowdown_vs_ours_bs32"] = round(r["seconds"] / ours32, 2)
    print(
        f"{len(rows)} questions, {pairs} (question, choice) pairs, torch threads {args.threads}, "
        f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    )
    print(f"{'scorer':<16}{'seconds':>10}{'pairs/s':>10}{'x ours bs=32':>14}{'acc':>8}")
    for r in runs:
        print(
            f"{r['name']:<16}{r['seconds']:>10.2f}{r['pairs_per_s']:>10.1f}{r['slowdown_vs_ours_bs32']:>14.2f}"
            f"{r['acc']:>8.4f}"
        )
    print(
        f"speed-up of batching (bs=32 over bs=1): {runs[0]['seconds'] / ours32:.1f}x; "
        f"lm-eval / ours (bs=32): {runs[2]['seconds'] / ours32:.2f}x; "
        f"acc agree: {abs(runs[1]['acc'] - runs[2]['acc']) <= 1e-6}"
    )
    out = {
        "benchmark": str(bench),
        "size": meta.get("size"),
        "questions": len(rows),
        "pairs": pairs,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "runs": runs,
        "batching_speedup": round(runs[0]["seconds"] / ours32, 2),
        "lm_eval_over_ours": round(runs[2]["seconds"] / ours32, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
