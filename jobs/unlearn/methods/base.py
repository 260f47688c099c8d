"""What every unlearning method is, and the few loss pieces they share."""

from __future__ import annotations

import contextvars
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict

from jobs.data.format import sequence_nll


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class LossOutput:
    """The loss to minimise and the parts worth plotting (e.g. forget_loss, retain_loss): detached 0-d
    tensors (or floats). The loop reads them once per optimizer step, packed with the loss, so a method
    never forces a device sync of its own (no ``.item()``)."""

    loss: torch.Tensor
    metrics: dict[str, Union[torch.Tensor, float]] = field(default_factory=dict)


class Method:
    """Base of all methods. Subclasses set ``Params`` and implement ``loss``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_reference: ClassVar[bool] = False
    needs_retain: ClassVar[bool] = False
    takes_text: ClassVar[bool] = True  # trains on raw-text forget rows (False: needs question/answer rows)
    # params naming local files or folders: a config's relative paths there resolve against its folder
    path_params: ClassVar[tuple[str, ...]] = ()
    # attributes that change during training (a dual variable): saved in every resumable checkpoint
    state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel):
        self.params = params

    def uses_retain(self) -> bool:
        """Whether this configuration trains on retain data: ``needs_retain``, or a retain term switched on
        through the parameter every method calls ``alpha`` (the retain weight)."""
        return self.needs_retain or float(getattr(self.params, "alpha", 0) or 0) > 0

    def pre_jobs(self, spec: Any) -> list[tuple[str, Any, dict]]:
        """Training jobs to run before this one, each a ``TorchTrainer`` of its own (e.g. WHP's reinforced
        model): ``(suffix, UnlearnSpec, method_params update for this job)``. The runner runs them in order
        (skipping one whose output folder already holds a finished job), then this job with each update
        merged into its ``method_params``."""
        return []

    def setup(self, model: Any) -> None:
        """Called once on each worker before ``deepspeed.initialize``: freeze parameters, add hooks. Under ZeRO-3
        the model's parameters are already partitioned (``ds_shape`` holds a parameter's full shape)."""

    def frozen_models(self) -> dict[str, str]:
        """Frozen models ``loss`` reads besides the reference, as ``{attribute: model folder}`` (WHP's reinforced
        model): the loop builds each as it builds the reference, partitioned under ZeRO-3, and sets the
        attribute after ``deepspeed.initialize``."""
        return {}

    def forget_views(self, row: dict, rng: random.Random) -> dict[str, tuple[str, str]]:
        """Extra (question, answer) pairs per forget row, e.g. ``{"idk": (q, "I don't know.")}``. Each view
        reaches ``loss`` as ``batch[view]``, aligned with ``batch["forget"]``."""
        return {}

    def finalize(self, trained: dict, base: dict) -> Optional[dict]:
        """The job's output weights from the trained and the base state dicts; None keeps the trained
        weights. A method that returns new weights (task-vector negation) also has the trained model
        saved in ``<output>/trained``. Under ZeRO-3 it is called one tensor name at a time (the weights are
        gathered tensor by tensor), so it must work name by name."""
        return None

    def finalizes(self) -> bool:
        """Whether ``finalize`` makes new output weights (the method overrides it): only then does the job
        load the base model at save time, and its output is a full model even with LoRA."""
        return type(self).finalize is not Method.finalize

    def merge_input(self) -> Optional[str]:
        """Which folder of each subset job the merge takes: None for the job's output, else a subfolder
        (``"trained"``)."""
        return None

    def rewrites_merge(self) -> bool:
        """Whether ``after_merge`` rewrites the merged model."""
        return False

    def after_merge(self, merged: dict, base: dict) -> dict:
        """Weights of the final merged model from the mergekit result (when ``rewrites_merge``)."""
        return merged

    def loss(self, model: Any, batch: dict, ref_model: Optional[Any] = None) -> LossOutput:
        """``batch["forget"]`` and ``batch["retain"]`` (or None) hold input_ids, attention_mask, labels."""
        raise NotImplementedError


def sequence_logprob(model: Any, part: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's target tokens, and their count."""
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    nll, n = sequence_nll(logits, part["labels"])
    return -nll, n


