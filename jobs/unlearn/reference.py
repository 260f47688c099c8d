"""What the loop trains against besides the data: LoRA adapters on the trained model and the frozen
reference model a method asks for (NPO, KL, DPO, WHP), sharded, disabled-adapter or copied as the job's
set-up allows; and how a LoRA job's adapter is gathered and saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from jobs.models import load_model
from jobs.spec import UnlearnSpec


def add_lora(model, spec: UnlearnSpec):
    """The model with peft LoRA adapters on ``spec.lora.target_modules``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lo = spec.lora
    config = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                        task_type="CAUSAL_LM", base_model_name_or_path=spec.model_path)
    return get_peft_model(model, config)


class AdapterDisabled:
    """The reference model of a LoRA job: the trained model with its adapter switched off (the frozen base
    weights, no second copy), called without gradients. Attributes pass through to the peft model."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter(), torch.no_grad():
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


def reference_model(engine, spec: UnlearnSpec, ds_config: dict[str, Any]):
    """The frozen reference model a method asks for (NPO, KL, DPO, WHP): with LoRA the trained model with
    its adapter disabled; under ZeRO-3 a second DeepSpeed engine without optimizer, so that its weights are
    sharded over the workers like the trained model's (as open-unlearning does); else a full copy on the
    engine's device."""
    if spec.lora is not None:
        return AdapterDisabled(engine.module)
    ref = load_model(spec.model_path, spec.dtype, spec.allow_pickle, spec.attn_implementation).eval()
    ref.requires_grad_(False)
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        ref_engine = deepspeed.initialize(model=ref, config=reference_config(ds_config))[0]
        ref_engine.eval()
        return ref_engine
    return ref.to(engine.device)


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
