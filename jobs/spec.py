"""The specs a worker-side job receives. Plain pydantic models: the driver builds them, Ray ships them.

They hold resolved values only (absolute paths, concrete numbers); the user-facing config lives in
``orchestrator/config/schema.py`` and composes these.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import PromptFormat
from jobs.localize import LocalizeSpec
from jobs.shards import DEFAULT_MAX_SHARD_SIZE


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class OptimizerSpec(_Spec):
    """A plain torch optimizer handed to ``deepspeed.initialize`` (unless the DeepSpeed config names one)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear"] = "constant"


class LoraSpec(_Spec):
    """LoRA unlearning (peft): train low-rank adapters on the target modules instead of the full weights.
    The reference model of a method that asks for one is the same model with the adapter disabled."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: delta = (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="module names (q_proj, v_proj, ...) or peft's 'all-linear'"
    )


class TrainingSpec(_Spec):
    """How an unlearning job trains: the one schema of these fields, shared by the pipeline config's
    ``unlearn:`` section (``orchestrator.config.schema.UnlearnConfig``) and the job spec (``UnlearnSpec``)."""

    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    localize: Optional[LocalizeSpec] = Field(None, description="attribution mask: only masked parameters train")
    lora: Optional[LoraSpec] = Field(None, description="train LoRA adapters (peft) instead of the full weights")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0, description="micro batch per worker (with global_batch_size: the largest)")
    gradient_accumulation_steps: int = Field(1, gt=0)
    global_batch_size: Optional[int] = Field(
        None,
        gt=0,
        description="rows per optimizer step over all workers, whatever scaling.num_workers is: each "
        "worker takes global_batch_size / num_workers rows a step, in micro batches of up to "
        "batch_size (the accumulation follows); null: batch_size x "
        "gradient_accumulation_steps x num_workers",
    )
    max_length: int = Field(128, gt=8)
    seed: int = 0
    report_interval_s: float = Field(
        5.0,
        ge=0,
        description="seconds between reports; each carries every step "
        "since the last (0: every step); not part of the stage key",
    )
    checkpoint_every: Optional[int] = Field(
        None, gt=0, description="steps between resumable DeepSpeed checkpoints (null: none); not part of the stage key"
    )
    eval_every: Optional[int] = Field(
        None,
        gt=0,
        description="steps between model snapshots that Ray eval tasks score while training goes on "
        "(unlearn.select picks the job's model among them); null: only the last step",
    )

    def training(self) -> dict[str, Any]:
        """The ``TrainingSpec`` fields of this model (a config section or a spec), as keyword arguments."""
        return {k: getattr(self, k) for k in TrainingSpec.model_fields}


class UnlearnSpec(TrainingSpec):
    """One unlearning job: a method run on one forget subset, on every Ray Train worker."""

    name: str = Field(description="job name, e.g. 'subset/1950s' or 'unsplit'")
    model_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_pickle: bool = False
    forget_path: str
    retain_path: Optional[str] = None
    forget_format: Literal["qa", "text"] = Field(
        "qa", description="text: raw text rows (MUSE's, WMDP's corpora): every token is a target"
    )
    retain_format: Literal["qa", "text"] = Field(
        "qa", description="text: general text (retain_source general) or a raw-text retain corpus"
    )
    method: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: Optional[str] = Field(None, description="transformers' attn_implementation")
    prompt: PromptFormat = Field(default_factory=PromptFormat, description="prompt template, chat, answer EOS")
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    threads_per_worker: int = Field(1, gt=0)
    max_shard_size: str = Field(
        DEFAULT_MAX_SHARD_SIZE,
        description="largest safetensors file the job writes (storage.max_shard_size); not part of the stage key",
    )
    output_dir: str


# Each method's defaults. TIES at density 0.5 with sign election, normalised, is the merge of the demo recipe
# (README "The offline demo benchmark") and of docs/results.md's runs.
DEFAULT_MERGE_PARAMETERS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.5, "weight": 1.0, "normalize": True},
    "dare_ties": {"density": 0.5, "weight": 1.0, "normalize": True},
    "task_arithmetic": {"weight": 1.0},
    "linear": {"weight": 1.0},
}


class MergeSpec(_Spec):
    """Merge finished subset models onto the base model."""

    base_model_path: str
    model_paths: dict[str, str]
    method: str = "ties"
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: Literal["full", "adapter"] = Field(
        "full", description="LoRA jobs: write the merged full model, or a peft adapter holding the merged delta"
    )
    max_shard_size: str = Field(
        DEFAULT_MAX_SHARD_SIZE, description="largest safetensors file of the merged model (storage.max_shard_size)"
    )
    output_dir: str

    def resolved_parameters(self) -> dict[str, Any]:
        """The global mergekit parameters: the project's defaults for the method, then the given ones."""
        return {**DEFAULT_MERGE_PARAMETERS.get(self.method, {}), **self.parameters}


class EvalSpec(_Spec):
    """Score one model on named suites over named splits (jsonl files)."""

    model_path: str
    splits: dict[str, str]
    suites: list[str] = Field(default_factory=lambda: ["qa"])
    prompt: PromptFormat = Field(default_factory=PromptFormat, description="prompt template, chat, answer EOS")
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_length: int = Field(128, gt=8)
    max_examples: Optional[int] = Field(None, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Optional[str] = Field(None, description="transformers' attn_implementation")
    suite_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="suite name -> extra keyword arguments (lmeval tasks, mc attributes)"
    )
    max_memory: Optional[dict[str, Union[int, str]]] = Field(
        None,
        description="device ('0', '1', ... for GPUs, 'cpu') -> bytes or '70GiB' the weights may take; null: "
        "every visible GPU less headroom (jobs.evaluate.placement), else the CPU",
    )
    offload_folder: Optional[str] = Field(None, description="with max_memory: modules that fit nowhere go to disk here")
