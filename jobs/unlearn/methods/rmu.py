"""Representation Misdirection for Unlearning (RMU; Li et al. 2024, "The WMDP Benchmark", section 4).

RMU trains a few MLPs just below one decoder layer ``layer`` so that the layer's output (the residual
stream after it) on forget tokens is pushed onto a fixed, scaled random direction, while on retain
tokens it stays where the frozen reference model has it:

    h(x)     = output of decoder layer ``layer`` (hidden states, [B, T, D]), updated model
    h_ref(x) = the same for the frozen reference model
    u        = r / ||r||,  r ~ U[0, 1)^D  (drawn once from a generator seeded with ``seed``)
    c        = steering_coeff (``steering: fixed``), or
               adaptive_scale * mean over sequences of (1 / |S|) * sum_{t in S} ||h_ref,t||
               on the first forget batch (``steering: adaptive``, the default; see below)
    mse(a, b; x) = mean over the sequences of x of
                   (1 / |S|) * sum_{t in S} mean_d (a_td - b_td)^2       S: the sequence's counted tokens
    loss = gamma * mse(h, c * u; forget) + alpha * mse(h, h_ref; retain)

The reduction is open-unlearning's ``RMU.compute_activation_loss`` (src/trainer/unlearn/rmu.py, which
borrows from centerforaisafety/wmdp rmu/unlearn.py): squared error averaged over the hidden dimension
(``F.mse_loss``, as in WMDP, so the published steering coefficients carry over), averaged over each
sequence's counted tokens, then over the batch. Counted tokens, as in open-unlearning, are those with a
label (``labels != -100``; here also ``attention_mask == 1``): the answer tokens of a QA row, every
token of a general-text row. ``tokens: all`` counts every non-padding token instead (WMDP's plain
``mse_loss`` averages over all positions of its pretraining-text batches, padding included; we leave
padding out). A sequence without a counted token is left out of the batch mean (open-unlearning would
divide by zero).

The retain term is open-unlearning's ``retain_loss_type: EMBED_DIFF`` and WMDP's only retain term.

Activations are captured with a forward hook on ``layers[layer]``, registered for one forward pass and
removed again: this works through a DeepSpeed engine (the hook sits on the wrapped HF model's layer),
under ZeRO-3 (the hook sees the layer's full output) and with gradient checkpointing (the hook is gone
before any recomputation). ``output_hidden_states`` is not used: in transformers 5 its last entry is
taken after the final norm, so it is not the last layer's output. The reference model's forward pass
stops right after ``layer`` (the layers above it do not enter the loss).

The steering coefficient c (``steering``):
- ``adaptive`` (the default unless ``steering_coeff`` is given): c = adaptive_scale * the mean norm of the
  frozen (reference) model's activations at ``layer`` on the forget set, as adaptive RMU (Dang et al. 2024,
  "On Effects of Steering Latent Representation for Large Language Model Unlearning", arXiv 2408.06223;
  their code ``adap_rmu``: ``coeff = mean_b mean_t ||h_bt|| * scale``, measured on the first forget batch
  and kept, ``--scale 5.0``). Here the mean runs over the counted tokens of each sequence, then over the
  sequences of the job's first forget micro-batch, on the reference model (the authors read the updated
  model on the first batch of each topic, i.e. after at most one step); with several workers it is
  averaged over the ranks, so every worker steers to the same target. c is then fixed for the job (it is
  one of the method's ``state_attrs``: a resumed job keeps it). Because c scales with the activations, one
  ``adaptive_scale`` can serve a 1M-parameter toy (5 works on the demo benchmark) and a 7B model (the
  authors' setting, where 5 is their default).
- ``fixed``: c = ``steering_coeff`` (WMDP). Giving ``steering_coeff`` without ``steering`` means ``fixed``,
  so configs written for WMDP's coefficient keep their meaning.

Defaults, and where they come from:
- ``layer``: None = ``floor(layer_fraction * num_hidden_layers)`` (clipped to the last layer), with
  ``layer_fraction`` 0.5: the middle layer (layer 16 of 32, 15 of 30 for SmolLM2-135M, 2 of the 4-layer
  demo model; the same layer as ``num_hidden_layers // 2``, the default before issue 15). An int ``layer``
  is an absolute index and wins over ``layer_fraction``. WMDP and open-unlearning steer layer 7 (of 32 in
  zephyr-7b: ``layer_fraction`` 0.22, or ``layer: 7``; of 16 in open-unlearning's Llama-3.2-1B config:
  0.44). On the demo benchmark (adaptive steering, alpha 100) the middle layer forgot more and kept more
  than layer 1 (docs/benchmarks.md "Method defaults on the demo benchmark"), so the default stays in the
  middle. Resolved in ``setup``.
- ``trainable_layers``: None = ``[layer-2, layer-1, layer]`` clipped at 0 (WMDP ``--layer_ids 5,6,7``
  for ``--layer_id 7``; open-unlearning trains layers 5, 6, 7 too).
- ``trainable_params``: ``mlp`` = every ``mlp.*`` parameter of those layers (gate, up and down
  projections). WMDP (``--param_ids 6``) and open-unlearning (``mlp.down_proj.weight``) train only the
  down projection: ``down_proj`` reproduces them exactly; ``all`` trains every parameter of the layers.
- ``adaptive_scale``: 5.0, the adaptive RMU code's ``--scale`` default.
- ``steering_coeff``: 6.5, WMDP's published zephyr-7b RMU (``--steering_coeffs 6.5,6.5``; the script's
  own default is 20, open-unlearning's config 300 for Llama-3.2-1B). The target's per-dimension size is
  steering_coeff / sqrt(D), so a fixed value has to be tuned per model against the norm of its
  activations at ``layer`` (WMDP: raising the norm is what disrupts later layers). On the demo model 6.5 is
  below the activations' own norm, and the model did not move at all (docs/results.md; the norms and the
  adaptive c: docs/benchmarks.md "Method defaults on the demo benchmark").
- ``alpha``: 100, WMDP's script default (``--alpha 100,100``; its published zephyr-7b run uses 1200,
  open-unlearning's ``configs/trainer/RMU.yaml`` 1000, the default here before issue 15). With adaptive
  steering both terms scale with the square of the activations' norm, so the balance alpha sets carries
  over between models. On the demo benchmark (adaptive c, layer 2) alpha 1000 held every activation in
  place, 100 forgot at a small retain cost and 10 forgot more at a larger one, while a fixed 6.5 at alpha 100
  did not move: adaptive steering is what moved it (docs/benchmarks.md "Method defaults on the demo
  benchmark" has the figures).
- ``gamma``: 1.0, open-unlearning's weight of the forget term (WMDP has none).
- ``seed``: 0. The control vector comes from its own ``torch.Generator``, so every worker of a job
  draws the same ``u`` whatever the global RNG state.

Metrics: ``forget_loss`` (the forget MSE), ``unlearn_loss`` (the forget term as it enters the loss,
gamma * forget_loss: WMDP's ``unlearn_loss``), ``retain_loss`` (the retain MSE, before alpha),
``forget_nll`` (token-mean NLL of the forget answers, from the same forward pass's logits) and
``steering_coeff`` (c, fixed or adaptive).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.data.format import IGNORE_INDEX, sequence_nll
from jobs.unlearn.methods import register
from jobs.unlearn.methods.base import LossOutput, Method, plus_later, ranks_mean, token_mean


class RMUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: Optional[int] = Field(
        None,
        ge=0,
        description="decoder layer whose output is steered (absolute index); "
        "None: floor(layer_fraction * num_hidden_layers)",
    )
    layer_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="the steered layer relative to depth, used when "
        "`layer` is None: floor(fraction x layers), the "
        "middle by default (WMDP's layer 7 of 32: 0.22)",
    )
    steering: Optional[Literal["fixed", "adaptive"]] = Field(
        None,
        description="adaptive: c = adaptive_scale x the mean activation norm at `layer` of the frozen model "
        "on the forget set (Dang et al. 2024); fixed: c = steering_coeff (WMDP); None: fixed "
        "when steering_coeff is given, else adaptive",
    )
    adaptive_scale: float = Field(
        5.0, gt=0, description="adaptive steering: c / mean activation norm (the adaptive RMU code's --scale)"
    )
    steering_coeff: float = Field(
        6.5,
        gt=0,
        description="fixed steering: the norm of the target vector c*u; scale "
        "it with the norm of the activations at `layer`",
    )
    alpha: float = Field(
        100.0, ge=0, description="weight of the retain (activation-matching) term (WMDP's script default)"
    )
    gamma: float = Field(1.0, ge=0, description="weight of the forget (steering) term")
    trainable_layers: Optional[list[int]] = Field(
        None, description="layers whose parameters train; None: [layer-2, layer-1, layer] clipped at 0"
    )
    trainable_params: Literal["mlp", "down_proj", "all"] = Field(
        "mlp",
        description="mlp: mlp.* of those layers; down_proj: mlp.down_proj.weight only (WMDP, "
        "open-unlearning); all: every parameter of those layers",
    )
    tokens: Literal["answer", "all"] = Field(
        "answer", description="answer: tokens with a label (open-unlearning); all: every non-padding token"
    )
    seed: int = Field(0, description="seed of the random control vector u")

    @model_validator(mode="after")
    def _steering(self) -> "RMUParams":
        if self.steering is None:  # a config that names WMDP's coefficient means WMDP's fixed steering
            self.steering = "fixed" if "steering_coeff" in self.model_fields_set else "adaptive"
        return self


def steered_layer(p: RMUParams, n_layers: int) -> int:
    """The steered layer: ``layer`` when given, else floor(layer_fraction * n_layers) clipped to the last."""
    if p.layer is not None:
        return p.layer
    return min(n_layers - 1, int(p.layer_fraction * n_layers))


class _StopForward(Exception):
    """Raised by the capture hook to end a reference forward pass once the layer has run."""


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Mistral/Qwen style, or GPT-2/NeoX style)."""
    hf = getattr(model, "module", model)
    if hasattr(hf, "get_base_model"):  # a peft (LoRA) model: its wrapped transformer
        hf = hf.get_base_model()
    base = getattr(hf, "model", None)
    if base is not None and hasattr(base, "layers"):
        return base.layers
    for path in (("transformer", "h"), ("gpt_neox", "layers")):
        obj = hf
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return obj
    raise ValueError(f"rmu: cannot find the decoder layers of {type(hf).__name__} (expected model.layers)")


