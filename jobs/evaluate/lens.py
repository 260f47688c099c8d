"""Logit lens (the ``lens`` suite): how likely the forgotten answer still is in each layer's residual stream.

An unlearned model may only hide an answer at its output while the layers below still compute it (Hu et al.
2024, "Unlearning or Obfuscating? Jogging the memory of unlearned LLMs via benign relearning",
arXiv:2406.13356, ask that question of unlearning in general). The logit lens (nostalgebraist, "interpreting GPT:
the logit lens", LessWrong 2020) reads a layer's residual stream as if it were the last one: through the model's
final norm and unembedding. Łucki et al. 2024 ("An adversarial perspective on machine unlearning for AI safety",
arXiv:2409.18025; github.com/ethz-spylab/unlearning-vs-safety, ``src/logit_lens/logit_lens.py``) decode each
decoder block's output of unlearned models that way, ``lm_head(model.norm(block output))`` at the last prompt
position of WMDP questions, and score per layer whether the right answer letter is the likeliest of A-D.

Definition. Each row (``split``, default ``forget``) is encoded as the ``qa`` suite scores it (its answer's
tokens, EOS included, as targets; every token of a raw-text row) and run once with ``output_hidden_states``:
``hidden_states[l]`` is the residual stream after decoder layer ``l`` (0: the embeddings). At the positions that
predict a target token only, layer ``l``'s lens logits are ``unembed(final_norm(hidden_states[l]))`` (the
model's ``get_output_embeddings()``, tied or not; the final norm is ``model.norm`` of Llama / Mistral / Qwen,
``transformer.ln_f`` of GPT-2, ``gpt_neox.final_layer_norm`` of GPT-NeoX). Layer ``L`` (the last) is the model's
own logits: transformers hands back the last hidden state after the final norm, so norming it again would be
wrong; the first batch checks that norm + unembedding of that state reproduces the model's target log-probs,
which proves the other layers are read the way the model reads its last one (an architecture whose logits are
made otherwise, with a soft-cap or a scale, is an error). Per layer ``l``, a row's probability is
``exp(-mean target-token NLL)`` under its lens, and ``curve[l]`` its mean over rows: at ``L`` exactly the ``qa``
suite's ``forget_prob`` (and per row its ``raw["forget_prob"]``).

Metrics: ``lens_last_prob`` (``curve[L]``), ``lens_max_prob`` (the curve's highest point over the layers read),
``lens_peak_layer`` (where: the earliest layer of the highest point, as a float), ``lens_max_gap`` (max minus
last: what the layers below know that the output does not say). ``raw``: ``lens_curve`` and ``lens_layers`` (the
curve over its layers), per row ``lens_last_prob`` and ``lens_max_prob`` (each row's probability at the last and
the peak layer: their means are the metrics). ``lens_recovery`` (the report's Robustness group; the base model's
``lens_last_prob`` as the knowledge before unlearning, ``jobs.evaluate.suites.Recovery``): ``(lens_max_prob -
lens_last_prob) / (base lens_last_prob - lens_last_prob)`` clipped to [0, 1], how much of what unlearning took
from the output a layer below still holds.

Where it differs from the sources: they read the top token (Łucki et al.: which of A/B/C/D is most likely at each
layer, an accuracy); here the probability of the TRUE answer, teacher-forced token by token, length-normalised as
TOFU's probability, so that a model's lens compares with its own ``forget_prob`` and across models. Only block
outputs are read (not the attention or MLP outputs the ethz-spylab code also decodes), and layers from 1 (the
embeddings read the input token, not anything computed) unless ``layers`` names 0. The pass holds every layer's
hidden states of a batch (``(L + 1) x batch x tokens x hidden`` values; lower ``eval.batch_size`` if that is too
much); the vocabulary projection is made one layer at a time at the answer positions only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.evaluate.suites import Recovery, SuiteContext, register_suite

# where each architecture keeps its final norm, as ``model.get_submodule`` paths
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")
# largest |difference| of target log-probs between the lens at the last layer and the model's own (nats): float32
# agrees to rounding; a half-precision matmul over differently shaped inputs may round a logit by ~2**-8 of it
CHECK_TOL = {"float32": 1e-3, "float64": 1e-6}
HALF_TOL = 0.25


class LensOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: str = Field("forget", description="the split whose rows the lens reads (forget, retain, holdout, ...)")
    layers: Optional[list[int]] = Field(
        None,
        description="the layers whose lens counts for lens_max_prob and lens_peak_layer (0: the embeddings, "
        "1..L: after each decoder layer); default 1..L. The last layer is always read (lens_last_prob)",
    )


Options = LensOptions


def _needs(opts: LensOptions) -> tuple[str, ...]:
    from jobs.data.sources import SOURCES

    return (opts.split,) if opts.split in SOURCES else (f"eval_sets.{opts.split}",)


def final_norm(model: Any) -> Any:
    """The module that norms the last hidden state before the unembedding (``FINAL_NORMS``); a ``ValueError``
    naming the places looked at when the architecture keeps it elsewhere."""
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(
        f"the lens suite cannot find the final norm of {type(model).__name__} (looked for {', '.join(FINAL_NORMS)}): "
        "the logit lens is not defined for this architecture here"
    )


def execution_device(module: Any) -> Any:
    """Where ``module`` runs: accelerate's execution device for a dispatched module, else its weights' device
    (None for a module without weights, such as a non-parametric layer norm: the input stays where it is)."""
    import torch

    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    weight = next(module.parameters(), None)
    return None if weight is None else weight.device


class Lens:
    """A model's final norm and unembedding, applied to one layer's hidden states [N, d] (on whatever device)."""

    def __init__(self, model: Any):
        self.norm = final_norm(model)
        self.unembed = model.get_output_embeddings()
        if self.unembed is None:
            raise ValueError(f"the lens suite needs the output embeddings of {type(model).__name__}; it has none")
        self.norm_device, self.unembed_device = execution_device(self.norm), execution_device(self.unembed)
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def __call__(self, hidden: Any, norm: bool = True) -> Any:
        h = hidden if self.norm_device is None else hidden.to(self.norm_device)
        return self.unembed((self.norm(h) if norm else h).to(self.unembed_device))

    def check(self, last_hidden: Any, logits: Any, targets: Any) -> None:
        """``ValueError`` unless the unembedding of the last hidden state (normed by the model already, or here
        when an architecture hands it back un-normed) gives the model's own target log-probs."""
        want = target_logp(logits, targets)
        diff = min(
            float((target_logp(lens, targets) - want.to(lens.device)).abs().max())
            for lens in (self(last_hidden, norm=False), self(last_hidden))
        )
        if diff > CHECK_TOL.get(self.dtype, HALF_TOL):
            raise ValueError(
                f"the logit lens of {type(self.norm).__name__} + output embeddings does not reproduce the logits of "
                f"the model at its last layer (target log-probs differ by up to {diff:.3g} nats): its logits are "
                "made otherwise (a soft-cap, a scale, a further projection), and the lens suite cannot read its layers"
            )


