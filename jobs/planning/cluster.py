"""A SPUNGE run on a GPU cluster, from formulas (no GPU): how many GPUs one job needs, how many jobs run at
once and in how many waves, the merge's I/O volume, time and RAM, and the evaluation fan-out.

Built on ``jobs.planning.memory`` (one job's per-GPU and host memory); docs/scaling.md states the formulas and
their tables (``benchmarks/memory_estimate.py --markdown-scale --markdown-cluster`` prints them). The
hardware figures below are vendor data sheets and assumptions (``MFU``), not measurements.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from jobs.planning.memory import GiB, JobSetup, ModelShape, estimate, fits

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # scaling.num_workers tried when sizing a job (one GPU each)
GPUS_PER_NODE = 8
# dense bf16 peak FLOP/s and HBM bandwidth (vendor data sheets): A100-SXM 80 GB, H100-SXM 80 GB, H200-SXM 141 GB
ACCELERATORS = {
    "A100-80GB": {"card": 80, "flops": 312e12, "hbm": 2.0e12},
    "H100-80GB": {"card": 80, "flops": 989e12, "hbm": 3.35e12},
    "H200-141GB": {"card": 140, "flops": 989e12, "hbm": 4.8e12},
}
CARDS = {"80 GB A100/H100": {"card": 80, "flops": 989e12}, "141 GB H200": {"card": 140, "flops": 989e12}}
NODE_RAM_GIB = 0.9 * 2e12 / GiB  # 90 % of a 2 TB DGX H100/H200 node (8 GPUs): 1676 GiB for the workers
MFU = 0.3  # assumed model FLOP utilisation (not measured); ZeRO-3 with offload runs lower
OFFLOAD_VARIANTS = {
    "none": {},
    "optimizer": {"offload_optimizer": True},
    "optimizer+param": {"offload_optimizer": True, "offload_param": True},
}


def scale_rows(m: ModelShape, base: JobSetup, gpus: tuple[int, ...] = (8, 16, 32, 64)) -> list[dict[str, Any]]:
    """The ZeRO-3 grid of docs/scaling.md: N GPUs per job x offload (none / optimizer / optimizer+param) x with
    and without a reference model, gradient checkpointing on (off costs 2·L·c·sbh: 85 GiB for 70B)."""
    rows = []
    for n in gpus:
        for variant in OFFLOAD_VARIANTS.values():
            for ref in (True, False):
                rows.append(
                    estimate(
                        m, replace(base, zero=3, gpus=n, gradient_checkpointing=True, needs_reference=ref, **variant)
                    )
                )
    return rows


def node_host_gib(r: dict[str, Any], gpus_per_node: int = GPUS_PER_NODE) -> dict[str, float]:
    """Host RAM of one node full of such workers (``gpus_per_node`` of them, from one job or several
    concurrent ones): steady (offloaded states) and at start-up (``host_memory``'s ``load``: jobs started
    together load together)."""
    workers = gpus_per_node
    host = r["host_gib_per_worker"]
    return {"workers": workers, "steady": workers * host["steady"], "load": workers * host["load"]}


def smallest_job(
    m: ModelShape, base: JobSetup, card: int, gpus: tuple[int, ...] = GPU_COUNTS, node_ram_gib: float = NODE_RAM_GIB
) -> Optional[dict[str, Any]]:
    """The estimate of the fewest GPUs per job (``scaling.num_workers``) whose steady and start-up peaks fit
    ``card`` and whose node of 8 such workers stays within ``node_ram_gib`` of host RAM (steady and at
    start-up); None if none of ``gpus`` does."""
    for n in gpus:
        r = estimate(m, replace(base, gpus=n))
        node = node_host_gib(r)
        if r["fits"][f"{card}GB"] and max(node["steady"], node["load"]) <= node_ram_gib:
            return r
    return None


def job_seconds(
    params: float,
    forget_tokens: float,
    gpus: int,
    flops: float,
    mfu: float = MFU,
    checkpointing: bool = True,
    reference: bool = True,
) -> float:
    """Seconds of one NPO job: per forget token (each with an equal retain token) forget fwd+bwd 6Ψ, retain
    fwd+bwd 6Ψ, reference forward 2Ψ, and with checkpointing one more forward of each graph (2 x 2Ψ):
    18Ψ FLOPs (14Ψ without checkpointing, 12Ψ/16Ψ without reference); divided by N · peak · MFU. Attention
    FLOPs (~6·L·s·h per token, 3 % at s = 512 for 7B) and the CPU optimizer step of offload are left out."""
    per_token = 12 * params + (2 * params if reference else 0) + (4 * params if checkpointing else 0)
    return per_token * forget_tokens / (gpus * flops * mfu)


def waves(jobs: int, concurrent: int) -> int:
    """Rounds of unlearning jobs: ceil(jobs / concurrent) (the driver keeps ``job_capacity`` running)."""
    return -(-jobs // concurrent)


def concurrency_rows(
    models: dict[str, ModelShape],
    base: JobSetup,
    clusters: tuple[int, ...] = (8, 64),
    subsets: tuple[int, ...] = (4, 8, 16),
    forget_tokens: float = 1e7,
) -> list[dict[str, Any]]:
    """For each model, offload variant and accelerator: the fewest GPUs per job that fit (``smallest_job``),
    how many such jobs run at once on a cluster of G GPUs (G // N, GPU-bound), the
    waves for k subset jobs (ceil(k / at once); the unsplit baseline comes on top, see docs/scaling.md), and
    one job's compute time for ``forget_tokens``."""
    rows = []
    for name, m in models.items():
        for off_name, variant in OFFLOAD_VARIANTS.items():
            setup = replace(base, zero=3, gradient_checkpointing=True, **variant)
            for acc, spec in CARDS.items():
                r = smallest_job(m, setup, spec["card"])
                n = r["setup"]["gpus"] if r else None
                rows.append(
                    {
                        "model": name,
                        "offload": off_name,
                        "accelerator": acc,
                        "card_gib": spec["card"],
                        "gpus_per_job": n,
                        "peak_gib": r["peak_gib"] if r else None,
                        "init_peak_gib": r["init_peak_gib"] if r else None,
                        "node_host_gib": node_host_gib(r) if r else None,
                        "concurrent_jobs": {g: g // n if n and n <= g else 0 for g in clusters},
                        "waves": {
                            g: {k: waves(k, g // n) if n and n <= g else None for k in subsets} for g in clusters
                        },
                        "job_seconds": job_seconds(m.params, forget_tokens, n, spec["flops"]) if n else None,
                        "forget_tokens": forget_tokens,
                    }
                )
    return rows


DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
OUT_SHARD_BYTES = 5e9  # mergekit MergeOptions.out_shard_size default (the run_merge fallback: dare_*, della*)


def merge_io(m: ModelShape, dtype: str, k: int, bandwidths: tuple[float, ...] = (1e9, 5e9)) -> dict[str, Any]:
    """Bytes a full-model merge moves: every subset checkpoint and the base model read once ((k + 1)·B·Ψ;
    ``mergekit_config`` names the base as ``base_model``), the merged model written once (B·Ψ); seconds at
    each storage bandwidth (bytes/s, read and write sharing it). RAM: mergekit's Executor keeps one output
    tensor's inputs alive until their last use and TIES' ``merge_group`` builds k deltas plus sign/mask
    tensors of the same shape, so about (5k + 2) copies of the largest tensor in the merge dtype, plus the
    ``TensorWriter``'s shard buffer (``out_shard_size`` 5e9 bytes, one more being written by its thread).
    Read from mergekit 0.1.5's source, not measured: the bound of the run_merge fallback (dare_*, della*),
    an upper bound for the methods jobs/merge_stream.py streams (TIES there also reads each checkpoint
    twice; docs/scaling.md)."""
    b = DTYPE_BYTES[dtype]
    ckpt = b * m.params
    read, written = (k + 1) * ckpt, ckpt
    working = (5 * k + 2) * b * m.largest_layer()
    return {
        "dtype": dtype,
        "k": k,
        "checkpoint_gb": ckpt / 1e9,
        "read_gb": read / 1e9,
        "written_gb": written / 1e9,
        "seconds": {f"{bw / 1e9:g}GB/s": (read + written) / bw for bw in bandwidths},
        "mergekit_ram_gb": (working + 2 * OUT_SHARD_BYTES) / 1e9,
        "largest_tensor_gb": b * m.largest_layer() / 1e9,
    }


def eval_models(k: int, unsplit: bool = True, oracle: bool = True) -> int:
    """Models ``orchestrator.stages.evaluate.models_to_score`` scores: base, the oracle (``eval.oracle``), every job's
    model (k subsets + unsplit with ``split.baseline: unsplit``), the merged model."""
    return 1 + int(oracle) + k + int(unsplit) + 1


def eval_rows(
    models: dict[str, ModelShape],
    k: int = 8,
    suites: int = 1,
    gpus_per_task: float = 1,
    cluster_gpus: tuple[int, ...] = (8, 64),
    eval_tokens: float = 1e6,
    answers: int = 1000,
    batch: int = 16,
    new_tokens: int = 32,
    seq: int = 512,
) -> list[dict[str, Any]]:
    """Evaluation fan-out: one Ray task per (model, suite), ``eval.gpus_per_task`` each; the task loads the
    whole model onto its first GPU (``model.to("cuda")`` in ``jobs.evaluate.suites.evaluate_model``). GPU
    bytes: B·Ψ weights + the batch's logits (bf16 + fp32 upcast, 6·b·s·V) + the KV cache of generation
    (2·L·kv_dim·2 bytes per token, b·(s + new tokens) tokens). Scoring ``eval_tokens`` costs 2Ψ FLOPs a token
    at ``MFU``; greedy generation is bandwidth-bound: every new token of a batch reads all weights once,
    ceil(answers / batch) · new_tokens · B·Ψ / HBM bandwidth."""
    tasks = eval_models(k) * suites
    rows = []
    for name, m in models.items():
        weights = 2 * m.params
        kv = 2 * m.layers * m.kv_dim() * 2 * batch * (seq + new_tokens)
        logit = 6 * batch * seq * m.vocab
        gpu = weights + logit + kv
        for acc, spec in ACCELERATORS.items():
            fits_card = fits(gpu, spec["card"])
            conc = {g: int(g // gpus_per_task) if fits_card else 0 for g in cluster_gpus}
            rows.append(
                {
                    "model": name,
                    "accelerator": acc,
                    "tasks": tasks,
                    "batch": batch,
                    "gpu_gib": {
                        "weights": weights / GiB,
                        "logits": logit / GiB,
                        "kv_cache": kv / GiB,
                        "total": gpu / GiB,
                    },
                    "fits": fits_card,
                    "fits_raw": gpu / GiB + 1 <= spec["card"],
                    "concurrent": conc,
                    "waves": {g: waves(tasks, c) if c else None for g, c in conc.items()},
                    "score_seconds": 2 * m.params * eval_tokens / (spec["flops"] * MFU),
                    "generate_seconds": -(-answers // batch) * new_tokens * weights / spec["hbm"],
                    "eval_tokens": eval_tokens,
                    "answers": answers,
                    "new_tokens": new_tokens,
                }
            )
    return rows
