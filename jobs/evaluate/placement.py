"""Where an eval task puts its model: a device map planned on the meta device, over the GPUs the task reserved.

``plan_placement`` builds the model from its config without weights, asks accelerate's ``infer_auto_device_map``
for a placement that never splits a decoder layer, and refuses one that spills off the given GPUs;
``load_placed`` loads the folder with that device map; ``place_for_eval`` is what ``evaluate_model`` calls.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from jobs.models import DTYPES, adapter_base, check_model_dir, is_adapter_dir

GB = 1e9
GiB = 2**30

# Share of each GPU's memory the weights may take: the other 10% holds a batch's activations, the KV cache of
# greedy generation and the logits (a few GB at eval's batch sizes on an 80 GB card, and they grow with it).
DEFAULT_GPU_FRACTION = 0.9
# Taken off every GPU on top of that: the CUDA context, cuBLAS workspaces and allocator slack, which don't
# shrink with a smaller card.
DEFAULT_GPU_RESERVE = 2 * GiB

Device = Union[int, str]  # a GPU index, "cpu" or "disk" (accelerate's device-map values)
MaxMemory = dict[Device, Union[int, str]]  # device -> bytes (or "70GiB"), as accelerate takes it


class PlacementError(ValueError):
    """A model that does not fit the devices an eval task was given."""


@dataclass(frozen=True)
class Placement:
    """A device map (module name -> device) and the bytes of weights it puts on each device."""

    device_map: dict[str, Device]
    model_bytes: int
    device_bytes: dict[Device, int]

    @property
    def devices(self) -> list[Device]:
        """The devices used, in the order of the model's modules."""
        return list(dict.fromkeys(self.device_map.values()))

    def summary(self) -> str:
        return summarize(self.device_map)


