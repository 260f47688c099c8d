"""Per-GPU memory of an NPO unlearning job under DeepSpeed ZeRO-2/3, from a formula (no GPU needed).

Computes, for one Ray Train worker (one GPU) of one spunge unlearning job, the bytes of

- **model states** (ZeRO paper, Rajbhandari et al. 2020, mixed precision Adam, K = 12): 2Ψ bf16 weights,
  2Ψ bf16 gradients, 12Ψ fp32 master weights + Adam m + v, partitioned over the N workers per stage:
  stage 0: 16Ψ; stage 1: 4Ψ + 12Ψ/N; stage 2: 2Ψ + 14Ψ/N; stage 3: 16Ψ/N. ``offload_optimizer`` moves
  the 12Ψ (and the gradient partitions) to host memory (ZeRO-Offload), ``offload_param`` (stage 3) the
  bf16 weights too (ZeRO-Infinity);
- the **reference model** NPO needs (also ga_kl, idk_dpo, whp): a frozen bf16 copy, 2Ψ per GPU at ZeRO 0-2,
  2Ψ/N at ZeRO-3 (sharded through ``deepspeed.initialize`` without an optimizer), 0 with LoRA (the
  reference is the same model with the adapter disabled);
- **activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", eq. 1 with t = 1): s·b·h·(34 + 5·a·s/h) bytes per layer; sdpa / flash attention never
  materialise the a·s² scores, so their 5as/h term is dropped; with full activation checkpointing only
  each layer's input (2·s·b·h) is kept, plus one layer's working set while it is recomputed;
- the **logits** of the LM head: b·s·V bf16 plus the fp32 upcast that ``sequence_nll`` feeds to
  ``log_softmax``; the fp32 log-probabilities are what backward keeps;
- ZeRO's **buffers** (the gradient reduce bucket, ZeRO-3's gathered largest layer) and the
  **optimizer-step** temporaries (the fp32 copy of the gradient partition DeepSpeed makes before the step,
  and torch AdamW's sqrt(v) temporary).

Peak = resident (model states + reference [+ ZeRO-3's reduce bucket]) + max(backward phase, step phase):
backward = activations + logits + ZeRO buffers, step = the optimizer-step temporaries (the activations are
freed when ``engine.step()`` runs). The start-up peak (``init_peak``) is what creating the job's models and
``deepspeed.initialize`` need: at ZeRO-3 the shards plus one module built whole under ``deepspeed.zero.Init``
(no rank holds a whole copy), at ZeRO 0-2 the whole model on every GPU; a card fits when both peaks fit.
Every assumption is in the docstring of the function that uses it; docs/scaling.md has the formulas and the
tables.

For a cluster the script also computes (``--markdown-scale``, ``--markdown-cluster``): the ZeRO-3 grid for
N = 8 ... 64 GPUs per job with and without offload and reference model, Llama-2-7B and Llama-2-70B (GQA)
presets (``--model``); how many jobs of the smallest fitting size run at once on 8 and 64 GPUs and in how
many waves k subset jobs finish (the unsplit baseline: docs/scaling.md); the merge's I/O volume, time and RAM; and the
evaluation fan-out (one Ray task per model and suite).

The model-state part is cross-checked against DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs_all_cold`` / ``estimate_zero3_model_states_mem_needs_all_cold``
and the functions they print from). Usage::

    python benchmarks/memory_estimate.py                      # Llama-2-7B, ZeRO-2/3, N = 1, 4, 8, seq 512, b 4
    python benchmarks/memory_estimate.py --zero 3 --gpus 4 --offload-optimizer --gradient-checkpointing on
    python benchmarks/memory_estimate.py --lora-r 16 --json benchmarks/results/memory_estimate.json
    python benchmarks/memory_estimate.py --markdown           # the docs/scaling.md table
    python benchmarks/memory_estimate.py --model llama2-70b --gpus 8 16 32 64 --markdown-scale --markdown-cluster

Numbers are computed estimates, not measurements; all sizes printed in GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

GiB = 2**30
CARDS_GB = (24, 40, 80, 140)  # card sizes, taken as GiB (an A10G/L4 "24 GB" exposes ~22.5 GiB: see fits();
# a "141 GB" H200 shows 143771 MiB = 140.4 GiB in nvidia-smi, an 80 GB A100/H100 81559 MiB = 79.6 GiB)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder. ``params`` is Ψ (all parameters, embeddings and an untied LM head included)."""

    params: float = 6.74e9
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    vocab: int = 32000
    intermediate: int = 11008  # SwiGLU MLP width (Llama-2-7B): LoRA parameter count, largest layer
    tied_embeddings: bool = False
    kv_heads: Optional[int] = None  # grouped-query attention: K/V heads (None: = heads, plain multi-head)

    def kv_dim(self) -> int:
        """Width of the K and V projections: kv_heads · head_dim (= hidden without GQA)."""
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)

    def largest_layer(self) -> int:
        """Parameters of the largest single module (ZeRO-3 gathers one module at a time, and zero.Init builds
        one whole before partitioning it): the embedding / LM head (V·h) for Llama-2, else the biggest MLP
        matrix."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


# Ψ is the published parameter count; llama_param_count() reproduces both from the shapes (see the tests).
PRESETS = {
    "llama2-7b": ModelShape(),
    "llama2-70b": ModelShape(params=68.98e9, layers=80, hidden=8192, heads=64, vocab=32000, intermediate=28672,
                             kv_heads=8),
}


@dataclass(frozen=True)
class JobSetup:
    """One unlearning job's knobs (see docs/scaling.md for the YAML that sets each)."""

    zero: int = 3  # deepspeed.zero_optimization.stage
    gpus: int = 4  # scaling.num_workers (one GPU each)
    micro_batch: int = 4  # unlearn.batch_size
    seq: int = 512  # unlearn.max_length (batches are padded to their longest row: this is the worst case)
    offload_optimizer: bool = False  # zero_optimization.offload_optimizer.device: cpu
    offload_param: bool = False  # zero_optimization.offload_param.device: cpu (stage 3 only)
    gradient_checkpointing: bool = False  # unlearn.gradient_checkpointing
    attn: str = "sdpa"  # model.attn_implementation
    lora_r: int = 0  # unlearn.lora.r (0: full fine-tuning)
    lora_targets: tuple[str, ...] = LLAMA_LINEARS  # peft "all-linear" on Llama = these seven
    needs_reference: bool = True  # npo, ga_kl, idk_dpo, whp, ...
    grad_passes: int = 2  # NPO: forget + retain forward passes, one backward through both
    act_coeff: float = 34.0  # Korthikanti's per-layer constant (bytes per s·b·h)
    reduce_bucket_size: float = 5e8  # DeepSpeed default (elements)
    sub_group_size: float = 1e9  # DeepSpeed ZeRO-3 default (elements)
    adamw_temp: bool = True  # torch AdamW (foreach, the CUDA default) allocates sqrt(v) during step


