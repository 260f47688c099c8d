"""Merging unlearned checkpoints onto the base model with mergekit.

Every mergekit method is available by its mergekit name (``ties``, ``task_arithmetic``, ``dare_ties``,
``linear``, ...). The config is built exactly as a mergekit YAML would be, so anything mergekit accepts
in ``parameters`` (global) or per model is accepted here. Full safetensors models merged with
``task_arithmetic``, ``linear``, ``ties``, ``breadcrumbs`` or ``breadcrumbs_ties`` and plain numeric
parameters go through ``jobs.merge_stream`` (the same tensors as mergekit, tensor by tensor in bounded
memory); everything else through mergekit's ``run_merge``. Peft LoRA adapter folders (a LoRA job's output)
are merged by ``jobs.merge_lora`` with mergekit's kernels, module by module on their low-rank deltas.

A hub-name base (``org/name``) is first resolved to its snapshot folder in the Hugging Face cache (``resolve_base``)
so that the streaming and LoRA merges, which read local safetensors, apply to it too. Every engine writes the
merged weights in shards of at most ``spec.max_shard_size`` (an index above one file). ``merge_memory_bytes`` is
what the merge actor asks Ray for: each engine's peak in terms of the checkpoints' sizes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from jobs.models import is_adapter_dir
from jobs.shards import DEFAULT_MAX_SHARD_SIZE, Progress, parse_size, remove_weights, weight_files
from jobs.spec import MergeSpec

MERGE_MARKER = "spunge_merge.json"
PROCESS_BYTES = 1 << 29  # the actor's own interpreter, with torch, transformers, mergekit and ray imported


def merge_method_names() -> list[str]:
    """Names of every merge method the installed mergekit knows."""
    from mergekit.merge_methods import registered_methods

    return sorted(m.spec.name for m in registered_methods())


def mergekit_config(spec: MergeSpec) -> dict[str, Any]:
    """The mergekit configuration (as a YAML-shaped dict) for a MergeSpec."""
    params = spec.resolved_parameters()
    models = [
        {"model": path, **({"parameters": spec.model_parameters[name]} if name in spec.model_parameters else {})}
        for name, path in spec.model_paths.items()
    ]
    return {
        "merge_method": spec.method,
        "base_model": spec.base_model_path,
        "models": models,
        "parameters": params,
        "dtype": spec.dtype,
    }


def merge_models(
    spec: MergeSpec, post: Optional[Callable[[str], Any]] = None, progress: Optional[Progress] = None
) -> str:
    """Merge spec.model_paths onto the base; the result is a Hugging Face folder (safetensors + tokenizer) at
    spec.output_dir, or a peft adapter folder for adapter inputs with ``output: adapter``. Full models go
    through jobs.merge_stream when it covers the spec, else mergekit's run_merge; adapter folders (every
    path, never a mix) through jobs.merge_lora. A hub-name base is merged from its cached snapshot
    (``resolve_base``; the marker's ``base_model_folder``). ``post(folder)`` runs before the completion marker
    is written (a crash never leaves a half result). ``progress(tensors written, of the total)`` follows the
    streaming and LoRA merges (mergekit's run_merge reports nothing)."""
    if not spec.model_paths:
        raise ValueError("merge: no models to merge")
    adapters = [name for name, path in spec.model_paths.items() if is_adapter_dir(path)]
    if adapters and len(adapters) < len(spec.model_paths):
        full = [name for name in spec.model_paths if name not in adapters]
        raise ValueError(
            f"merge: model_paths mixes LoRA adapters ({', '.join(adapters)}) and full models "
            f"({', '.join(full)}); merge one kind"
        )
    t0 = time.perf_counter()
    given, folder = spec.base_model_path, resolve_base(spec.base_model_path)
    spec = spec.model_copy(update={"base_model_path": folder})
    if adapters:
        from jobs.merge_lora import merge_adapters

        marker = merge_adapters(spec, base_name=given, progress=progress)
    elif spec.output == "adapter":
        raise ValueError("merge.output: 'adapter' needs LoRA adapter folders in model_paths, not full models")
    else:
        from jobs.merge_stream import stream_merge, stream_reason

        reason = stream_reason(spec)
        marker = (
            stream_merge(spec, progress)
            if reason is None
            else {"mergekit_config": run_mergekit(spec), "engine": f"mergekit run_merge ({reason})"}
        )
    if post is not None:
        post(spec.output_dir)
    marker.update(seconds=time.perf_counter() - t0, models=spec.model_paths, base_model_folder=folder)
    (Path(spec.output_dir) / MERGE_MARKER).write_text(json.dumps(marker, indent=2))
    return spec.output_dir


def run_mergekit(spec: MergeSpec) -> dict[str, Any]:
    """mergekit's run_merge of full models into spec.output_dir; returns the config it ran."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = mergekit_config(spec)
    run_merge(
        MergeConfiguration.model_validate(cfg),
        out_path=spec.output_dir,
        options=MergeOptions(
            copy_tokenizer=True,
            safe_serialization=True,
            lazy_unpickle=False,
            quiet=True,
            write_model_card=False,
            out_shard_size=parse_size(spec.max_shard_size),
        ),
    )
    return cfg


def rewrite_merged(
    folder: str, base_model_path: str, method: Any, dtype: str = "float32", max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
) -> None:
    """Replace the merged weights in ``folder`` by ``method.after_merge(merged, base)``, in shards of at most
    ``max_shard_size``; the old weight files go first, so none of another shard count is left behind."""
    from jobs.models import load_model, load_tokenizer, save_model

    merged = load_model(folder, dtype)
    new = method.after_merge(merged.state_dict(), load_model(resolve_base(base_model_path), dtype).state_dict())
    tokenizer = load_tokenizer(folder)
    remove_weights(folder)
    save_model(merged, tokenizer, folder, state_dict=new, max_shard_size=max_shard_size)


def resolve_base(path: str, local_only: bool = False) -> str:
    """The local folder of a base model: ``path`` when it is a folder; for a hub name its snapshot in the
    Hugging Face cache (weights, configs, tokenizer), fetched unless it is cached already, ``HF_HUB_OFFLINE`` is
    set or ``local_only``. A snapshot without safetensors weights (a pickle-only repository) leaves the hub name,
    which mergekit loads itself. A name neither here nor on the Hub is a one-line ValueError."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    from jobs.merge_lora import TOKENIZER_FILES

    try:
        folder = snapshot_download(
            path, allow_patterns=["*.safetensors", "*.json", *TOKENIZER_FILES], local_files_only=local_only
        )
    except Exception as err:  # not a repo id, not cached offline, not on the Hub: each its own error class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"merge: base model {path!r} is neither a local folder nor a Hugging Face model found "
            f"in the cache or on the Hub ({reason})"
        ) from None
    return folder if weight_files(folder) else path


def merge_engine(spec: MergeSpec, adapters: bool = False) -> str:
    """What ``merge_models`` runs for ``spec``: ``lora`` (adapter inputs), ``stream-elementwise`` or
    ``stream-sparse`` (``jobs.merge_stream``), or ``mergekit`` (its ``run_merge``)."""
    from jobs.merge_stream import method_kind, stream_reason

    if adapters:
        return "lora"
    return "mergekit" if stream_reason(spec) is not None else f"stream-{method_kind(spec.method)}"


def merge_memory_bytes(
    engine: str,
    k: int,
    model_bytes: int,
    largest_elements: int,
    dtype_bytes: int,
    adapter_bytes: int = 0,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    rewrite: bool = False,
) -> int:
    """Peak resident bytes of the merge actor merging k checkpoints onto a base of ``model_bytes`` (in the merge
    dtype, ``dtype_bytes`` per element) whose largest tensor has ``largest_elements`` (T bytes in the merge dtype),
    on top of ``PROCESS_BYTES``; docs/scaling.md "Merge RAM" derives each term from the code:

    * ``stream-elementwise``: the merged tensor, plus row chunks of every input and mergekit's stacked copies
      of them: T + 2 (k + 2) chunks of ``CHUNK_ELEMENTS``;
    * ``stream-sparse`` (TIES, breadcrumbs): per tensor the base, the read buffer, the sign-election sum, the
      sparsifier's magnitudes, sort indices (int64) and mask, the merged delta and divisor: 10 T, plus k keep-masks
      of one bit per element;
    * ``mergekit``: its ``merge_group`` on k stacked deltas with their masks and products, (5k + 2) T, plus the
      output shard it accumulates and the copy it serializes, 2 min(shard, model);
    * ``lora``: float32 arithmetic (T32 = 4 bytes per element): the k module deltas, mergekit's (5k + 2) copies,
      the base tensor and the sum, (6k + 6) T32, plus the adapters' factors (``adapter_bytes`` in float32) twice
      (read, and the merged adapter's);
    * ``rewrite`` (task-vector negation after the merge): the merged and base models loaded whole, the new state
      dict and the shard being saved, 3 model + min(shard, model); the larger of that and the merge counts."""
    from jobs.merge_stream import CHUNK_ELEMENTS

    t = largest_elements * dtype_bytes
    shard = min(parse_size(max_shard_size), model_bytes)
    if engine == "stream-elementwise":
        peak = t + 2 * (k + 2) * min(CHUNK_ELEMENTS, largest_elements) * dtype_bytes
    elif engine == "stream-sparse":
        peak = 10 * t + k * -(-largest_elements // 8)
    elif engine == "mergekit":
        peak = (5 * k + 2) * t + 2 * shard
    elif engine == "lora":
        peak = (6 * k + 6) * largest_elements * 4 + 2 * adapter_bytes
    else:
        raise ValueError(f"merge: unknown engine {engine!r}")
    if rewrite:
        peak = max(peak, 3 * model_bytes + shard)
    return PROCESS_BYTES + peak
