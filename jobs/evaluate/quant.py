"""Quantization attack (the ``quant`` suite): how much of the forgotten knowledge comes back once the model's
weights are quantized to 8 or 4 bits.

Unlearning with a utility constraint moves the weights by little; rounding them to a 4-bit grid can put most of
them back in the bucket of the original model, which then answers the forget questions again (Zhang et al. 2025,
"Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025, arXiv:2410.16454; code
github.com/zzwjames/FailureLLMUnlearning, whose ``utils.load_model`` reloads the unlearned model with
transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` or ``(load_in_8bit=True)`` and reruns the same MUSE
metrics). The suite scores each model as loaded and then quantized, with bitsandbytes as those configs do:

- every ``torch.nn.Linear`` (and transformers' ``Conv1D``) is quantized except the output head
  (``model.get_output_embeddings()``), a layer whose weight is tied to another module's and the model's
  ``_keep_in_fp32_modules``: what transformers' ``get_keys_to_not_convert`` leaves in full precision, so tied
  embeddings stay tied and the head keeps the model's dtype;
- 8 bits: ``bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, LLM.int8 as ``load_in_8bit``'s
  defaults: int8 weights with one absmax scale per output row (taken from the weight cast to float16), activations
  cast to float16 and quantized to int8 per row, except the input columns holding a value of magnitude 6.0 or more,
  multiplied unquantized with the dequantized weights;
- 4 bits: ``bnb.nn.Linear4bit`` with ``quant_type`` (NF4 by default; ``load_in_4bit``'s own default data type is
  FP4, ``quant_type: fp4``), blocks of 64 weights with a float32 absmax each and no double quantization
  (``bnb_4bit_use_double_quant=False``), the weights dequantized to the model's dtype for each product
  (``compute_dtype``; on the CPU too: bitsandbytes' AVX512-BF16 kernel, which would multiply in bfloat16, is
  turned off).

Metrics, each as the ``qa`` suite's ``forget_prob`` / ``forget_rouge`` / ``retain_prob`` (mean over rows of
``exp(-mean answer-token NLL)``; mean ROUGE-L recall of greedy answers): ``quant_fp_*`` on the model as loaded (so
the suite stands alone), then ``quant{b}_*`` for each ``b`` of ``bits`` (``*_retain_prob`` where a non-empty QA
``retain`` split is given). A forget probability that climbs back towards the original model's after
quantization is knowledge the unlearning only hid.

Where it differs from the paper: the loaded weights are quantized in memory (``quantized``) instead of reloading
the checkpoint with a quantization config, and put back afterwards. transformers' reload builds the same
``Params4bit`` / ``Int8Params`` from each weight cast to the load dtype and moves it to its device, which calls the
same ``_quantize``: for a model evaluated in fp32 or bf16 the quantized weights and scales are bit for bit those of a
reload in that dtype, and so are the logits (tests/test_quant_suite.py checks it against ``BitsAndBytesConfig``).
Not the same as the paper's runs: its 4-bit reload takes ``load_in_4bit``'s defaults, FP4 with products in float32
on a bf16 model, where the suite defaults to NF4 with products in the model's dtype (``quant_type: fp4`` on an fp32
model is that config exactly); its 8-bit reload passes no dtype (the transformers of its time loaded the layers left
unquantized in float16), where here they keep the eval dtype. The paper reports MUSE's KnowMem / VerbMem (ROUGE of
generations); here the QA rows' answer probability and ROUGE-L recall.

Memory: the original layers are kept while their quantized copies exist, so each pass holds about 1 byte (8 bits)
or 0.56 byte (4 bits: half a byte and a float32 absmax per 64 weights) a quantized parameter on top of the model,
plus a float16 copy of one layer while it is quantized to 8 bits. Offloaded models (weights on the meta device) are
refused.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.evaluate.suites import Recovery, SuiteContext, is_qa_split, register_suite

INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold
BLOCKSIZE = 64  # bnb's and BitsAndBytesConfig's 4-bit block size


class QuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: list[Literal[4, 8]] = Field(
        default_factory=lambda: [8, 4],
        min_length=1,
        description="weight precisions the model is re-scored at, in order (8: LLM.int8, 4: quant_type)",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="the 4-bit data type (NF4, or FP4 as BitsAndBytesConfig(load_in_4bit=True)'s default)"
    )
    stop: list[str] = Field(
        default_factory=list,
        description="strings that end a greedy answer (EOS and a chat end-of-turn always do), as eval.qa.stop",
    )

    @field_validator("bits")
    @classmethod
    def _unique(cls, bits: list[int]) -> list[int]:
        return list(dict.fromkeys(bits))


Options = QuantOptions


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def quantizable(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of every layer ``quantized`` replaces: each ``torch.nn.Linear`` (exactly that class, as
    transformers: a subclass may read its weight elsewhere) or ``Conv1D``, except the output head, a layer whose
    weight is tied to another module and the model's ``_keep_in_fp32_modules``."""
    import torch

    conv1d = _conv1d()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    out = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear and not isinstance(module, conv1d):
            continue
        if module is head or uses.get(id(module.weight), 0) > 1:
            continue
        if any(f".{k}." in f".{name}." for k in keep):  # the module or one it sits in
            continue
        out.append((name, module))
    return out


