"""The ``data:`` and ``split:`` sections of a pipeline config: where the rows come from, what their columns
are called, how prompts are built, and how the forget set is split (``orchestrator.config.schema`` holds the rest)."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.data.format import CHAT, DEFAULT_TEMPLATE, PromptFormat
from jobs.data.sources import SOURCE_NAMES


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataSource(Section):
    """A dataset: local json/jsonl/parquet/csv file(s), or a Hugging Face hub dataset name; or ``parts``,
    several of those concatenated (WMDP's bio and cyber corpora), each row given its part's ``set`` columns."""

    path: Union[str, list[str], None] = None
    format: Literal["auto", "json", "jsonl", "parquet", "csv", "hub"] = "auto"
    name: Optional[str] = Field(None, description="hub dataset config name")
    split: str = "train"
    set: dict[str, Any] = Field(default_factory=dict, description="columns given to every row, e.g. {domain: bio}")
    parts: Optional[list["DataSource"]] = Field(None, description="sources concatenated in order (instead of path)")

    @field_validator("parts", mode="before")
    @classmethod
    def _part_shorthand(cls, v: Any) -> Any:
        return [{"path": p} if isinstance(p, (str, list)) else p for p in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _path_or_parts(self):
        if (self.path is None) == (self.parts is None):
            raise ValueError(
                "expected path (a file, files or a hub name) or parts (a list of sources): "
                f"{'neither' if self.path is None else 'both'} given"
            )
        if self.parts is not None and not self.parts:
            raise ValueError("parts: expected at least one source")
        return self

    def leaves(self) -> list["DataSource"]:
        """The sources with a path: this one, or its parts'."""
        return [self] if self.parts is None else [leaf for p in self.parts for leaf in p.leaves()]

    def label(self) -> str:
        """How messages name it: its path, or its parts' joined by '+'."""
        return str(self.path) if self.parts is None else " + ".join(p.label() for p in self.parts)


class Columns(Section):
    question: str = "question"
    answer: str = "answer"
    paraphrased_answer: str = "paraphrased_answer"
    perturbed_answers: str = "perturbed_answers"
    text: str = "text"


class DataConfig(Section):
    forget: DataSource
    retain: Optional[DataSource] = None
    holdout: Optional[DataSource] = None
    general: Optional[DataSource] = None
    mc: Optional[DataSource] = Field(
        None, description="multiple-choice eval set (mc suite): question, choices (list), answer (index), attributes"
    )
    eval_sets: dict[str, DataSource] = Field(
        default_factory=dict,
        description="sets the suites score, never trained on, by split name: more "
        "question/answer splits (TOFU: real_authors, world_facts), a suite's own rows (MUSE: verbmem, knowmem_*), "
        "or forget/retain/holdout scored on other rows than the training ones (TOFU: retain_perturbed)",
    )
    columns: Columns = Field(default_factory=Columns)
    template: str = Field(
        DEFAULT_TEMPLATE,
        description="prompt with {question}, or 'chat': the tokenizer's "
        "chat template (question as the user turn, answer as the assistant turn)",
    )
    system_prompt: Optional[str] = Field(
        None, description="template chat: the system turn (default: the chat template's own)"
    )
    answer_eos: bool = Field(
        True,
        description="answers end with EOS (chat: the end-of-turn) in training and "
        "scoring; off for facts learned in pretraining (WMDP/RWKU-style)",
    )

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(template=self.template, system_prompt=self.system_prompt, answer_eos=self.answer_eos)

    @field_validator("forget", "retain", "holdout", "general", "mc", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, (str, list)) else v

    @field_validator("eval_sets", mode="before")
    @classmethod
    def _eval_sets(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        for name in v:
            if (
                not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name))
                or name in ("general", "mc")
                or (name.startswith("forget") and name != "forget")
            ):
                raise ValueError(f"split name {name!r}: expected lower_snake_case, not general, mc or forget_*")
        return {k: {"path": s} if isinstance(s, (str, list)) else s for k, s in v.items()}

    def sources(self) -> dict[str, DataSource]:
        """Every data source set, by its config path (``forget``, ..., ``eval_sets.<name>``)."""
        out = {n: getattr(self, n) for n in SOURCE_NAMES if getattr(self, n) is not None}
        return {**out, **{f"eval_sets.{n}": src for n, src in self.eval_sets.items()}}

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v != CHAT and "{question}" not in v:
            raise ValueError("must contain '{question}', or be 'chat' (the tokenizer's chat template)")
        return v

    @model_validator(mode="after")
    def _system_prompt(self):
        if self.system_prompt is not None and self.template != CHAT:
            raise ValueError("system_prompt needs template: chat (a plain template holds its own text)")
        return self


class SplitConfig(Section):
    by: Literal["attribute", "cluster"] = Field(
        "attribute",
        description="attribute: one subset per value of a forget-set column; cluster: k subsets of "
        "similar rows (k-means over TF-IDF vectors), for data without an attribute",
    )
    attribute: Optional[str] = Field(None, description="by: attribute: the forget-set column to split by")
    groups: Optional[dict[str, list[Any]]] = Field(
        None, description="explicit subsets: name -> attribute values; default one subset per value"
    )
    clusters: Optional[int] = Field(None, ge=2, description="by: cluster: k, the number of subsets")
    embedding: Literal["tfidf", "model"] = Field(
        "tfidf",
        description="by: cluster: the rows' vectors: TF-IDF of their words, or a sentence embedding "
        "(mean-pooled last hidden states of embedding_model)",
    )
    embedding_model: Optional[str] = Field(
        None, description="embedding: model: a sentence encoder folder or hub name (default: model.path)"
    )
    seed: int = Field(0, description="by: cluster: the k-means seed (same data and seed, same subsets)")
    baseline: Literal["unsplit", "none"] = "unsplit"
    missing: Literal["error", "drop", "group"] = Field(
        "error", description="forget rows without an attribute value: an error, left out, or a subset 'missing'"
    )

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must name at least one group")
            for name, values in v.items():
                if not values:
                    raise ValueError(f"group {name!r} lists no values")
        return v

    @model_validator(mode="after")
    def _by(self):
        if self.by == "attribute" and not self.attribute:
            raise ValueError("attribute: expected the forget-set column to split by (or by: cluster with clusters: k)")
        if self.by == "cluster":
            if self.clusters is None:
                raise ValueError("clusters: expected k, the number of subsets, with by: cluster")
            if self.attribute is not None or self.groups is not None:
                raise ValueError(
                    "attribute and groups belong to by: attribute; by: cluster takes clusters, seed and embedding"
                )
        elif self.embedding != "tfidf" or self.embedding_model is not None:
            raise ValueError("embedding and embedding_model belong to by: cluster")
        return self

    def describe(self) -> str:
        if self.by == "cluster":
            return f"into {self.clusters} clusters ({self.embedding} vectors, seed {self.seed})"
        return f"by {self.attribute!r}"