def target_logp(logits: Any, targets: Any) -> Any:
    """log-softmax in float32 of [N, V] logits at their N targets."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(logits.device)[:, None])[:, 0]


def layer_nll(
    model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int, layers: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Summed target-token NLL of each encoded row under each layer's lens ``[rows, len(layers)]`` (float64) and
    its target count ``[rows]``, in input order. Batches as ``scoring.encoded_logits`` makes them (longest first,
    right-padded); the last layer (``config.num_hidden_layers``) is the model's own logits."""
    import torch

    from jobs.evaluate.placement import spans_devices
    from jobs.evaluate.scoring import keeps_masked_logits, target_batches

    lens = Lens(model)
    last = model.config.num_hidden_layers
    nll = np.zeros((len(encoded), len(layers)), dtype=np.float64)
    n_tokens = np.zeros(len(encoded), dtype=np.int64)
    # as scoring.target_logits: only the kept positions go through the LM head where the model can do that
    masked = keeps_masked_logits(type(model)) and not spans_devices(model)
    checked = False
    with torch.inference_mode():
        for idx, batch, keep, targets, rows in target_batches(model, tokenizer, encoded, batch_size):
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                **({"logits_to_keep": keep} if masked else {}),
            )
            logits = out.logits if masked else out.logits[keep.to(out.logits.device)]
            hidden = out.hidden_states
            del out
            if len(hidden) != last + 1:
                raise ValueError(
                    f"{type(model).__name__} returned {len(hidden)} hidden states for {last} layers "
                    "(expected the embeddings and one per layer)"
                )
            if not checked and len(targets):
                lens.check(hidden[last][keep.to(hidden[last].device)], logits, targets)
                checked = True
            for j, layer in enumerate(layers):
                h = hidden[layer]
                logp = target_logp(logits if layer == last else lens(h[keep.to(h.device)]), targets)
                row_nll = torch.zeros(len(idx), dtype=torch.float64, device=logp.device)
                nll[idx, j] = row_nll.index_add_(0, rows.to(logp.device), -logp.double()).cpu().numpy()
            n_tokens[idx] = torch.bincount(rows, minlength=len(idx)).cpu().numpy()
            del hidden, logits
    return nll, n_tokens


