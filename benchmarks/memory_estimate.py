"""Per-GPU memory of an NPO unlearning job under DeepSpeed ZeRO-2/3 and the cluster plan, as tables (no GPU).

The command line of ``jobs.planning``. ``jobs.planning.memory`` holds the formulas for one worker (model
states, reference model, activations, logits, ZeRO's buffers, the optimizer step, the start-up peak, host RAM);
``jobs.planning.cluster`` the ZeRO-3 grid for N = 8 ... 64 GPUs per job, how many jobs of the smallest fitting
size run at once on 8 and 64 GPUs and in how many waves k subset jobs finish, the merge's I/O volume, time and
RAM, and the evaluation fan-out (one Ray task per model and suite). docs/scaling.md states the formulas and
shows these tables; tests/test_memory_estimate.py checks the formulas' parts, and their model-state part against
DeepSpeed's own estimators. Usage::

    python benchmarks/memory_estimate.py                      # Llama-2-7B, ZeRO-2/3, N = 1, 4, 8, seq 512, b 4
    python benchmarks/memory_estimate.py --zero 3 --gpus 4 --offload-optimizer --gradient-checkpointing on
    python benchmarks/memory_estimate.py --lora-r 16 --json benchmarks/results/memory_estimate.json
    python benchmarks/memory_estimate.py --markdown           # the docs/scaling.md table
    python benchmarks/memory_estimate.py --model llama2-70b --gpus 8 16 32 64 --markdown-scale --markdown-cluster

Numbers are computed estimates, not measurements; all sizes printed in GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from jobs.planning.cluster import (
    ACCELERATORS,
    DTYPE_BYTES,
    MFU,
    concurrency_rows,
    eval_rows,
    merge_io,
    node_host_gib,
    scale_rows,
)
from jobs.planning.memory import CARDS_GB, PRESETS, GiB, JobSetup, ModelShape, estimate, param_counts

# --------------------------------------------------------------------------------------------- one job


def _g(x: float) -> str:
    return f"{x / GiB:6.2f}"


def _fits_str(r: dict) -> str:
    ok = [c for c in CARDS_GB if r["fits"][f"{c}GB"]]
    return f">={ok[0]}GB" if ok else "none"


def print_table(rows: list[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    head = (
        f"{'ZeRO':>4} {'N':>3} {'ckpt':>4} {'offl':>5} {'lora':>4} | {'weights':>7} {'grads':>6} {'optim':>6} "
        f"{'ref':>6} {'buffers':>7} | {'acts':>6} {'logits':>6} {'step':>6} | {'peak':>6} {'start':>6}  fits"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        s, b = r["setup"], r["bytes"]
        off = ("opt" if s["offload_optimizer"] else "") + ("+par" if s["offload_param"] else "") or "-"
        print(
            f"{s['zero']:>4} {s['gpus']:>3} {'on' if s['gradient_checkpointing'] else 'off':>4} {off:>5} "
            f"{s['lora_r'] or '-':>4} | {_g(b['model_states']['weights']):>7} {_g(b['model_states']['grads'])} "
            f"{_g(b['model_states']['optimizer'])} {_g(b['reference'])} {_g(sum(b['buffers'].values())):>7} | "
            f"{_g(sum(b['activations'].values()))} {_g(sum(b['logits'].values()))} {_g(b['step_peak'])} | "
            f"{_g(b['peak'])} {_g(b['init_peak'])}  {_fits_str(r)}",
            file=out,
        )


def _fit_cell(r: dict[str, Any], card: int) -> str:
    """yes if the card holds both the steady and the start-up peak, else no."""
    return "yes" if r["fits"][f"{card}GB"] else "no"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ZeRO | N | grad ckpt | optimizer offload | LoRA | model states | reference | activations | logits | "
        "ZeRO buffers | step temps | **peak GiB** | start-up peak | 24 GB | 40 GB | 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, b = r["setup"], r["bytes"]
        lines.append(
            f"| {s['zero']} | {s['gpus']} | {'on' if s['gradient_checkpointing'] else 'off'} | "
            f"{'cpu' if s['offload_optimizer'] else '-'} | {('r=' + str(s['lora_r'])) if s['lora_r'] else '-'} | "
            f"{sum(b['model_states'].values()) / GiB:.1f} | {b['reference'] / GiB:.1f} | "
            f"{sum(b['activations'].values()) / GiB:.1f} | {sum(b['logits'].values()) / GiB:.1f} | "
            f"{sum(b['buffers'].values()) / GiB:.1f} | {b['step_peak'] / GiB:.1f} | **{r['peak_gib']:.1f}** | "
            f"{r['init_peak_gib']:.1f} | {_fit_cell(r, 24)} | {_fit_cell(r, 40)} | {_fit_cell(r, 80)} |"
        )
    return "\n".join(lines)


def doc_rows(m: ModelShape, base: JobSetup) -> list[dict[str, Any]]:
    """The docs/scaling.md grid: ZeRO-2/3 x N = 4, 8 x {full, optimizer offload, LoRA r=16} x checkpointing."""
    rows = []
    for zero in (2, 3):
        for n in (4, 8):
            for variant in ({}, {"offload_optimizer": True}, {"lora_r": 16}):
                for ckpt in (False, True):
                    rows.append(estimate(m, replace(base, zero=zero, gpus=n, gradient_checkpointing=ckpt, **variant)))
    return rows


# --------------------------------------------------------------------------------------------- cluster plan


def scale_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| N | offload | reference | model states | reference | activations + logits | ZeRO buffers | "
            "step temps | **peak GiB** | start-up peak | 80 GB | 140 GB | host GiB / worker | "
            "host GiB / node: steady, start-up |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, b = r["setup"], r["bytes"]
        off = "optimizer+param" if s["offload_param"] else "optimizer" if s["offload_optimizer"] else "-"
        node = node_host_gib(r)
        lines.append(
            f"| {s['gpus']} | {off} | {'yes' if s['needs_reference'] else 'no'} | "
            f"{sum(b['model_states'].values()) / GiB:.1f} | {b['reference'] / GiB:.1f} | "
            f"{(sum(b['activations'].values()) + sum(b['logits'].values())) / GiB:.1f} | "
            f"{sum(b['buffers'].values()) / GiB:.1f} | {b['step_peak'] / GiB:.1f} | **{r['peak_gib']:.1f}** | "
            f"{r['init_peak_gib']:.1f} | {_fit_cell(r, 80)} | {_fit_cell(r, 140)} | "
            f"{r['host_gib_per_worker']['steady']:.0f} | {node['steady']:.0f}, {node['load']:.0f} |"
        )
    return "\n".join(lines)


def concurrency_markdown(rows: list[dict[str, Any]]) -> str:
    gs = list(rows[0]["concurrent_jobs"])
    ks = list(rows[0]["waves"][gs[0]])
    head = (
        "| model | offload | card | N per job | peak, start-up GiB | host GiB/node: steady, start-up | "
        + " | ".join(f"G={g}: jobs at once; waves k={','.join(map(str, ks))}" for g in gs)
        + f" | one job, h per {rows[0]['forget_tokens']:.0e} forget tokens |"
    )
    lines = [head, "|" + "---|" * (7 + len(gs))]
    for r in rows:
        if r["gpus_per_job"] is None:
            cells = ["none fits", "-", "-"] + ["-"] * len(gs) + ["-"]
        else:
            per_g = [
                f"{r['concurrent_jobs'][g]}; " + ",".join(str(w or "-") for w in r["waves"][g].values())
                if r["concurrent_jobs"][g]
                else "0; -"
                for g in gs
            ]
            cells = [
                str(r["gpus_per_job"]),
                f"{r['peak_gib']:.0f}, {r['init_peak_gib']:.0f}",
                f"{r['node_host_gib']['steady']:.0f}, {r['node_host_gib']['load']:.0f}",
            ]
            cells += per_g + [f"{r['job_seconds'] / 3600:.2f}"]
        lines.append(f"| {r['model']} | {r['offload']} | {r['accelerator']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_markdown(models: dict[str, ModelShape], ks: tuple[int, ...] = (4, 8, 16)) -> tuple[str, list[dict]]:
    rows, lines = (
        [],
        [
            (
                "| model | dtype | k | one checkpoint GB | read GB | written GB | minutes at 1 GB/s | "
                "minutes at 5 GB/s | mergekit RAM GB (approx.) |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ],
    )
    for name, m in models.items():
        for dtype in DTYPE_BYTES:
            for k in ks:
                r = {"model": name, **merge_io(m, dtype, k)}
                rows.append(r)
                lines.append(
                    f"| {name} | {dtype} | {k} | {r['checkpoint_gb']:.1f} | {r['read_gb']:.0f} | "
                    f"{r['written_gb']:.1f} | {r['seconds']['1GB/s'] / 60:.1f} | "
                    f"{r['seconds']['5GB/s'] / 60:.1f} | {r['mergekit_ram_gb']:.0f} |"
                )
    return "\n".join(lines), rows


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def eval_markdown(rows: list[dict[str, Any]]) -> str:
    gs = list(rows[0]["concurrent"])
    lines = [
        "| model | GPU | task GPU GiB: weights + logits + KV = total | fits (rule; raw + 1 GiB) | tasks | "
        + " | ".join(f"G={g}: at once; waves" for g in gs)
        + f" | scoring s per {rows[0]['eval_tokens']:.0e} tokens | generation s per {rows[0]['answers']} answers |",
        "|" + "---|" * (7 + len(gs)),
    ]
    for r in rows:
        g = r["gpu_gib"]
        per_g = [f"{r['concurrent'][c]}; {r['waves'][c]}" if r["concurrent"][c] else "-" for c in gs]
        lines.append(
            f"| {r['model']} | {r['accelerator']} | {g['weights']:.1f} + {g['logits']:.1f} + "
            f"{g['kv_cache']:.1f} = {g['total']:.1f} | {_yes(r['fits'])}; {_yes(r['fits_raw'])} | {r['tasks']} | "
            + " | ".join(per_g)
            + f" | {r['score_seconds']:.0f} | {r['generate_seconds']:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command line


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    j = JobSetup()
    ap.add_argument(
        "--model",
        choices=sorted(PRESETS),
        default="llama2-7b",
        help="model shape preset; the flags below override its fields",
    )
    ap.add_argument("--params", type=float, help="Ψ, all parameters (Llama-2-7B 6.74e9, Llama-2-70B 68.98e9)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention K/V heads (Llama-2-70B: 8)")
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--intermediate", type=int, help="MLP width (LoRA parameter count, largest layer)")
    ap.add_argument("--seq", type=int, default=j.seq, help="unlearn.max_length")
    ap.add_argument("--micro-batch", type=int, default=j.micro_batch, help="unlearn.batch_size")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8], help="scaling.num_workers (one GPU each)")
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-param", action="store_true", help="ZeRO-3 only")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off", "both"], default="both")
    ap.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default=j.attn)
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank on all linear layers (0: full fine-tuning)")
    ap.add_argument("--no-reference", action="store_true", help="a method without reference model (ga, grad_diff)")
    ap.add_argument(
        "--act-coeff", type=float, default=j.act_coeff, help="per-layer activation constant (34; ~43 for HF Llama)"
    )
    ap.add_argument(
        "--reduce-bucket-size", type=float, default=j.reduce_bucket_size, help="DeepSpeed reduce_bucket_size"
    )
    ap.add_argument("--sub-group-size", type=float, default=j.sub_group_size, help="DeepSpeed ZeRO-3 sub_group_size")
    ap.add_argument("--markdown", action="store_true", help="also print the docs/scaling.md ZeRO-2/3 N = 4, 8 table")
    ap.add_argument(
        "--markdown-scale",
        action="store_true",
        help="also print the ZeRO-3 N = 8, 16, 32, 64 x offload x reference table of --model",
    )
    ap.add_argument(
        "--markdown-cluster",
        action="store_true",
        help="also print the cluster tables (jobs at once, merge I/O, eval fan-out) for both presets",
    )
    ap.add_argument("--subsets", type=int, default=8, help="k, forget subsets (eval fan-out table)")
    ap.add_argument("--suites", type=int, default=1, help="len(eval.suites) (eval fan-out table)")
    ap.add_argument("--eval-batch", type=int, default=16, help="eval.batch_size (eval fan-out table)")
    ap.add_argument(
        "--json",
        type=Path,
        metavar="OUT",
        help="write every row as JSON (e.g. benchmarks/results/memory_estimate.json)",
    )
    args = ap.parse_args(argv)

    overrides = {
        f: getattr(args, f)
        for f in ("params", "layers", "hidden", "heads", "kv_heads", "vocab", "intermediate")
        if getattr(args, f) is not None
    }
    m = replace(PRESETS[args.model], **overrides)
    base = JobSetup(
        micro_batch=args.micro_batch,
        seq=args.seq,
        offload_optimizer=args.offload_optimizer,
        offload_param=args.offload_param,
        attn=args.attn,
        lora_r=args.lora_r,
        needs_reference=not args.no_reference,
        act_coeff=args.act_coeff,
        reduce_bucket_size=args.reduce_bucket_size,
        sub_group_size=args.sub_group_size,
    )
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.gradient_checkpointing]
    rows = [
        estimate(m, replace(base, zero=z, gpus=n, gradient_checkpointing=c))
        for z in args.zero
        for c in ckpts
        for n in args.gpus
        if not (args.offload_param and z != 3)
    ]
    print(
        f"Per-GPU memory (GiB) of one {'NPO' if base.needs_reference else 'reference-free'} unlearning job: "
        f"Ψ = {m.params / 1e9:.2f}e9, {m.layers} layers, h {m.hidden}, {m.heads} heads "
        f"({m.kv_heads or m.heads} K/V), V {m.vocab}, "
        f"seq {base.seq}, micro batch {base.micro_batch}, attn {base.attn}, bf16"
        + (f", LoRA r={base.lora_r} ({param_counts(m, base)[1] / 1e6:.1f}M trainable)" if base.lora_r else "")
    )
    print(
        "computed estimates, not measurements; "
        "peak = weights + grads + optim + ref + max(buffers + acts + logits, step); "
        "start = the start-up peak (ZeRO-3: shards + one module built whole; ZeRO 0-2: the whole model; "
        "see init_peak); fits uses both"
        "\n(ZeRO-3's reduce bucket, 0.93 GiB of 'buffers', is resident and also in the step phase)\n"
    )
    print_table(rows)

    out: dict[str, Any] = {
        "note": "computed estimates, not measurements (no GPU)",
        "command": sys.argv[1:] if argv is None else argv,
        "loadavg_1min": os.getloadavg()[0],
        "model": asdict(m),
        "rows": rows,
    }
    if args.markdown:
        drows = doc_rows(m, replace(base, offload_optimizer=False, offload_param=False, lora_r=0))
        out["doc_rows"] = drows
        print("\n" + markdown_table(drows))
    if args.markdown_scale:
        srows = scale_rows(m, replace(base, offload_optimizer=False, offload_param=False, lora_r=0))
        out["scale_rows"] = srows
        print(
            f"\nZeRO-3, gradient checkpointing on, seq {base.seq}, micro batch {base.micro_batch}:\n"
            + scale_markdown(srows)
        )
    if args.markdown_cluster:
        cbase = replace(base, offload_optimizer=False, offload_param=False, lora_r=0)
        crows = concurrency_rows(PRESETS, cbase)
        mtext, mrows = merge_markdown(PRESETS)
        erows = eval_rows(PRESETS, k=args.subsets, suites=args.suites, batch=args.eval_batch, seq=base.seq)
        out["cluster"] = {
            "concurrency": crows,
            "merge_io": mrows,
            "eval": erows,
            "mfu": MFU,
            "accelerators": ACCELERATORS,
        }
        print(f"\nJobs at once (ZeRO-3, checkpointing, NPO with reference; MFU {MFU}):\n" + concurrency_markdown(crows))
        print("\nMerge I/O (k subset checkpoints + base read, merged written):\n" + mtext)
        print(
            f"\nEvaluation fan-out (k = {args.subsets}, {args.suites} suite(s), eval.gpus_per_task 1, "
            f"eval.batch_size {args.eval_batch}, MFU {MFU}):\n" + eval_markdown(erows)
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
