"""Stage 3, merge: the merge actor (started with the unlearn stage, which hands it each finished subset
checkpoint) merges them onto the base model with ``merge.method`` (mergekit, or task-vector negation)."""

from __future__ import annotations

import time

import ray

from jobs.merge import MERGE_MARKER
from jobs.spec import MergeSpec
from orchestrator.cache import claim, method_params_key, model_fingerprint, stage_key
from orchestrator.context import Merged, PipelineError, RunContext, root_message


def start_merge_actor(ctx: RunContext) -> None:
    """The actor that will merge ``ctx``'s subset jobs (it receives their checkpoints as they finish)."""
    from orchestrator.merge_actor import MergeActor

    ctx.merge_actor = MergeActor.options(num_cpus=0).remote(ctx.cfg.model.path, [j.key for j in ctx.subset_jobs()])


def merge(ctx: RunContext) -> None:
    """``ctx.merged``: the merged model in ``stages/merge-<hash>/``, reused when ``--resume`` finds it."""
    cfg, m = ctx.cfg, ctx.cfg.merge
    jobs = ctx.subset_jobs()
    spec = MergeSpec(base_model_path=cfg.model.path, model_paths={j.key: j.model_dir for j in jobs},
                     method=m.method, parameters=m.parameters, model_parameters=m.model_parameters,
                     dtype=cfg.model.dtype, output=m.output, output_dir="")
    # the unlearning method picks which folder of a job is merged and may rewrite the merged weights (tvn)
    h = stage_key(spec, cfg.unlearn.method, method_params_key(cfg), base_model_path=model_fingerprint(cfg.model.path),
                  model_paths={j.key: j.model_hash for j in jobs})
    folder = ctx.out / "stages" / f"merge-{h}"
    ctx.display.add("merge", f"merge ({m.method})")
    reused = claim(folder, MERGE_MARKER, ctx.resume)
    seconds = None
    if not reused:
        ctx.display.update("merge", info="mergekit running")
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                ray.get(ctx.merge_actor.merge.remote(m.method, m.parameters, m.model_parameters, cfg.model.dtype,
                                                     str(folder), (cfg.unlearn.method, cfg.unlearn.params), m.output))
                break
            except ray.exceptions.RayActorError as e:  # its process died (killed, OOM): the merge alone again
                if attempt == 2:
                    raise PipelineError(f"merge ({m.method}) failed: the merge actor died twice "
                                        f"({root_message(e)})") from None
                ctx.display.log(f"merge: the merge actor died ({root_message(e)}); merging again in a new one")
                claim(folder, MERGE_MARKER, resume=False)  # whatever it left half-written
                start_merge_actor(ctx)
                ray.get([ctx.merge_actor.add.remote(j.key, j.model_dir) for j in jobs])
            except Exception as e:
                raise PipelineError(f"merge ({m.method}) failed: {root_message(e)}") from None
        seconds = time.perf_counter() - t0
    ctx.merged = Merged(str(folder), h, reused, seconds)
    ctx.display.finish("merge", "reused (resume)" if reused else "done")
