"""Streaming merge of full safetensors checkpoints: one tensor name at a time, bounded memory.

mergekit's ``run_merge`` stacks all k task vectors of a tensor (``k x`` its size, plus masks and products
of the same size) and keeps the output shard (the whole model below 5B parameters) in memory until it
is written, so its peak grows with k (docs/benchmarks.md "Merge: streaming vs mergekit" measures both). This
module computes the same tensors with mergekit's own kernels and formulas, but holds at most one input tensor
at a time:

* ``task_arithmetic`` and ``linear`` (elementwise in the inputs) run mergekit's ``merge_tensors`` on row
  chunks of ``CHUNK_ELEMENTS`` elements per input, read with ``safe_open(...).get_slice``;
* ``ties``, ``breadcrumbs``, ``breadcrumbs_ties`` (mergekit's generalized task arithmetic with a
  deterministic sparsification) run per whole tensor in two passes over the models: pass 1 reads model i,
  sparsifies its delta with mergekit's ``sparsify`` (whole-tensor magnitude ranking, as mergekit does),
  keeps only its keep-mask (1 bit per element) and adds the weighted delta to the consensus sum; pass 2
  re-reads model i, rebuilds the trimmed weighted delta from the mask and folds it into the merged delta
  and divisor. Held per tensor: base, consensus sum, k bit masks, one delta and its working copies. Every
  read goes into the same buffer (``Checkpoint.read_into``, one ``readinto`` at the header's offsets), so
  its pages are faulted in once per tensor, not once per read.

Inputs may be sharded (``model.safetensors.index.json`` names each tensor's file). Output: the merged weights
written tensor by tensor through ``jobs.shards.ShardedWriter`` (each file's header is known up front from the
base's shapes): one ``model.safetensors``, or files of at most ``spec.max_shard_size`` with an index, as
Hugging Face shards them. They hold exactly the base's tensor names (tied embeddings stay tied, no ``lm_head``
is added); beside them the base's config (dtype set), generation config and tokenizer files. Arithmetic is in
``spec.dtype`` as in mergekit. Results equal mergekit's bit for bit where torch's ``sum(dim=0)`` over the
k stacked deltas adds them in input order (vectorized inner sizes, as in every SmolLM2 tensor); on other
shapes with k >= 5 torch may pair the additions differently, which differs by float rounding (~1e-7).

``stream_reason(spec)`` says why a spec cannot stream (random masks: dare_*, della*; non-numeric
parameters such as gradients; checkpoints that are not safetensors of the base's names and shapes), and
``jobs.merge`` then falls back to mergekit's ``run_merge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from jobs.allocator import unmap_large_frees
from jobs.shards import SAFETENSORS_DTYPES, SAFETENSORS_TORCH, Checkpoint, Progress, ShardedWriter, remove_weights
from jobs.spec import MergeSpec

CHUNK_ELEMENTS = 1 << 21  # elements per input per chunk of an elementwise merge (8 MB in float32)
ELEMENTWISE = ("task_arithmetic", "linear")
DETERMINISTIC_SPARSIFICATION = (None, "magnitude", "magnitude_outliers")


def method_kind(method: str) -> Optional[str]:
    """'elementwise', 'sparse' (deterministic generalized task arithmetic) or None (not streamable)."""
    from mergekit.merge_methods import get
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    if method in ELEMENTWISE:
        return "elementwise"
    impl = get(method)
    if isinstance(impl, GeneralizedTaskArithmeticMerge):
        sparsify = impl.sparsification_method.value if impl.sparsification_method else None
        if sparsify in DETERMINISTIC_SPARSIFICATION:
            return "sparse"
    return None


def stream_reason(spec: MergeSpec) -> Optional[str]:
    """Why spec cannot take the streaming path (None: it can)."""
    try:
        kind = method_kind(spec.method)
    except Exception as err:  # unknown method name: mergekit reports it
        return f"unknown method ({err})"
    if kind is None:
        return f"{spec.method} draws random masks or is not task arithmetic"
    values = [*spec.resolved_parameters().values(), *(v for p in spec.model_parameters.values() for v in p.values())]
    if any(not isinstance(v, (bool, int, float)) for v in values):
        return "a parameter is not one number (gradient or filtered values)"
    if set(spec.model_parameters) - set(spec.model_paths):
        return "model_parameters names a model that is not merged"
    base = Checkpoint(spec.base_model_path)
    if not base.shapes:
        return "the base has no safetensors weights"
    for path, ckpt in ((spec.base_model_path, base), *((p, Checkpoint(p)) for p in spec.model_paths.values())):
        if ckpt.shapes != base.shapes:
            return f"{path} does not hold the base's tensor names and shapes"
        odd = sorted(set(ckpt.dtypes.values()) - set(SAFETENSORS_DTYPES.values()))
        if odd:
            return f"{path} holds tensors of dtype {', '.join(odd)}"
    return None


def row_chunks(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of at most CHUNK_ELEMENTS elements (at least one row; one range for 0-d)."""
    if not shape:
        yield 0, 0
        return
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def mergekit_merge(
    method: str, base: torch.Tensor, models: Sequence[torch.Tensor], kwargs: dict[str, Any]
) -> torch.Tensor:
    """mergekit's merge of one tensor (or chunk), the inputs in run_merge's order: the models (ids 0..n-1),
    then the base (id n, marked as the base; an ordinary input to linear, added last)."""
    from mergekit.merge_methods import merge_tensors

    n = len(models)
    return merge_tensors([*models, base], method, parameters=kwargs, ids=[*range(n), n], base_index=n)


