"""DeepSpeed set-up for the unlearning loop: the engine's config from the job spec, the loop's own optimizer
(torch's, or DeepSpeed's CPU Adam under ZeRO-Offload) and schedule, who clips the gradients, and the grad norm
of a step."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import warnings
from typing import Any, Optional

import torch

from jobs.spec import OptimizerSpec, UnlearnSpec

OFFLOAD_DEVICES = ("cpu", "nvme")  # where DeepSpeed's engine asks for its own CPU optimizer
FORCE_DS_CPU_OPTIMIZER = "zero_force_ds_cpu_optimizer"


def _offload_device(cfg: dict[str, Any]) -> str:
    return str(((cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")).lower()


def deepspeed_config(spec: UnlearnSpec, world_size: int, hidden_size: Optional[int] = None) -> dict[str, Any]:
    """The user's DeepSpeed config with the batch fields filled in from the spec, and at ZeRO-3 with a
    ``hidden_size`` h its sizes from the model's width, where the user left them out or "auto": the buckets as
    transformers' Trainer fills "auto" (DeepSpeed's fixed 5e8-element reduce bucket is sized for billions of
    parameters; as an fp32 buffer with its copies it outweighs a small model several times), and the
    parameters a rank keeps gathered between uses (``stage3_max_live_parameters``, ``stage3_max_reuse_distance``)
    at about two decoder layers' worth, 24 h^2, at most DeepSpeed's 1e9: below 1e9 parameters DeepSpeed's
    default keeps the whole model gathered through a step on every rank."""
    cfg = json.loads(json.dumps(spec.deepspeed))  # deep copy
    micro, accum = spec.batch_size, spec.gradient_accumulation_steps
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accum),
        ("train_batch_size", micro * accum * world_size),
    ):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    cfg.setdefault("gradient_clipping", 1.0)
    cfg.setdefault("zero_optimization", {"stage": 0})
    cfg.setdefault("steps_per_print", 10**9)
    zero = cfg["zero_optimization"]
    if hidden_size and int(zero.get("stage", 0)) == 3:
        for key, value in (
            ("reduce_bucket_size", hidden_size * hidden_size),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
            ("stage3_param_persistence_threshold", 10 * hidden_size),
            ("stage3_max_live_parameters", min(10**9, 24 * hidden_size * hidden_size)),
            ("stage3_max_reuse_distance", min(10**9, 24 * hidden_size * hidden_size)),
        ):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    if _offload_device(cfg) in OFFLOAD_DEVICES and "optimizer" not in cfg:
        # DeepSpeed refuses any client optimizer but its own CPU Adam under ZeRO-Offload without this key;
        # make_optimizer drops it again when it hands DeepSpeed that CPU Adam
        cfg.setdefault(FORCE_DS_CPU_OPTIMIZER, False)
    if spec.dtype == "bfloat16":
        cfg.setdefault("bf16", {"enabled": True})
    elif spec.dtype == "float16":
        cfg.setdefault("fp16", {"enabled": True})
    return cfg


class CPUAdamFallbackWarning(RuntimeWarning):
    """DeepSpeed's cpu_adam op could not be built or loaded: the offloaded Adam step runs in torch's fused AdamW."""


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config keeps the optimizer states and their step on the host: ZeRO stage 1-3 with
    ``zero_optimization.offload_optimizer.device`` cpu or nvme (at stage 0 there is nothing to offload and the
    optimizer steps the weights where they are)."""
    stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
    return stage > 0 and _offload_device(cfg) in OFFLOAD_DEVICES


@functools.cache
def cpu_adam_unavailable() -> Optional[str]:
    """None once DeepSpeed's ``cpu_adam`` op is loaded in this process (compiled on first use into the torch
    extensions folder, ~/.cache/torch_extensions, that every process of the user on this machine then loads),
    else why it is not; a failure is warned about once per process."""
    import_deepspeed()
    import cpuinfo

    # the builder's compiler flags and the optimizer each ask py-cpuinfo, which starts a Python subprocess
    # per call; the CPU does not change within a process
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
    from deepspeed.ops.op_builder import CPUAdamBuilder

    try:
        CPUAdamBuilder().load()
    except Exception as e:  # no compiler, no ninja, a build or load error: the torch optimizer still trains
        why = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"DeepSpeed's cpu_adam op is unavailable ({why}); the offloaded Adam step runs in torch's fused CPU "
            "kernel instead (the same update at the step time docs/benchmarks.md 'ZeRO-Offload's CPU Adam' "
            "measures for it). Building the op needs g++ and ninja.",
            CPUAdamFallbackWarning,
            stacklevel=3,
        )
        return why
    return None


