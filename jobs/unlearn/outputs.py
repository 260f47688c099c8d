"""What an unlearning job writes to disk: the output model and its marker, the snapshots of ``eval_every``, and
the resumable checkpoints of ``checkpoint_every`` (with each rank's random state), under the names the
orchestrator reads them by. Every function here is called on every rank where a collective is involved
(ZeRO-3 gathers, DeepSpeed's checkpoint I/O) and writes from rank 0 only, unless it says otherwise."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from jobs.models import load_model, save_model
from jobs.spec import UnlearnSpec
from jobs.unlearn.reference import adapter_state, save_adapter

JOB_MARKER = "spunge_job.json"
FAILED_MARKER = "spunge_failed.json"  # a job that must not be retried (a non-finite loss) says why here
ATTEMPTS_FILE = "attempts.jsonl"  # one line per start of the job's workers (Ray Train restarts included)
STEPS_FILE = "steps.jsonl"  # every reported step row, appended by rank 0 (a restart's replays included)
SETUP_FILE = "setup.json"  # rank 0's set-up phases of the latest start, in seconds (benchmarks/first_step.py)
CHECKPOINT_STATE = "spunge_checkpoint.json"  # written by rank 0 into every resumable checkpoint
CHECKPOINT_TAG = "spunge"  # DeepSpeed's tag (sub-folder) inside a checkpoint folder
SNAPSHOTS_DIR = "snapshots"  # spec.eval_every: <output_dir>/snapshots/step_<N>/, each a model folder like the output
SNAPSHOT_MARKER = "spunge_snapshot.json"  # written last into every snapshot folder
STOP_FILE = "spunge_stop.json"  # the driver asks a running job to stop early (unlearn.select.patience)


def checkpoint_name(step: int) -> str:
    """A resumable checkpoint's folder name, in step order when sorted (Ray Train's and the in-process job's)."""
    return f"checkpoint_step{step:07d}"


