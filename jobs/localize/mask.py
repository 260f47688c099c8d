"""From attribution scores to a global top-fraction mask, and the masked update that holds it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from jobs.localize.attribution import Batch, LocalizeSpec, Mask, get_attribution, scoped_parameters, unwrap

# --------------------------------------------------------------------------------------- selection

# Above this many in-scope entries the threshold is found by bisection over float order (32 counting
# passes, no extra memory) instead of kthvalue on a concatenated copy (4 + 4 + 8 bytes per entry).
EXACT_SELECT_LIMIT = 1 << 26


def _float_of_key(key: int) -> float:
    """Inverse of the order-preserving float32 -> int32 key (key = bits if >= 0 else bits ^ 0x7FFFFFFF)."""
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _kth_largest(scores: Sequence[torch.Tensor], k: int, n: int) -> float:
    if n <= EXACT_SELECT_LIMIT:
        flat = torch.cat([s.reshape(-1).to(scores[0].device) for s in scores])
        return torch.kthvalue(flat.cpu(), n - k + 1).values.item()
    # largest key T with count(score >= float(T)) >= k; keys span [-inf, +inf], so no NaN midpoints
    lo, hi = -0x7F800000 - 1, 0x7F800000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        t = _float_of_key(mid)
        if sum(int((s >= t).sum()) for s in scores) >= k:
            lo = mid
        else:
            hi = mid - 1
    return _float_of_key(lo)


def top_fraction_mask(scores: Mapping[str, torch.Tensor], fraction: float) -> Mask:
    """Keep exactly ``k = max(1, floor(fraction * N + 0.5))`` entries (N: all score entries): the k
    highest scores across all tensors. Ties at the threshold go to the earliest entries in tensor order
    (the mapping's order, ``named_parameters`` order for ``compute_mask``), then row-major order, so the
    result is deterministic and the count is exact.

    Memory: up to ``EXACT_SELECT_LIMIT`` entries, ``torch.kthvalue`` on one concatenated float32 copy
    (about 16 bytes per entry with its internal value/index buffers); above it (e.g. the ~4.4e9 MLP
    entries of a 7B Llama, ~70 GB that way) a 32-pass bisection that needs only one boolean temporary
    per tensor. The score dict itself is 4 bytes per in-scope entry and the masks 1 byte."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    names = list(scores)
    flat = [scores[n].detach().float().contiguous() for n in names]  # no copy for contiguous float32 scores
    n = sum(s.numel() for s in flat)
    if n == 0:
        raise ValueError("no in-scope parameters to select from")
    for name, s in zip(names, flat):
        if torch.isnan(s).any():
            raise ValueError(f"attribution score of {name} has NaN entries")
    k = max(1, min(n, math.floor(fraction * n + 0.5)))
    t = _kth_largest(flat, k, n)
    masks = [s > t for s in flat]
    need = k - sum(int(m.sum()) for m in masks)
    for m, s in zip(masks, flat):
        if need <= 0:
            break
        eq = (s == t).reshape(-1)
        take = eq & (eq.cumsum(0) <= need)
        need -= int(take.sum())
        m.view(-1).logical_or_(take)
    return {name: m.cpu() for name, m in zip(names, masks)}


def _broadcast_mask(mask: Mask) -> Mask:
    """Rank 0's mask on every rank (one broadcast of N bytes), so data-parallel ranks agree bit for bit."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mask
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(mask)
    flat = torch.cat([mask[n].reshape(-1) for n in names]).to(device=device, dtype=torch.uint8)
    dist.broadcast(flat, src=0)
    flat = flat.bool().cpu()
    out, start = {}, 0
    for n in names:
        out[n] = flat[start : start + mask[n].numel()].view(mask[n].shape).clone()
        start += mask[n].numel()
    return out


def compute_mask(
    model: Any,
    forget_batches: Sequence[Batch],
    retain_batches: Optional[Sequence[Batch]],
    spec: Union[LocalizeSpec, Mapping[str, Any]],
) -> Mask:
    """``{param name: bool tensor (CPU)}`` for the in-scope parameters: True = trainable entry.

    Run it before ``deepspeed.initialize``, on the full model, with the same batches on every rank.
    Batches are collated parts (``input_ids``, ``attention_mask``, ``labels``) or the loop's batch dicts
    holding a ``forget`` / ``retain`` part; they are moved to the model's device. Cost: one forward and
    backward per forget batch (``gradient``), plus one per retain batch (``wagle``), one forward per
    forget batch (``activation``), nothing (``random``); the gradients of in-scope parameters (float32)
    and the scores (4 bytes per in-scope entry) are held at once. Mode, ``requires_grad`` and ``.grad``
    of the model are left as they were."""
    spec = spec if isinstance(spec, LocalizeSpec) else LocalizeSpec(**spec)
    params = scoped_parameters(model, spec.scope)
    if not params:
        raise ValueError(f"unlearn.localize.scope {spec.scope!r} matches no trainable weight matrix of this model")
    if any(hasattr(p, "ds_id") and p.numel() != p.ds_numel for p in params.values()):
        raise ValueError(
            "compute_mask needs full parameters: call it before deepspeed.initialize, or inside "
            "deepspeed.zero.GatheredParameters for a model created partitioned (ZeRO-3)"
        )
    scores = get_attribution(spec.attribution)(model, list(forget_batches), list(retain_batches or []), spec)
    if set(scores) != set(params):
        raise ValueError(
            f"attribution {spec.attribution!r} scored {sorted(set(scores) ^ set(params))} "
            f"wrongly (must score exactly the {spec.scope} scope)"
        )
    for name, p in params.items():
        if tuple(scores[name].shape) != tuple(p.shape):
            raise ValueError(
                f"attribution {spec.attribution!r}: score of {name} has shape "
                f"{tuple(scores[name].shape)}, parameter {tuple(p.shape)}"
            )
    ordered = {name: scores[name] for name in params}
    del scores
    return _broadcast_mask(top_fraction_mask(ordered, spec.fraction))


# ------------------------------------------------------------------------------------------ update


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


class MaskedUpdate:
    """Train only the masked entries, whatever the optimizer does.

    On construction (before the optimizer and ``deepspeed.initialize`` exist):

    - parameters with no mask entry, or an all-False mask, get ``requires_grad_(False)``: no gradient,
      so no optimizer touches them (torch optimizers skip ``grad is None``; the loop builds its
      optimizer from ``requires_grad`` parameters);
    - partially masked parameters get a tensor hook ``grad -> where(mask, grad, 0)`` (exact zeros, even
      for inf/NaN gradients) and a snapshot of their values;
    - all-True masks need nothing.

    Adam's moments stay 0 where the gradient is always 0, but decoupled weight decay (AdamW) still
    moves those entries: call ``restore(engine)`` after every optimizer step to copy the snapshot back
    into the masked-out entries. ZeRO support: see the module docstring (stages 0-3).

    ``originals_device``: where the snapshots live. Default: taken on the parameter's device at
    construction and moved, once, to the parameter's device at the first ``restore`` (after
    ``deepspeed.initialize`` has moved the model): one extra copy of the partially masked parameters
    there. ``"cpu"`` keeps them in host memory and copies each in per ``restore`` (slower, no device
    memory). ZeRO-3: snapshots are dropped on every rank but 0 at the first ``restore`` and kept on CPU
    there. Masks of partially masked parameters are cached on the gradient's device (1 byte per entry,
    on every rank, ZeRO-3 included)."""

    def __init__(
        self, model: Any, mask: Mapping[str, torch.Tensor], originals_device: Optional[Union[str, torch.device]] = None
    ):
        module = unwrap(model)
        named = dict(module.named_parameters())
        unknown = sorted(set(mask) - set(named))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {unknown[:5]}")
        self.frozen: list[str] = []
        self.full: list[str] = []
        self.partial: list[str] = []
        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self._originals_device = torch.device(originals_device) if originals_device is not None else None
        self._mask_on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._handles: list[Any] = []
        self._checked_model: Optional[int] = None
        self._zero3_ready = False
        for name, p in named.items():
            m = mask.get(name)
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if m is not None and tuple(m.shape) != shape:
                raise ValueError(f"mask of {name} has shape {tuple(m.shape)}, parameter {shape}")
            if m is None or not bool(m.any()) or not p.requires_grad:
                p.requires_grad_(False)
                self.frozen.append(name)
                continue
            if bool(m.all()):
                self.full.append(name)
                continue
            m = m.detach().to("cpu", torch.bool)
            self.partial.append(name)
            self._params[name] = p
            self._masks[name] = m
            self._originals[name] = self._snapshot(p, originals_device)
            self._handles.append(p.register_hook(self._grad_hook(name)))

    @staticmethod
    def _snapshot(p: nn.Parameter, device) -> torch.Tensor:
        if _is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().to(device or "cpu", copy=True)
        return p.detach().to(device or p.device, copy=True)

    def _mask(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._mask_on:
            self._mask_on[key] = self._masks[name].to(device)
        return self._mask_on[key]

    def _original(self, name: str, device: torch.device) -> torch.Tensor:
        orig = self._originals[name]
        if orig.device != device and self._originals_device is None:
            orig = self._originals[name] = orig.to(device)  # follow the parameter, once
        return orig.to(device)

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if tuple(grad.shape) != tuple(self._masks[name].shape):
                raise RuntimeError(
                    f"gradient of {name} has shape {tuple(grad.shape)}, mask "
                    f"{tuple(self._masks[name].shape)}: unsupported parameter partitioning"
                )
            zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
            return torch.where(self._mask(name, grad.device), grad, zero)

        return hook

    def _check(self, model: Any) -> None:
        if model is None or self._checked_model == id(model):
            return
        named = dict(unwrap(model).named_parameters())
        for name, p in self._params.items():
            if named.get(name) is not p:
                raise RuntimeError(
                    f"restore(model): {name} is not the parameter MaskedUpdate hooked; build "
                    "MaskedUpdate on the model that is handed to deepspeed.initialize"
                )
        self._checked_model = id(model)

    @torch.no_grad()
    def restore(self, model: Any = None) -> None:
        """Copy the snapshot back into every masked-out entry. Call after each optimizer step (every
        rank; under ZeRO-3 it is a collective). ``model``: the engine or module (checked once to hold
        the hooked parameters); optional."""
        self._check(model)
        zero3 = {n for n, p in self._params.items() if _is_zero3(p)}
        if zero3:
            self._restore_zero3(sorted(zero3, key=list(self._params).index))
        for name, p in self._params.items():
            if name in zero3:
                continue
            p.data.copy_(torch.where(self._mask(name, p.device), p.data, self._original(name, p.device)))

    def _restore_zero3(self, names: list[str]) -> None:
        import deepspeed
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if not self._zero3_ready:  # only the modifier rank needs the originals
            self._originals_device = torch.device("cpu")
            for n in names:
                self._originals[n] = self._originals[n].cpu() if rank == 0 else torch.empty(0)
            self._zero3_ready = True
        for n in names:  # one parameter at a time: peak memory is the largest gathered parameter
            p = self._params[n]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(torch.where(self._mask(n, p.device), p.data, self._original(n, p.device)))

    def trainable_parameters(self) -> list[str]:
        """Names of parameters that may change (partially or fully masked)."""
        return self.full + self.partial

    def remove(self) -> None:
        """Remove the gradient hooks (frozen parameters stay frozen)."""
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------------------------------- stats

_LAYER = re.compile(r"^(?:.*\.)?(\d+)\.(.+)$")


def mask_stats(mask: Mapping[str, torch.Tensor], model: Any = None) -> dict[str, float]:
    """Flat, loggable numbers: ``kept`` and ``in_scope`` (entries), ``fraction`` (kept / in scope),
    ``group/<module path without layer index>`` (e.g. ``group/mlp.down_proj``) and ``layer/<i>``
    fractions, and with ``model`` also ``model_fraction`` (kept / all parameters of the model)."""
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    groups: dict[str, list[int]] = {}
    for name, m in mask.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        hit = _LAYER.match(base)
        keys = [f"group/{hit.group(2)}", f"layer/{hit.group(1)}"] if hit else [f"group/{base}"]
        for key in keys:
            acc = groups.setdefault(key, [0, 0])
            acc[0] += int(m.sum())
            acc[1] += m.numel()
    out: dict[str, float] = {"kept": kept, "in_scope": total, "fraction": kept / total if total else 0.0}
    out.update({k: v[0] / v[1] for k, v in sorted(groups.items())})
    if model is not None:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in unwrap(model).parameters())
        out["model_fraction"] = kept / n if n else 0.0
    return out
