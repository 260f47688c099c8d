"""What the pipeline asks of the cluster, and a wait for a cluster that grows.

A Ray cluster with an autoscaler (the shipped AWS launcher starts with no GPU worker, KubeRay with fewer pods
than a recipe needs) adds nodes for demand it sees. ``wait_until_fits`` asks it for one unit of work (a job's
workers, an eval task) through ``ray.autoscaler.sdk.request_resources`` and waits, with a progress line, until
the cluster fits that unit or ``scaling.wait_for_resources_s`` runs out; a cluster that cannot grow (a local
Ray spunge started) fails at once with one line naming what did not fit.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import ray

from orchestrator.config.schema import ScalingConfig
from orchestrator.run.context import PipelineError
from orchestrator.run.display import Display

CLUSTER_WAIT_S = 900.0  # default wait on a cluster: an autoscaler's GPU node often takes 5-10 minutes to join
POLL_S = 2.0
LOG_EVERY_S = 60.0


def default_wait_s(configured: Optional[float]) -> float:
    """``scaling.wait_for_resources_s``; unset: none on a local Ray spunge started (nothing adds nodes to it),
    ``CLUSTER_WAIT_S`` on a cluster it connected to."""
    from orchestrator.remote.ray_init import started_locally

    if configured is not None:
        return configured
    return 0.0 if started_locally() else CLUSTER_WAIT_S


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One Ray Train worker's resources, as ``run_unlearn_job`` reserves them."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
    if scaling.memory_per_worker_gb:
        bundle["memory"] = float(int(scaling.memory_per_worker_gb * 2**30))
    return bundle


def task_bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def fits_some_node(bundle: dict[str, float], nodes: Optional[list[dict]] = None) -> bool:
    """Whether one alive node has the resources of ``bundle`` (Ray never splits a worker over nodes)."""
    nodes = ray.nodes() if nodes is None else nodes
    return any(
        n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items() if v) for n in nodes
    )


def describe(bundles: list[dict[str, float]]) -> str:
    """``4 x {CPU: 8, GPU: 1, memory: 32 GiB}``, equal bundles counted."""

    def one(b: dict[str, float]) -> str:
        return (
            "{" + ", ".join(f"{k}: {v / 2**30:g} GiB" if k == "memory" else f"{k}: {v:g}" for k, v in b.items()) + "}"
        )

    first = bundles[0]
    return f"{len(bundles)} x {one(first)}" if all(b == first for b in bundles) else " + ".join(map(one, bundles))


def cluster_summary(res: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in res]
    return (
        ", ".join(f"{res[k] / 2**30:.0f} GiB memory" if k == "memory" else f"{res[k]:g} {k}" for k in keys) or "nothing"
    )


def wait_until_fits(
    count: Callable[[dict[str, float]], int],
    bundles: list[dict[str, float]],
    what: str,
    wait_s: float,
    setting: str,
    display: Optional[Display] = None,
) -> int:
    """``count(cluster resources)`` once it is at least 1 (how many units fit the cluster). While it is 0: ask
    the autoscaler for ``bundles`` (one unit), report progress, poll; after ``wait_s`` seconds a
    ``PipelineError`` naming ``what`` waited for, the cluster's resources and ``setting``."""
    res = dict(ray.cluster_resources())
    fits = count(res)
    if fits >= 1:
        return fits
    if wait_s <= 0:
        raise PipelineError(
            f"{what} needs {describe(bundles)}, more than the cluster has ({cluster_summary(res)}); "
            f"on a cluster that grows, set {setting} to wait for it"
        )
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    key, start = f"cluster/{what}", time.monotonic()
    if display is not None:
        display.add(key, f"waiting: {what}")
        display.log(
            f"{what} needs {describe(bundles)}; the cluster has {cluster_summary(res)}: asked the "
            f"autoscaler, waiting up to {wait_s:.0f} s ({setting})"
        )
    logged = start
    try:
        while True:
            time.sleep(POLL_S)
            res = dict(ray.cluster_resources())
            fits = count(res)
            waited = time.monotonic() - start
            if fits >= 1:
                if display is not None:
                    display.finish(key, f"the cluster grew in {waited:.0f} s ({cluster_summary(res)})")
                return fits
            if waited >= wait_s:
                raise PipelineError(
                    f"{setting}: waited {waited:.0f} s for {what} ({describe(bundles)}); the cluster "
                    f"has {cluster_summary(res)}"
                )
            if display is not None:
                display.update(key, info=f"{waited:.0f} s of {wait_s:.0f} s; cluster: {cluster_summary(res)}")
                if time.monotonic() - logged >= LOG_EVERY_S:
                    logged = time.monotonic()
                    display.log(
                        f"still waiting for {what}: {waited:.0f} s of {wait_s:.0f} s; the cluster has "
                        f"{cluster_summary(res)}"
                    )
                display.heartbeat()
    finally:
        request_resources(bundles=[])  # the work's own placement groups and tasks hold the demand from here
