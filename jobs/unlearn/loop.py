"""The per-worker unlearning loop: Ray Train's ``train_loop_per_worker`` around ``deepspeed.initialize``.

Every worker of a job runs ``train_loop_per_worker({"spec": UnlearnSpec dict})``. Ray Train has set up
torch.distributed (gloo on CPU, nccl on GPU); DeepSpeed joins that process group. Under ZeRO-3 the trained model and
every frozen model are created partitioned (``jobs.unlearn.partitioned``): no rank holds a whole copy. Each step's
rows come from ``jobs.unlearn.data`` (an order and a global batch that do not depend on the worker count). The
method named in the spec turns each batch into a loss; the loop knows nothing else about it. Rank 0 saves the final
model as a Hugging Face folder (under ZeRO-3 gathered one tensor at a time) and writes ``spunge_job.json``.

With ``spec.eval_every`` rank 0 writes the model as it stands every N steps into
``<output_dir>/snapshots/step_<N>/`` (the same folder the job's output is: a HF model, an adapter, or a
finalized model with ``trained/``) and reports at once, its row naming the folder (``snapshot``); the driver
scores it with Ray eval tasks while training goes on and picks the job's model among them. When the driver
writes ``STOP_FILE`` into the output folder the job ends after the current step (early stopping), the last
row carrying ``stopped_early``.

With ``spec.checkpoint_every`` the loop saves a resumable checkpoint every N steps (DeepSpeed's own
``save_checkpoint``: model, optimizer, scheduler, each rank's shards, plus each rank's RNG state and the
step) and hands it to Ray Train with that step's report; when Ray Train restarts the worker group after a
failure (``FailureConfig(max_failures)``), ``ray.train.get_checkpoint()`` holds the latest one and the
loop continues from the step after it, with the same data order. Rows after a restore carry
``resumed_from`` (the restored step).

The loop keeps a sync budget (as torchtune does): the loss, the method's metrics and the grad norm stay
detached tensors on the device during a step; at the step's end they are read back in one copy. The numbers
every rank must agree on (token count, a non-finite flag, rank 0's report decision) and the loss and metrics,
averaged into the global batch's, travel in one packed ``all_reduce`` (none with one rank). On plain ZeRO
stage 0 the loop clips the gradients itself (``loop_clips``), which gives the grad norm without a second pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from jobs.allocator import release_free_memory, unmap_large_frees
from jobs.data.format import collate
from jobs.data.io import load_jsonl
from jobs.models import load_tokenizer
from jobs.spec import UnlearnSpec
from jobs.unlearn.data import StepBatches, encode_rows, split_batch, total_steps
from jobs.unlearn.engine import (deepspeed_config, deepspeed_grad_norm, import_deepspeed, loop_clips, make_optimizer,
                                 make_schedule, step_grad_norm)
from jobs.unlearn.methods import build_method
from jobs.unlearn.methods.base import sequence_logprob, terms_later
from jobs.unlearn.outputs import (ATTEMPTS_FILE, FAILED_MARKER, SETUP_FILE, STEPS_FILE, STOP_FILE, load_checkpoint,
                                  save_checkpoint, save_final, save_snapshot)
from jobs.unlearn.partitioned import count_every_forward, hidden_size, reset_backward_counts
from jobs.unlearn.reference import add_lora, frozen_model, load_trained, parameter_count, reference_model


class NonFiniteLossError(FloatingPointError):
    pass


def _to(batch: Optional[dict], device) -> Optional[dict]:
    return None if batch is None else {k: v.to(device) for k, v in batch.items()}


def _scalar(value: Any, device: Any) -> torch.Tensor:
    """A 0-d float32 tensor on ``device`` from a (detached) tensor or a number."""
    if torch.is_tensor(value):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), device=device)


def sync_step(device: Any, shared: list[Any], local: dict[str, Any], world: int,
              same: Optional[dict[str, Any]] = None) -> tuple[list[float], dict[str, float]]:
    """The one read-back of an optimizer step (the loop's sync budget).

    ``shared``: numbers summed over ranks (token counts, a non-finite flag, rank 0's report decision); ``local``:
    this rank's loss and metrics, averaged over the ranks (the global batch's values, ``jobs.unlearn.data``).
    Both are packed into one tensor on the engine's ``device`` (NCCL rejects CPU tensors) and all-reduced: the
    step's only collective, so every rank takes the same branch and no one hangs. ``same``: values every rank
    holds already (the global grad norm), read back in the same copy. With one rank (``world`` 1) there is
    nothing to agree on and no collective. Returns (the summed ``shared`` values, ``local`` and ``same`` as
    floats)."""
    same = same or {}
    packed = torch.cat([_scalar(shared[0], device).view(1),
                        torch.tensor([float(v) for v in shared[1:]], device=device),
                        *([torch.stack([_scalar(v, device) for v in local.values()])] if local else [])])
    if world > 1:
        dist.all_reduce(packed)
        packed[len(shared):] /= dist.get_world_size()
    flat = torch.cat([packed, torch.stack([_scalar(v, device) for v in same.values()])]).tolist() if same \
        else packed.tolist()
    return flat[: len(shared)], dict(zip([*local, *same], flat[len(shared):]))


def logged_nll(engine, part: dict, world: int) -> float:
    """Token-mean NLL of ``part`` over every rank's rows (a collective with more than one rank)."""
    with torch.no_grad():
        logp, n = sequence_logprob(engine, part)
        both = torch.stack([-logp.sum().float(), n.sum().float()])
    if world > 1:
        dist.all_reduce(both)
    total, count = both.tolist()
    return total / max(count, 1.0)


class _Phases:
    """Seconds spent in each named set-up phase, in order (each from the end of the previous one)."""

    def __init__(self) -> None:
        self.started, self.last, self.seconds = time.time(), time.perf_counter(), {}

    def end(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"started": self.started, "setup_s": self.seconds}) + "\n")