def device_name(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def usable_bytes(
    total: int, free: Optional[int] = None, fraction: float = DEFAULT_GPU_FRACTION, reserve: int = DEFAULT_GPU_RESERVE
) -> int:
    """Bytes of one GPU that weights may take: ``fraction`` of its total less ``reserve``; never more than is
    free now less ``reserve`` (another model already loaded, e.g. an attack's reference model)."""
    budget = int(total * fraction)
    if free is not None:
        budget = min(budget, int(free))
    return max(0, budget - reserve)


def gpu_memory(fraction: float = DEFAULT_GPU_FRACTION, reserve: int = DEFAULT_GPU_RESERVE) -> dict[int, int]:
    """``usable_bytes`` of every visible GPU (Ray's CUDA_VISIBLE_DEVICES: the ones the task reserved)."""
    out = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out[i] = usable_bytes(total, free, fraction, reserve)
    return out


def _bytes(value: Union[int, str]) -> int:
    from accelerate.utils import convert_file_size_to_int

    return convert_file_size_to_int(value)


def _device_key(device: Device) -> Device:
    """A GPU index from a JSON key ("0") or a "cuda:0"; "cpu" and "disk" as they are."""
    text = str(device).removeprefix("cuda:")
    return int(text) if text.isdigit() else device


def model_config(path: Union[str, os.PathLike]) -> Any:
    """The config of a model folder or hub name; an adapter folder's base model's."""
    from transformers import AutoConfig

    base = adapter_base(path) if is_adapter_dir(path) else path
    return AutoConfig.from_pretrained(str(base))


def empty_model(config: Any, dtype: str = "float32") -> Any:
    """The causal LM of ``config`` on the meta device (shapes and dtypes, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])


def plan_placement(
    model: Any,
    max_memory: MaxMemory,
    dtype: str = "float32",
    offload_folder: Optional[str] = None,
    name: Optional[str] = None,
) -> Placement:
    """The device map of ``model`` (a folder, a config, or a model on the meta device) over ``max_memory``,
    filling the devices in order (GPU 0 first) and never splitting a module of ``_no_split_modules`` (a
    decoder layer). accelerate puts what does not fit on "cpu" and then "disk" silently: a module placed on a
    device that ``max_memory`` does not name (or on "disk" without an ``offload_folder``) is a
    ``PlacementError`` naming the model's size, the devices and what to raise."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if isinstance(model, (str, os.PathLike)):
        name = name or str(model)
        model = model_config(model)
    if not isinstance(model, torch.nn.Module):
        name = name or getattr(model, "name_or_path", "") or getattr(model, "model_type", "model")
        model = empty_model(model, dtype)
    name = name or getattr(model.config, "name_or_path", "") or model.config.model_type
    if not max_memory:
        raise PlacementError("no devices to place the model on (max_memory is empty)")
    max_memory = {_device_key(d): _bytes(v) for d, v in max_memory.items()}
    sizes = compute_module_sizes(model, dtype=DTYPES[dtype])
    device_map = dict(
        infer_auto_device_map(
            model,
            max_memory=dict(max_memory),
            dtype=DTYPES[dtype],
            no_split_module_classes=list(model._no_split_modules or ()),
        )
    )
    allowed = set(max_memory) | ({"disk"} if offload_folder else set())
    spilled = [m for m, d in device_map.items() if d not in allowed]
    if spilled:
        raise PlacementError(_too_big(name, dtype, sizes[""], max_memory, model, spilled))
    per_device: dict[Device, int] = {}
    for module, device in device_map.items():
        per_device[device] = per_device.get(device, 0) + sizes[module]
    return Placement(device_map, sizes[""], per_device)


def _too_big(name: str, dtype: str, size: int, max_memory: dict[Device, int], model: Any, spilled: list[str]) -> str:
    """The one-line error of a model that spills off its devices (with the GPU count that would hold it)."""
    gpus = {d: b for d, b in max_memory.items() if isinstance(d, int)}
    devices = ", ".join(f"{device_name(d)} {b / GB:.1f} GB" for d, b in max_memory.items())
    what = f"the {len(gpus)} GPU(s) reserved" if len(gpus) == len(max_memory) else "the devices given"
    hint = "raise eval.gpus_per_task"
    if gpus and len(gpus) == len(max_memory):
        need = _gpus_needed(model, dtype, min(gpus.values()), start=len(gpus) + 1)
        if need:
            hint += f" to {need}"
        if dtype == "float32":
            hint += " (or set model.dtype: bfloat16, half the bytes)"
    return (
        f"model {name} needs {size / GB:.1f} GB of weights in {dtype} but does not fit {what} "
        f"({devices} usable for weights; {len(spilled)} module(s) left over, from {spilled[0]}): {hint}"
    )


def _gpus_needed(model: Any, dtype: str, per_gpu: int, start: int, most: int = 64) -> Optional[int]:
    """The fewest GPUs of ``per_gpu`` usable bytes that hold ``model`` (planned like the real thing)."""
    from accelerate import infer_auto_device_map

    if per_gpu <= 0:
        return None
    no_split = list(model._no_split_modules or ())
    for n in range(start, most + 1):
        plan = infer_auto_device_map(
            model, max_memory={i: per_gpu for i in range(n)}, dtype=DTYPES[dtype], no_split_module_classes=no_split
        )
        if all(isinstance(d, int) for d in plan.values()):
            return n
    return None


def summarize(device_map: dict[str, Device]) -> str:
    """One line per plan, e.g. ``model.embed_tokens, model.layers 0-39 on cuda:0; model.layers 40-79,
    model.norm, lm_head on cuda:1``: numbered siblings in a row on one device become a range."""
    groups: list[tuple[Device, list[str]]] = []
    for module, device in device_map.items():
        if not groups or groups[-1][0] != device:
            groups.append((device, []))
        groups[-1][1].append(module)
    if len(groups) == 1:
        return f"all on {device_name(groups[0][0])}"
    return "; ".join(f"{', '.join(_ranges(mods))} on {device_name(d)}" for d, mods in groups)


def _ranges(modules: list[str]) -> list[str]:
    out: list[str] = []
    runs: list[list] = []  # [prefix, first, last] of the run being built, or [name] for other modules
    for m in modules:
        hit = re.fullmatch(r"(.+)\.(\d+)", m)
        if hit and runs and len(runs[-1]) == 3 and runs[-1][0] == hit[1] and runs[-1][2] + 1 == int(hit[2]):
            runs[-1][2] = int(hit[2])
        elif hit:
            runs.append([hit[1], int(hit[2]), int(hit[2])])
        else:
            runs.append([m])
    for r in runs:
        out.append(r[0] if len(r) == 1 else f"{r[0]} {r[1]}" if r[1] == r[2] else f"{r[0]} {r[1]}-{r[2]}")
    return out


def load_placed(
    path: Union[str, os.PathLike],
    device_map: dict[str, Device],
    dtype: str = "float32",
    allow_pickle: bool = False,
    attn_implementation: Optional[str] = None,
    offload_folder: Optional[str] = None,
) -> Any:
    """``jobs.models.load_model`` with a device map: the weights go straight to their devices (no whole copy
    on the CPU first); accelerate's hooks move activations between devices. An adapter folder is loaded onto
    its base model, placed the same way, and merged in (merged on the CPU first when the map offloads to
    "cpu" or "disk")."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path, allow_pickle)
    extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if offload_folder:
        extra["offload_folder"] = str(offload_folder)
    if is_adapter_dir(path) and any(d in ("cpu", "disk") for d in device_map.values()):
        # peft re-plans an offloaded base with its own device map: merge on the CPU, then dispatch
        from accelerate import dispatch_model

        from jobs.models import load_model

        model = load_model(path, dtype, allow_pickle, attn_implementation)
        return dispatch_model(model, device_map, offload_dir=offload_folder)
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_placed(adapter_base(path), device_map, dtype, allow_pickle, attn_implementation, offload_folder)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], use_safetensors=not allow_pickle, device_map=device_map, **extra
    )


def place_for_eval(
    path: Union[str, os.PathLike],
    dtype: str = "float32",
    attn_implementation: Optional[str] = None,
    max_memory: Optional[MaxMemory] = None,
    offload_folder: Optional[str] = None,
    allow_pickle: bool = False,
) -> tuple[Any, str]:
    """The model of an eval task and its placement's summary. ``max_memory`` given: planned over it (GPU
    indices, "cpu"; "disk" with an ``offload_folder``). Otherwise planned over every visible GPU
    (``gpu_memory``; the whole model on cuda:0 when it fits there); without CUDA, on the CPU. A plan that does
    not fit is a ``PlacementError`` before any weight is read."""
    from jobs.models import load_model

    if max_memory is None and not torch.cuda.is_available():
        model = load_model(path, dtype=dtype, allow_pickle=allow_pickle, attn_implementation=attn_implementation)
        return model, "all on cpu"
    plan = plan_placement(path, max_memory or gpu_memory(), dtype, offload_folder)
    whole = len(plan.devices) == 1 and plan.devices[0] != "disk"
    # one device: the model loads whole onto it, without accelerate's hooks; several: dispatched
    model = load_placed(
        path,
        {"": plan.devices[0]} if whole else plan.device_map,
        dtype,
        allow_pickle,
        attn_implementation,
        offload_folder,
    )
    where = f"{plan.summary()} ({plan.model_bytes / GB:.2f} GB of weights in {dtype}"
    if not whole:
        where += ": " + ", ".join(f"{device_name(d)} {b / GB:.2f} GB" for d, b in plan.device_bytes.items())
    return model, where + ")"


def input_device(model: Any) -> torch.device:
    """Where a batch goes: the execution device of a dispatched model's first module (accelerate's hooks move
    activations on from there), else the device of the model's first parameter. A module offloaded to "cpu" or
    "disk" keeps its weights on the meta device and runs on the plan's first GPU (else the CPU)."""
    plan = getattr(model, "hf_device_map", None)
    if not plan:
        return next(model.parameters()).device
    devices = list(plan.values())
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    first = devices[0] if devices[0] not in ("cpu", "disk") else (gpus[0] if gpus else "cpu")
    return torch.device("cuda", first) if isinstance(first, int) else torch.device(first)


def spans_devices(model: Any) -> bool:
    """Whether a dispatched model runs on more than one GPU: tensors handed to its forward then meet hidden
    states on another device. (Modules offloaded to "cpu" or "disk" run on the plan's first GPU, or on the CPU
    when it has none: one device either way.)"""
    plan = getattr(model, "hf_device_map", None) or {}
    return len({d for d in plan.values() if d not in ("cpu", "disk")}) > 1


def refuse_offloaded(model: Any, what: str) -> None:
    """``ValueError`` for a model with modules offloaded to "cpu" or "disk" (weights on the meta device), which
    ``what`` (a suite's change to the weights, e.g. "the quant suite quantizes the model's weights in memory")
    cannot work on."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            f"{what}, which it cannot do with modules offloaded to 'cpu' or 'disk' (their weights are on the meta "
            "device): give the eval task more GPU memory"
        )
