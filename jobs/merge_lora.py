"""Merging LoRA adapters onto their base model (the merge stage of LoRA unlearning jobs).

A LoRA job saves a peft adapter: for each target module ``m`` (a linear layer) the factors ``A`` (r x in),
``B`` (out x r) and the scale ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``;
``alpha_pattern`` overrides alpha per module, r is the rank ``A`` is saved with). The adapter's model is
``base + delta`` with ``delta = s * B @ A`` (transposed with ``fan_in_fan_out``), peft's ``get_delta_weight``.

Merging the n adapter models with mergekit's task-vector methods (``ties``, ``task_arithmetic``,
``breadcrumbs``, ``breadcrumbs_ties``) only ever sees their deltas ``model_i - base``, so the merge runs
module by module on the deltas, through mergekit's own kernels (``mergekit.merge_methods.merge_tensors``
with a zero base, for which mergekit's ``model_i - base`` is ``delta_i`` exactly); an adapter that does not
target a module contributes a zero delta there, as its merged model would. mergekit's ``linear`` merges the
models themselves, the base model among them (mergekit adds ``base_model`` to the inputs, with the global
weight w_0): ``(w_0 base + sum_i w_i (base + delta_i)) / (W if normalize else 1)``, ``W = w_0 + sum_i w_i``,
which is ``c * base + linear(0, delta_1..delta_n)`` with ``c = W / (W if normalize else 1)``. Tensors no
adapter targets are the base's (times ``c`` for linear, which is 1 unless ``normalize: false``). The result
equals mergekit's merge of the adapter-merged full models up to float rounding (mergekit's deltas are
``(base + delta_i) - base``). The methods that draw random masks (``dare_*``, ``della*``) cannot reproduce
mergekit's draws and are not offered. Arithmetic is float32; the output is written in ``spec.dtype``.

Memory: the base is read one tensor at a time (``safe_open``; a sharded base through its index); besides the
adapters' factors only the current module's n deltas (and mergekit's working copies of them) are held, and
the full output is written tensor by tensor as each is computed (``jobs.shards.ShardedWriter``). The output
holds exactly the base's tensor names, so tied embeddings stay tied (no ``lm_head`` is added).

Outputs (``spec.output``):

* ``full``: a Hugging Face folder: ``model.safetensors`` (or shards of at most ``spec.max_shard_size`` and
  their index), the base's ``config.json`` (dtype set to ``spec.dtype``), ``generation_config.json`` and
  tokenizer files.
* ``adapter``: a peft LoRA folder with scale 1 whose ``B @ A`` is the merged delta, targeting the union of
  the modules. For ``task_arithmetic`` and ``linear`` the merged delta is ``sum_i k_i delta_i``, exactly
  ``[k_1 s_1 B_1, ..., k_n s_n B_n] @ [A_1; ...; A_n]``: the factors are concatenated and the rank is the sum
  of the ranks (peft's ``add_weighted_adapter(combination_type="cat")``); ``k`` is mergekit's merge of the
  unit vectors. The other methods' merged delta is not low-rank (sparsification, sign election), so it is
  truncated by SVD to rank ``R = sum of the ranks`` (Eckart-Young: ``B = U_R sqrt(S_R)``,
  ``A = sqrt(S_R) V_R^T``). That is an approximation: each module's relative Frobenius error
  ``||D - B A||_F / ||D||_F = sqrt(sum_{j>R} s_j^2 / sum_j s_j^2)`` is returned (max, mean, per module) for
  the merge marker. ``linear`` with ``c != 1`` scales the base and has no adapter form.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from jobs.shards import SAFETENSORS_TORCH, Checkpoint, Progress, ShardedWriter, remove_weights
from jobs.spec import MergeSpec

# Deterministic mergekit methods whose merge of base + delta_i depends on the deltas only (or, linear,
# on c * base plus the deltas).
LORA_METHODS = ("ties", "task_arithmetic", "linear", "breadcrumbs", "breadcrumbs_ties")
# Methods whose merged delta is a fixed linear combination sum_i k_i delta_i: exact as a LoRA adapter.
LINEAR_IN_DELTAS = ("task_arithmetic", "linear")
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
)
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors: A (r x in), B (out x r), scale s, and peft's fan_in_fan_out flag."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight: (out, in), or (in, out) with fan_in_fan_out."""
        shape = (self.B.shape[0], self.A.shape[1])
        return shape[::-1] if self.fan_in_fan_out else shape

    def delta(self) -> torch.Tensor:
        """delta = s * B @ A (transposed with fan_in_fan_out), computed as peft's get_delta_weight does."""
        product = self.B @ self.A
        return (product.T if self.fan_in_fan_out else product) * self.scale


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A saved peft LoRA adapter: its folder, task type and factors by module name."""

    folder: str
    task_type: Any
    modules: dict[str, LoraFactors]


class BaseCheckpoint(Checkpoint):
    """The base model's safetensors weights (one file or indexed shards), which must hold some: names, shapes and
    dtypes from the headers up front, tensors read one at a time."""

    def __init__(self, folder: str):
        super().__init__(folder)
        if not self.shapes:
            raise ValueError(f"merge: base model {folder} has no *.safetensors weights")


def check_method(method: str) -> None:
    """One-line error for a method that cannot merge LoRA adapters exactly."""
    if method not in LORA_METHODS:
        raise ValueError(f"merge.method: {method!r} cannot merge LoRA adapters; supported: {', '.join(LORA_METHODS)}")


def read_adapter(folder: str) -> Adapter:
    """A peft LoRA folder's factors, as float32, with scale alpha / r (alpha / sqrt(r) with use_rslora)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    raw = json.loads((Path(folder) / "adapter_config.json").read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"merge: {folder}: peft_type {raw.get('peft_type')!r} is not LORA")
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"merge: {folder}: no {ADAPTER_WEIGHTS}")
    config = LoraConfig.from_pretrained(folder)
    if variants := lora_variants(config):
        raise ValueError(f"merge: {folder}: LoRA variant(s) {', '.join(variants)} do not merge as s * B @ A")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(Path(folder) / ADAPTER_WEIGHTS).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"merge: {folder}: unsupported adapter tensor {key} (only LoRA A/B of linear layers)")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor.float()
    modules = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(f"merge: {folder}: {module} lacks a matching lora_A/lora_B pair")
        r = ab["A"].shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[module] = LoraFactors(ab["A"], ab["B"], scale, bool(config.fan_in_fan_out))
    if not modules:
        raise ValueError(f"merge: {folder}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return Adapter(folder, config.task_type, modules)


def lora_variants(config: Any) -> list[str]:
    """The peft LoRA variants (DoRA, ...) a config turns on, read from peft's own field metadata."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    on = [name for name, f in fields.items() if f.metadata.get("is_lora_variant") and getattr(config, name)]
    if config.init_lora_weights in fields["init_lora_weights"].metadata.get("lora_variants", []):
        on.append(f"init_lora_weights={config.init_lora_weights}")
    return on


def check_against_base(adapters: Sequence[Adapter], base: BaseCheckpoint) -> None:
    """Every adapted module must be a base weight of the adapter's shape (else: trained on another base), and
    not lm_head when the base ties it to the input embeddings (the loaded model would drop its delta)."""
    tied = json.loads((base.folder / "config.json").read_text()).get("tie_word_embeddings", False)
    for adapter in adapters:
        for module, f in adapter.modules.items():
            name = f"{module}.weight"
            if tied and module == "lm_head":
                raise ValueError(f"merge: {adapter.folder}: adapts lm_head, which the base ties to its embeddings")
            if name not in base.shapes:
                raise ValueError(
                    f"merge: {adapter.folder}: {module} has no weight {name} in the base model "
                    f"{base.folder} (a different base, or a weight the base ties to another)"
                )
            if base.shapes[name] != f.weight_shape:
                raise ValueError(
                    f"merge: {adapter.folder}: {module} delta has shape {list(f.weight_shape)} but the "
                    f"base weight is {list(base.shapes[name])}: trained on a different base model"
                )


def mergekit_parameters(spec: MergeSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the global parameters, with the project's defaults; the keyword parameters for mergekit's method).

    As in a mergekit config, a model's own value (model_parameters) wins over the global one, which wins
    over mergekit's default; names the method does not take are ignored, as mergekit ignores them.
    Per-model values are keyed by the model's index in spec.model_paths; the base model, an input of its
    own (id n), takes the global value of a per-input parameter (linear's weight)."""
    from mergekit.merge_methods import ParameterScope, get
    from mergekit.merge_methods.base import MISSING

    shared = spec.resolved_parameters()

    def value(name: str, model: str | None, default: Any) -> Any:
        v = spec.model_parameters.get(model, {}).get(name, shared.get(name, default))
        if v is MISSING:
            raise ValueError(f"merge.parameters: {spec.method} needs {name}")
        if not isinstance(v, (bool, int, float)):
            raise ValueError(f"merge.parameters: LoRA merges take one number per parameter; {name} is {v!r}")
        return v

    kwargs: dict[str, Any] = {}
    for p in get(spec.method).spec.parameters:
        if p.scope == ParameterScope.SHARED:
            kwargs[p.name] = value(p.name, None, p.default)
            continue
        kwargs[p.name] = {i: value(p.name, model, p.default) for i, model in enumerate(spec.model_paths)}
        if p.scope == ParameterScope.INPUT:
            kwargs[p.name][len(spec.model_paths)] = value(p.name, None, p.default)
    return shared, kwargs


def mergekit_merge(
    method: str, base: torch.Tensor, models: Sequence[torch.Tensor], kwargs: dict[str, Any]
) -> torch.Tensor:
    """mergekit's merge of one tensor, the inputs as its graph passes them: the models (ids 0..n-1) and the
    base (id n, marked as the base; an ordinary input to linear)."""
    from mergekit.merge_methods import merge_tensors

    n = len(models)
    return merge_tensors([base, *models], method, parameters=kwargs, ids=[n, *range(n)], base_index=0)


def merge_deltas(method: str, deltas: Sequence[torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    """The merged delta: mergekit's merge with a zero base, whose delta_i = model_i - base is deltas[i] exactly
    (task-vector methods: base + merged delta = the merged delta; linear: sum_i w_i delta_i / (W if normalize
    else 1), the base adding w_0 * 0)."""
    return mergekit_merge(method, torch.zeros_like(deltas[0]), deltas, kwargs)


def delta_coefficients(method: str, kwargs: dict[str, Any], n: int) -> list[float]:
    """k with merged delta = sum_i k_i delta_i, for the methods linear in the deltas: mergekit's merge of the
    unit vectors e_1..e_n (task_arithmetic: k_i = lambda w_i / (sum_j w_j if normalize else 1); linear:
    k_i = w_i / (W if normalize else 1))."""
    return merge_deltas(method, list(torch.eye(n, dtype=torch.float64)), kwargs).tolist()


def base_coefficient(method: str, kwargs: dict[str, Any], n: int) -> float:
    """c in merged = c * base + merged delta: 1 for the task-vector methods; for linear, which weights the
    base in every input, mergekit's merge of n + 1 ones: W / (W if normalize else 1)."""
    if method != "linear":
        return 1.0
    one = torch.ones(1, dtype=torch.float64)
    return mergekit_merge(method, one, [one] * n, kwargs).item()


def module_deltas(adapters: Sequence[Adapter], module: str, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """delta_i of one module for every adapter, zero where adapter i does not target it."""
    return [a.modules[module].delta() if module in a.modules else torch.zeros(shape) for a in adapters]


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-R factors of delta (Eckart-Young) and the relative Frobenius error:
    delta ~ B @ A with B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T; error sqrt(sum_{j>R} s_j^2 / sum_j s_j^2)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    R = min(rank, S.numel())
    root = S[:R].sqrt()
    total = S.square().sum()
    error = (S[R:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return U[:, :R] * root, root[:, None] * Vh[:R], error


def write_full(
    spec: MergeSpec,
    adapters: Sequence[Adapter],
    base: BaseCheckpoint,
    kwargs: dict[str, Any],
    progress: Optional[Progress] = None,
) -> dict:
    """c * base + merged delta for every base tensor, in spec.dtype, each written as soon as it is computed
    (shards of at most spec.max_shard_size)."""
    from jobs.models import DTYPES

    c = base_coefficient(spec.method, kwargs, len(adapters))
    targeted = {m for a in adapters for m in a.modules}
    odd = sorted(set(base.dtypes.values()) - set(SAFETENSORS_TORCH))
    if odd:
        raise ValueError(
            f"merge: base model {base.folder} holds tensors of dtype {', '.join(odd)}, which the LoRA "
            "merge does not write"
        )
    floating = {name: SAFETENSORS_TORCH[code].is_floating_point for name, code in base.dtypes.items()}
    layout = {
        name: (DTYPES[spec.dtype] if floating[name] else SAFETENSORS_TORCH[base.dtypes[name]], shape)
        for name, shape in base.shapes.items()
    }
    remove_weights(spec.output_dir)
    with ShardedWriter(spec.output_dir, layout, spec.max_shard_size, progress) as writer:
        for name in writer.order:
            w = base.tensor(name)
            if floating[name]:
                w = w.float() if c == 1 else c * w.float()
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in targeted:
                    w = w + merge_deltas(spec.method, module_deltas(adapters, module, base.shapes[name]), kwargs)
                w = w.to(DTYPES[spec.dtype])
            writer.write(name, w)
            del w
    return {}


def concatenated_factors(factors: Sequence[LoraFactors], k: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of sum_i k_i s_i B_i @ A_i: B = [k_1 s_1 B_1, ..., k_n s_n B_n] (side by side),
    A = [A_1; ...; A_n] (stacked); the rank is the sum of the ranks."""
    B = torch.cat([k_i * f.scale * f.B for f, k_i in zip(factors, k)], dim=1)
    return B, torch.cat([f.A for f in factors], dim=0)


def write_adapter(
    spec: MergeSpec,
    adapters: Sequence[Adapter],
    base: BaseCheckpoint,
    kwargs: dict[str, Any],
    base_name: str | None = None,
    progress: Optional[Progress] = None,
) -> dict:
    """adapter_model.safetensors + adapter_config.json (scale 1) holding the merged delta of every targeted
    module: concatenated factors for the methods linear in the deltas, else a rank-R SVD truncation. The config
    names ``base_name`` as its base (default: the base folder), e.g. the hub name a cached snapshot came from.
    ``progress(modules merged, of the targeted)`` follows each module."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from jobs.models import DTYPES

    flags = {f.fan_in_fan_out for a in adapters for f in a.modules.values()}
    if len(flags) > 1:
        raise ValueError("merge: the adapters disagree on fan_in_fan_out; merge them with output: full")
    fan_in_fan_out = flags.pop()
    exact = spec.method in LINEAR_IN_DELTAS
    if exact:
        k = delta_coefficients(spec.method, kwargs, len(adapters))
        if not math.isclose(base_coefficient(spec.method, kwargs, len(adapters)), 1.0, rel_tol=1e-6):
            raise ValueError(
                "merge.output: linear with normalize false scales the base by sum(weight), which no "
                "adapter can hold; use output: full"
            )
    tensors, ranks, errors = {}, {}, {}
    targeted = [
        n
        for n in base.shapes
        if n.endswith(".weight") and any(n.removesuffix(".weight") in a.modules for a in adapters)
    ]
    for done, name in enumerate(targeted, 1):
        module = name.removesuffix(".weight")
        users = [i for i, a in enumerate(adapters) if module in a.modules]
        ranks[module] = sum(adapters[i].modules[module].rank for i in users)
        if exact:
            B, A = concatenated_factors([adapters[i].modules[module] for i in users], [k[i] for i in users])
        else:
            merged = merge_deltas(spec.method, module_deltas(adapters, module, base.shapes[name]), kwargs)
            B, A, errors[module] = low_rank(merged.T if fan_in_fan_out else merged, ranks[module])
            ranks[module] = A.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(DTYPES[spec.dtype]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.to(DTYPES[spec.dtype]).contiguous()
        if progress is not None:
            progress(done, len(targeted))
    save_file(tensors, str(Path(spec.output_dir) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    r = max(ranks.values())
    pattern = {m: rank for m, rank in ranks.items() if rank != r}
    LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=pattern,
        target_modules=list(ranks),
        fan_in_fan_out=fan_in_fan_out,
        task_type=adapters[0].task_type,
        base_model_name_or_path=base_name or spec.base_model_path,
    ).save_pretrained(spec.output_dir)
    if exact:
        return {}
    values = list(errors.values())
    return {"svd_relative_error": {"max": max(values), "mean": sum(values) / len(values), "modules": errors}}


def copy_side_files(spec: MergeSpec) -> None:
    """The base's tokenizer files; for a full output also config.json (dtype set) and generation_config.json."""
    src, dst = Path(spec.base_model_path), Path(spec.output_dir)
    for path in src.iterdir():
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_FILES):
            shutil.copy2(path, dst / path.name)
    if spec.output == "full":
        config = json.loads((src / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = spec.dtype
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", dst / "generation_config.json")


def merge_adapters(
    spec: MergeSpec, base_name: str | None = None, progress: Optional[Progress] = None
) -> dict[str, Any]:
    """Merge the LoRA adapters in spec.model_paths onto spec.base_model_path (a folder) into spec.output_dir; an
    adapter output names ``base_name`` as its base when given; ``progress(done, total)`` follows each tensor
    written (a full output) or module merged (an adapter). Returns what the merge marker records (method,
    parameters, output kind, SVD errors when truncated)."""
    check_method(spec.method)
    shared, kwargs = mergekit_parameters(spec)
    adapters = [read_adapter(path) for path in spec.model_paths.values()]
    base = BaseCheckpoint(spec.base_model_path)
    check_against_base(adapters, base)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    if spec.output == "full":
        record = write_full(spec, adapters, base, kwargs, progress)
    else:
        record = write_adapter(spec, adapters, base, kwargs, base_name, progress)
    copy_side_files(spec)
    return {
        "method": spec.method,
        "parameters": shared,
        "model_parameters": spec.model_parameters,
        "output": spec.output,
        **record,
    }
