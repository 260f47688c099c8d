"""Parameter attribution for localized unlearning: the spec, the scope rules and the scoring methods."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from jobs.registry import Registry
from jobs.unlearn.methods.base import mean_nll

Scores = dict[str, torch.Tensor]
Mask = dict[str, torch.Tensor]
Batch = Mapping[str, Any]
Attribution = Callable[[nn.Module, Sequence[Batch], Sequence[Batch], "LocalizeSpec"], Scores]

ATTRIBUTIONS: Registry[Attribution] = Registry("attribution")

MLP_PATTERNS = (".mlp.",)
ATTENTION_PATTERNS = (".self_attn.", ".attn.", ".attention.", ".self_attention.")
_EMBEDDING_NAME = re.compile(r"(^|\.)(lm_head|embed_\w+|wte|wpe)(\.|$)")


class LocalizeSpec(BaseModel):
    """``unlearn.localize``: which attribution, how much of the scope to train, where, which seed."""

    model_config = ConfigDict(extra="forbid")

    attribution: str = Field("gradient", description="gradient | activation | wagle | random (registered names)")
    fraction: float = Field(0.05, gt=0, le=1, description="share of in-scope entries kept trainable (global top-k)")
    scope: Literal["mlp", "attention", "all"] = "mlp"
    seed: int = Field(0, description="seed of the random attribution")
    wagle_gamma: float = Field(1e-3, gt=0, description="wagle: γ, the scalar diagonal-Hessian approximation")

    @field_validator("attribution")
    @classmethod
    def _known_attribution(cls, value: str) -> str:
        try:
            ATTRIBUTIONS.get(value)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return value


def register_attribution(name: str) -> Callable[[Attribution], Attribution]:
    """Register ``fn(model, forget_batches, retain_batches, spec) -> {param name: score tensor}``.

    Scores cover exactly ``scoped_parameters(model, spec.scope)``, same shapes, higher = more
    responsible for the forget data (kept first)."""
    return ATTRIBUTIONS.register(name)


def attribution_names() -> list[str]:
    return ATTRIBUTIONS.names()


def get_attribution(name: str) -> Attribution:
    return ATTRIBUTIONS.get(name)


# ---------------------------------------------------------------------------------------------- scope


def unwrap(model: Any) -> nn.Module:
    """The HF module inside a DeepSpeed engine (or DDP); the model itself otherwise."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        ids |= {id(p) for p in out.parameters()}
    return ids


def scoped_parameters(model: Any, scope: str) -> dict[str, nn.Parameter]:
    """The parameters a scope may localize, in ``named_parameters`` order (rules: module docstring)."""
    model = unwrap(model)
    if scope not in ("mlp", "attention", "all"):
        raise ValueError(f"unknown scope {scope!r}; known: mlp, attention, all")
    embeddings = _embedding_param_ids(model)
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        ndim = len(getattr(p, "ds_shape", p.shape))
        if not p.requires_grad or not p.is_floating_point() or ndim < 2:
            continue
        if id(p) in embeddings or _EMBEDDING_NAME.search(name):
            continue
        dotted = "." + name
        if scope == "mlp" and not any(s in dotted for s in MLP_PATTERNS):
            continue
        if scope == "attention" and not any(s in dotted for s in ATTENTION_PATTERNS):
            continue
        out[name] = p
    return out


# ------------------------------------------------------------------------------------ attributions


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _part(batch: Batch, key: str) -> Batch:
    """A collated part (input_ids, attention_mask, labels), or the ``key`` part of a loop batch dict."""
    if "input_ids" in batch:
        return batch
    if key in batch and batch[key] is not None:
        return batch[key]
    raise ValueError(f"a {key} batch needs input_ids/attention_mask/labels (or a {key!r} part); got {sorted(batch)}")


def _to(part: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in part.items() if isinstance(v, torch.Tensor)}


class _AttributionMode:
    """Eval mode, gradients only for ``params``, no stale ``.grad``; everything restored on exit."""

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter]):
        self.model, self.ids = model, {id(p) for p in params.values()}

    def __enter__(self):
        self.training = self.model.training
        self.flags = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _, _ in self.flags:
            p.requires_grad_(id(p) in self.ids)
            p.grad = None
        return self

    def __exit__(self, *exc):
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad
        self.model.train(self.training)