def token_mean(total: torch.Tensor, n: torch.Tensor, part: Optional[dict] = None) -> torch.Tensor:
    """A sum over target tokens as a token mean: over this micro batch's ``n`` tokens, or, when the loop gave the
    part a ``norm``, over the global batch's (jobs.unlearn.data: then the mean over micro batches and workers is
    the global batch's token mean, whatever the worker count)."""
    if part is not None and part.get("norm") is not None:
        return total / part["norm"]
    return total / n.sum().clamp(min=1)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor, part: Optional[dict] = None) -> torch.Tensor:
    """Token-averaged NLL of ``labels`` under ``logits`` (both [B, T, ...], labels not yet shifted); ``part``: the
    batch part whose target positions ``labels`` has, for its ``norm`` (``token_mean``)."""
    nll, n = sequence_nll(logits, labels)
    return token_mean(nll.sum(), n, part)


_LATER: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("spunge_later_terms", default=None)


@contextmanager
def terms_later(enabled: bool = True) -> Iterator[list[Callable[[], torch.Tensor]]]:
    """While it is open, ``plus_later`` does not build its term but appends the function that builds it to the
    yielded list: the loop back-propagates the method's loss, then builds and back-propagates each term in
    turn, so one graph is alive at a time. Under ZeRO-3 that matters beyond activations: a parameter used by
    two graphs stays gathered until both are back-propagated, so a forget and a retain graph alive together
    hold the whole model on every rank during backward."""
    terms: list[Callable[[], torch.Tensor]] = []
    token = _LATER.set(terms if enabled else None)
    try:
        yield terms
    finally:
        _LATER.reset(token)


def plus_later(loss: torch.Tensor, term: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``loss + term()``, or ``loss`` alone with ``term`` left for the loop to add (inside ``terms_later``). ``term``
    builds an independent part of the loss (its own forward) and records its metrics itself."""
    later = _LATER.get()
    if later is None:
        return loss + term()
    later.append(term)
    return loss


def with_retain(model: Any, batch: dict, loss: torch.Tensor, metrics: dict, alpha: float) -> torch.Tensor:
    """``loss + alpha * NLL(retain)`` when alpha > 0 and a retain batch is there (records ``retain_loss``,
    detached); the retain term is a ``plus_later`` term."""
    if alpha > 0 and batch.get("retain") is not None:

        def retain_term() -> torch.Tensor:
            retain = mean_nll(model, batch["retain"])
            metrics["retain_loss"] = retain.detach()
            return alpha * retain

        return plus_later(loss, retain_term)
    return loss


class RelabelMethod(Method):
    """Fine-tune the forget answers towards other labels (``relabel``), plus an optional retain term:
    loss = NLL(forget with relabelled targets) + alpha * NLL(retain). ``params`` need ``seed`` and ``alpha``."""

    loss_name: ClassVar[str] = "relabel_loss"

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.generator: Optional[torch.Generator] = None

    def relabel(self, logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: Any, batch: dict, ref_model: Optional[Any] = None) -> LossOutput:
        if self.generator is None:  # advances with every call: each step sees new labels
            self.generator = torch.Generator().manual_seed(self.params.seed)
        part = batch["forget"]
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        loss = token_mean_nll(logits, self.relabel(logits, part["labels"], self.generator), part)
        with torch.no_grad():
            forget = token_mean_nll(logits, part["labels"], part)
        metrics = {"forget_loss": forget, self.loss_name: loss.detach()}
        return LossOutput(with_retain(model, batch, loss, metrics, self.params.alpha), metrics)


def mean_nll(model: Any, part: dict) -> torch.Tensor:
    """Token-averaged NLL over a batch's target tokens (the usual LM loss; ``token_mean``)."""
    logp, n = sequence_logprob(model, part)
    return token_mean(-logp.sum(), n, part)


def ranks_mean(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the workers (itself when not distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / dist.get_world_size()
    return x
