"""Merging unlearned checkpoints onto the base model with mergekit.

Every mergekit method is available by its mergekit name (``ties``, ``task_arithmetic``, ``dare_ties``,
``linear``, ...). The config is built exactly as a mergekit YAML would be, so anything mergekit accepts
in ``parameters`` (global) or per model is accepted here. Full safetensors models merged with
``task_arithmetic``, ``linear``, ``ties``, ``breadcrumbs`` or ``breadcrumbs_ties`` and plain numeric
parameters go through ``jobs.merge_stream`` (the same tensors as mergekit, tensor by tensor in bounded
memory); everything else through mergekit's ``run_merge``. Peft LoRA adapter folders (a LoRA job's output)
are merged by ``jobs.merge_lora`` with mergekit's kernels, module by module on their low-rank deltas.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from jobs.models import is_adapter_dir
from jobs.spec import MergeSpec

MERGE_MARKER = "spunge_merge.json"

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


def merge_models(spec: MergeSpec, post: Optional[Callable[[str], Any]] = None) -> str:
    """Merge spec.model_paths onto the base; the result is a Hugging Face folder (safetensors + tokenizer) at
    spec.output_dir, or a peft adapter folder for adapter inputs with ``output: adapter``. Full models go
    through jobs.merge_stream when it covers the spec, else mergekit's run_merge; adapter folders (every
    path, never a mix) through jobs.merge_lora.
    ``post(folder)`` runs before the completion marker is written (a crash never leaves a half result)."""
    if not spec.model_paths:
        raise ValueError("merge: no models to merge")
    adapters = [name for name, path in spec.model_paths.items() if is_adapter_dir(path)]
    if adapters and len(adapters) < len(spec.model_paths):
        full = [name for name in spec.model_paths if name not in adapters]
        raise ValueError(f"merge: model_paths mixes LoRA adapters ({', '.join(adapters)}) and full models "
                         f"({', '.join(full)}); merge one kind")
    t0 = time.perf_counter()
    if adapters:
        from jobs.merge_lora import merge_adapters

        marker = merge_adapters(spec)
    elif spec.output == "adapter":
        raise ValueError("merge.output: 'adapter' needs LoRA adapter folders in model_paths, not full models")
    else:
        from jobs.merge_stream import stream_merge, stream_reason

        reason = stream_reason(spec)
        marker = stream_merge(spec) if reason is None else {"mergekit_config": run_mergekit(spec),
                                                            "engine": f"mergekit run_merge ({reason})"}
    if post is not None:
        post(spec.output_dir)
    marker.update(seconds=time.perf_counter() - t0, models=spec.model_paths)
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
        options=MergeOptions(copy_tokenizer=True, safe_serialization=True, lazy_unpickle=False, quiet=True,
                             write_model_card=False),
    )
    return cfg


def rewrite_merged(folder: str, base_model_path: str, method: Any, dtype: str = "float32") -> None:
    """Replace the merged weights in ``folder`` by ``method.after_merge(merged, base)``."""
    from jobs.models import load_model, load_tokenizer, save_model

    merged = load_model(folder, dtype)
    new = method.after_merge(merged.state_dict(), load_model(base_model_path, dtype).state_dict())
    save_model(merged, load_tokenizer(folder), folder, state_dict=new)