def _mean_nll_gradient(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Sequence[Batch], key: str
) -> Scores:
    """float32 gradient of (1/B) Σ_b mean_nll(batch b) for each of ``params`` (zeros where unused)."""
    if not batches:
        raise ValueError(f"attribution needs at least one {key} batch")
    device = _device(model)
    with _AttributionMode(model, params):
        for b in batches:
            (mean_nll(model, _to(_part(b, key), device)) / len(batches)).backward()
        return {
            n: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros(p.shape, device=p.device))
            for n, p in params.items()
        }


@register_attribution("gradient")
def gradient_attribution(model, forget_batches, retain_batches, spec) -> Scores:
    """|∇θ mean forget NLL| (Stoehr et al. 2024; SalUn). Retain batches are not used."""
    params = scoped_parameters(model, spec.scope)
    return {n: g.abs_() for n, g in _mean_nll_gradient(unwrap(model), params, forget_batches, "forget").items()}


def _input_feature_dim(module: nn.Module, pname: str) -> int:
    """Which axis of ``module.<pname>`` indexes the layer's input features."""
    if pname == "weight" and isinstance(module, nn.Linear):
        return 1  # [out, in]
    if pname == "weight" and type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: [in, out]
        return 0
    raise ValueError(
        f"activation attribution scores nn.Linear (or Conv1D) weights only; "
        f"{type(module).__name__}.{pname} is in scope — use another scope or attribution"
    )


@register_attribution("activation")
def activation_attribution(model, forget_batches, retain_batches, spec) -> Scores:
    """Wanda on the forget data: |W_ij| * RMS over non-padding tokens of input feature j."""
    model = unwrap(model)
    params = scoped_parameters(model, spec.scope)
    if not forget_batches:
        raise ValueError("attribution needs at least one forget batch")
    owners: dict[str, tuple[nn.Module, int]] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if full in params:
                owners[full] = (module, _input_feature_dim(module, pname))
    sumsq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    tokens: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach()
            keep = tokens["mask"]
            if keep is not None and tuple(x.shape[:-1]) == tuple(keep.shape):
                x = x[keep]
            x = x.reshape(-1, x.shape[-1]).float()
            sumsq[name] = sumsq.get(name, 0) + x.pow(2).sum(0)
            count[name] = count.get(name, 0) + x.shape[0]

        return hook

    device = _device(model)
    handles = [module.register_forward_pre_hook(hook_for(n)) for n, (module, _) in owners.items()]
    try:
        with _AttributionMode(model, {}), torch.no_grad():
            for b in forget_batches:
                part = _to(_part(b, "forget"), device)
                tokens["mask"] = part["attention_mask"].bool()
                model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for n, p in params.items():
        _, dim = owners[n]
        rms = (sumsq[n] / max(count[n], 1)).sqrt() if n in sumsq else torch.zeros(p.shape[dim], device=p.device)
        scores[n] = p.detach().float().abs() * (rms.unsqueeze(0) if dim == 1 else rms.unsqueeze(1))
    return scores


@register_attribution("wagle")
def wagle_attribution(model, forget_batches, retain_batches, spec) -> Scores:
    """WAGLE (Jia et al. 2024): |(θ - g_retain / γ) ⊙ g_forget| (see the module docstring)."""
    if not retain_batches:
        raise ValueError(
            "unlearn.localize attribution 'wagle' needs retain data (data.retain); use 'gradient' without it"
        )
    model = unwrap(model)
    params = scoped_parameters(model, spec.scope)
    g_f = _mean_nll_gradient(model, params, forget_batches, "forget")
    g_r = _mean_nll_gradient(model, params, retain_batches, "retain")
    return {n: ((p.detach().float() - g_r[n] / spec.wagle_gamma) * g_f[n]).abs_() for n, p in params.items()}


@register_attribution("random")
def random_attribution(model, forget_batches, retain_batches, spec) -> Scores:
    """Uniform [0, 1) scores, seeded: the random-localization control. Uses no data."""
    gen = torch.Generator().manual_seed(spec.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in scoped_parameters(model, spec.scope).items()}