QUANTIZES = "the quant suite quantizes the model's weights in memory"  # what an offloaded model refuses


def _move_inputs_to(device: Any):
    """A forward pre-hook that moves a module's tensor inputs to ``device``: what the accelerate hook of the layer it
    replaces did (a layer with its own place in a device map)."""
    import torch

    def hook(module: Any, args: tuple) -> tuple:
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    return hook


def quantized_layer(module: Any, bits: int, quant_type: str = "nf4") -> Any:
    """A bitsandbytes layer computing ``module``'s product from its weight quantized to ``bits`` (on the weight's
    device; ``module`` itself is left as it was): ``Linear8bitLt`` (LLM.int8, threshold 6.0) or ``Linear4bit``
    (``quant_type``, blocks of 64, float32 absmax, products in the weight's dtype)."""
    import bitsandbytes as bnb
    import torch

    weight = module.weight.data
    if isinstance(module, _conv1d()):
        weight = weight.t()  # Conv1D computes x @ W: a Linear's weight is its transpose
    out_features, in_features = weight.shape
    device, has_bias = weight.device, module.bias is not None
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, has_bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)
    elif bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            has_bias,
            compute_dtype=weight.dtype,
            compress_statistics=False,
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=False,
            quant_type=quant_type,
            module=layer,
        )._quantize(device)
        # the AVX512-BF16 CPU kernel multiplies in bfloat16 whatever compute_dtype says; GPUs honour it
        layer.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"bits must be 8 or 4, not {bits!r}")
    if has_bias:
        # its own Parameter over the same storage: bnb may re-point a bias's data to another dtype in forward
        layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
    layer.train(module.training)
    if hasattr(module, "_hf_hook"):
        layer.register_forward_pre_hook(_move_inputs_to(device))
    return layer


