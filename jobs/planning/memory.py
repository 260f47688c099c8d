"""Per-GPU and host memory of one spunge unlearning job under DeepSpeed ZeRO 0-3, from formulas (no GPU).

For one Ray Train worker (one GPU) of one job, the bytes of

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
tables (``benchmarks/memory_estimate.py`` prints them). Standard library only. Sizes are bytes; GiB = 2**30.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

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
    "llama2-70b": ModelShape(
        params=68.98e9, layers=80, hidden=8192, heads=64, vocab=32000, intermediate=28672, kv_heads=8
    ),
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
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return m.layers * sum(r * sum(shapes[t]) for t in targets)


def param_counts(m: ModelShape, s: JobSetup) -> tuple[float, float]:
    """(frozen, trainable) parameter counts: full fine-tuning trains Ψ; LoRA trains the adapters only."""
    if s.lora_r:
        return m.params, float(lora_param_count(m, s.lora_r, s.lora_targets))
    return 0.0, m.params


# --------------------------------------------------------------------------------------------- model states


def model_states(
    zero: int,
    n: int,
    trainable: float,
    frozen: float = 0.0,
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> dict[str, float]:
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


def reference_model(
    zero: int, n: int, params: float, needs_reference: bool = True, lora: bool = False, offload_param: bool = False
) -> float:
    """GPU bytes of the frozen reference model: a bf16 copy, 2Ψ at ZeRO 0-2 (each worker holds it whole),
    2Ψ/N at ZeRO-3 (initialised as a DeepSpeed engine without optimizer, so sharded like the model; with
    ``offload_param`` its shards stay in host memory too). LoRA: 0 (the base model with the adapter
    disabled is the reference)."""
    if not needs_reference or lora:
        return 0.0
    if zero == 3:
        return 0.0 if offload_param else 2 * params / n
    return 2 * params


def zero_buffers(
    zero: int, m: ModelShape, trainable: float, lora: bool, reduce_bucket_size: float = 5e8
) -> dict[str, float]:
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


def optimizer_step_temporaries(
    zero: int,
    n: int,
    trainable: float,
    offload_optimizer: bool = False,
    sub_group_size: float = 1e9,
    adamw_temp: bool = True,
) -> dict[str, float]:
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


def layer_activations(
    seq: int,
    batch: int,
    hidden: int,
    heads: int,
    attn: str = "sdpa",
    coeff: float = 34.0,
    kv_heads: Optional[int] = None,
) -> float:
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
    frozen, trainable = param_counts(m, s)
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
    frozen, trainable = param_counts(m, s)
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
    frozen, trainable = param_counts(m, s)
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
