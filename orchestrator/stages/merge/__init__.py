"""Stage 3, merge: the merge actor (started with the unlearn stage, which hands it each finished subset
checkpoint) merges them onto the base model with ``merge.method`` (mergekit, or task-vector negation). It asks
Ray for the memory its merge needs, estimated from the base model's size when it starts (``merge_memory``)."""

from __future__ import annotations

import math
import time
from typing import Sequence

import ray

from jobs.merge import MERGE_MARKER
from jobs.spec import MergeSpec
from orchestrator.config.schema import PipelineConfig
from orchestrator.run.cache import claim, method_params_key, model_fingerprint, stage_key
from orchestrator.run.context import Merged, PipelineError, RunContext, root_message


def merge_memory(cfg: PipelineConfig, subsets: Sequence[str]) -> tuple[int, str]:
    """(bytes of Ray's memory resource the merge actor asks for, what they are for). ``merge.memory_gb`` when set;
    else ``jobs.merge.merge_memory_bytes`` of the engine the merge will run, from the base's safetensors headers
    (each subset checkpoint is the base's size, or a LoRA adapter of ``unlearn.lora.r``); 0 when there is nothing
    to merge or the base is neither a folder nor cached here (its size is unknown)."""
    from jobs.merge import merge_engine, merge_memory_bytes, resolve_base
    from jobs.models import DTYPES
    from jobs.shards import folder_tensors
    from jobs.unlearn.methods import build_method

    if cfg.merge.memory_gb is not None:
        return int(cfg.merge.memory_gb * 2**30), "merge.memory_gb"
    if not subsets:
        return 0, "no subsets"
    try:
        folder = resolve_base(cfg.model.path, local_only=True)
    except ValueError:
        return 0, "base size unknown"
    tensors = folder_tensors(folder)
    if not tensors:
        return 0, "base size unknown"
    dtype_bytes = DTYPES[cfg.model.dtype].itemsize
    floating = {name: shape for name, (code, shape) in tensors.items() if code.startswith(("F", "BF"))}
    numel = {name: math.prod(shape) for name, (_, shape) in tensors.items()}
    model_bytes = sum(
        n * (dtype_bytes if name in floating else _code_bytes(tensors[name][0])) for name, n in numel.items()
    )
    largest = max((numel[name] for name in floating), default=0)
    lora = cfg.unlearn.lora
    if lora is not None:
        engine = "lora"  # every linear weight adapted at rank r bounds the adapters: r (rows + cols) float32 each
        adapter_bytes = len(subsets) * 4 * lora.r * sum(sum(shape) for shape in floating.values() if len(shape) == 2)
    else:
        m = cfg.merge
        engine = merge_engine(
            MergeSpec(
                base_model_path=folder,
                model_paths={key: folder for key in subsets},
                method=m.method,
                parameters=m.parameters,
                model_parameters=m.model_parameters,
                dtype=cfg.model.dtype,
                output_dir="",
            )
        )
        adapter_bytes = 0
    rewrite = build_method(cfg.unlearn.method, cfg.unlearn.params).rewrites_merge()
    need = merge_memory_bytes(
        engine, len(subsets), model_bytes, largest, dtype_bytes, adapter_bytes, cfg.storage.max_shard_size, rewrite
    )
    return need, (
        f"{engine} merge of {len(subsets)} checkpoints onto a {model_bytes / 2**30:.3g} GiB base"
        f"{', then its rewrite' if rewrite else ''}"
    )


