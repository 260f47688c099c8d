"""cluster/ and docker/ files: the launcher YAMLs pass Ray's own cluster schema, the KubeRay manifests have
the structure KubeRay (ray.io/v1) expects, and the images pin versions inside pyproject's ranges."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER, DOCKER = ROOT / "cluster", ROOT / "docker"
LAUNCHERS = ["launcher-aws-gpu.yaml", "launcher-local.yaml"]


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_cluster_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(raw, ray_schema())  # the file as written
    cfg = prepare_config(raw)  # what `ray up` does: fill Ray's provider defaults, then validate
    validate_config(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
        if "ray start" in c
    )
    assert "/shared:/shared" in " ".join(cfg["docker"]["run_options"])  # shared storage on every node


def test_the_schema_check_has_teeth():
    raw = yaml.safe_load((CLUSTER / "launcher-local.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**raw, "max_worker": 3}, ray_schema())  # a typo'd key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in raw.items() if k != "provider"}, ray_schema())


def test_local_launcher_lists_the_machines():
    from ray.autoscaler._private.util import prepare_config

    raw = yaml.safe_load((CLUSTER / "launcher-local.yaml").read_text())
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"]
    (node,) = prepare_config(raw)["available_node_types"].values()
    assert node["min_workers"] == node["max_workers"] == len(raw["provider"]["worker_ips"]) == 3
    aws = yaml.safe_load((CLUSTER / "launcher-aws-gpu.yaml").read_text())
    assert aws["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


def check_cluster_spec(spec: dict) -> None:
    assert Version(spec["rayVersion"]) == Version(pinned()["ray"])
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    images = []
    for group in [head, *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            images.append(c["image"])
            assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            assert "/shared" in {m["mountPath"] for m in c["volumeMounts"]}
    for w in spec["workerGroupSpecs"]:
        assert w["groupName"] and isinstance(w["rayStartParams"], dict)
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
        gpu = w["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(gpu["nvidia.com/gpu"]) >= 1
    assert all(i.endswith("spunge:0.1.0-gpu") for i in images), images
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports


def test_kuberay_raycluster_structure():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_structure():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("spunge run /configs/") and "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    check_cluster_spec(spec["rayClusterSpec"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "/configs" in {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}


def test_runtime_env_file_is_accepted_by_spunge_submit():
    from orchestrator.cli.submit import build_runtime_env, load_runtime_env

    env = load_runtime_env(CLUSTER / "runtime_env.yaml")
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    merged = build_runtime_env(Path("/tmp"), env, {})
    assert merged["env_vars"]["HF_HOME"] == "/shared/hf" and merged["working_dir"] == "/tmp"


# ---------------------------------------------------------------------------------------------------
# docker/


def pinned() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def test_image_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = set(re.findall(r'"\.\[([\w,-]+)\]"', (DOCKER / "Dockerfile.gpu").read_text())[0].split(","))
    reqs = [Requirement(r) for r in project["dependencies"]]  # what the images install: core + their extras
    reqs += [Requirement(r) for extra in installed for r in project["optional-dependencies"][extra]]
    pins = {canonicalize_name(k): v for k, v in pinned().items()}
    for r in reqs:
        name = canonicalize_name(r.name)
        assert name in pins, f"docker/constraints.txt has no pin for {r.name}"
        assert r.specifier.contains(pins[name], prereleases=True), (r.name, pins[name], str(r))
    for extra, deps in project["optional-dependencies"].items():  # pins of other extras stay in range too
        for r in map(Requirement, deps):
            if canonicalize_name(r.name) in pins:
                assert r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True), (extra, str(r))


@pytest.mark.parametrize("name,tag", [("Dockerfile.gpu", r"-py3\d+-cu12\d"), ("Dockerfile.cpu", r"-py3\d+-cpu")])
def test_dockerfiles_use_the_pinned_ray_and_torch(name, tag):
    text = (DOCKER / name).read_text()
    pins = pinned()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base and base.group(1).startswith(pins["ray"] + "-") and re.search(tag, base.group(1)), name
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert f'"torch=={pins["torch"]}"' in text and "download.pytorch.org/whl/" in text
    assert "-c /home/ray/constraints.txt" in text and "ninja-build" in text and "build-essential" in text
    assert (DOCKER / f"{name}.dockerignore").is_file()


# ---------------------------------------------------------------------------------------------------
# sizing: the templates hold the GPU examples (docs/cluster.md "Sizing the nodes")

GiB = 2**30
# AWS's published sizes: vCPUs, RAM GiB, GPUs, GiB one GPU exposes ("24 GB" A10G: ~22.5, docs/scaling.md)
INSTANCES = {
    "m6i.2xlarge": (8, 32, 0, 0),
    "g5.xlarge": (4, 16, 1, 22.5),
    "g5.12xlarge": (48, 192, 4, 22.5),
    "g5.48xlarge": (192, 768, 8, 22.5),
    "p4d.24xlarge": (96, 1152, 8, 40),
    "p4de.24xlarge": (96, 1152, 8, 80),
}
OS_GIB = 4  # RAM a node keeps for the OS, docker and Ray's own processes, beyond what Ray offers its tasks
TEMPLATES = ["launcher-aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
GPU_EXAMPLES = sorted(
    p for p in (ROOT / "examples").glob("*.yaml") if (yaml.safe_load(p.read_text()).get("scaling") or {}).get("use_gpu")
)


class Node:
    """One node type (one KubeRay worker group): what Ray offers on one node, how many the cluster may start."""

    def __init__(self, name: str, offers: dict[str, float], max_count: float):
        self.name, self.offers, self.max_count = name, offers, max_count


def quantity(q) -> float:
    """A Kubernetes quantity (``64Gi``, ``10``, ``500m``) as a number (bytes for memory)."""
    q = str(q)
    for suffix, factor in (
        ("Ki", 2**10),
        ("Mi", 2**20),
        ("Gi", 2**30),
        ("Ti", 2**40),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def pod_offers(group: dict) -> dict[str, float]:
    """What Ray offers on a KubeRay worker pod: rayStartParams, else the container's limits (as KubeRay does)."""
    params, limits = group["rayStartParams"], group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "CPU": quantity(params.get("num-cpus", limits["cpu"])),
        "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        "memory": quantity(params.get("memory", limits["memory"])),
    }


