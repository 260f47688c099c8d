"""benchmarks/device_check.py (the GPU device check) and benchmarks/device_bundle.sh: the peak table, the memory
estimate it compares against (jobs.planning.memory), and its --cpu smoke run end to end (every case kind, one
tiny model, ~15 s)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.planning import memory as me

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dc():
    return _load("device_check")


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_peak_tflops_by_device_name(dc, name, tflops):
    assert dc.peak_tflops(name) == tflops


def test_the_shapes_are_smollm2_and_tinyllama(dc):
    counts = {name: dc.estimate_memory(shape, 3, 1, 8, 16, True)["params"] for name, shape in dc.SHAPES.items()}
    assert counts == {"smollm2": 134_515_008, "llama-1b": 1_100_048_384}
    assert (
        me.llama_param_count(
            me.ModelShape(layers=22, hidden=2048, heads=32, vocab=32000, intermediate=5632, kv_heads=4)
        )
        == 1_100_048_384
    )


def test_the_estimate_is_the_planning_formula_for_the_same_job(dc):
    got = dc.estimate_memory(dc.SHAPES["llama-1b"], 2, 8, 512, 16, True)
    m = me.ModelShape(
        params=1_100_048_384, layers=22, hidden=2048, heads=32, vocab=32000, intermediate=5632, kv_heads=4
    )
    want = me.estimate(
        m,
        me.JobSetup(
            zero=2,
            gpus=1,
            micro_batch=8,
            seq=512,
            gradient_checkpointing=True,
            lora_r=16,
            grad_passes=2,
            reduce_bucket_size=5e8,
        ),
    )
    assert got["peak_bytes"] == want["bytes"]["peak"] and got["init_peak_bytes"] == want["bytes"]["init_peak"]
    zero3 = dc.estimate_memory(dc.SHAPES["llama-1b"], 3, 8, 512, 16, True)
    assert zero3["setup"]["grad_passes"] == 1 and zero3["setup"]["reduce_bucket_size"] == 2048 * 2048


def test_the_bundle_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_bundle.sh")], check=True)


def test_cpu_smoke_run_passes_every_case_without_ray_mlflow_or_datasets(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "device_check.py"),
            "--cpu",
            "--models",
            "smollm2",
            "--eval-model",
            "smollm2",
            "--merge-model",
            "smollm2",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert {n: c["status"] for n, c in record["cases"].items()} == {
        "build": "ok",
        "bare/smollm2": "ok",
        "spunge/smollm2/zero2": "ok",
        "spunge/smollm2/zero3": "ok",
        "eval/smollm2": "ok",
        "merge/smollm2": "ok",
    }
    assert record["imports"] == {
        "forbidden": ["ray", "mlflow", "datasets"],
        "found": [],
        "ok": True,
        "cases_checked": sorted(record["cases"]),
    }
    assert [(r["zero"], r["ratio"] > 0, r["estimate_peak_bytes"] > 0) for r in record["training"]] == [
        (2, True, True),
        (3, True, True),
    ]
    assert "all checks passed" in proc.stdout
