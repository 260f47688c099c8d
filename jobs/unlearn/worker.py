"""One worker's share of an unlearning job, around the steps that ``jobs.unlearn.loop`` runs: its set-up in the order
ZeRO-3 needs it (``setup``), each step's one read-back and row, and what a row may call for (the logged retain
loss, a snapshot, a checkpoint, a report) up to the output model (``Worker``)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
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
from jobs.unlearn.engine import deepspeed_config, import_deepspeed, loop_clips, make_optimizer, make_schedule
from jobs.unlearn.methods import build_method
from jobs.unlearn.methods.base import sequence_logprob
from jobs.unlearn.outputs import SETUP_FILE, STOP_FILE, load_checkpoint, save_checkpoint, save_final, save_snapshot
from jobs.unlearn.partitioned import count_every_forward, hidden_size
from jobs.unlearn.reference import add_lora, frozen_model, load_trained, parameter_count, reference_model


class NonFiniteLossError(FloatingPointError):
    """A loss that is not finite on some rank: the job fails and is not retried (a restart would diverge again)."""


def _scalar(value: Any, device: Any) -> torch.Tensor:
    """A 0-d float32 tensor on ``device`` from a (detached) tensor or a number."""
    if torch.is_tensor(value):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(value), device=device)


def sync_step(
    device: Any, shared: list[Any], local: dict[str, Any], world: int, same: Optional[dict[str, Any]] = None
) -> tuple[list[float], dict[str, float]]:
    """The one read-back of an optimizer step (the loop's sync budget).

    ``shared``: numbers summed over ranks (token counts, a non-finite flag, rank 0's report decision); ``local``:
    this rank's loss and metrics, averaged over the ranks (the global batch's values, ``jobs.unlearn.data``).
    Both are packed into one tensor on the engine's ``device`` (NCCL rejects CPU tensors) and all-reduced: the
    step's only collective, so every rank takes the same branch and no one hangs. ``same``: values every rank
    holds already (the global grad norm), read back in the same copy. With one rank (``world`` 1) there is
    nothing to agree on and no collective. Returns (the summed ``shared`` values, ``local`` and ``same`` as
    floats)."""
    same = same or {}
    packed = torch.cat(
        [
            _scalar(shared[0], device).view(1),
            torch.tensor([float(v) for v in shared[1:]], device=device),
            *([torch.stack([_scalar(v, device) for v in local.values()])] if local else []),
        ]
    )
    if world > 1:
        dist.all_reduce(packed)
        packed[len(shared) :] /= dist.get_world_size()
    flat = (
        torch.cat([packed, torch.stack([_scalar(v, device) for v in same.values()])]).tolist()
        if same
        else packed.tolist()
    )
    return flat[: len(shared)], dict(zip([*local, *same], flat[len(shared) :]))


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


def every(n: Optional[int], step: int, last: bool) -> bool:
    """Whether ``step`` is one of every ``n``-th steps (``n`` unset: none); the last step never is: it makes the
    job's output."""
    return bool(n) and step % n == 0 and not last


@dataclass
class StepOutput:
    """One optimizer step's numbers, left on the device until ``Worker.read_back`` reads them in one copy."""

    losses: list[torch.Tensor] = field(default_factory=list)  # each micro batch's loss, detached
    metrics: dict[str, list[Any]] = field(default_factory=dict)  # each micro batch's method metrics
    tokens: int = 0  # this rank's attention-mask tokens
    grad_norm: Any = None  # global, before clipping
    retain: Optional[dict] = None  # the last micro batch's retain part (for the logged retain loss)

    def add(self, host: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Count a micro batch's tokens from its host copy (no device sync) and keep its metrics."""
        self.tokens += sum(int(v["attention_mask"].sum()) for v in host.values() if v is not None)
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append(v)


@dataclass
class Worker:
    """What one worker's steps work with (built once by ``setup``) and how far they have got."""

    spec: UnlearnSpec  # with this worker's micro batch and accumulation steps
    rank: int
    world: int
    engine: Any
    method: Any
    tokenizer: Any
    data: StepBatches
    steps: int
    n_params: int  # the cost report's N (6 N x tokens per step)
    phases: _Phases
    ref_model: Any = None
    scheduler: Any = None
    masked: Any = None  # localize's MaskedUpdate, which undoes every update outside the mask
    localize_stats: dict[str, Any] = field(default_factory=dict)
    zero3: bool = False
    clip: Optional[float] = None  # the loop clips the gradients itself to this (plain stage 0)
    ds_norm: bool = False  # DeepSpeed's optimizer measures the grad norm in step()
    resumed_from: int = 0  # the restored checkpoint's step
    tokens: float = 0.0  # summed over ranks since the first step
    t0: float = 0.0
    last_report: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows since the last report

    def read_back(self, step: int, out: StepOutput) -> tuple[dict[str, Any], bool, bool]:
        """The step's row from its one read-back (``sync_step``), and whether rank 0 calls for a report and for
        a stop; a non-finite loss on any rank raises ``NonFiniteLossError`` on every rank at the same step."""
        device, spec = self.engine.device, self.spec
        stacked = torch.stack(out.losses)
        local = {
            "loss": stacked.mean(),
            **{k: torch.stack([_scalar(x, device) for x in v]).mean() for k, v in out.metrics.items()},
        }
        # rank 0's clock decides the interval reports for every rank, and rank 0 reads the driver's stop
        # request (both ride in the same collective)
        due = self.rank == 0 and time.perf_counter() - self.last_report >= spec.report_interval_s
        stop = self.rank == 0 and (Path(spec.output_dir) / STOP_FILE).exists()
        (nonfinite, new_tokens, due_any, stop_any), values = sync_step(
            device,
            [(~torch.isfinite(stacked)).any(), out.tokens, float(due), float(stop)],
            local,
            self.world,
            same={"grad_norm": out.grad_norm if out.grad_norm is not None else float("nan")},
        )
        if nonfinite > 0:
            bad = next((x for x in stacked.tolist() if not math.isfinite(x)), None)
            raise NonFiniteLossError(
                f"job {spec.name}: loss became {bad if bad is not None else 'non-finite on another rank'} at step "
                f"{step} (method {spec.method}, lr {spec.optimizer.lr}); lower unlearn.optimizer.lr or check the data"
            )
        self.tokens += new_tokens
        elapsed = time.perf_counter() - self.t0
        row = {k: v for k, v in values.items() if k != "grad_norm"}
        row.update(
            step=step,
            total_steps=self.steps,
            epoch=self.data.epoch(step),
            lr=self.scheduler.get_last_lr()[0] if self.scheduler is not None else spec.optimizer.lr,
            grad_norm=values["grad_norm"],
            tokens_per_s=self.tokens / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            step_tokens=new_tokens,
        )
        return row, due_any > 0, stop_any > 0

    def annotate(self, row: dict[str, Any], step: int, stop: bool, last: bool) -> None:
        """Add the keys a row carries once: step 1's localize statistics, ``resumed_from`` after a restore,
        ``stopped_early`` on a stopped job's last row, and the model's size on the last row."""
        if step == 1:
            row.update(self.localize_stats)
        if self.resumed_from:
            row["resumed_from"] = self.resumed_from
        if stop and step < self.steps:
            row["stopped_early"] = 1
        if last:
            row["params"] = self.n_params

    def write_setup_times(self) -> None:
        """Rank 0 records this start's set-up phases, up to its first step, for ``benchmarks/first_step.py``."""
        if self.rank == 0:
            self.phases.end("first_step")
            self.phases.write(Path(self.spec.output_dir) / SETUP_FILE)

    def save_snapshot(self, step: int) -> str:
        """The model as it stands, in ``snapshots/step_<N>/``, for the driver to score while training goes on."""
        return save_snapshot(self.engine, self.tokenizer, self.spec, self.rank, step, self.method)

    def log_retain_loss(self, row: dict[str, Any], retain: Optional[dict]) -> None:
        """A reported row shows the retain NLL even where the method's loss has no retain term (every rank
        takes this branch: a collective)."""
        if "retain_loss" not in row and retain is not None:
            row["retain_loss"] = logged_nll(self.engine, retain, self.world)

    def publish(self, report: Optional[Callable[..., None]], step: int, checkpoint: bool) -> None:
        """Hand the rows since the last report to ``report``, with a resumable checkpoint folder when one is due
        (the callback copies it before it returns; it is deleted then)."""
        if checkpoint:
            folder = save_checkpoint(self.engine, self.spec, step, self.rank, self.world, self.method)
            try:
                if report is not None:
                    report(self.rows, checkpoint=folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        elif report is not None:
            report(self.rows)
        # a fresh list: the callback may keep the one it was handed
        self.rows, self.last_report = [], time.perf_counter()

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """Save the job's output model and marker; returns the final metrics, localize's statistics included."""
        final = {**final, **self.localize_stats}
        save_final(self.engine, self.tokenizer, self.spec, self.rank, final, self.method)
        return final


def setup(spec: UnlearnSpec, restore_from: Optional[str] = None) -> Worker:
    """A worker ready for its first step, each set-up phase timed for ``SETUP_FILE``; ``restore_from`` (a
    checkpoint folder) restores the engine, the random state and the step to go on after."""
    phases = _Phases()
    unmap_large_frees()
    deepspeed = import_deepspeed()
    phases.end("import_deepspeed")
    spec, rank, world, ds_config = _join_group(deepspeed, spec)
    phases.end("process_group")

    method = build_method(spec.method, spec.method_params)
    tokenizer = load_tokenizer(spec.model_path)
    model = load_trained(spec, ds_config)
    release_free_memory()  # the full-size tensors a ZeRO-3 load creates and partitions, freed but still resident
    n_params = parameter_count(model)
    phases.end("model_load")
    _prepare_for_training(model, spec)

    forget_rows, retain_rows = _read_rows(spec, method)
    data = StepBatches(
        encode_rows(forget_rows, tokenizer, spec, "forget", method),
        encode_rows(retain_rows, tokenizer, spec, "retain") if retain_rows else None,
        spec.seed,
        spec.batch_size,
        spec.gradient_accumulation_steps,
        rank,
        world,
        tokenizer.pad_token_id,
    )
    steps = total_steps(spec, len(forget_rows), data.size)
    phases.end("data")

    method.setup(model)
    if spec.lora is not None:
        model = add_lora(model, spec)
    masked, localize_stats = _localize(model, spec, tokenizer, forget_rows, retain_rows)
    engine, scheduler, own_clip = _initialize(deepspeed, model, spec, ds_config, steps)
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
    phases.end("deepspeed_init")  # the mask, the engine and the frozen models

    worker = Worker(
        spec=spec,
        rank=rank,
        world=world,
        engine=engine,
        method=method,
        tokenizer=tokenizer,
        data=data,
        steps=steps,
        n_params=n_params,
        phases=phases,
        ref_model=ref_model,
        scheduler=scheduler,
        masked=masked,
        localize_stats=localize_stats,
        zero3=zero3,
        clip=clip,
        ds_norm=ds_norm,
    )
    if restore_from:
        worker.resumed_from = load_checkpoint(engine, restore_from, rank, world, spec, method)
    worker.t0 = worker.last_report = time.perf_counter()
    return worker


def _join_group(deepspeed, spec: UnlearnSpec) -> tuple[UnlearnSpec, int, int, dict[str, Any]]:
    """Join the job's process group and size this worker's share: (the spec with its micro batch and
    accumulation steps, rank, world size, the DeepSpeed config)."""
    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(spec.seed)
    # joins the process group Ray Train made (or makes one): DeepSpeed's config checks and zero.Init read its
    # view of the group, which exists only once this ran
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum = split_batch(spec.batch_size, spec.gradient_accumulation_steps, spec.global_batch_size, world)
    spec = spec.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accum})
    return spec, rank, world, deepspeed_config(spec, world, hidden_size(spec.model_path))


def _prepare_for_training(model, spec: UnlearnSpec) -> None:
    """No KV cache (training never reuses it) and, if asked, activation checkpointing without reentrancy."""
    model.config.use_cache = False
    if spec.gradient_checkpointing:  # transformers 5 names it activation checkpointing
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _read_rows(spec: UnlearnSpec, method) -> tuple[list[dict], list[dict]]:
    """The job's forget and retain rows; an empty forget set, or a method that needs retain rows without any,
    fails here rather than at its first step."""
    forget_rows = load_jsonl(spec.forget_path)
    retain_rows = load_jsonl(spec.retain_path) if spec.retain_path else []
    if not forget_rows:
        raise ValueError(f"job {spec.name}: forget data {spec.forget_path} is empty")
    if method.uses_retain() and not retain_rows:
        raise ValueError(f"job {spec.name}: method {spec.method!r} needs retain data (data.retain)")
    return forget_rows, retain_rows


def _initialize(deepspeed, model, spec: UnlearnSpec, ds_config: dict[str, Any], steps: int):
    """``deepspeed.initialize`` with the loop's own optimizer and schedule where the config names none; returns
    (engine, scheduler, whether the loop clips the gradients itself)."""
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
    return engine, scheduler, own_clip


def _localize(model, spec: UnlearnSpec, tokenizer, forget_rows: list[dict], retain_rows: list[dict]):
    """With ``spec.localize``: attribute on the whole forget (and retain) set, keep the top fraction, and
    return the ``MaskedUpdate`` that freezes the rest (before the optimizer is built) and its stats. A model
    created partitioned (ZeRO-3) is gathered whole on every rank while the attribution scores it."""
    if spec.localize is None:
        return None, {}
    from jobs.localize import MaskedUpdate, compute_mask, mask_stats

    def batches(rows: list[dict], part: str) -> list[dict]:
        enc = encode_rows(rows, tokenizer, spec, part)
        return [
            collate([e[part] for e in enc[i : i + spec.batch_size]], tokenizer.pad_token_id)
            for i in range(0, len(enc), spec.batch_size)
        ]

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gathered = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned)
    with gathered:
        mask = compute_mask(
            model, batches(forget_rows, "forget"), batches(retain_rows, "retain") if retain_rows else [], spec.localize
        )
    return MaskedUpdate(model, mask), {f"localize/{k}": v for k, v in mask_stats(mask, model).items()}
