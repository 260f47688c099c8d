"""ZeRO-Offload steps DeepSpeed's CPU Adam (its ``cpu_adam`` op, JIT-built into ~/.cache/torch_extensions on
first use), or torch's fused AdamW with one warning where the op cannot be built; both give the same weights."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from jobs.spec import OptimizerSpec, UnlearnSpec
from jobs.unlearn.engine import (
    FORCE_DS_CPU_OPTIMIZER,
    CPUAdamFallbackWarning,
    cpu_adam_unavailable,
    deepspeed_config,
    import_deepspeed,
    make_optimizer,
    offloads_optimizer,
)
from jobs.unlearn.loop import run_unlearning


def offload(stage: int = 2, device: str = "cpu") -> dict:
    return {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": device}}}


def spec(tiny_dir, tmp_path, out: str, **kw) -> UnlearnSpec:
    base = dict(
        name="subset/old",
        model_path=str(tiny_dir / "model"),
        forget_path=str(tiny_dir / "forget.jsonl"),
        retain_path=str(tiny_dir / "retain.jsonl"),
        method="grad_diff",
        optimizer={"lr": 1e-2, "weight_decay": 0.1},
        max_steps=2,
        batch_size=4,
        report_interval_s=0,
        deepspeed=offload(),
        output_dir=str(tmp_path / out),
    )
    return UnlearnSpec(**{**base, **kw})


@pytest.fixture
def op_check():
    """The once-per-process check of the op, run afresh for this test and forgotten after it."""
    cpu_adam_unavailable.cache_clear()
    yield
    cpu_adam_unavailable.cache_clear()


@pytest.fixture
def broken_op(monkeypatch, op_check):
    """The cpu_adam op fails to build, as it does without a compiler."""
    import_deepspeed()
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def fail(self, verbose=False):
        raise RuntimeError("Unable to JIT load the cpu_adam op due to ninja not being installed.")

    monkeypatch.setattr(CPUAdamBuilder, "load", fail)


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.zeros(3))]


def test_offload_is_read_from_the_deepspeed_config():
    assert offloads_optimizer(offload(2, "cpu")) and offloads_optimizer(offload(3, "nvme"))
    assert offloads_optimizer(offload(1, "CPU"))
    assert not offloads_optimizer(offload(3, "none"))
    assert not offloads_optimizer(offload(0, "cpu"))  # no ZeRO: nothing is offloaded
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": None}})
    assert not offloads_optimizer({})


def test_offloaded_adam_and_adamw_are_deepspeeds_cpu_adam(op_check):
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    s = UnlearnSpec(name="x", model_path="m", forget_path="f", method="ga", output_dir="o", deepspeed=offload(3))
    for name, adamw in (("adamw", True), ("adam", False)):
        cfg = deepspeed_config(s, world_size=1)
        opt = make_optimizer(params(), OptimizerSpec(name=name, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1), cfg)
        assert type(opt) is DeepSpeedCPUAdam and opt.adam_w_mode is adamw
        group = opt.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, (0.8, 0.9), 0.1)
        assert FORCE_DS_CPU_OPTIMIZER not in cfg  # DeepSpeed's own CPU optimizer passes its check
    # SGD stays torch's (and needs the key), as does every optimizer without offload or without the config
    cfg = deepspeed_config(s, world_size=1)
    assert type(make_optimizer(params(), OptimizerSpec(name="sgd"), cfg)) is torch.optim.SGD
    assert cfg[FORCE_DS_CPU_OPTIMIZER] is False
    no_offload = deepspeed_config(s.model_copy(update={"deepspeed": {"zero_optimization": {"stage": 3}}}), 1)
    for opt in (make_optimizer(params(), OptimizerSpec(), no_offload), make_optimizer(params(), OptimizerSpec())):
        assert type(opt) is torch.optim.AdamW and not opt.param_groups[0]["fused"]


def test_without_the_op_offloaded_adamw_is_torchs_fused_one_with_one_warning(broken_op):
    s = UnlearnSpec(name="x", model_path="m", forget_path="f", method="ga", output_dir="o", deepspeed=offload())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configs = [deepspeed_config(s, world_size=1) for _ in range(3)]
        opts = [make_optimizer(params(), OptimizerSpec(), cfg) for cfg in configs]
    fallbacks = [w for w in caught if issubclass(w.category, CPUAdamFallbackWarning)]
    assert len(fallbacks) == 1 and "ninja not being installed" in str(fallbacks[0].message)
    assert all(type(o) is torch.optim.AdamW and o.param_groups[0]["fused"] for o in opts)
    assert all(cfg[FORCE_DS_CPU_OPTIMIZER] is False for cfg in configs)  # DeepSpeed accepts torch's optimizer


def train(s: UnlearnSpec, monkeypatch) -> tuple[list[dict], torch.optim.Optimizer]:
    """Run the loop; its rows and the optimizer its DeepSpeed engine steps."""
    deepspeed = import_deepspeed()
    engines, initialize = [], deepspeed.initialize

    def spy(*args, **kwargs):
        out = initialize(*args, **kwargs)
        engines.append(out[0])
        return out

    monkeypatch.setattr(deepspeed, "initialize", spy)
    rows = []
    run_unlearning(s, report=rows.extend)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    return rows, engines[0].basic_optimizer


@pytest.mark.parametrize("stage", [2, 3])
def test_two_offloaded_steps_with_cpu_adam_match_torch_adamw(
    tiny_dir, tmp_path, single_process_dist, monkeypatch, op_check, stage
):
    """The loop's offloaded job steps DeepSpeedCPUAdam; with the op broken, torch's fused AdamW with one warning.
    Both apply AdamW's formula in fp32 and differ only in rounding, which Adam magnifies up to lr / eps where a
    gradient is near 0. Each step moves a weight by about lr = 1e-2 (m / sqrt(v) is about 1 in the first
    steps); the two agree to 1e-4, where Adam for AdamW or a lost weight decay (0.1) would part them by 1e-3
    or more."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    rows, opt = train(spec(tiny_dir, tmp_path, "cpu_adam", deepspeed=offload(stage)), monkeypatch)
    assert type(opt) is DeepSpeedCPUAdam
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    base = load_file(tiny_dir / "model" / "model.safetensors")
    fast = load_file(tmp_path / "cpu_adam" / "model.safetensors")
    moved = max((fast[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-2

    from deepspeed.ops.op_builder import CPUAdamBuilder

    def fail(self, verbose=False):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CPUAdamBuilder, "load", fail)
    cpu_adam_unavailable.cache_clear()
    with pytest.warns(CPUAdamFallbackWarning, match="no C\\+\\+ compiler") as caught:
        rows_torch, opt = train(spec(tiny_dir, tmp_path, "torch", deepspeed=offload(stage)), monkeypatch)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["fused"]
    assert len([w for w in caught if issubclass(w.category, CPUAdamFallbackWarning)]) == 1
    slow = load_file(tmp_path / "torch" / "model.safetensors")
    assert rows_torch[0]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)  # the same first step
    for k in base:
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-4, msg=k)