def make_optimizer(params, opt: OptimizerSpec, ds_config: Optional[dict[str, Any]] = None) -> torch.optim.Optimizer:
    """The loop's optimizer (``deepspeed.initialize``'s client optimizer, which the loop's schedule drives).

    With a DeepSpeed config (``deepspeed_config``'s) that offloads the optimizer (``offloads_optimizer``), Adam
    and AdamW are DeepSpeed's ``DeepSpeedCPUAdam`` (a vectorised C++ step over the offloaded fp32 states) and
    ``zero_force_ds_cpu_optimizer`` leaves ``ds_config``, which is updated in place. Where its op cannot be
    built they are torch's with ``fused=True`` (one ``CPUAdamFallbackWarning`` per process), and the key stays,
    as it does for SGD."""
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay)
    offloaded = ds_config is not None and offloads_optimizer(ds_config)
    if offloaded and not cpu_adam_unavailable():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if ds_config.get(FORCE_DS_CPU_OPTIMIZER) is False:
            del ds_config[FORCE_DS_CPU_OPTIMIZER]
        return DeepSpeedCPUAdam(
            params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, adamw_mode=opt.name == "adamw"
        )
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    # offloaded states step on the CPU, where torch's default is a loop over tensors of several passes each
    fused = {"fused": True} if offloaded else {}
    return cls(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, **fused)


def make_schedule(optimizer: torch.optim.Optimizer, opt: OptimizerSpec, total_steps: int):
    def factor(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "linear":
            left = total_steps - opt.warmup_steps
            return max(0.0, 1.0 - (step - opt.warmup_steps) / max(1, left))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loop_clips(cfg: dict[str, Any]) -> bool:
    """Whether the loop clips the gradients itself rather than DeepSpeed: plain ZeRO stage 0 without mixed
    precision. There DeepSpeed's clipping loops over every parameter in Python and all-reduces a norm it
    then discards; ``torch.nn.utils.clip_grad_norm_`` applies the same formula (scale by
    ``max_norm / (norm + 1e-6)`` when that is below 1) to the same gradients (averaged over ranks in
    ``backward``) and returns the norm, so the grad norm of the row costs nothing more. ZeRO stages and
    DeepSpeed's fp16/bf16 optimizers clip (and keep the norm) themselves."""
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    mixed = any((cfg.get(k) or {}).get("enabled") for k in ("fp16", "bf16", "bfloat16", "amp", "torch_autocast"))
    return stage == 0 and not mixed


def step_grad_norm(engine, clip: Optional[float]) -> torch.Tensor:
    """Global gradient norm before clipping, as a device tensor (no host sync), at the accumulation
    boundary (stage 0: the gradients are averaged over ranks by then). With ``clip`` > 0 the gradients
    are clipped to it as well."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=engine.device)
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip).float()
    return torch.nn.utils.get_total_norm([p.grad for p in params]).float()


def import_deepspeed():
    """``import deepspeed`` for a training worker: its accelerator (CUDA where there is a GPU, else CPU), without
    the ``mlflow`` import of its autotuner, and without the shared-memory op below. DeepSpeed's autotuner (which
    spunge never runs) tries ``import mlflow`` and goes on without it when that fails; mlflow and what it pulls
    in (scipy, fastapi, ...) were most of what ``import deepspeed`` cost each worker (docs/benchmarks.md "Time to
    first step"). Only this import sees mlflow as missing: the process can import it after."""
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None  # makes ``import mlflow`` raise ImportError
        try:
            importlib.import_module("deepspeed")
        finally:
            if hide and sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    skip_shm_comm_op()
    return sys.modules["deepspeed"]


def skip_shm_comm_op() -> None:
    """DeepSpeed's communication backend compiles (on first use; after that a ninja check and a probe of every
    op's compiler support in each worker: docs/benchmarks.md "Fan-out" has the cost) a shared-memory C++
    all-reduce on CPU machines that only its ``inference_all_reduce`` calls (tensor-parallel inference);
    training's collectives are the process group's. It is not built: nothing here runs DeepSpeed inference."""
    # importlib: ``import deepspeed.comm.torch as m`` binds deepspeed.comm's attribute ``torch``, which is torch
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_grad_norm(engine) -> Any:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else norm