# --------------------------------------------------------------------------------------------- parameters


def llama_param_count(m: ModelShape) -> int:
    """Ψ from the architecture (no biases; two RMSNorm weights per layer plus the final one). Q and O are
    h×h, K and V h×kv_dim (GQA), the SwiGLU MLP three h×i matrices."""
    h, i = m.hidden, m.intermediate
    per_layer = 2 * h * h + 2 * h * m.kv_dim() + 3 * h * i + 2 * h
    embed = m.vocab * h * (1 if m.tied_embeddings else 2)
    return m.layers * per_layer + embed + h


def lora_param_count(m: ModelShape, r: int, targets: tuple[str, ...] = LLAMA_LINEARS) -> int:
    """LoRA adapter parameters: r·(d_in + d_out) per adapted linear (A is r×d_in, B is d_out×r), per layer."""
    h, i, kv = m.hidden, m.intermediate, m.kv_dim()
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return m.layers * sum(r * sum(shapes[t]) for t in targets)


def _counts(m: ModelShape, s: JobSetup) -> tuple[float, float]:
    """(frozen, trainable) parameter counts: full fine-tuning trains Ψ; LoRA trains the adapters only."""
    if s.lora_r:
        return m.params, float(lora_param_count(m, s.lora_r, s.lora_targets))
    return 0.0, m.params


# --------------------------------------------------------------------------------------------- model states