def merge_elementwise(
    method: str, base: Checkpoint, models: Sequence[Checkpoint], name: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> torch.Tensor:
    """mergekit's merge of one tensor, chunk of rows by chunk of rows (the methods are elementwise)."""
    shape = base.shapes[name]
    if not shape:
        return mergekit_merge(method, base.tensor(name).to(dtype), [m.tensor(name).to(dtype) for m in models], kwargs)
    out = torch.empty(shape, dtype=dtype)
    for start, stop in row_chunks(shape):
        inputs = [m.rows(name, start, stop).to(dtype) for m in models]
        out[start:stop] = mergekit_merge(method, base.rows(name, start, stop).to(dtype), inputs, kwargs)
        del inputs
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask packed 8 elements to a byte (k masks of the embedding: k/8 of its float32 size / 4)."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    import numpy as np

    n = int(torch.Size(shape).numel())
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).view(np.bool_)).reshape(shape)


def trimmed_delta(
    impl: Any,
    model: torch.Tensor,
    base: torch.Tensor,
    i: int,
    kwargs: dict[str, Any],
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Model i's weighted, sparsified delta as mergekit's generalized task arithmetic computes it, and its
    keep-mask. Without ``mask`` the sparsifier ranks the delta (pass 1); with it the delta is masked and
    rescaled the same way without ranking again (pass 2)."""
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor, sparsify

    delta = model.sub_(base)
    norm = RescaleNorm.l1 if kwargs["rescale"] else None
    if impl.sparsification_method is not None:
        if mask is None:
            extra = {key: kwargs[key][i] for key in ("gamma", "epsilon") if key in kwargs}
            trimmed = sparsify(
                delta, density=kwargs["density"][i], method=impl.sparsification_method, rescale_norm=norm, **extra
            )
            mask = pack_mask(trimmed != 0) if trimmed is not delta else None
        elif norm is None:  # rescaled_masked_tensor without a norm, in place: delta * mask
            trimmed = delta.mul_(unpack_mask(mask, delta.shape))
        else:
            trimmed = rescaled_masked_tensor(delta, unpack_mask(mask, delta.shape).to(delta.dtype), norm)
        delta = trimmed
    return delta.mul_(torch.tensor(kwargs["weight"][i], dtype=delta.dtype)), mask


class Reader:
    """Each model's copy of one tensor, read into buffers kept for all of its reads (one per stored dtype, and
    one in the arithmetic's dtype when that differs): what a read returns is overwritten by the next."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(self.shape, dtype=dtype)
        return self.buffers[dtype]

    def __call__(self, model: Checkpoint, name: str) -> torch.Tensor:
        stored = SAFETENSORS_TORCH[model.dtypes[name]]
        raw = model.read_into(name, self._buffer(stored))
        return raw if stored == self.dtype else self._buffer(self.dtype).copy_(raw)


def merge_sparse(
    impl: Any, base: Checkpoint, models: Sequence[Checkpoint], name: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group of one tensor, folding the k deltas in two
    passes instead of stacking them (see the module docstring)."""
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod

    w0 = base.tensor(name).to(dtype)
    read = Reader(w0.shape, dtype)
    weights = [kwargs["weight"][i] for i in range(len(models))]
    masks: list[Optional[torch.Tensor]] = []
    consensus = impl.consensus_method
    mask_dtype = torch.int8 if kwargs["int8_mask"] else dtype
    vote = None
    for i, model in enumerate(models):  # pass 1: sparsify, keep masks, sum for the sign election
        delta, mask = trimmed_delta(impl, read(model, name), w0, i, kwargs)
        masks.append(mask)
        if consensus is not None:
            term = delta if consensus == ConsensusMethod.sum else delta.sign().to(mask_dtype)
        else:
            term = delta
        vote = term.clone() if vote is None else vote.add_(term)  # delta can be the reader's buffer
        del delta, mask
    if consensus is None:
        mixed = vote
        divisor = torch.tensor(weights, dtype=dtype).sum(dim=0)
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=dtype)
    else:
        positive = vote >= 0  # the elected sign: mergekit's majority is +1 here, else -1
        del vote
        mixed = torch.zeros_like(w0)
        divisor = torch.zeros_like(w0)
        for i, model in enumerate(models):  # pass 2: keep the deltas that agree with the elected sign
            delta, _ = trimmed_delta(impl, read(model, name), w0, i, kwargs, masks[i])
            agree = torch.where(positive, delta > 0, delta < 0)  # sign(delta) == majority (a 0 never agrees)
            mixed.add_(delta.mul_(agree))
            divisor.add_(agree, alpha=weights[i])
            masks[i] = None
            del delta, agree
        del positive
        divisor[divisor == 0] = 1
    read.buffers.clear()  # no longer needed: freed before the result is made
    if kwargs["normalize"]:
        mixed /= divisor
    del divisor
    if kwargs["lambda"] != 1:
        mixed *= kwargs["lambda"]
    return mixed.add_(w0).to(w0.dtype)  # w0 + mixed, in place (addition commutes bit for bit)


def stream_merge(spec: MergeSpec, progress: Optional[Progress] = None) -> dict[str, Any]:
    """Merge spec.model_paths onto the base into spec.output_dir tensor by tensor (stream_reason must be
    None), calling ``progress(tensors written, of the total)`` after each. Returns what the merge marker records."""
    from mergekit.merge_methods import get

    from jobs.merge_lora import copy_side_files, mergekit_parameters
    from jobs.models import DTYPES

    unmap_large_frees()  # the masks of one tensor are freed before the next: give their pages back
    shared, kwargs = mergekit_parameters(spec)
    dtype = DTYPES[spec.dtype]
    kind = method_kind(spec.method)
    impl = get(spec.method)
    base = Checkpoint(spec.base_model_path)
    models = [Checkpoint(path) for path in spec.model_paths.values()]
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_weights(out)
    names = sorted(base.shapes)
    floating = {name: base.dtypes[name] in ("F32", "F16", "BF16", "F64") for name in names}
    layout = {
        name: (dtype if floating[name] else SAFETENSORS_TORCH[base.dtypes[name]], base.shapes[name]) for name in names
    }
    with ShardedWriter(out, layout, spec.max_shard_size, progress) as writer:
        for name in writer.order:  # the files' order: each shard is written whole before the next
            if not floating[name]:
                merged = base.tensor(name)
            elif kind == "elementwise":
                merged = merge_elementwise(spec.method, base, models, name, kwargs, dtype)
            else:
                merged = merge_sparse(impl, base, models, name, kwargs, dtype)
            writer.write(name, merged)
            del merged
    copy_side_files(spec)
    return {
        "method": spec.method,
        "parameters": shared,
        "model_parameters": spec.model_parameters,
        "engine": "spunge streaming merge (mergekit kernels)",
    }