def _code_bytes(code: str) -> int:
    """Bytes per element of a safetensors integer or boolean dtype code (I64, U8, BOOL, ...)."""
    bits = "".join(c for c in code if c.isdigit())
    return max(1, int(bits) // 8) if bits else 1


def start_merge_actor(ctx: RunContext) -> None:
    """The actor that will merge ``ctx``'s subset jobs (it receives their checkpoints as they finish), holding
    the memory its merge needs from its start; a need no Ray node can offer fails here, not as an actor that
    waits forever to be placed."""
    from orchestrator.stages.merge.actor import MergeActor

    subsets = [j.key for j in ctx.subset_jobs()]
    need, what = merge_memory(ctx.cfg, subsets)
    if need:
        offered = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")), default=0)
        if need > offered:
            raise PipelineError(
                f"merge: the merge actor needs {need / 2**30:.1f} GiB of memory ({what}) but the "
                f"largest Ray node offers {offered / 2**30:.1f} GiB; set merge.memory_gb (0: reserve "
                "none) or add a node with more memory"
            )
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # outside any placement group the caller runs in (a tune trial's holds no memory for it)
    options = {
        "num_cpus": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
        **({"memory": need} if need else {}),
    }
    ctx.merge_actor = MergeActor.options(**options).remote(ctx.cfg.model.path, subsets)
    ctx.merge_memory = need


def merge(ctx: RunContext) -> None:
    """``ctx.merged``: the merged model in ``stages/merge-<hash>/``, reused when ``--resume`` finds it."""
    cfg, m = ctx.cfg, ctx.cfg.merge
    jobs = ctx.subset_jobs()
    spec = MergeSpec(
        base_model_path=cfg.model.path,
        model_paths={j.key: j.model_dir for j in jobs},
        method=m.method,
        parameters=m.parameters,
        model_parameters=m.model_parameters,
        dtype=cfg.model.dtype,
        output=m.output,
        max_shard_size=cfg.storage.max_shard_size,
        output_dir="",
    )
    # the unlearning method picks which folder of a job is merged and may rewrite the merged weights (tvn)
    h = stage_key(
        spec,
        cfg.unlearn.method,
        method_params_key(cfg),
        base_model_path=model_fingerprint(cfg.model.path),
        model_paths={j.key: j.model_hash for j in jobs},
    )
    folder = ctx.out / "stages" / f"merge-{h}"
    ctx.display.add("merge", f"merge ({m.method})")
    reused = claim(folder, MERGE_MARKER, ctx.resume)
    seconds = None
    if not reused:
        ctx.display.update("merge", info="merging")
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                follow_merge(
                    ctx,
                    ctx.merge_actor.merge.remote(
                        m.method,
                        m.parameters,
                        m.model_parameters,
                        cfg.model.dtype,
                        str(folder),
                        (cfg.unlearn.method, cfg.unlearn.params),
                        m.output,
                        cfg.storage.max_shard_size,
                    ),
                )
                break
            except ray.exceptions.RayActorError as e:  # its process died (killed, OOM): the merge alone again
                if attempt == 2:
                    raise PipelineError(
                        f"merge ({m.method}) failed: the merge actor died twice ({root_message(e)})"
                    ) from None
                ctx.display.log(f"merge: the merge actor died ({root_message(e)}); merging again in a new one")
                claim(folder, MERGE_MARKER, resume=False)  # whatever it left half-written
                start_merge_actor(ctx)
                ray.get([ctx.merge_actor.add.remote(j.key, j.model_dir) for j in jobs])
            except Exception as e:
                raise PipelineError(f"merge ({m.method}) failed: {root_message(e)}") from None
        seconds = time.perf_counter() - t0
    ctx.merged = Merged(str(folder), h, reused, seconds)
    ctx.display.finish("merge", "reused (resume)" if reused else "done")


def follow_merge(ctx: RunContext, ref: ray.ObjectRef) -> str:
    """Wait for the merge actor's ``merge`` call, its tensors merged of the total on the display and a log line
    at each quarter (a 70B merge takes an hour)."""
    quarters = 0
    while True:
        done, _ = ray.wait([ref], timeout=1.0)
        if done:
            return ray.get(ref)
        written, total = ray.get(ctx.merge_actor.progress.remote())
        if total:
            ctx.display.update("merge", done=written, total=total, info="tensors merged")
            if 4 * written // total > quarters:
                quarters = 4 * written // total
                ctx.display.log(f"merge: {written}/{total} tensors merged")
        ctx.display.heartbeat()