def model_states(zero: int, n: int, trainable: float, frozen: float = 0.0, offload_optimizer: bool = False,
                 offload_param: bool = False) -> dict[str, float]:
    """GPU bytes of weights, gradients and optimizer states per worker (ZeRO paper, K = 12).

    - weights: bf16, 2 bytes per parameter (trainable and frozen), partitioned only at stage 3;
    - gradients: bf16, 2 bytes per trainable parameter, partitioned from stage 2 (DeepSpeed keeps each
      rank's reduced partition in a bf16 buffer: ``grads_in_partition`` / ``grad_partitions_flat_buffer``);
    - optimizer: fp32 master weights + Adam m + v, 12 bytes per trainable parameter, partitioned from
      stage 1 (the loop's torch AdamW under DeepSpeed bf16 mixed precision; frozen parameters are not in
      its parameter groups and get none).
    ``offload_optimizer`` (ZeRO-Offload) keeps the optimizer states and the fp32 gradient partitions in host
    memory: 0 on the GPU for both. ``offload_param`` (stage 3, ZeRO-Infinity) keeps the bf16 partitions in
    host memory too (only the gathered layers in ``zero_buffers`` remain)."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, not {zero}")
    if offload_param and zero != 3:
        raise ValueError("offload_param needs ZeRO stage 3")
    total = trainable + frozen
    weights = 2 * total / (n if zero == 3 else 1)
    grads = 2 * trainable / (n if zero >= 2 else 1)
    optimizer = 12 * trainable / (n if zero >= 1 else 1)
    if offload_optimizer:
        grads = optimizer = 0.0
    if offload_param:
        weights = 0.0
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


def reference_model(zero: int, n: int, params: float, needs_reference: bool = True, lora: bool = False,
                    offload_param: bool = False) -> float:
    """GPU bytes of the frozen reference model: a bf16 copy, 2Ψ at ZeRO 0-2 (each worker holds it whole),
    2Ψ/N at ZeRO-3 (initialised as a DeepSpeed engine without optimizer, so sharded like the model; with
    ``offload_param`` its shards stay in host memory too). LoRA: 0 (the base model with the adapter
    disabled is the reference)."""
    if not needs_reference or lora:
        return 0.0
    if zero == 3:
        return 0.0 if offload_param else 2 * params / n
    return 2 * params


def zero_buffers(zero: int, m: ModelShape, trainable: float, lora: bool,
                 reduce_bucket_size: float = 5e8) -> dict[str, float]:
    """DeepSpeed's working buffers (what its estimators leave out, except ZeRO-3's gathered layer).

    - the gradient reduce bucket, ``reduce_bucket_size`` bf16 elements (one buffer, two with
      ``overlap_comm: true``): stage 1-2 allocate it for each backward (``setup_buckets``) and free it at the
      end of backward (``_release_ipg_buffers``); stage 3 allocates it once at start-up and keeps it;
    - stage 3: the largest module gathered whole during its forward/backward: its bf16 weights plus, when
      it trains, its bf16 gradient before reduce-scatter, 2+2 bytes per parameter (the ``4 · largest_layer``
      of DeepSpeed's ZeRO-3 estimator). ZeRO-3's prefetch (``stage3_prefetch_bucket_size`` 5e7 elements,
      0.09 GiB) is not counted."""
    out = {"reduce_bucket": 2 * reduce_bucket_size if zero >= 1 and trainable > 0 else 0.0, "gathered_layer": 0.0}
    if zero == 3:
        largest = m.largest_layer()
        out["gathered_layer"] = 2 * largest + (0 if lora else 2 * largest)
    return out


def optimizer_step_temporaries(zero: int, n: int, trainable: float, offload_optimizer: bool = False,
                               sub_group_size: float = 1e9, adamw_temp: bool = True) -> dict[str, float]:
    """GPU bytes allocated only during ``engine.step()`` (the activations are gone by then).

    - DeepSpeed upcasts the bf16 gradient partition to fp32 before the optimizer step: stage 1-2 the whole
      partition (4·Ψ/N; stage 0: 4Ψ), stage 3 one ``sub_group_size`` sub-group at a time
      (``_prepare_fp32_grad_for_sub_group``): 4·min(sub_group, Ψ/N). The ZeRO paper's 16Ψ omits it;
      DeepSpeed's own ZeRO-2 estimator counts it (its 18 = 2 + 4 + 12 per parameter per rank);
    - torch AdamW (``foreach``, the CUDA default) computes sqrt(v) into a new fp32 tensor of that size;
    - stage 1-2 free the bf16 gradient partition once it is upcast (``bf16_grads_freed``); stage 3 keeps its
      flat gradient buffer.
    ``step_peak`` = max(fp32_grad, fp32_grad + adamw_temp - bf16_grads_freed). With ``offload_optimizer`` the
    step runs on the host: 0 on the GPU."""
    if offload_optimizer or trainable == 0:
        return {"fp32_grad": 0.0, "adamw_temp": 0.0, "bf16_grads_freed": 0.0}
    part = trainable / (n if zero >= 1 else 1)
    freed = 2 * trainable / (n if zero >= 2 else 1) if zero in (1, 2) else 0.0
    if zero == 3:
        part = min(sub_group_size, part)
    return {"fp32_grad": 4 * part, "adamw_temp": 4 * part if adamw_temp else 0.0, "bf16_grads_freed": freed}


def step_peak(step: dict[str, float]) -> float:
    return max(step["fp32_grad"], step["fp32_grad"] + step["adamw_temp"] - step["bf16_grads_freed"])


# --------------------------------------------------------------------------------------------- activations


def layer_activations(seq: int, batch: int, hidden: int, heads: int, attn: str = "sdpa", coeff: float = 34.0,
                      kv_heads: Optional[int] = None) -> float:
    """Bytes one transformer layer keeps for backward (Korthikanti et al. 2022, eq. 1, no tensor parallelism):
    s·b·h·(34 + 5·a·s/h) with 16-bit activations. The 34 counts a GPT block (attention 11sbh + 5as²b, MLP
    19sbh, two LayerNorms 4sbh, dropout masks); a HF Llama block in bf16 (SwiGLU, RMSNorm's fp32 upcast, no
    dropout) keeps about 43·sbh instead: pass ``coeff``. ``sdpa`` / ``flash_attention_2`` never
    materialise the a·s×s scores, so the 5as²b term (softmax output 2, dropout mask 1, dropout output 2
    bytes per score) is dropped; ``eager`` keeps it (HF's eager Llama keeps an fp32 softmax, ~6 bytes a
    score, so 5 is if anything low). Grouped-query attention (``kv_heads`` < ``heads``) keeps K and V
    kv_heads/heads as wide: of the 34, K (2sbh, kept for QKᵀ) and V (2sbh, kept for softmax·V) shrink by
    that ratio, so the constant drops by 4·(1 − kv_heads/heads): 30.5 for Llama-2-70B (8 of 64)."""
    sbh = seq * batch * hidden
    score_term = 5 * heads * seq / hidden if attn == "eager" else 0.0
    gqa_saving = 4 * (1 - (kv_heads or heads) / heads)
    return sbh * (coeff - gqa_saving + score_term)


def activations(m: ModelShape, s: JobSetup) -> dict[str, float]:
    """Activation bytes at the backward peak of one micro batch.

    NPO runs the forget forward (with graph), the reference forward (no grad: its per-layer working set is
    freed as it goes and never exceeds the retain pass's), the retain forward (with graph), then one
    ``engine.backward`` through both: ``grad_passes`` (2) graphs are alive at once.
    - without checkpointing: passes · L · layer_activations;
    - with full checkpointing (HF ``gradient_checkpointing_enable``: every decoder layer): passes · L · 2sbh
      (each layer's bf16 input) plus one layer's full working set, recomputed during backward.
    The final norm / LM-head inputs (~6sbh per pass), embeddings and rotary tables are ignored (< 0.1 GiB
    here). LoRA: the same (its adapters need the same layer inputs; the r-wide intermediates are ignored)."""
    per_layer = layer_activations(s.seq, s.micro_batch, m.hidden, m.heads, s.attn, s.act_coeff, m.kv_heads)
    if s.gradient_checkpointing:
        kept = s.grad_passes * m.layers * 2 * s.seq * s.micro_batch * m.hidden
        return {"layers": kept, "recompute": per_layer}
    return {"layers": s.grad_passes * m.layers * per_layer, "recompute": 0.0}


def logits(m: ModelShape, s: JobSetup) -> dict[str, float]:
    """LM-head output bytes: each pass with a graph keeps its fp32 log_softmax output for backward (4·b·s·V;
    ``sequence_nll`` upcasts the logits before ``log_softmax``), and the pass being computed briefly holds
    its bf16 logits plus their fp32 upcast (2 + 4 bytes per logit). (Backward through log_softmax briefly
    needs ~8·b·s·V, 2·b·s·V more: 0.12 GiB at b = 4, s = 512, V = 32000; not counted.)"""
    bsv = s.micro_batch * s.seq * m.vocab
    return {"logprobs_kept": s.grad_passes * 4 * bsv, "logits_transient": 6 * bsv}


# --------------------------------------------------------------------------------------------- the estimate


def fits(peak_bytes: float, card_gib: float) -> bool:
    """Whether a card of ``card_gib`` fits a job of ``peak_bytes`` allocated: 1 GiB for the CUDA context and
    NCCL (not counted by ``torch.cuda.max_memory_allocated``) plus 10 % of the peak for the caching
    allocator's fragmentation. A "24 GB" A10G or L4 exposes ~22.5 GiB: treat it as a tighter card."""
    return 1.10 * peak_bytes / GiB + 1.0 <= card_gib


def host_memory(m: ModelShape, s: JobSetup) -> dict[str, float]:
    """Host RAM per worker (not per node): with ``offload_optimizer`` the fp32 master/m/v and the fp32
    gradient partition (16 bytes per trainable parameter / N) plus torch AdamW's sqrt(v) temporary on the
    CPU (4/N); with ``offload_param`` the bf16 shards of model and reference (2Ψ/N each). At start-up
    (``load``): at ZeRO-3 each worker reads only its slice of the checkpoint into its partition
    (``jobs.unlearn.partitioned.load_partitioned``), so it holds no whole copy: the offloaded states, plus the
    reference's shards with ``offload_param`` (the page cache of the files read is the kernel's, not the
    worker's). At ZeRO 0-2 every worker loads each model whole in bf16 on the CPU (``jobs.models.load_model``)
    before moving it to its GPU, the reference after ``deepspeed.initialize`` has created the offloaded
    states: offloaded states + 2Ψ with a reference, else max(2Ψ, offloaded states). Per node: times the
    workers on it. DeepSpeed's estimators multiply host figures by 1.5 (pinned buffers); not done here."""
    frozen, trainable = _counts(m, s)
    n = s.gpus
    div = n if s.zero >= 1 else 1
    offloaded = 0.0  # the trained engine's host states once deepspeed.initialize has run
    if s.offload_optimizer:
        offloaded += 16 * trainable / div
    if s.offload_param:
        offloaded += 2 * (trainable + frozen) / n
    steady = offloaded
    if s.offload_optimizer and s.adamw_temp:
        steady += 4 * trainable / div
    ref_shards = reference_model(3, n, m.params, s.needs_reference, bool(s.lora_r)) if s.offload_param else 0.0
    steady += ref_shards
    if s.zero == 3:
        return {"steady": steady, "load": offloaded + ref_shards}
    whole = 2 * m.params
    with_reference = s.needs_reference and not s.lora_r
    return {"steady": steady, "load": offloaded + whole if with_reference else max(whole, offloaded)}


def init_peak(m: ModelShape, s: JobSetup, resident: float) -> float:
    """GPU bytes while the job's models are created and ``deepspeed.initialize`` runs (``run_unlearning`` up to
    the reference). At ZeRO-3 ``jobs.unlearn.partitioned.load_partitioned`` builds each model under
    ``deepspeed.zero.Init`` without initialising it: every module's parameters are created whole on the GPU and
    at once partitioned, so besides the shards made so far one module is whole at a time (at most the largest,
    2·largest_layer bytes in bf16), and DeepSpeed's ``_configure_distributed_model`` leaves a zero.Init model
    where it is. The trained model: its shards (2(Ψ + T_lora)/N, 0 with ``offload_param``) + that module;
    then its engine (``resident``); then the reference, a second engine built after it: ``resident`` + the
    reference's shards (2Ψ/N, 0 with ``offload_param``) + that module. At ZeRO 0-2 every worker loads each
    model whole and moves it to its GPU: 2·(Ψ + T_lora), and both whole copies are part of the steady peak.
    ``resident``: the trained engine's GPU bytes (states + ZeRO-3 bucket), without the reference."""
    frozen, trainable = _counts(m, s)
    if s.zero != 3:
        return 2 * (frozen + trainable)
    module = 2 * m.largest_layer()
    load = model_states(3, s.gpus, trainable, frozen, s.offload_optimizer, s.offload_param)["weights"] + module
    ref_build = 0.0
    if s.needs_reference and not s.lora_r:
        ref_build = resident + reference_model(3, s.gpus, m.params, True, False, s.offload_param) + module
    return max(load, resident, ref_build)


def estimate(m: ModelShape, s: JobSetup) -> dict[str, Any]:
    """Every part in bytes, the steady training peak, the start-up peak (``init_peak``), and which card sizes
    fit both (``fits``)."""
    frozen, trainable = _counts(m, s)
    lora = bool(s.lora_r)
    states = model_states(s.zero, s.gpus, trainable, frozen, s.offload_optimizer, s.offload_param)
    ref = reference_model(s.zero, s.gpus, m.params, s.needs_reference, lora, s.offload_param)
    buffers = zero_buffers(s.zero, m, trainable, lora, s.reduce_bucket_size)
    acts = activations(m, s)
    logit = logits(m, s)
    step = optimizer_step_temporaries(s.zero, s.gpus, trainable, s.offload_optimizer, s.sub_group_size, s.adamw_temp)
    # the stage-3 bucket lives throughout; the stage 1-2 bucket and stage 3's gathered layer only in fwd/bwd
    persistent_bucket = buffers["reduce_bucket"] if s.zero == 3 else 0.0
    resident = sum(states.values()) + ref + persistent_bucket
    backward = sum(acts.values()) + sum(logit.values()) + sum(buffers.values()) - persistent_bucket
    step_bytes = step_peak(step)
    peak = resident + max(backward, step_bytes)
    start = init_peak(m, s, resident - ref)  # the reference's own shards do not exist yet
    return {
        "setup": {**asdict(s), "lora_targets": list(s.lora_targets)},
        "trainable_params": trainable,
        "bytes": {
            "model_states": states,
            "reference": ref,
            "buffers": buffers,
            "activations": acts,
            "logits": logit,
            "optimizer_step": step,
            "resident": resident,
            "backward_peak": backward,
            "step_peak": step_bytes,
            "peak": peak,
            "init_peak": start,
        },
        "peak_gib": peak / GiB,
        "init_peak_gib": start / GiB,
        "host_gib_per_worker": {k: v / GiB for k, v in host_memory(m, s).items()},
        "fits": {f"{c}GB": fits(max(peak, start), c) for c in CARDS_GB},
        "bound_by": "backward" if backward >= step_bytes else "optimizer step",
    }


# --------------------------------------------------------------------------------------------- DeepSpeed's estimators


def _deepspeed_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("deepspeed")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _function_from_source(path: Path, name: str) -> Callable:
    """One top-level function of a DeepSpeed source file, compiled on its own (no deepspeed import: that
    takes seconds and wants an accelerator). Used for the fast path and the tests; the functions are pure
    arithmetic."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace: dict[str, Any] = {}
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
            return namespace[name]
    raise LookupError(f"{name} not in {path}")


def deepspeed_estimators(mode: str = "import") -> Optional[dict[str, Callable]]:
    """DeepSpeed's number-returning estimators (the ones its ``*_all_cold`` printers call):
    ``estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload,
    additional_buffer_factor) -> (cpu, gpu)`` and ``estimate_zero3_model_states_mem_needs(total_params,
    largest_layer_params, num_gpus_per_node, num_nodes, cpu_offload, cpu_offload_params, zero_init,
    additional_buffer_factor) -> (cpu, gpu, largest_layer_memory)``, plus the printers in ``import`` mode.
    ``mode``: ``import`` (import deepspeed; CPU accelerator if no GPU), ``source`` (compile the two functions
    from the installed source files), ``off``. None if DeepSpeed is not installed."""
    if mode == "off":
        return None
    if mode == "source":
        root = _deepspeed_dir()
        if root is None:
            return None
        return {
            "zero2": _function_from_source(root / "runtime/zero/stage_1_and_2.py",
                                           "estimate_zero2_model_states_mem_needs"),
            "zero3": _function_from_source(root / "runtime/zero/stage3.py", "estimate_zero3_model_states_mem_needs"),
        }
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.runtime.zero import stage3, stage_1_and_2
    except Exception:  # not installed, or no usable accelerator
        return deepspeed_estimators("source")
    return {
        "zero2": stage_1_and_2.estimate_zero2_model_states_mem_needs,
        "zero3": stage3.estimate_zero3_model_states_mem_needs,
        "zero2_all_cold": stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold,
        "zero3_all_cold": stage3.estimate_zero3_model_states_mem_needs_all_cold,
    }


def deepspeed_gpu_bytes(est: dict[str, Callable], zero: int, n: int, params: float, largest_layer: int,
                        offload_optimizer: bool = False, offload_param: bool = False) -> float:
    """DeepSpeed's per-GPU model-state bytes for a full fine-tune on N GPUs (one node; the GPU figure
    depends only on the total)."""
    if zero == 2:
        _, gpu = est["zero2"](total_params=params, num_gpus_per_node=n, num_nodes=1, cpu_offload=offload_optimizer)
    elif zero == 3:
        _, gpu, _ = est["zero3"](total_params=params, largest_layer_params=largest_layer, num_gpus_per_node=n,
                                 num_nodes=1, cpu_offload=offload_optimizer, cpu_offload_params=offload_param,
                                 zero_init=True)
    else:
        raise ValueError("DeepSpeed estimates stages 2 and 3 only")
    return float(gpu)


def ours_comparable(m: ModelShape, zero: int, n: int, offload_optimizer: bool = False, offload_param: bool = False,
                    sub_group_size: float = 1e9) -> dict[str, float]:
    """Our model-state bytes in the terms DeepSpeed's estimator covers (full fine-tune, no reference, no
    activations): ``paper`` = ZeRO-paper states (+ ZeRO-3's gathered layer 4·largest, which DeepSpeed's
    ZeRO-3 figure includes), and ``with_fp32_grad`` = that plus the fp32 gradient partition of the step."""
    states = sum(model_states(zero, n, m.params, 0.0, offload_optimizer, offload_param).values())
    if zero == 3:
        states += zero_buffers(3, m, m.params, False)["gathered_layer"]
    fp32 = optimizer_step_temporaries(zero, n, m.params, offload_optimizer, sub_group_size)["fp32_grad"]
    return {"paper": states, "with_fp32_grad": states + fp32}


def compare_with_deepspeed(m: ModelShape, gpus: list[int], est: dict[str, Callable]) -> list[dict[str, Any]]:
    rows = []
    for zero in (2, 3):
        for off_opt, off_par in ((False, False), (True, False)) + (((True, True),) if zero == 3 else ()):
            for n in gpus:
                ours = ours_comparable(m, zero, n, off_opt, off_par)
                ds = deepspeed_gpu_bytes(est, zero, n, m.params, m.largest_layer(), off_opt, off_par)
                rows.append({"zero": zero, "gpus": n, "offload_optimizer": off_opt, "offload_param": off_par,
                             "ours_paper_gib": ours["paper"] / GiB,
                             "ours_with_fp32_grad_gib": ours["with_fp32_grad"] / GiB,
                             "deepspeed_gib": ds / GiB, "paper_vs_deepspeed": ours["paper"] / ds - 1,
                             "with_fp32_grad_vs_deepspeed": ours["with_fp32_grad"] / ds - 1})
    return rows


# --------------------------------------------------------------------------------------------- output


def _g(x: float) -> str:
    return f"{x / GiB:6.2f}"


def _fits_str(r: dict) -> str:
    ok = [c for c in CARDS_GB if r["fits"][f"{c}GB"]]
    return f">={ok[0]}GB" if ok else "none"


def print_table(rows: list[dict[str, Any]], out=sys.stdout) -> None:
    head = (f"{'ZeRO':>4} {'N':>3} {'ckpt':>4} {'offl':>5} {'lora':>4} | {'weights':>7} {'grads':>6} {'optim':>6} "
            f"{'ref':>6} {'buffers':>7} | {'acts':>6} {'logits':>6} {'step':>6} | {'peak':>6} {'start':>6}  fits")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        s, b = r["setup"], r["bytes"]
        off = ("opt" if s["offload_optimizer"] else "") + ("+par" if s["offload_param"] else "") or "-"
        print(f"{s['zero']:>4} {s['gpus']:>3} {'on' if s['gradient_checkpointing'] else 'off':>4} {off:>5} "
              f"{s['lora_r'] or '-':>4} | {_g(b['model_states']['weights']):>7} {_g(b['model_states']['grads'])} "
              f"{_g(b['model_states']['optimizer'])} {_g(b['reference'])} {_g(sum(b['buffers'].values())):>7} | "
              f"{_g(sum(b['activations'].values()))} {_g(sum(b['logits'].values()))} {_g(b['step_peak'])} | "
              f"{_g(b['peak'])} {_g(b['init_peak'])}  {_fits_str(r)}", file=out)


def _fit_cell(r: dict[str, Any], card: int) -> str:
    """yes if the card holds both the steady and the start-up peak, else no."""
    return "yes" if r["fits"][f"{card}GB"] else "no"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| ZeRO | N | grad ckpt | optimizer offload | LoRA | model states | reference | activations | logits | "
             "ZeRO buffers | step temps | **peak GiB** | start-up peak | 24 GB | 40 GB | 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, b = r["setup"], r["bytes"]
        lines.append(
            f"| {s['zero']} | {s['gpus']} | {'on' if s['gradient_checkpointing'] else 'off'} | "
            f"{'cpu' if s['offload_optimizer'] else '-'} | {('r=' + str(s['lora_r'])) if s['lora_r'] else '-'} | "
            f"{sum(b['model_states'].values()) / GiB:.1f} | {b['reference'] / GiB:.1f} | "
            f"{sum(b['activations'].values()) / GiB:.1f} | {sum(b['logits'].values()) / GiB:.1f} | "
            f"{sum(b['buffers'].values()) / GiB:.1f} | {b['step_peak'] / GiB:.1f} | **{r['peak_gib']:.1f}** | "
            f"{r['init_peak_gib']:.1f} | {_fit_cell(r, 24)} | {_fit_cell(r, 40)} | {_fit_cell(r, 80)} |")
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


GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # scaling.num_workers tried when sizing a job (one GPU each)
GPUS_PER_NODE = 8
# dense bf16 peak FLOP/s and HBM bandwidth (vendor data sheets): A100-SXM 80 GB, H100-SXM 80 GB, H200-SXM 141 GB
ACCELERATORS = {"A100-80GB": {"card": 80, "flops": 312e12, "hbm": 2.0e12},
                "H100-80GB": {"card": 80, "flops": 989e12, "hbm": 3.35e12},
                "H200-141GB": {"card": 140, "flops": 989e12, "hbm": 4.8e12}}
CARDS = {"80 GB A100/H100": {"card": 80, "flops": 989e12}, "141 GB H200": {"card": 140, "flops": 989e12}}
NODE_RAM_GIB = 0.9 * 2e12 / GiB  # 90 % of a 2 TB DGX H100/H200 node (8 GPUs): 1676 GiB for the workers
MFU = 0.3  # assumed model FLOP utilisation (not measured); ZeRO-3 with offload runs lower
OFFLOAD_VARIANTS = {"none": {}, "optimizer": {"offload_optimizer": True},
                    "optimizer+param": {"offload_optimizer": True, "offload_param": True}}


def scale_rows(m: ModelShape, base: JobSetup, gpus: tuple[int, ...] = (8, 16, 32, 64)) -> list[dict[str, Any]]:
    """The ZeRO-3 grid of docs/scaling.md: N GPUs per job x offload (none / optimizer / optimizer+param) x with
    and without a reference model, gradient checkpointing on (off costs 2·L·c·sbh: 85 GiB for 70B)."""
    rows = []
    for n in gpus:
        for variant in OFFLOAD_VARIANTS.values():
            for ref in (True, False):
                rows.append(estimate(m, replace(base, zero=3, gpus=n, gradient_checkpointing=True,
                                                needs_reference=ref, **variant)))
    return rows


def node_host_gib(r: dict[str, Any], gpus_per_node: int = GPUS_PER_NODE) -> dict[str, float]:
    """Host RAM of one node full of such workers (``gpus_per_node`` of them, from one job or several
    concurrent ones): steady (offloaded states) and at start-up (``host_memory``'s ``load``: jobs started
    together load together)."""
    workers = gpus_per_node
    host = r["host_gib_per_worker"]
    return {"workers": workers, "steady": workers * host["steady"], "load": workers * host["load"]}


def scale_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [("| N | offload | reference | model states | reference | activations + logits | ZeRO buffers | "
              "step temps | **peak GiB** | start-up peak | 80 GB | 140 GB | host GiB / worker | "
              "host GiB / node: steady, start-up |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
            f"{r['host_gib_per_worker']['steady']:.0f} | {node['steady']:.0f}, {node['load']:.0f} |")
    return "\n".join(lines)


def smallest_job(m: ModelShape, base: JobSetup, card: int, gpus: tuple[int, ...] = GPU_COUNTS,
                 node_ram_gib: float = NODE_RAM_GIB) -> Optional[dict[str, Any]]:
    """The estimate of the fewest GPUs per job (``scaling.num_workers``) whose steady and start-up peaks fit
    ``card`` and whose node of 8 such workers stays within ``node_ram_gib`` of host RAM (steady and at
    start-up); None if none of ``gpus`` does."""
    for n in gpus:
        r = estimate(m, replace(base, gpus=n))
        node = node_host_gib(r)
        if r["fits"][f"{card}GB"] and max(node["steady"], node["load"]) <= node_ram_gib:
            return r
    return None


def job_seconds(params: float, forget_tokens: float, gpus: int, flops: float, mfu: float = MFU,
                checkpointing: bool = True, reference: bool = True) -> float:
    """Seconds of one NPO job: per forget token (each with an equal retain token) forget fwd+bwd 6Ψ, retain
    fwd+bwd 6Ψ, reference forward 2Ψ, and with checkpointing one more forward of each graph (2 x 2Ψ):
    18Ψ FLOPs (14Ψ without checkpointing, 12Ψ/16Ψ without reference); divided by N · peak · MFU. Attention
    FLOPs (~6·L·s·h per token, 3 % at s = 512 for 7B) and the CPU optimizer step of offload are left out."""
    per_token = 12 * params + (2 * params if reference else 0) + (4 * params if checkpointing else 0)
    return per_token * forget_tokens / (gpus * flops * mfu)


def waves(jobs: int, concurrent: int) -> int:
    """Rounds of unlearning jobs: ceil(jobs / concurrent) (the driver keeps ``job_capacity`` running)."""
    return -(-jobs // concurrent)


def concurrency_rows(models: dict[str, ModelShape], base: JobSetup, clusters: tuple[int, ...] = (8, 64),
                     subsets: tuple[int, ...] = (4, 8, 16), forget_tokens: float = 1e7) -> list[dict[str, Any]]:
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
                rows.append({
                    "model": name, "offload": off_name, "accelerator": acc, "card_gib": spec["card"],
                    "gpus_per_job": n, "peak_gib": r["peak_gib"] if r else None,
                    "init_peak_gib": r["init_peak_gib"] if r else None,
                    "node_host_gib": node_host_gib(r) if r else None,
                    "concurrent_jobs": {g: g // n if n and n <= g else 0 for g in clusters},
                    "waves": {g: {k: waves(k, g // n) if n and n <= g else None for k in subsets} for g in clusters},
                    "job_seconds": job_seconds(m.params, forget_tokens, n, spec["flops"]) if n else None,
                    "forget_tokens": forget_tokens})
    return rows


def concurrency_markdown(rows: list[dict[str, Any]]) -> str:
    gs = list(rows[0]["concurrent_jobs"])
    ks = list(rows[0]["waves"][gs[0]])
    head = ("| model | offload | card | N per job | peak, start-up GiB | host GiB/node: steady, start-up | "
            + " | ".join(f"G={g}: jobs at once; waves k={','.join(map(str, ks))}" for g in gs)
            + f" | one job, h per {rows[0]['forget_tokens']:.0e} forget tokens |")
    lines = [head, "|" + "---|" * (7 + len(gs))]
    for r in rows:
        if r["gpus_per_job"] is None:
            cells = ["none fits", "-", "-"] + ["-"] * len(gs) + ["-"]
        else:
            per_g = [f"{r['concurrent_jobs'][g]}; " + ",".join(str(w or "-") for w in r["waves"][g].values())
                     if r["concurrent_jobs"][g] else "0; -" for g in gs]
            cells = [str(r["gpus_per_job"]), f"{r['peak_gib']:.0f}, {r['init_peak_gib']:.0f}",
                     f"{r['node_host_gib']['steady']:.0f}, {r['node_host_gib']['load']:.0f}"]
            cells += per_g + [f"{r['job_seconds'] / 3600:.2f}"]
        lines.append(f"| {r['model']} | {r['offload']} | {r['accelerator']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    return {"dtype": dtype, "k": k, "checkpoint_gb": ckpt / 1e9, "read_gb": read / 1e9, "written_gb": written / 1e9,
            "seconds": {f"{bw / 1e9:g}GB/s": (read + written) / bw for bw in bandwidths},
            "mergekit_ram_gb": (working + 2 * OUT_SHARD_BYTES) / 1e9, "largest_tensor_gb": b * m.largest_layer() / 1e9}


def merge_markdown(models: dict[str, ModelShape], ks: tuple[int, ...] = (4, 8, 16)) -> tuple[str, list[dict]]:
    rows, lines = [], [("| model | dtype | k | one checkpoint GB | read GB | written GB | minutes at 1 GB/s | "
                        "minutes at 5 GB/s | mergekit RAM GB (approx.) |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for dtype in DTYPE_BYTES:
            for k in ks:
                r = {"model": name, **merge_io(m, dtype, k)}
                rows.append(r)
                lines.append(f"| {name} | {dtype} | {k} | {r['checkpoint_gb']:.1f} | {r['read_gb']:.0f} | "
                             f"{r['written_gb']:.1f} | {r['seconds']['1GB/s'] / 60:.1f} | "
                             f"{r['seconds']['5GB/s'] / 60:.1f} | {r['mergekit_ram_gb']:.0f} |")
    return "\n".join(lines), rows


def eval_models(k: int, unsplit: bool = True, oracle: bool = True) -> int:
    """Models ``orchestrator.evaluate.models_to_score`` scores: base, the oracle (``eval.oracle``), every job's
    model (k subsets + unsplit with ``split.baseline: unsplit``), the merged model."""
    return 1 + int(oracle) + k + int(unsplit) + 1


def eval_rows(models: dict[str, ModelShape], k: int = 8, suites: int = 1, gpus_per_task: float = 1,
              cluster_gpus: tuple[int, ...] = (8, 64), eval_tokens: float = 1e6, answers: int = 1000,
              batch: int = 16, new_tokens: int = 32, seq: int = 512) -> list[dict[str, Any]]:
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
            rows.append({"model": name, "accelerator": acc, "tasks": tasks, "batch": batch,
                         "gpu_gib": {"weights": weights / GiB, "logits": logit / GiB, "kv_cache": kv / GiB,
                                     "total": gpu / GiB},
                         "fits": fits_card, "fits_raw": gpu / GiB + 1 <= spec["card"], "concurrent": conc,
                         "waves": {g: waves(tasks, c) if c else None for g, c in conc.items()},
                         "score_seconds": 2 * m.params * eval_tokens / (spec["flops"] * MFU),
                         "generate_seconds": -(-answers // batch) * new_tokens * weights / spec["hbm"],
                         "eval_tokens": eval_tokens, "answers": answers, "new_tokens": new_tokens})
    return rows


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def eval_markdown(rows: list[dict[str, Any]]) -> str:
    gs = list(rows[0]["concurrent"])
    lines = ["| model | GPU | task GPU GiB: weights + logits + KV = total | fits (rule; raw + 1 GiB) | tasks | "
             + " | ".join(f"G={g}: at once; waves" for g in gs)
             + f" | scoring s per {rows[0]['eval_tokens']:.0e} tokens | generation s per {rows[0]['answers']} answers |",
             "|" + "---|" * (7 + len(gs))]
    for r in rows:
        g = r["gpu_gib"]
        per_g = [f"{r['concurrent'][c]}; {r['waves'][c]}" if r["concurrent"][c] else "-" for c in gs]
        lines.append(f"| {r['model']} | {r['accelerator']} | {g['weights']:.1f} + {g['logits']:.1f} + "
                     f"{g['kv_cache']:.1f} = {g['total']:.1f} | {_yes(r['fits'])}; {_yes(r['fits_raw'])} | {r['tasks']} | "
                     + " | ".join(per_g) + f" | {r['score_seconds']:.0f} | {r['generate_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    j = JobSetup()
    ap.add_argument("--model", choices=sorted(PRESETS), default="llama2-7b",
                    help="model shape preset; the flags below override its fields")
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
    ap.add_argument("--act-coeff", type=float, default=j.act_coeff,
                    help="per-layer activation constant (34; ~43 for HF Llama)")
    ap.add_argument("--reduce-bucket-size", type=float, default=j.reduce_bucket_size,
                    help="DeepSpeed reduce_bucket_size")
    ap.add_argument("--sub-group-size", type=float, default=j.sub_group_size, help="DeepSpeed ZeRO-3 sub_group_size")
    ap.add_argument("--deepspeed", choices=["import", "source", "off"], default="import",
                    help="cross-check with DeepSpeed's estimators: import deepspeed, read its source, or skip")
    ap.add_argument("--markdown", action="store_true", help="also print the docs/scaling.md ZeRO-2/3 N = 4, 8 table")
    ap.add_argument("--markdown-scale", action="store_true",
                    help="also print the ZeRO-3 N = 8, 16, 32, 64 x offload x reference table of --model")
    ap.add_argument("--markdown-cluster", action="store_true",
                    help="also print the cluster tables (jobs at once, merge I/O, eval fan-out) for both presets")
    ap.add_argument("--subsets", type=int, default=8, help="k, forget subsets (eval fan-out table)")
    ap.add_argument("--suites", type=int, default=1, help="len(eval.suites) (eval fan-out table)")
    ap.add_argument("--eval-batch", type=int, default=16, help="eval.batch_size (eval fan-out table)")
    ap.add_argument("--json", type=Path, metavar="OUT",
                    help="write every row as JSON (e.g. benchmarks/results/memory_estimate.json)")
    args = ap.parse_args(argv)

    overrides = {f: getattr(args, f) for f in ("params", "layers", "hidden", "heads", "kv_heads", "vocab",
                                                "intermediate") if getattr(args, f) is not None}
    m = replace(PRESETS[args.model], **overrides)
    base = JobSetup(micro_batch=args.micro_batch, seq=args.seq, offload_optimizer=args.offload_optimizer,
                    offload_param=args.offload_param, attn=args.attn, lora_r=args.lora_r,
                    needs_reference=not args.no_reference, act_coeff=args.act_coeff,
                    reduce_bucket_size=args.reduce_bucket_size, sub_group_size=args.sub_group_size)
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.gradient_checkpointing]
    rows = [estimate(m, replace(base, zero=z, gpus=n, gradient_checkpointing=c))
            for z in args.zero for c in ckpts for n in args.gpus
            if not (args.offload_param and z != 3)]
    print(f"Per-GPU memory (GiB) of one {'NPO' if base.needs_reference else 'reference-free'} unlearning job: "
          f"Ψ = {m.params / 1e9:.2f}e9, {m.layers} layers, h {m.hidden}, {m.heads} heads "
          f"({m.kv_heads or m.heads} K/V), V {m.vocab}, "
          f"seq {base.seq}, micro batch {base.micro_batch}, attn {base.attn}, bf16"
          + (f", LoRA r={base.lora_r} ({_counts(m, base)[1] / 1e6:.1f}M trainable)" if base.lora_r else ""))
    print("computed estimates, not measurements; "
          "peak = weights + grads + optim + ref + max(buffers + acts + logits, step); "
          "start = the start-up peak (ZeRO-3: shards + one module built whole; ZeRO 0-2: the whole model; "
          "see init_peak); fits uses both"
          "\n(ZeRO-3's reduce bucket, 0.93 GiB of 'buffers', is resident and also in the step phase)\n")
    print_table(rows)

    out: dict[str, Any] = {"note": "computed estimates, not measurements (no GPU)", "command": sys.argv[1:] if argv is None
                           else argv, "loadavg_1min": os.getloadavg()[0], "model": asdict(m), "rows": rows}
    est = deepspeed_estimators(args.deepspeed)
    if est is not None and not base.lora_r:
        ds_gpus = [n for n in args.gpus]
        cmp_rows = compare_with_deepspeed(m, ds_gpus, est)
        out["deepspeed_comparison"] = cmp_rows
        print("\nModel states vs DeepSpeed's estimator "
              "(full fine-tune, per GPU, GiB; ZeRO-3 includes 4 x largest layer):")
        print(f"{'ZeRO':>4} {'offload':>9} {'N':>3} | {'paper':>7} {'+fp32 grad':>10} | {'DeepSpeed':>9} | "
              f"{'paper/DS-1':>10} {'+fp32/DS-1':>10}")
        for c in cmp_rows:
            off = ("opt" if c["offload_optimizer"] else "none") + ("+param" if c["offload_param"] else "")
            print(f"{c['zero']:>4} {off:>9} {c['gpus']:>3} | {c['ours_paper_gib']:7.2f} "
                  f"{c['ours_with_fp32_grad_gib']:10.2f} | {c['deepspeed_gib']:9.2f} | "
                  f"{c['paper_vs_deepspeed']:+10.1%} {c['with_fp32_grad_vs_deepspeed']:+10.1%}")
        if "zero2_all_cold" in est:
            print("\nDeepSpeed's own printout (estimate_zero{2,3}_model_states_mem_needs_all_cold; its 'GB' is GiB):")
            for n in ds_gpus:
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    est["zero2_all_cold"](total_params=m.params, num_gpus_per_node=n, num_nodes=1)
                    est["zero3_all_cold"](total_params=m.params, largest_layer_params=m.largest_layer(),
                                          num_gpus_per_node=n, num_nodes=1)
                print(buf.getvalue().replace("OffloadDeviceEnum.cpu", "cpu"), end="")

    if args.markdown:
        drows = doc_rows(m, replace(base, offload_optimizer=False, offload_param=False, lora_r=0))
        out["doc_rows"] = drows
        print("\n" + markdown_table(drows))
    if args.markdown_scale:
        srows = scale_rows(m, replace(base, offload_optimizer=False, offload_param=False, lora_r=0))
        out["scale_rows"] = srows
        print(f"\nZeRO-3, gradient checkpointing on, seq {base.seq}, micro batch {base.micro_batch}:\n"
              + scale_markdown(srows))
    if args.markdown_cluster:
        cbase = replace(base, offload_optimizer=False, offload_param=False, lora_r=0)
        crows = concurrency_rows(PRESETS, cbase)
        mtext, mrows = merge_markdown(PRESETS)
        erows = eval_rows(PRESETS, k=args.subsets, suites=args.suites, batch=args.eval_batch, seq=base.seq)
        out["cluster"] = {"concurrency": crows, "merge_io": mrows, "eval": erows, "mfu": MFU,
                          "accelerators": ACCELERATORS}
        print(f"\nJobs at once (ZeRO-3, checkpointing, NPO with reference; MFU {MFU}):\n" + concurrency_markdown(crows))
        print("\nMerge I/O (k subset checkpoints + base read, merged written):\n" + mtext)
        print(f"\nEvaluation fan-out (k = {args.subsets}, {args.suites} suite(s), eval.gpus_per_task 1, "
              f"eval.batch_size {args.eval_batch}, MFU {MFU}):\n" + eval_markdown(erows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