def capture(model: Any, module: torch.nn.Module, inputs: dict, stop: bool = False) -> tuple[torch.Tensor, Any]:
    """Run ``model`` on ``inputs`` and return ``module``'s output (the hidden states) and the model output.

    ``stop``: end the forward pass right after ``module`` (the model output is then None); only for a plain
    model (never a DeepSpeed engine, whose ZeRO-3 hooks expect every forward pass to complete)."""
    cache: list[torch.Tensor] = []

    def hook(_mod, _args, output):
        cache.append(output[0] if isinstance(output, (tuple, list)) else output)
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    out = None
    try:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not cache:
        raise RuntimeError("rmu: the steered layer did not run in the forward pass")
    return cache[0], out


def token_mask(part: dict, tokens: str = "answer") -> torch.Tensor:
    """Which positions count: attention_mask == 1, and with ``tokens="answer"`` also labels != -100."""
    mask = part["attention_mask"] == 1
    if tokens == "answer":
        mask = mask & (part["labels"] != IGNORE_INDEX)
    return mask


def activation_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence: mean over counted tokens of the hidden-dimension mean of (a - b)^2; then the mean over
    sequences with at least one counted token. Computed in float32. ``b`` may broadcast (e.g. [1, 1, D])."""
    sq = (a.float() - b.float()).pow(2).mean(dim=-1)  # [B, T]
    m = mask.to(sq.dtype)
    n = m.sum(dim=1)  # [B]
    per_seq = (sq * m).sum(dim=1) / n.clamp(min=1)
    keep = n > 0
    if not keep.any():
        return sq.sum() * 0.0  # nothing to count: zero, still attached to the graph
    return per_seq[keep].mean()


def mean_activation_norm(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence: mean over counted tokens of ||h_t|| (L2 over the hidden dimension); then the mean over
    sequences with at least one counted token (float32, 0-d). Adaptive RMU's ``mean_b mean_t ||h_bt||``."""
    norms = h.float().norm(dim=-1)  # [B, T]
    m = mask.to(norms.dtype)
    n = m.sum(dim=1)
    keep = n > 0
    if not keep.any():
        raise ValueError("rmu: adaptive steering needs a forget batch with at least one counted token")
    return ((norms * m).sum(dim=1) / n.clamp(min=1))[keep].mean()


