"""The per-worker unlearning loop: Ray Train's ``train_loop_per_worker`` around ``deepspeed.initialize``.

Every worker of a job runs ``train_loop_per_worker({"spec": UnlearnSpec dict})``. Ray Train has set up
torch.distributed (gloo on CPU, nccl on GPU); DeepSpeed joins that process group. With ``scaling.num_workers: 0``
the job's one rank runs in its runner task instead (``jobs.unlearn.solo.run_in_process``); both call ``run_job``.
Under ZeRO-3 the trained model and every frozen model are created partitioned (``jobs.unlearn.partitioned``): no
rank holds a whole copy. Each step's rows come from ``jobs.unlearn.data`` (an order and a global batch that do not
depend on the worker count). The method named in the spec turns each batch into a loss; the loop knows nothing else
about it. Rank 0 saves the final model as a Hugging Face folder (under ZeRO-3 gathered one tensor at a time) and
writes ``spunge_job.json``.

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

This module holds the loop itself (``run_unlearning``) and its core step (``train_step``); the set-up and what
happens around the steps (the read-back, rows, snapshots, checkpoints, reports) are ``jobs.unlearn.worker``'s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from jobs.spec import UnlearnSpec
from jobs.unlearn.engine import deepspeed_grad_norm, step_grad_norm
from jobs.unlearn.methods.base import terms_later
from jobs.unlearn.outputs import ATTEMPTS_FILE, FAILED_MARKER, STEPS_FILE, checkpoint_name
from jobs.unlearn.partitioned import reset_backward_counts
from jobs.unlearn.worker import NonFiniteLossError, StepOutput, Worker, every, setup, sync_step

# NonFiniteLossError and sync_step are the loop's names to its callers (the runner, the tests)
__all__ = ["NonFiniteLossError", "run_job", "run_unlearning", "sync_step", "train_loop_per_worker", "train_step"]


def run_unlearning(
    spec: UnlearnSpec, report: Optional[Callable[..., None]] = None, restore_from: Optional[str] = None
) -> dict[str, Any]:
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
    worker = setup(spec, restore_from)
    final: dict[str, Any] = {}
    for step in range(worker.resumed_from + 1, worker.steps + 1):
        out = train_step(worker, step)
        row, due, stop = worker.read_back(step, out)  # the step's one sync: every rank gets the same row
        last = step == worker.steps or stop
        worker.annotate(row, step, stop, last)
        if step == worker.resumed_from + 1:
            worker.write_setup_times()
        if every(worker.spec.eval_every, step, last):  # the driver scores it while training goes on
            row["snapshot"] = worker.save_snapshot(step)
        worker.rows.append(row)
        final = row
        checkpoint = every(worker.spec.checkpoint_every, step, last)
        if last or checkpoint or due or "snapshot" in row:  # the driver hears of each at once
            worker.log_retain_loss(row, out.retain)
            worker.publish(report, step, checkpoint)
        if last:
            break
    return worker.finish(final)


def train_step(worker: Worker, step: int) -> StepOutput:
    """One optimizer step over this worker's micro batches: forward, loss, backward, step."""
    engine, out = worker.engine, StepOutput()
    for host in worker.data.micro_batches(step):
        batch = {k: _to(v, engine.device) for k, v in host.items()}
        if worker.zero3:
            reset_backward_counts(engine.module)
        # under ZeRO-3 the method's independent terms (the retain NLL) are built and back-propagated after
        # the rest: one graph at a time, so each layer is released after its backward (terms_later)
        with terms_later(enabled=worker.zero3) as later:
            result = worker.method.loss(engine, batch, worker.ref_model)
        loss = result.loss.detach().float()
        engine.backward(result.loss)
        for term in later:
            part = term()
            loss = loss + part.detach().float()
            engine.backward(part)
        out.losses.append(loss.reshape(()))  # stays on the device: read once, at the step's end
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and not worker.ds_norm:
            out.grad_norm = step_grad_norm(engine, worker.clip)
        engine.step()
        if worker.masked is not None and boundary:
            worker.masked.restore(engine)  # every rank: a collective under ZeRO-3
        out.add(host, result.metrics)
        out.retain = batch["retain"]
    if worker.ds_norm:
        out.grad_norm = deepspeed_grad_norm(engine)
    return out


def _to(part: Optional[dict], device) -> Optional[dict]:
    return None if part is None else {k: v.to(device) for k, v in part.items()}


def run_job(
    spec: UnlearnSpec,
    rank: int,
    send: Callable[[dict[str, Any], Optional[str]], None],
    restore_from: Optional[str] = None,
) -> None:
    """One rank's part of one job, for either runner (Ray Train's workers, or ``jobs.unlearn.solo``'s
    in-process job): ``send(metrics, checkpoint)`` hands each report on, its metrics the last row plus every
    row since the previous report under ``history``. Rank 0 also appends the rows to the job's folder: a driver
    that resumes the job after a kill reads the steps before its checkpoint there (they are all reported at
    the latest at the checkpoint). A diverged job writes ``FAILED_MARKER`` and returns normally."""

    def report(rows: list[dict], checkpoint: Optional[str] = None) -> None:
        if rank == 0:
            with open(Path(spec.output_dir) / STEPS_FILE, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        send({**rows[-1], "history": rows, "rank": rank}, checkpoint)

    out = Path(spec.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps({"started": time.time(), "from_checkpoint": restore_from is not None}) + "\n")
    try:
        run_unlearning(spec, report=report, restore_from=restore_from)
    except NonFiniteLossError as e:
        # not a crash: a restart would diverge again. Every rank saw it (the check is collective), so every
        # rank returns normally and Ray Train does not retry; the driver raises from the marker.
        if rank == 0:
            (out / FAILED_MARKER).write_text(json.dumps({"error": str(e), "kind": "non_finite_loss"}))


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``ray.train.torch.TorchTrainer``: config is ``{"spec": UnlearnSpec.model_dump()}``."""
    import ray.train

    spec = UnlearnSpec(**config["spec"])
    rank = ray.train.get_context().get_world_rank()

    def send(metrics: dict[str, Any], checkpoint: Optional[str]) -> None:
        # rank 0's report is the one Ray Train keeps; every rank hands over its checkpoint folder, and Ray Train
        # copies them all into one folder
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                checkpoint_dir_name=checkpoint_name(metrics["step"]),
            )

    latest = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    if latest is None:
        run_job(spec, rank, send)
    else:
        with latest.as_directory() as folder:
            run_job(spec, rank, send, restore_from=folder)