def rng_state(method=None) -> dict[str, Any]:
    """This process's random state: torch, Python, CUDA, and every ``torch.Generator`` the method holds
    (e.g. a relabelling method's own generator), so that a restored run draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gens = vars(method).items() if method is not None else ()
    state["method"] = {k: (str(g.device), g.get_state()) for k, g in gens if isinstance(g, torch.Generator)}
    state["method_attrs"] = {k: getattr(method, k) for k in getattr(method, "state_attrs", ())}
    return state


def set_rng_state(state: dict[str, Any], method=None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, (device, gen_state) in state.get("method", {}).items() if method is not None else ():
        gen = torch.Generator(device=device)
        gen.set_state(gen_state)
        setattr(method, name, gen)
    for name, value in state.get("method_attrs", {}).items() if method is not None else ():
        setattr(method, name, value)


def save_checkpoint(engine, spec: UnlearnSpec, step: int, rank: int, world: int, method=None) -> str:
    """Every rank writes its part of a resumable checkpoint into a fresh local folder (DeepSpeed's
    ``save_checkpoint`` is collective: rank 0 writes the model and, without ZeRO, the optimizer; each rank
    its ZeRO shards) plus its RNG state; rank 0 adds the step. Ray Train uploads every rank's folder into
    one checkpoint folder. Returns the local folder; the caller removes it after the upload."""
    folder = Path(tempfile.mkdtemp(prefix=f"spunge-ckpt-{step}-rank{rank}-"))
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG)
    torch.save(rng_state(method), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {"job": spec.name, "step": step, "world_size": world, "tag": CHECKPOINT_TAG}
        (folder / CHECKPOINT_STATE).write_text(json.dumps(state))
    return str(folder)


def load_checkpoint(engine, folder: str, rank: int, world: int, spec: UnlearnSpec, method=None) -> int:
    """Restore a checkpoint written by ``save_checkpoint`` on every rank; returns its step."""
    path = Path(folder)
    if not (path / CHECKPOINT_STATE).exists():
        raise FileNotFoundError(f"job {spec.name}: checkpoint {folder} has no {CHECKPOINT_STATE}")
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    if state["world_size"] != world:
        raise ValueError(
            f"job {spec.name}: checkpoint {folder} was written by {state['world_size']} workers, "
            f"this run has {world} (scaling.num_workers)"
        )
    loaded, _ = engine.load_checkpoint(folder, tag=state["tag"])
    if loaded is None:
        raise RuntimeError(f"job {spec.name}: DeepSpeed could not load checkpoint {folder}")
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False), method)
    return int(state["step"])


def write_model(engine, tokenizer, spec: UnlearnSpec, rank: int, out: Optional[Path], method=None) -> None:
    """The model as the job outputs it, written into ``out`` by rank 0 in shards of ``spec.max_shard_size`` (a
    LoRA job: the peft adapter folder); under ZeRO-3 every rank takes part in gathering the shards, one tensor
    at a time (``write_partitioned``; a LoRA job gathers only its adapters). A method whose ``finalize`` makes
    new weights (task-vector negation) gets those as the output, and the trained weights in ``<out>/trained``;
    only such a method reads the base model here. Collective: every rank calls it (``out`` None: take part in
    the gather, write nothing)."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    finalizes = method is not None and method.finalizes()
    if stage == 3:  # parameters a step prefetched may still be in flight: a gather of them would fail
        engine.empty_partition_cache()
    if (
        spec.lora is None
        and stage == 3
        and write_partitioned(engine, tokenizer, spec, rank, out, method if finalizes else None)
    ):
        return
    if spec.lora is not None:
        state_dict = adapter_state(engine, stage)
    else:
        state_dict = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if rank != 0 or out is None:
        return
    if state_dict is None:
        state_dict = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    if spec.lora is not None:
        save_adapter(engine.module, tokenizer, out / "trained" if finalizes else out, state_dict)
    if finalizes:
        trained = load_model(out / "trained", spec.dtype) if spec.lora is not None else None
        base = load_model(spec.model_path, spec.dtype, spec.allow_pickle).state_dict()
        if trained is not None:  # the adapter merged into the base: the full trained weights
            state_dict, module = trained.state_dict(), trained
        else:
            save_model(
                engine.module, tokenizer, out / "trained", state_dict=state_dict, max_shard_size=spec.max_shard_size
            )
            module = engine.module
        save_model(
            module, tokenizer, out, state_dict=method.finalize(state_dict, base), max_shard_size=spec.max_shard_size
        )
    elif spec.lora is None:
        save_model(engine.module, tokenizer, out, state_dict=state_dict, max_shard_size=spec.max_shard_size)