def cluster_spec(template: str) -> dict:
    doc = yaml.safe_load((CLUSTER / template).read_text())
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def template_nodes(template: str) -> tuple[list[Node], float]:
    """A template's GPU node types and the most nodes the cluster may start in all (inf: no global cap)."""
    if template.startswith("launcher"):
        raw = yaml.safe_load((CLUSTER / template).read_text())
        return [
            Node(name, t["resources"], t.get("max_workers", 0))
            for name, t in raw["available_node_types"].items()
            if name != raw["head_node_type"]
        ], raw["max_workers"]
    groups = cluster_spec(template)["workerGroupSpecs"]
    return [Node(g["groupName"], pod_offers(g), g["maxReplicas"]) for g in groups], float("inf")


def per_node(bundle: dict[str, float], offers: dict[str, float]) -> int:
    """How many of ``bundle`` one node offering ``offers`` holds (Ray never splits a bundle over nodes)."""
    return int(min(offers.get(k, 0) // v for k, v in bundle.items() if v))


def worker_bundle(cfg) -> dict[str, float]:
    s = cfg.scaling
    return {
        "CPU": s.cpus_per_worker,
        "GPU": s.gpus_per_worker if s.use_gpu else 0,
        "memory": (s.memory_per_worker_gb or 0) * GiB,
    }


def fit_problems(cfg, nodes: list[Node], max_nodes: float = float("inf")) -> list[str]:
    """Why ``cfg``'s jobs cannot run on a cluster of ``nodes`` (at most ``max_nodes`` in all); [] when they can:
    a worker and an eval task each fit one node, and one job's workers fit the cluster at its largest."""
    worker = worker_bundle(cfg)
    eval_task = {"CPU": cfg.eval.cpus_per_task, "GPU": cfg.eval.gpus_per_task}
    problems = []
    if not any(per_node(worker, n.offers) for n in nodes):
        problems.append(f"a worker {worker} fits no node type ({', '.join(f'{n.name}: {n.offers}' for n in nodes)})")
    if not any(per_node(eval_task, n.offers) for n in nodes):
        problems.append(f"an eval task {eval_task} fits no node type")
    capacity, left = 0, max_nodes
    for n in sorted(nodes, key=lambda n: -per_node(worker, n.offers)):
        count = min(n.max_count, left)
        capacity, left = capacity + count * per_node(worker, n.offers), left - count
    if capacity < cfg.scaling.num_workers:
        problems.append(f"one job's {cfg.scaling.num_workers} workers exceed the cluster's {capacity}")
    return problems


def gpu_config_problems(cfg) -> list[str]:
    """What a GPU config leaves out that an OOM kill on a cluster needs: Ray's memory resource, checkpoints,
    worker-group restarts."""
    s, problems = cfg.scaling, []
    if not s.memory_per_worker_gb:
        problems.append("scaling.memory_per_worker_gb is not set")
    if not cfg.unlearn.checkpoint_every:
        problems.append("unlearn.checkpoint_every is not set")
    if s.max_failures is None or s.max_failures == 0 or s.max_failures < -1:
        problems.append(f"scaling.max_failures is {s.max_failures} (want >= 1, or -1)")
    return problems


def example_configs(path: Path) -> list:
    """Every pipeline of an example, through spunge's loader (its defaults: gpus_per_worker and
    eval.gpus_per_task 1 with use_gpu); for an example naming a cluster's files (absent here), the same
    models validated without the file checks."""
    from orchestrator.config.loading import load_configs
    from orchestrator.config.schema import ConfigError, PipelineConfig, apply_overrides

    try:
        return [cfg for _, cfg in load_configs(path)]
    except ConfigError as e:
        if not all(re.search(r": no such (file|folder) ", p) for p in e.problems):
            raise
    raw = yaml.safe_load(path.read_text())
    for key in ("seeds", "tune"):
        raw.pop(key, None)
    variants = raw.pop("variants", None) or {"": {}}
    return [PipelineConfig.model_validate(apply_overrides(raw, changes)) for changes in variants.values()]


def test_the_gpu_examples_are_found():
    assert {p.name for p in GPU_EXAMPLES} >= {"llama2_7b_gpu.yaml", "tofu.yaml", "muse_news.yaml"}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("path", GPU_EXAMPLES, ids=lambda p: p.name)
def test_gpu_example_fits_the_cluster_templates(path, template):
    nodes, max_nodes = template_nodes(template)
    for cfg in example_configs(path):
        assert cfg.scaling.use_gpu and cfg.scaling.gpus_per_worker >= 1 and cfg.eval.gpus_per_task >= 1
        assert fit_problems(cfg, nodes, max_nodes) == [], (path.name, template)


@pytest.mark.parametrize("path", GPU_EXAMPLES, ids=lambda p: p.name)
def test_gpu_example_sets_memory_checkpoints_and_restarts(path):
    for cfg in example_configs(path):
        assert gpu_config_problems(cfg) == [], path.name


def test_launcher_node_types_offer_what_the_instance_has():
    raw = yaml.safe_load((CLUSTER / "launcher-aws-gpu.yaml").read_text())
    shm = re.search(r"--shm-size=(\d+)g", " ".join(raw["docker"]["run_options"]))
    for name, t in raw["available_node_types"].items():
        cpus, ram_gib, gpus, _ = INSTANCES[t["node_config"]["InstanceType"]]
        res = t["resources"]
        if name == raw["head_node_type"]:
            assert not res.get("GPU")
            continue
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= raw["max_workers"], name  # autoscaled from 0
        assert 0 < res["CPU"] <= cpus and res["GPU"] == gpus, name
        assert res["memory"] + res.get("object_store_memory", 0) <= (ram_gib - OS_GIB) * GiB, name
        assert shm and 0 < res["object_store_memory"] <= int(shm.group(1)) * GiB, name  # /dev/shm holds it


@pytest.mark.parametrize("template", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_worker_pods_offer_what_the_pod_has(template):
    spec = cluster_spec(template)
    assert spec.get("enableInTreeAutoscaling") is True
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        params = group["rayStartParams"]
        offers = pod_offers(group)
        shm = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")
        store = quantity(params["object-store-memory"])
        assert offers["CPU"] <= quantity(limits["cpu"]) and offers["GPU"] == quantity(limits["nvidia.com/gpu"]) >= 1
        assert offers["memory"] + store + OS_GIB * GiB <= quantity(limits["memory"]), group["groupName"]
        assert store <= quantity(shm)  # the object store lives in /dev/shm, which counts against the limit


def recipe_peak_gib(ME, cfg, **changes) -> float:
    """The larger of the steady and start-up per-GPU peaks of a Llama-2-7B config (jobs/planning/memory.py)."""
    zero = cfg.deepspeed_dict()["zero_optimization"]
    setup = ME.JobSetup(
        zero=zero["stage"],
        gpus=cfg.scaling.num_workers,
        micro_batch=cfg.unlearn.batch_size,
        seq=cfg.unlearn.max_length,
        gradient_checkpointing=cfg.unlearn.gradient_checkpointing,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") == "cpu",
        attn=cfg.model.attn_implementation or "sdpa",
    )
    est = ME.estimate(ME.PRESETS["llama2-7b"], replace(setup, **changes))
    return max(est["bytes"]["peak"], est["bytes"]["init_peak"])


def test_the_7b_recipe_fits_the_launchers_gpus():
    from jobs.planning import memory as ME

    (cfg,) = example_configs(ROOT / "examples" / "llama2_7b_gpu.yaml")
    raw = yaml.safe_load((CLUSTER / "launcher-aws-gpu.yaml").read_text())
    (gpu_node,) = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU")]
    card = INSTANCES[gpu_node["node_config"]["InstanceType"]][3]
    peak = recipe_peak_gib(ME, cfg)
    assert 9 * GiB < peak < 10 * GiB  # docs/scaling.md: 9.8 GiB steady, 7.5 at start-up
    assert ME.fits(peak, card)
    assert not ME.fits(recipe_peak_gib(ME, cfg, offload_optimizer=False), card)  # 36.6 GiB: the check can fail


def test_the_fit_checks_have_teeth():
    (cfg,) = example_configs(ROOT / "examples" / "llama2_7b_gpu.yaml")
    nodes, max_nodes = template_nodes("launcher-aws-gpu.yaml")
    assert fit_problems(cfg, nodes, max_nodes) == []
    # the launcher's former GPU node: 4 vCPUs, 1 A10G, no memory declared
    old = [Node("gpu_worker", {"CPU": 4, "GPU": 1}, 4)]
    assert any("fits no node type" in p for p in fit_problems(cfg, old, 4))
    # a worker of 64 CPUs, or 200 GiB, fits no g5.12xlarge; a job of 32 workers exceeds 4 nodes of 4 GPUs
    for change in ({"cpus_per_worker": 64}, {"memory_per_worker_gb": 200}):
        big = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update=change)})
        assert any("fits no node type" in p for p in fit_problems(big, nodes, max_nodes)), change
    many = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 32})})
    assert fit_problems(many, nodes, max_nodes) == ["one job's 32 workers exceed the cluster's 16"]
    assert fit_problems(cfg, nodes, max_nodes=0) == ["one job's 4 workers exceed the cluster's 0"]
    # an eval task of 2 GPUs on 1-GPU pods
    pods, _ = template_nodes("kuberay/raycluster.yaml")
    wide = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"gpus_per_task": 2})})
    assert fit_problems(wide, pods) == ["an eval task {'CPU': 4.0, 'GPU': 2} fits no node type"]
    # a GPU config without Ray's memory resource, checkpoints or restarts
    bare = cfg.model_copy(
        update={
            "scaling": cfg.scaling.model_copy(update={"memory_per_worker_gb": None, "max_failures": None}),
            "unlearn": cfg.unlearn.model_copy(update={"checkpoint_every": None}),
        }
    )
    assert len(gpu_config_problems(bare)) == 3