def control_vector(hidden_size: int, seed: int) -> torch.Tensor:
    """The fixed random unit vector u (float32, CPU): uniform [0, 1) entries, normalised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.rand(hidden_size, generator=g, dtype=torch.float32)
    return r / r.norm()


@register("rmu")
class RMU(Method):
    Params = RMUParams
    needs_reference = True
    needs_retain = True
    state_attrs = ("coeff",)  # the adaptive coefficient, measured once: a resumed job keeps it

    def __init__(self, params: RMUParams):
        super().__init__(params)
        self.layer: Optional[int] = None
        self.trainable_layers: list[int] = []
        self.trainable_names: list[str] = []
        self._u: Optional[torch.Tensor] = None  # unit vector, float32 CPU
        self.coeff: Optional[torch.Tensor] = None  # c, a 0-d float32 tensor (set on the first loss call)
        self._fixed = torch.tensor(float(params.steering_coeff))
        self._target: dict[tuple, torch.Tensor] = {}  # (device, dtype, id(c)) -> c * u, [1, 1, D]

    # ----- setup: resolve layers, freeze everything else -------------------------------------------------
    def resolve(self, model: Any) -> None:
        """Fill in ``layer`` and ``trainable_layers`` from the model's depth; reject impossible choices."""
        p = self.params
        n = len(decoder_layers(model))
        layer = steered_layer(p, n)
        if not 0 <= layer < n:
            raise ValueError(f"rmu: layer {layer} out of range: the model has {n} decoder layers (0..{n - 1})")
        if p.trainable_layers is None:
            trainable = sorted({max(0, layer - 2), max(0, layer - 1), layer})
        else:
            trainable = sorted(set(p.trainable_layers))
            if not trainable:
                raise ValueError("rmu: trainable_layers is empty")
            bad = [i for i in trainable if not 0 <= i <= layer]
            if bad:
                raise ValueError(
                    f"rmu: trainable_layers {bad} must lie in 0..{layer} (layer): layers above the steered "
                    "layer do not affect the loss"
                )
        self.layer, self.trainable_layers = layer, trainable

    def _selected(self, name: str) -> bool:
        kind = self.params.trainable_params
        if kind == "all":
            return True
        if kind == "mlp":
            return name.startswith("mlp.")
        return name == "mlp.down_proj.weight"

    def setup(self, model: Any) -> None:
        self.resolve(model)
        hf = getattr(model, "module", model)
        hf.requires_grad_(False)
        layers = decoder_layers(hf)
        chosen = 0
        for i in self.trainable_layers:
            for name, param in layers[i].named_parameters():
                if self._selected(name):
                    param.requires_grad_(True)
                    chosen += 1
        if not chosen:
            raise ValueError(
                f"rmu: trainable_params {self.params.trainable_params!r} selects no parameter of "
                f"layers {self.trainable_layers}"
            )
        self.trainable_names = [n for n, p in hf.named_parameters() if p.requires_grad]

    # ----- the loss -------------------------------------------------------------------------------------
    def coefficient(self, ref_model: Any, forget: dict) -> torch.Tensor:
        """c: ``steering_coeff`` (fixed), or adaptive_scale x the reference model's mean activation norm at
        the steered layer on this forget batch, averaged over the ranks; measured on the first call, then kept."""
        if self.coeff is None:
            p = self.params
            if p.steering == "fixed":
                self.coeff = self._fixed
            else:
                module = decoder_layers(ref_model)[self.layer]
                with torch.no_grad():
                    h_ref, _ = capture(ref_model, module, forget, stop=getattr(ref_model, "module", None) is None)
                    norm = mean_activation_norm(h_ref, token_mask(forget, p.tokens).to(h_ref.device))
                self.coeff = (p.adaptive_scale * ranks_mean(norm)).detach()
        return self.coeff

    def target(self, like: torch.Tensor, hidden_size: int) -> torch.Tensor:
        """c * u as [1, 1, D], kept per device/dtype and per c (``coefficient``'s; a fixed ``steering_coeff``
        before it was called)."""
        if self._u is None:
            self._u = control_vector(hidden_size, self.params.seed)
        coeff = self.coeff if self.coeff is not None else self._fixed
        key = (like.device, like.dtype, id(coeff))  # a restored or newly measured c gets its own target
        if key not in self._target:
            c = coeff.to(like.device, torch.float32)
            self._target[key] = (c * self._u.to(like.device)).to(like.dtype).view(1, 1, -1)
        return self._target[key]

    def loss(self, model, batch, ref_model=None):
        if ref_model is None:
            raise ValueError("rmu needs the frozen reference model (needs_reference)")
        if self.layer is None:  # setup not called (e.g. used directly): resolve without freezing
            self.resolve(model)
        p = self.params
        module = decoder_layers(model)[self.layer]
        ref_module = decoder_layers(ref_model)[self.layer]

        forget = batch["forget"]
        coeff = self.coefficient(ref_model, forget)
        h, out = capture(model, module, forget)
        target = self.target(h, h.shape[-1])
        forget_mse = activation_mse(h, target, token_mask(forget, p.tokens))
        loss = p.gamma * forget_mse
        metrics = {
            "forget_loss": forget_mse.detach(),
            "unlearn_loss": (p.gamma * forget_mse).detach(),
            "steering_coeff": coeff,
        }
        with torch.no_grad():
            nll, n = sequence_nll(out.logits, forget["labels"])
            metrics["forget_nll"] = token_mean(nll.sum(), n, forget)
        del out

        retain = batch.get("retain")
        if retain is not None:

            def retain_term():
                with torch.set_grad_enabled(p.alpha > 0 and torch.is_grad_enabled()):
                    h_r, _ = capture(model, module, retain)
                with torch.no_grad():
                    h_ref, _ = capture(ref_model, ref_module, retain, stop=getattr(ref_model, "module", None) is None)
                retain_mse = activation_mse(h_r, h_ref.to(h_r.device), token_mask(retain, p.tokens))
                metrics["retain_loss"] = retain_mse.detach()
                return p.alpha * retain_mse

            if p.alpha > 0:
                loss = plus_later(loss, retain_term)
            else:
                retain_term()  # the metric only
        return LossOutput(loss, metrics)