def run_unlearning(spec: UnlearnSpec, report: Optional[Callable[..., None]] = None,
                   restore_from: Optional[str] = None) -> dict[str, Any]:
    """Run one worker's share of an unlearning job; returns the last step's metrics.

    Every optimizer step yields a row of metrics, the same on every rank: ``loss`` and the method's parts (the
    global batch's: each rank's means over its micro-batches, averaged over the ranks), ``grad_norm`` (global,
    before clipping), ``lr``, ``tokens_per_s`` (every rank's tokens since the first step over ``elapsed_s``).
    ``report(rows)`` receives the rows gathered since the last call, every ``report_interval_s`` seconds of
    rank 0's clock and after the last step, on every rank at the same steps (Ray Train's ``report`` is a
    barrier). A non-finite loss on any rank raises ``NonFiniteLossError`` on every rank at the end of that step.
    With ``spec.checkpoint_every``, every N-th step (but the last) is reported as
    ``report(rows, checkpoint=folder)``: a local folder from ``save_checkpoint`` that the callback must copy
    before it returns (it is deleted then). ``restore_from`` (such a folder) resumes after its step."""
    setup = _Phases()
    unmap_large_frees()
    deepspeed = import_deepspeed()
    setup.end("import_deepspeed")
    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(spec.seed)
    # joins the process group Ray Train made (or makes one): DeepSpeed's config checks and zero.Init read its
    # view of the group, which exists only once this ran
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum = split_batch(spec.batch_size, spec.gradient_accumulation_steps, spec.global_batch_size, world)
    spec = spec.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum})
    ds_config = deepspeed_config(spec, world, hidden_size(spec.model_path))
    setup.end("process_group")

    method = build_method(spec.method, spec.method_params)
    tokenizer = load_tokenizer(spec.model_path)
    model = load_trained(spec, ds_config)
    release_free_memory()  # the full-size tensors a ZeRO-3 load creates and partitions, freed but still resident
    n_params = parameter_count(model)  # the cost report's N (6 N x tokens per step)
    setup.end("model_load")
    model.config.use_cache = False
    if spec.gradient_checkpointing:  # transformers 5 names it activation checkpointing
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    forget_rows = load_jsonl(spec.forget_path)
    retain_rows = load_jsonl(spec.retain_path) if spec.retain_path else []
    if not forget_rows:
        raise ValueError(f"job {spec.name}: forget data {spec.forget_path} is empty")
    if method.uses_retain() and not retain_rows:
        raise ValueError(f"job {spec.name}: method {spec.method!r} needs retain data (data.retain)")
    data = StepBatches(encode_rows(forget_rows, tokenizer, spec, "forget", method),
                       encode_rows(retain_rows, tokenizer, spec, "retain") if retain_rows else None,
                       spec.seed, micro, accum, rank, world, tokenizer.pad_token_id)
    steps = total_steps(spec, len(forget_rows), data.size)
    setup.end("data")

    method.setup(model)
    if spec.lora is not None:
        model = add_lora(model, spec)
    masked, localize_stats = _localize(model, spec, tokenizer, forget_rows, retain_rows)
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], spec.optimizer, ds_config)
        scheduler = make_schedule(optimizer, spec.optimizer, steps)
    own_clip = loop_clips(ds_config)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
        config={**ds_config, "gradient_clipping": 0.0} if own_clip else ds_config,
    )
    device = engine.device
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:
        count_every_forward(engine)
    # how the row's grad norm is had: the loop's own clipping (plain stage 0), DeepSpeed's optimizer after
    # step() (ZeRO, fp16/bf16 optimizers), or else measured before step()
    clip = float(ds_config["gradient_clipping"]) if own_clip else None
    ds_norm = not own_clip and (engine.zero_optimization_stage() > 0 or hasattr(engine.optimizer, "_global_grad_norm"))
    if own_clip and world == 1:
        engine.enable_backward_allreduce = False  # averaging gradients over one rank: a no-op collective per step
    ref_model = reference_model(engine, spec, ds_config) if method.needs_reference else None
    for attr, path in method.frozen_models().items():
        setattr(method, attr, frozen_model(path, engine, spec, ds_config))
    release_free_memory()
    engine.train()
    setup.end("deepspeed_init")  # the mask, the engine and the frozen models

    resumed_from = load_checkpoint(engine, restore_from, rank, world, spec, method) if restore_from else 0
    t0 = last_report = time.perf_counter()
    tokens = 0.0  # summed over ranks since the first step
    rows: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    for step in range(resumed_from + 1, steps + 1):
        # the sync budget: losses and metrics stay (detached) on the device; the host reads them once, at the
        # step's end, packed with the step's one collective (sync_step)
        losses: list[torch.Tensor] = []
        parts: dict[str, list[Any]] = {}
        step_tokens, grad_norm = 0, None
        for host in data.micro_batches(step):
            batch = {k: _to(v, device) for k, v in host.items()}
            # under ZeRO-3 the method's independent terms (the retain NLL) are built and back-propagated after
            # the rest: one graph at a time, so each layer is released after its backward (terms_later)
            if zero3:
                reset_backward_counts(engine.module)
            with terms_later(enabled=zero3) as later:
                out = method.loss(engine, batch, ref_model)
            loss = out.loss.detach().float()
            engine.backward(out.loss)
            for term in later:
                part = term()
                loss = loss + part.detach().float()
                engine.backward(part)
            losses.append(loss.reshape(()))
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and not ds_norm:
                grad_norm = step_grad_norm(engine, clip)
            engine.step()
            if masked is not None and boundary:
                masked.restore(engine)  # every rank: a collective under ZeRO-3
            # the batches are still on the host here: counting their tokens costs no device sync
            step_tokens += sum(int(v["attention_mask"].sum()) for v in host.values() if v is not None)
            for k, v in out.metrics.items():
                parts.setdefault(k, []).append(v)
        if ds_norm:
            grad_norm = deepspeed_grad_norm(engine)
        stacked = torch.stack(losses)
        local = {"loss": stacked.mean(), **{k: torch.stack([_scalar(x, device) for x in v]).mean()
                                            for k, v in parts.items()}}
        # rank 0's clock decides the interval reports for every rank, and rank 0 reads the driver's stop
        # request (both ride in the same collective)
        due = rank == 0 and time.perf_counter() - last_report >= spec.report_interval_s
        stop = rank == 0 and (Path(spec.output_dir) / STOP_FILE).exists()
        (nonfinite, new_tokens, due_any, stop_any), values = sync_step(
            device, [(~torch.isfinite(stacked)).any(), step_tokens, float(due), float(stop)], local, world,
            same={"grad_norm": grad_norm if grad_norm is not None else float("nan")})
        if nonfinite > 0:  # on any rank: every rank raises at the same step
            bad = next((x for x in stacked.tolist() if not math.isfinite(x)), None)
            raise NonFiniteLossError(
                f"job {spec.name}: loss became {bad if bad is not None else 'non-finite on another rank'} at step "
                f"{step} (method {spec.method}, lr {spec.optimizer.lr}); lower unlearn.optimizer.lr or check the data"
            )
        tokens += new_tokens
        elapsed = time.perf_counter() - t0
        row = {k: v for k, v in values.items() if k != "grad_norm"}
        row.update(
            step=step,
            total_steps=steps,
            epoch=data.epoch(step),
            lr=scheduler.get_last_lr()[0] if scheduler is not None else spec.optimizer.lr,
            grad_norm=values["grad_norm"],
            tokens_per_s=tokens / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            step_tokens=new_tokens,
        )
        if step == resumed_from + 1:
            if step == 1:
                row.update(localize_stats)
            if rank == 0:
                setup.end("first_step")
                setup.write(Path(spec.output_dir) / SETUP_FILE)
        if resumed_from:
            row["resumed_from"] = resumed_from
        last = step == steps or stop_any > 0
        if stop_any > 0 and step < steps:
            row["stopped_early"] = 1
        if last:
            row["params"] = n_params
        if spec.eval_every and step % spec.eval_every == 0 and not last:  # the last step's model is the output
            row["snapshot"] = save_snapshot(engine, tokenizer, spec, rank, step, method)
        rows.append(row)
        final = row
        checkpoint_due = bool(spec.checkpoint_every) and step % spec.checkpoint_every == 0 and not last
        if last or checkpoint_due or due_any > 0 or "snapshot" in row:
            if "retain_loss" not in row and batch["retain"] is not None:  # every rank takes this branch
                row["retain_loss"] = logged_nll(engine, batch["retain"], world)
            if checkpoint_due:
                folder = save_checkpoint(engine, spec, step, rank, world, method)
                try:
                    if report is not None:
                        report(rows, checkpoint=folder)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            elif report is not None:
                report(rows)
            rows, last_report = [], time.perf_counter()
        if last:
            break

    final = {**final, **localize_stats}
    save_final(engine, tokenizer, spec, rank, final, method)
    return final