class _DropFloat16CastNotice(logging.Filter):
    """LLM.int8 casts every non-float16 input to float16 and bitsandbytes logs it at each product."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


@contextlib.contextmanager
def quantized(model: Any, bits: int, quant_type: str = "nf4") -> Iterator[Any]:
    """``model`` with every ``quantizable`` layer swapped for its ``quantized_layer`` (8 or 4 bits); on exit the
    original modules are put back, the model exactly as it was (same module objects, same tensors). ``ValueError``
    for an offloaded model (weights on the meta device) or one without a layer to quantize."""
    from jobs.evaluate.placement import refuse_offloaded

    refuse_offloaded(model, QUANTIZES)
    targets = quantizable(model)
    if not targets:
        raise ValueError("the quant suite found no torch.nn.Linear or Conv1D layer to quantize besides the output head")
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    notice = _DropFloat16CastNotice()
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            parent._modules[attr] = quantized_layer(module, bits, quant_type)
            swapped.append((parent, attr, module))
        bnb_logger.addFilter(notice)
        yield model
    finally:
        bnb_logger.removeFilter(notice)
        for parent, attr, module in reversed(swapped):
            parent._modules[attr] = module
        del swapped
        _release_memory()


def _release_memory() -> None:
    """Collect the quantized layers and hand their GPU memory back (the next pass or suite may need it)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scheme(model: Any, bits: Sequence[int], quant_type: str = "nf4") -> str:
    """One line naming the quantization applied for ``bits``, for the report."""
    import bitsandbytes as bnb

    layers = quantizable(model)
    dtype = str(layers[0][1].weight.dtype if layers else next(model.parameters()).dtype).removeprefix("torch.")
    parts = []
    for b in bits:
        if b == 8:
            parts.append(
                f"8-bit LLM.int8 (int8 weights and activations, row-wise absmax, outlier threshold {INT8_THRESHOLD})"
            )
        else:
            parts.append(f"4-bit {quant_type.upper()} (blocksize {BLOCKSIZE}, compute {dtype})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    kept = f"{head_name} kept in {str(head.weight.dtype).removeprefix('torch.')}" if head_name else "no output head"
    return f"bitsandbytes {bnb.__version__}: {', '.join(parts)}; {kept}"


def _answer_probs(ctx: SuiteContext, records: Sequence[dict]) -> np.ndarray:
    from jobs.evaluate import metrics as M
    from jobs.evaluate.scoring import score_answers

    qs, refs = [r["question"] for r in records], [r["answer"] for r in records]
    nll, n = score_answers(ctx.model, ctx.tokenizer, qs, refs, ctx.batch_size, ctx.max_length, ctx.template)
    return M.answer_prob(nll, n)


def _rouge(ctx: SuiteContext, records: Sequence[dict], stop: list[str]) -> float:
    from jobs.evaluate import metrics as M
    from jobs.evaluate.scoring import generate_answers

    qs, refs = [r["question"] for r in records], [r["answer"] for r in records]
    gen, _ = generate_answers(ctx.model, ctx.tokenizer, qs, ctx.max_new_tokens, ctx.batch_size, ctx.template, stop)
    return float(np.mean(M.rouge_l_recall(gen, refs)))


@register_suite(
    "quant",
    needs=("forget",),
    options=QuantOptions,
    groups=(("Quantization", r"^quant"),),
    recoveries=tuple(
        Recovery(f"quant{b}_recovery", attacked=f"quant{b}_forget_prob", unlearned="quant_fp_forget_prob")
        for b in (8, 4)
    ),
)
def quant_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: QuantOptions) -> dict:
    """The quantization attack (see the module doc).

    Metrics: ``quant_fp_forget_prob``, ``quant_fp_forget_rouge``, ``quant_fp_retain_prob`` on the model as loaded,
    and ``quant{b}_forget_prob``, ``quant{b}_forget_rouge``, ``quant{b}_retain_prob`` for each ``b`` of ``bits``
    (retain ones with a non-empty QA ``retain`` split). ``raw``: per forget row ``quant_fp_forget_prob`` and
    ``quant{b}_forget_prob``. ``info["quant_scheme"]``: the quantization in one line.
    """
    forget = data.get("forget") or []
    if not forget or not is_qa_split(forget):
        raise ValueError(
            "the 'quant' suite needs a non-empty 'forget' split of question/answer rows; "
            f"got {len(forget)} forget rows{'' if not forget else ' that are not all QA'}"
        )
    splits = {"forget": forget}
    retain = data.get("retain") or []
    if retain and is_qa_split(retain):
        splits["retain"] = retain
    metrics: dict[str, float] = {}
    raw: dict[str, list[float]] = {}

    def score(prefix: str) -> None:
        for split, records in splits.items():
            probs = _answer_probs(ctx, records)
            metrics[f"{prefix}_{split}_prob"] = float(np.nanmean(probs))
            if split == "forget":
                raw[f"{prefix}_forget_prob"] = probs.tolist()
                metrics[f"{prefix}_forget_rouge"] = _rouge(ctx, records, opts.stop)

    from jobs.evaluate.placement import refuse_offloaded

    refuse_offloaded(ctx.model, QUANTIZES)  # before the unquantized pass, not after it
    score("quant_fp")
    for b in opts.bits:
        with quantized(ctx.model, b, opts.quant_type):
            score(f"quant{b}")
    info = {"quant_scheme": scheme(ctx.model, opts.bits, opts.quant_type)}
    return {"metrics": metrics, "raw": raw, "info": info}
