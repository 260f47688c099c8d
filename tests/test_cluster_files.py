"""cluster/ and docker/ files: the launcher YAMLs pass Ray's own cluster schema, the KubeRay manifests have
the structure KubeRay (ray.io/v1) expects, and the images pin versions inside pyproject's ranges."""

from __future__ import annotations

import json
import re
import tomllib
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
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
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
    from orchestrator.submit import build_runtime_env, load_runtime_env

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