def checkpoint_layout(module) -> Optional[dict[str, torch.Tensor]]:
    """The tensors a Hugging Face checkpoint of ``module`` holds, by name, in state-dict order (ZeRO-3
    parameters partitioned or not): its state dict without the second names of tied weights, as
    ``save_pretrained`` drops them. None when transformers would rename or convert them on saving (its weight
    conversions, e.g. fused experts), which only ``save_pretrained`` itself does."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    tensors = module.state_dict(keep_vars=True)
    meta = {
        k: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta") for k, t in tensors.items()
    }
    kept = remove_tied_weights_from_state_dict(meta, module)
    converted = revert_weight_conversion(module, dict(kept))
    if set(converted) != set(kept) or any(converted[k].shape != kept[k].shape for k in kept):
        return None
    return {k: tensors[k] for k in kept}


def write_partitioned(engine, tokenizer, spec: UnlearnSpec, rank: int, out: Optional[Path], method=None) -> bool:
    """A ZeRO-3 model's full weights into ``out`` without a whole copy anywhere: every rank gathers one tensor
    at a time (in the shards' order) and rank 0 writes it into its shard file (``jobs.shards.ShardedWriter``),
    then the config, generation config and tokenizer. With a finalizing ``method`` the gathered tensor goes to
    ``<out>/trained`` and ``method.finalize`` of it and the base's tensor (read from the base's safetensors) to
    ``out``, tensor by tensor. Collective. Returns False, having written nothing, where this cannot apply (a
    checkpoint transformers converts on saving, a base whose files do not hold the same tensors): the caller
    then saves the consolidated state dict."""
    import deepspeed

    from jobs.merge import resolve_base
    from jobs.merge_stream import Checkpoint
    from jobs.shards import ShardedWriter, plan_shards

    module = engine.module
    tensors = checkpoint_layout(module)
    base = None
    if tensors is not None and method is not None:
        base = Checkpoint(resolve_base(spec.model_path, local_only=True))  # a hub name: the snapshot it trained from
        if not set(tensors) <= set(base.shapes):
            tensors = None
    if tensors is None:
        return False
    layout = {k: (t.dtype, tuple(getattr(t, "ds_shape", t.shape))) for k, t in tensors.items()}
    order = [name for names in plan_shards(layout, spec.max_shard_size).values() for name in names]
    writers = []
    if rank == 0 and out is not None:
        writers = [ShardedWriter(out / "trained" if method is not None else out, layout, spec.max_shard_size)]
        if method is not None:
            writers.append(ShardedWriter(out, layout, spec.max_shard_size))
    for name in order:
        t = tensors[name]
        with deepspeed.zero.GatheredParameters([t] if hasattr(t, "ds_id") else []):
            value = t.detach().cpu().clone() if writers else None
        if not writers:
            continue
        writers[0].write(name, value)
        if method is not None:
            final = method.finalize({name: value}, {name: base.tensor(name).to(value.dtype)})[name]
            writers[1].write(name, final.to(value.dtype))
    module.config.dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    module.config.architectures = [type(module).__name__]
    for writer in writers:
        writer.close()
        module.config.save_pretrained(str(writer.folder))
        if module.can_generate():
            module.generation_config.save_pretrained(str(writer.folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.folder))
    return True


def _output_kind(spec: UnlearnSpec, method=None) -> str:
    return "adapter" if spec.lora is not None and not (method is not None and method.finalizes()) else "full"


def save_final(engine, tokenizer, spec: UnlearnSpec, rank: int, metrics: dict, method=None) -> None:
    """The job's output model (``write_model``) and its marker ``spunge_job.json`` in ``spec.output_dir``."""
    out = Path(spec.output_dir)
    write_model(engine, tokenizer, spec, rank, out, method)
    if rank == 0:
        marker = {
            "job": spec.name,
            "method": spec.method,
            "final_metrics": metrics,
            "output": _output_kind(spec, method),
        }
        (out / JOB_MARKER).write_text(json.dumps(marker, indent=2))
    if dist.is_initialized():
        dist.barrier()


def snapshot_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / SNAPSHOTS_DIR / f"step_{step:07d}"


def save_snapshot(engine, tokenizer, spec: UnlearnSpec, rank: int, step: int, method=None) -> str:
    """The model at ``step`` as the job would output it, in ``snapshot_dir`` (written to a temporary
    folder, then renamed, so a reader never sees half a model). A step replayed after a restart finds its
    snapshot there already (the same weights: the data order and RNG state are restored) and keeps it."""
    folder = snapshot_dir(spec.output_dir, step)
    tmp = folder.with_name(folder.name + ".tmp")
    write = rank == 0 and not folder.exists()
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
    write_model(engine, tokenizer, spec, rank, tmp if write else None, method)
    if write:
        (tmp / SNAPSHOT_MARKER).write_text(
            json.dumps({"job": spec.name, "step": step, "output": _output_kind(spec, method)})
        )
        tmp.rename(folder)
    if dist.is_initialized():
        dist.barrier()
    return str(folder)