def lens_layers(opts: LensOptions, last: int) -> list[int]:
    """The layers read: ``opts.layers`` (default 1..L) and always the last; ``ValueError`` for one out of 0..L."""
    chosen = list(range(1, last + 1)) if opts.layers is None else opts.layers
    bad = [layer for layer in chosen if not 0 <= layer <= last]
    if bad:
        raise ValueError(f"eval.lens.layers: {bad} not in 0..{last} (0: the embeddings, {last}: the last layer)")
    return sorted({*chosen, last})


def _nan_safe(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


@register_suite(
    "lens",
    needs=_needs,
    options=LensOptions,
    groups=(("Logit lens", r"^lens_"),),
    recoveries=(Recovery("lens_recovery", attacked="lens_max_prob", unlearned="lens_last_prob"),),
)
def lens_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: LensOptions) -> dict:
    """The logit lens of the ``split`` rows (see the module doc).

    Metrics: ``lens_last_prob``, ``lens_max_prob``, ``lens_peak_layer``, ``lens_max_gap``. ``raw``: ``lens_curve``
    over ``lens_layers``, per row ``lens_last_prob`` and ``lens_max_prob`` (at the peak layer).
    """
    from jobs.evaluate import metrics as M
    from jobs.evaluate.mia import encode_record

    records = data.get(opts.split) or []
    if not records:
        raise ValueError(f"the 'lens' suite needs a non-empty {opts.split!r} split; got {sorted(data)}")
    last = ctx.model.config.num_hidden_layers
    layers = lens_layers(opts, last)
    encoded = [encode_record(ctx.tokenizer, r, ctx.max_length, ctx.template) for r in records]
    nll, n = layer_nll(ctx.model, ctx.tokenizer, encoded, ctx.batch_size, layers)
    probs = M.answer_prob(nll, n[:, None])  # [rows, layers]
    curve = np.array([_nan_safe(probs[:, j]) for j in range(len(layers))])
    peak = int(np.nanargmax(curve)) if np.isfinite(curve).any() else len(layers) - 1
    metrics = {
        "lens_last_prob": float(curve[-1]),
        "lens_max_prob": float(curve[peak]),
        "lens_peak_layer": float(layers[peak]) if np.isfinite(curve).any() else float("nan"),
    }
    metrics["lens_max_gap"] = metrics["lens_max_prob"] - metrics["lens_last_prob"]
    raw = {
        "lens_curve": curve.tolist(),
        "lens_layers": layers,
        "lens_last_prob": probs[:, -1].tolist(),
        "lens_max_prob": probs[:, peak].tolist(),
    }
    return {"metrics": metrics, "raw": raw}