def _localize(model, spec: UnlearnSpec, tokenizer, forget_rows: list[dict], retain_rows: list[dict]):
    """With ``spec.localize``: attribute on the whole forget (and retain) set, keep the top fraction, and
    return the ``MaskedUpdate`` that freezes the rest (before the optimizer is built) and its stats. A model
    created partitioned (ZeRO-3) is gathered whole on every rank while the attribution scores it."""
    if spec.localize is None:
        return None, {}
    from jobs.localize import MaskedUpdate, compute_mask, mask_stats

    def batches(rows: list[dict], part: str) -> list[dict]:
        enc = encode_rows(rows, tokenizer, spec, part)
        return [collate([e[part] for e in enc[i : i + spec.batch_size]], tokenizer.pad_token_id)
                for i in range(0, len(enc), spec.batch_size)]

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gathered = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned)
    with gathered:
        mask = compute_mask(model, batches(forget_rows, "forget"),
                            batches(retain_rows, "retain") if retain_rows else [], spec.localize)
    return MaskedUpdate(model, mask), {f"localize/{k}": v for k, v in mask_stats(mask, model).items()}


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``ray.train.torch.TorchTrainer``: config is ``{"spec": UnlearnSpec.model_dump()}``."""
    import ray.train

    spec = UnlearnSpec(**config["spec"])
    ctx = ray.train.get_context()

    def report(rows: list[dict], checkpoint: Optional[str] = None) -> None:
        # rank 0's report is the one Ray Train keeps: its last row, plus every row since the previous report;
        # every rank hands over its checkpoint folder, and Ray Train copies them all into one folder.
        # Rank 0 also appends the rows to the job's folder: a driver that resumes the job after a kill reads
        # the steps before its checkpoint there (they are all reported at the latest at the checkpoint).
        if ctx.get_world_rank() == 0:
            with open(Path(spec.output_dir) / STEPS_FILE, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        metrics = {**rows[-1], "history": rows, "rank": ctx.get_world_rank()}
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                             checkpoint_dir_name=f"checkpoint_step{rows[-1]['step']:07d}")

    out = Path(spec.output_dir)
    latest = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    if ctx.get_world_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps({"started": time.time(), "from_checkpoint": latest is not None}) + "\n")
    try:
        if latest is None:
            run_unlearning(spec, report=report)
        else:
            with latest.as_directory() as folder:
                run_unlearning(spec, report=report, restore_from=folder)
    except NonFiniteLossError as e:
        # not a crash: a restart would diverge again. Every rank saw it (the check is collective), so every
        # rank returns normally and Ray Train does not retry; the driver raises from the marker.
        if ctx.get_world_rank() == 0:
            (out / FAILED_MARKER).write_text(json.dumps({"error": str(e), "kind": "non_finite_loss"}))
