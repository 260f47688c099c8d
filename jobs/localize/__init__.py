"""Localized (masked) unlearning: parameter-attribution masks computed on the forget data before
training, and an update rule under which only the masked entries of the model ever change.

Config (``unlearn.localize``)::

    localize: {attribution: gradient|activation|wagle|random, fraction: 0.05, scope: mlp|attention|all, seed: 0}

The three pieces, in the order a training loop uses them (see ``MaskedUpdate`` for the exact calls):

1. ``compute_mask(model, forget_batches, retain_batches, spec)`` scores every entry of every in-scope
   weight matrix with the named attribution and keeps the top ``fraction`` of them *globally* (one
   threshold across all in-scope matrices). Parameters outside the scope get no entry: fully frozen.
2. ``MaskedUpdate(model, mask)`` freezes what has no mask (``requires_grad_(False)``), zeroes the
   gradient of masked-out entries of partially masked parameters (tensor hooks) and snapshots them.
3. ``masked.restore(engine)`` after every optimizer step copies the snapshot back into the masked-out
   entries, undoing what weight decay (and anything else the optimizer does) did to them.

Scope rules (``scoped_parameters``): only trainable (``requires_grad``) floating-point parameters with
``ndim >= 2`` (weight matrices; biases and norm weights are never localized), and never an embedding or
the LM head (parameters of ``nn.Embedding`` modules, of ``model.get_output_embeddings()``, or named
``lm_head``/``embed_*``). Within that:

- ``mlp``: the name contains ``.mlp.`` (Llama/Mistral/Qwen ``gate_proj``/``up_proj``/``down_proj``).
- ``attention``: the name contains one of ``.self_attn.``, ``.attn.``, ``.attention.``, ``.self_attention.``
  (Llama ``q_proj``/``k_proj``/``v_proj``/``o_proj``; GPT-2/NeoX/Falcon spellings).
- ``all``: every such matrix (MLP, attention, and any other 2-D weight).

A parameter frozen before ``compute_mask`` (e.g. by a method's ``setup``) is out of scope.

Attribution formulas (all scores are float32, >= 0, same shape as the parameter):

- ``gradient``: ``|g_f|`` with ``g_f = d/dθ (1/B) Σ_b NLL_f(b)``, the gradient of the forget NLL
  (token mean per batch, mean over the B batches). The high-gradient-weights localization of Stoehr
  et al. 2024, "Localizing Paragraph Memorization in Language Models" (arXiv 2403.19851: memorized
  paragraphs are unlearned by fine-tuning only the high-gradient weights), the gradient saliency of
  SalUn (Fan et al., ICLR 2024, arXiv 2310.12508) and the ``gradient`` baseline of WAGLE's code.
- ``activation``: Wanda (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695), ``|W_ij| * ||X_j||`` on the
  forget data, ``X_j`` the j-th input feature of the Linear layer over every non-padding token.
  We use the root mean square ``sqrt(mean_t x_tj^2)`` (``||X_j||_2 / sqrt(T)``); every layer sees the
  same T tokens, so the global ranking is exactly Wanda's. Differences from Wanda: Wanda compares
  scores per output row to *prune*; here one global top-``fraction`` selects what to *train*.
- ``wagle``: WAGLE (Jia et al., NeurIPS 2024, arXiv 2410.17509), ``|(θ - g_r / γ) ⊙ g_f|`` with
  ``g_f``/``g_r`` the gradients of the mean forget/retain NLL over the batches and ``γ``
  (``spec.wagle_gamma``) the paper's scalar approximation of the retain loss's diagonal Hessian. This is
  the closed-form score of the paper's bi-level (implicit-gradient) analysis, as in the reference code's
  ``snip_advanced`` mask (``-|(θ - g_r/mu) * g_f|`` ranked, top entries kept; mirrored in the public repo
  Zodiark-ch/CSAT, ``src/unlearn/generate_mask.py``). Simplifications: the forget loss is the forget
  NLL, not the unlearning method's own objective (for GA/GradDiff that is the same gradient up to sign,
  which the absolute value removes; for NPO at θ = θ_ref it is a reweighted version of it); gradients
  are of the *mean* loss over batches (the reference code sums per-batch gradients, so its μ scales with
  the data size); the default ``γ = 1e-3`` is the reference code's default ``mu`` (its TOFU configs use
  1e-6, which makes the score ≈ |g_r ⊙ g_f| / γ); no layer-wise or smoothed variants.
- ``random``: i.i.d. uniform [0, 1) scores from ``torch.Generator().manual_seed(seed)`` in parameter
  order (the random-localization control of Stoehr et al. 2024 and of WAGLE).

Data parallelism: every rank must end with the same mask. Pass every rank the same (unsharded) forget
and retain batches; ``compute_mask`` also broadcasts rank 0's mask when torch.distributed is initialized.

DeepSpeed ZeRO: stages 0, 1 and 2 keep full parameters on every rank; hooks act on the full gradient
before DeepSpeed reduces it, and ``restore`` writes the full parameter in place (a view into ZeRO-1/2's
flat buffers). ZeRO-3 is supported too: ``compute_mask`` and ``MaskedUpdate`` run before
``deepspeed.initialize`` (full parameters), the hooks see the full gradient (a tensor hook runs before
ZeRO-3's reduce-scatter hook on the gradient accumulator), and ``restore`` gathers each partially masked
parameter with ``deepspeed.zero.GatheredParameters(p, modifier_rank=0)``, fixes it on rank 0 (which alone
keeps the originals, on CPU) and lets DeepSpeed broadcast and re-partition it. That costs one all-gather
plus one broadcast of the partially masked parameters per optimizer step; call ``restore`` only after
steps that really updated (gradient accumulation boundaries). In ZeRO 1-3 (and bf16/fp16 at any stage)
the optimizer keeps fp32 master copies: weight decay still shrinks the masters of masked-out entries,
and every ``restore`` overwrites what that writes back, so the model (forward passes, the saved
checkpoint) never sees it; DeepSpeed optimizer-state checkpoints do hold the drifted masters.
"""

from jobs.localize.attribution import (
    ATTRIBUTIONS,
    LocalizeSpec,
    attribution_names,
    get_attribution,
    register_attribution,
    scoped_parameters,
)
from jobs.localize.mask import MaskedUpdate, compute_mask, mask_stats, top_fraction_mask

__all__ = [
    "ATTRIBUTIONS",
    "LocalizeSpec",
    "MaskedUpdate",
    "attribution_names",
    "compute_mask",
    "get_attribution",
    "mask_stats",
    "register_attribution",
    "scoped_parameters",
    "top_fraction_mask",
]
