"""How the loop's models come to be: the trained model and every frozen model a method asks for (the reference
of NPO, KL, DPO, WHP; WHP's reinforced model), created partitioned under ZeRO-3 so that no rank ever holds a
whole copy; LoRA adapters on the trained model; and how a LoRA job's adapter is gathered and saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jobs.models import adapter_base, is_adapter_dir, load_model
from jobs.spec import UnlearnSpec
from jobs.unlearn.partitioned import counted_forward, load_partitioned, zero3_init, zero_stage


def load_for_job(path: str, spec: UnlearnSpec, ds_config: dict[str, Any]):
    """A model of the job's dtype: created partitioned under ZeRO-3 (``jobs.unlearn.partitioned``), else whole."""
    if zero_stage(ds_config) == 3:
        return load_partitioned(path, spec.dtype, ds_config, spec.allow_pickle, spec.attn_implementation)
    return load_model(path, spec.dtype, spec.allow_pickle, spec.attn_implementation)


def load_trained(spec: UnlearnSpec, ds_config: dict[str, Any]):
    """The model the job trains."""
    return load_for_job(spec.model_path, spec, ds_config)


def parameter_count(model) -> int:
    """Parameters of a model, partitioned (ZeRO-3's ``ds_numel``: a shard's ``numel()`` is 0) or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def add_lora(model, spec: UnlearnSpec):
    """The model with peft LoRA adapters on ``spec.lora.target_modules``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lo = spec.lora
    config = LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=spec.model_path,
    )
    return get_peft_model(model, config)


class AdapterDisabled:
    """The reference model of a LoRA job: the trained model with its adapter switched off (the frozen base
    weights, no second copy), called without gradients. Attributes pass through to the peft model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter(), torch.no_grad(), counted_forward(self.peft_model):
            return self.peft_model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.peft_model, name)


def reference_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config of the frozen reference model under ZeRO-3: the training config without
    optimizer, scheduler or optimizer offload (parameters sharded, and offloaded if the training's are)."""
    cfg = json.loads(json.dumps(ds_config))
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    cfg["zero_optimization"].pop("offload_optimizer", None)
    return cfg


def frozen_model(path: str, engine, spec: UnlearnSpec, ds_config: dict[str, Any]):
    """A frozen model of the job's dtype beside the trained one. Under ZeRO-3: created partitioned
    (``load_for_job``) and wrapped in a DeepSpeed engine without optimizer, which gathers each layer for its
    forward, so that its weights are sharded over the workers like the trained model's (as open-unlearning
    does); an adapter folder stays an unmerged peft model there (merging writes into weights a rank holds only
    a shard of). Else a whole copy on the engine's device."""
    zero3 = engine.zero_optimization_stage() == 3
    if zero3 and is_adapter_dir(path):
        from peft import PeftModel

        base = load_for_job(adapter_base(path), spec, ds_config)
        with zero3_init(ds_config):  # peft gathers what it must of a partitioned base
            model = PeftModel.from_pretrained(base, str(path))
    else:
        model = load_for_job(path, spec, ds_config)
    model.eval().requires_grad_(False)
    if not zero3:
        return model.to(engine.device)
    import deepspeed

    frozen = deepspeed.initialize(model=model, config=reference_config(ds_config))[0]
    frozen.eval()
    return frozen


def reference_model(engine, spec: UnlearnSpec, ds_config: dict[str, Any]):
    """The frozen reference model a method asks for (NPO, KL, DPO, WHP): with LoRA the trained model with its
    adapter disabled (no second copy); else the base model as a ``frozen_model``."""
    if spec.lora is not None:
        return AdapterDisabled(engine.module)
    return frozen_model(spec.model_path, engine, spec, ds_config)


def adapter_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters by name, gathered from their ZeRO-3 shards on every rank."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def save_adapter(peft_model, tokenizer, out: Path, state_dict: dict) -> None:
    """The peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
