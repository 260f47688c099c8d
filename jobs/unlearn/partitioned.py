"""Models created partitioned over a job's ZeRO-3 ranks, so that no rank ever holds a whole copy.

``load_partitioned`` builds the model under ``deepspeed.zero.Init`` (each module's parameters are split over
the ranks as it is constructed, without initialising them) and then fills every rank's partition straight from
the checkpoint: rank r reads elements ``[r P, (r+1) P)`` of each flattened tensor (the slice ZeRO-3 gives it)
from the safetensors files at their byte offsets. No rank reads more than its slice, none gathers a layer and
none waits on another: with N ranks each reads 1/N of the checkpoint, in parallel.

Where the checkpoint does not hold the model's parameters under their own names and shapes (transformers
renames or converts some architectures' weights on loading), where it is not safetensors, or where DeepSpeed
keeps partitions it cannot be handed this way (NVMe offload, ZeRO++'s quantised or hierarchical partitions),
it loads the way transformers' Trainer and OpenRLHF do: ``from_pretrained`` inside ``zero3_init`` (transformers'
``HfDeepSpeedConfig``), where rank 0 reads the checkpoint and each layer is gathered on every rank to receive it.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from jobs.models import DTYPES, is_adapter_dir, load_model
from jobs.shards import Checkpoint, weight_files

FLOATING = {"F32", "F16", "BF16"}


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


@contextmanager
def zero3_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under a ZeRO-3 config, every model transformers loads inside the block is partitioned as it is built
    (transformers' ``HfDeepSpeedConfig``). The config is global to transformers, so it lives only for the block:
    a load outside it (rank 0 alone, at save time) builds a whole model and joins no collective that the other
    ranks would never join."""
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def hidden_size(path: str) -> Optional[int]:
    """The model's width (``hidden_size``, or the largest of ``hidden_sizes``) from its config, None where the
    config has neither or cannot be read (DeepSpeed's own bucket sizes then apply)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "hidden_size", None) or max(getattr(config, "hidden_sizes", None) or [0]) or None
    return int(size) if size else None


def slice_reason(
    path: str, ds_config: dict[str, Any], model_cls: Any = None, expected: Optional[dict[str, tuple[int, ...]]] = None
) -> Optional[str]:
    """Why ``load_partitioned`` cannot fill the partitions from ``path``'s files itself (None: it can)."""
    zero = ds_config.get("zero_optimization") or {}
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "parameters offloaded to NVMe"
    if zero.get("zero_quantized_nontrainable_weights") or int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        return "ZeRO++ quantised or hierarchical partitions"
    folder = Path(path)
    if not folder.is_dir() or is_adapter_dir(folder) or not weight_files(folder):
        return "not a folder of safetensors weights"
    if model_cls is not None and (
        getattr(model_cls, "_keep_in_fp32_modules", None) or getattr(model_cls, "_keep_in_fp32_modules_strict", None)
    ):
        return "the model keeps some modules in float32"
    if expected is not None:
        ckpt = Checkpoint(str(folder))
        for name, shape in expected.items():
            if ckpt.shapes.get(name) != shape or ckpt.dtypes.get(name) not in FLOATING:
                return f"the checkpoint does not hold {name} as the model has it"
    return None


def _skeleton(config: Any, dtype: str) -> dict[str, tuple[int, ...]]:
    """The model's own parameter and persistent-buffer names and shapes, from a copy on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()
    persistent = set(model.state_dict())
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in persistent})
    return out


def load_partitioned(
    path: str,
    dtype: str,
    ds_config: dict[str, Any],
    allow_pickle: bool = False,
    attn_implementation: Optional[str] = None,
):
    """The model at ``path`` created partitioned over the ZeRO-3 ranks of ``ds_config`` (see the module
    docstring); every rank calls it."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    try:  # keeps zero.Init from casting float aranges (RoPE buffers); older transformers (5.17) lack it
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        prevent_arange_dtype_change = contextlib.nullcontext

    reason = slice_reason(path, ds_config)
    config = None
    if reason is None:
        config = AutoConfig.from_pretrained(path)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
        reason = (
            "not a causal LM class transformers knows"
            if model_cls is None
            else slice_reason(path, ds_config, model_cls, _skeleton(config, dtype))
        )
    if reason is not None:
        with zero3_init(ds_config):
            return load_model(path, dtype, allow_pickle, attn_implementation)
    # entered before zero.Init, which wraps torch.arange as it is entered (transformers orders them so too)
    with prevent_arange_dtype_change(), no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()
    ckpt = Checkpoint(path)
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = p.ds_tensor
            size = part.ds_numel
            start = size * dist.get_rank(group=p.ds_process_group)
            filled = max(0, min(start + size, p.ds_numel) - start)
            if filled:
                part.narrow(0, 0, filled).copy_(ckpt.read_range(name, start, start + filled))
            if filled < size:  # ZeRO-3 pads the last ranks' partitions
                part.narrow(0, filled, size - filled).zero_()
        for name, buf in model.named_buffers():
            if name in persistent:  # not partitioned: every rank holds the whole buffer
                buf.copy_(ckpt.tensor(name).to(buf.dtype))
    if (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


@contextmanager
def counted_forward(module: torch.nn.Module) -> Iterator[None]:
    """A forward of ``module`` (a ZeRO-3 model) that adds to DeepSpeed's backward bookkeeping instead of resetting
    it. DeepSpeed (0.19) releases a layer's gathered parameters in backward once ``ds_grads_remaining``, the
    number of its inputs that need a gradient, counts down to 0, and it sets that number to 0 at every forward
    of the layer. A second forward before the backward (a no-grad reference pass through the same layers, a
    metric, a second loss term) therefore leaves it at 0 or 1 where the backward will count 1 or 2 down: it
    goes negative, the layer is never released, and by the end of the backward every rank holds the whole
    model gathered (DeepSpeed's PR #6726 describes the DPO case). Here the counts of the earlier forwards are
    added back; a no-grad forward also leaves the pre-backward counts as they were (it builds no graph)."""
    grad = torch.is_grad_enabled()
    before = {
        m: (m.__dict__.get("ds_grads_remaining", 0), m.__dict__.get("applied_pre_backward_ref_cnt", 0))
        for m in module.modules()
    }
    try:
        yield
    finally:
        for m in module.modules():
            remaining, pre = before.get(m, (0, 0))
            if "ds_grads_remaining" in m.__dict__:
                m.ds_grads_remaining += remaining
            if not grad and "applied_pre_backward_ref_cnt" in m.__dict__:
                m.applied_pre_backward_ref_cnt = pre


def reset_backward_counts(module: torch.nn.Module) -> None:
    """Zero DeepSpeed's per-layer backward counts, as its own first forward of a step would: a layer whose output
    never reached a loss keeps a count that ``counted_forward`` would otherwise carry into the next step."""
    for m in module.modules():
        if "ds_grads_remaining" in m.__dict__:
            m.ds_grads_remaining = 0


def count_every_forward(engine) -> None:
    """Route every forward of a ZeRO-3 ``engine`` through ``counted_forward`` (the methods call the engine
    several times a step: forget and retain terms, metrics)."""
    forward = engine.forward

    def counted(*args, **kwargs):
        with counted_forward(engine.module):
            return forward(*args, **kwargs)

    engine.forward = counted
