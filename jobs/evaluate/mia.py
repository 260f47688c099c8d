"""Membership inference (the ``mia`` suite): loss, zlib, min-k% and min-k%++ attacks, their AUC, privleak.

Members are the ``forget`` split's examples, non-members the ``holdout`` split's. Every attack scores
the answer tokens (answer + EOS, as :func:`jobs.data.format.encode_qa` builds them) under the question
prompt, or every token of a raw-text row (:func:`jobs.data.format.encode_text`; MUSE's privleak), and every score
follows open-unlearning's convention (``src/evals/metrics/mia/``): HIGHER score
= LESS likely a member. The AUC labels forget 0 and holdout 1 (open-unlearning ``mia_auc``), so an AUC
near 1 means members are clearly distinguishable (lower loss), 0.5 means they are not.

Definitions (per example, over the answer's token log-probs ``lp_t = log p(x_t | x_<t)``):

- ``loss``  (Yeom et al. 2018): ``-mean_t lp_t``.
- ``zlib``  (Carlini et al. 2021; open-unlearning ``ZLIBAttack``): ``-mean_t lp_t / len(zlib(text))``,
  ``text`` the decoded answer tokens, length in bytes of ``zlib.compress(text.encode("utf-8"))``.
- ``min_k`` (Shi et al. 2024, Min-K% Prob): ``-mean`` of the ``max(1, int(k * n))`` smallest ``lp_t``.
- ``min_k_plus_plus`` (Zhang et al. 2024, Min-K%++): ``z_t = (lp_t - mu_t) / sigma_t`` with
  ``mu_t = E_{z~p(.|x_<t)}[log p(z|x_<t)]`` and ``sigma_t^2 = E[(log p(z|x_<t))^2] - mu_t^2`` over the
  vocabulary, then ``-mean`` of the ``max(1, int(k * n))`` smallest ``z_t``.
- ``gradnorm`` (gradient norm; Maini et al. 2024 / Das et al. 2024, open-unlearning ``GradNormAttack``): the
  gradient of the example's ``loss`` with respect to every parameter tensor, its p-norm per tensor
  (``p`` = ``gradnorm_p``, default 2), averaged over the tensors. Members, fitted, have smaller gradients.
- ``reference`` (reference-model / likelihood-ratio attack; Carlini et al. 2021, open-unlearning
  ``ReferenceAttack``): ``loss(model) - loss(reference)``, the log-likelihood ratio per token against a
  reference model that never saw the members. The reference is ``reference_model`` when given (scored in
  the same task), else the run's retain-only oracle (``eval.oracle``): then ``mia_reference_auc`` is computed
  once every model is scored, from the models' and the oracle's per-example ``loss`` scores.

``privleak`` (MUSE) compares an attack's AUC with the oracle's: the attack is ``privleak_attack``, by default
``min_k`` with k = 0.4 as MUSE and open-unlearning compute it.

"""

from __future__ import annotations

import zlib
from typing import Any, Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from jobs.data.format import DEFAULT_TEMPLATE, PromptLike
from jobs.evaluate.suites import Reference, SuiteContext, register_suite

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")  # from one teacher-forced pass
DEFAULT_K = 0.4  # open-unlearning's mia_min_k / mia_min_k_plus_plus default


# ----------------------------------------------------------------------------------------- pure parts


def zlib_length(text: str) -> int:
    """Bytes of ``zlib.compress(text.encode("utf-8"))`` (at least 1, so it can divide)."""
    return max(1, len(zlib.compress(text.encode("utf-8"))))


def loss_score(token_logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood of the tokens (nats); NaN for no tokens."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return float(-lp.mean()) if lp.size else float("nan")


def zlib_score(token_logprobs: Sequence[float], text: str) -> float:
    """``loss_score / zlib_length(text)`` (open-unlearning ``ZLIBAttack``: ``avg_loss / zlib_entropy``)."""
    return loss_score(token_logprobs) / zlib_length(text)


def _min_k_mean(values: np.ndarray, k: float) -> float:
    if values.size == 0:
        return float("nan")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    n = max(1, int(values.size * k))
    return float(-np.sort(values)[:n].mean())


def min_k_score(token_logprobs: Sequence[float], k: float = DEFAULT_K) -> float:
    """Min-K% Prob: minus the mean of the ``max(1, int(k * n))`` lowest token log-probs."""
    return _min_k_mean(np.asarray(token_logprobs, dtype=np.float64), k)


def min_k_plus_plus_score(token_logprobs, mu, sigma, k: float = DEFAULT_K) -> float:
    """Min-K%++: minus the mean of the lowest ``max(1, int(k * n))`` of ``(lp_t - mu_t) / sigma_t``.

    ``mu``/``sigma`` are the mean and standard deviation of ``log p`` over the vocabulary under the
    model's own next-token distribution (see :func:`vocab_logprob_moments`).
    """
    lp, m, s = (np.asarray(x, dtype=np.float64) for x in (token_logprobs, mu, sigma))
    return _min_k_mean((lp - m) / s, k)


def vocab_logprob_moments(log_probs):
    """``(mu, sigma)`` of ``log p`` under ``p`` along the last axis of a log-softmax tensor/array.

    ``mu = sum p log p``, ``sigma = sqrt(max(sum p (log p)^2 - mu^2, 1e-6))`` (the clamp as
    open-unlearning's ``MinKPlusPlusAttack``).
    """
    try:
        import torch

        if isinstance(log_probs, torch.Tensor):
            p = log_probs.exp()
            mu = (p * log_probs).sum(-1)
            var = (p * log_probs.square()).sum(-1) - mu.square()
            return mu, var.clamp(min=1e-6).sqrt()
    except ImportError:  # pragma: no cover
        pass
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    mu = (p * lp).sum(-1)
    var = (p * lp**2).sum(-1) - mu**2
    return mu, np.sqrt(np.maximum(var, 1e-6))


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling non-members (label 1) from members (label 0) by score (higher = non-member).

    ``sklearn.metrics.roc_auc_score([0]*m + [1]*h, members + nonmembers)`` as open-unlearning's
    ``mia_auc``; equivalently ``P(nonmember score > member score) + P(tie)/2`` (the Mann-Whitney U
    statistic over ``m*h``), the scipy fallback. 1.0: members perfectly separable (lower scores), 0.5:
    indistinguishable. Non-finite scores are dropped; NaN when either side is empty.
    """
    a = np.asarray(member_scores, dtype=np.float64)
    b = np.asarray(nonmember_scores, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # pragma: no cover - scikit-learn is a dependency here
        from scipy.stats import mannwhitneyu

        return float(mannwhitneyu(b, a, alternative="two-sided").statistic / (a.size * b.size))
    return float(roc_auc_score(np.r_[np.zeros(a.size), np.ones(b.size)], np.r_[a, b]))


def privleak(auc_model: float, auc_oracle: float) -> float:
    """MUSE's PrivLeak (%), relative to the retain-only oracle: ``(A_model - A_oracle) / A_oracle * 100``
    where MUSE's ``A = 1 - AUC`` of our convention (open-unlearning ``privleak``: ``score = 1 - score;
    ref = 1 - ref``), i.e. ``(auc_oracle - auc_model) / (1 - auc_oracle) * 100``.

    0 is ideal; an un-unlearned model (members separable, ``auc_model`` -> 1 vs an oracle near 0.5)
    gives about -100 (MUSE's target rows read -99.8); over-unlearning (``auc_model`` < ``auc_oracle``)
    gives positive values.
    """
    a_model, a_oracle = 1.0 - float(auc_model), 1.0 - float(auc_oracle)
    if a_oracle == 0:
        return float("nan")
    return (a_model - a_oracle) / a_oracle * 100.0


# ------------------------------------------------------------------------------------- model-facing


def answer_token_stats(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
    moments: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Per example (input order), teacher-forced over its answer tokens (``encode_qa``, cut to
    ``max_length``): ``labels`` (target ids), ``logp`` (their log-probs), ``pred`` (argmax ids) and,
    with ``moments=True``, ``mu``/``sigma`` of log p over the vocabulary (Min-K%++). Batched by length
    with ``collate`` as :func:`jobs.evaluate.scoring.score_answers`.
    """
    from jobs.data.format import encode_qa

    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions for {len(answers)} answers")
    encoded = [encode_qa(tokenizer, q, a, max_length, template) for q, a in zip(questions, answers)]
    return token_stats(model, tokenizer, encoded, batch_size, moments)


def encode_record(tokenizer: Any, record: dict, max_length: int, template: PromptLike) -> dict[str, list[int]]:
    """A record's tokens and targets: the answer of a question/answer row, every token of a raw-text row."""
    from jobs.data.format import encode_qa, encode_text
    from jobs.data.loading import is_text_record

    if is_text_record(record):
        return encode_text(tokenizer, record["text"], max_length)
    return encode_qa(tokenizer, record["question"], record["answer"], max_length, template)


def token_stats(
    model: Any, tokenizer: Any, encoded: Sequence[dict], batch_size: int = 32, moments: bool = False
) -> list[dict[str, np.ndarray]]:
    """:func:`answer_token_stats` of encoded rows (``input_ids``/``labels``): the stats of their targets."""
    import torch

    from jobs.evaluate.scoring import encoded_logits

    out: list[dict[str, np.ndarray]] = [{} for _ in encoded]
    with torch.inference_mode():
        for idx, logits, targets, rows in encoded_logits(model, tokenizer, encoded, batch_size):
            lsm = torch.log_softmax(logits.float(), dim=-1)  # [n answer tokens of the batch, V]
            logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()
            pred, labels = lsm.argmax(-1).cpu().numpy(), targets.cpu().numpy()
            if moments:
                mu, sigma = (t.double().cpu().numpy() for t in vocab_logprob_moments(lsm))
            ends = np.cumsum(torch.bincount(rows, minlength=len(idx)).cpu().numpy())
            for row, i in enumerate(idx):  # positions come row by row: row r holds ends[r-1]:ends[r]
                part = slice(ends[row - 1] if row else 0, ends[row])
                rec = {"labels": labels[part], "logp": logp[part], "pred": pred[part]}
                if moments:
                    rec["mu"], rec["sigma"] = mu[part], sigma[part]
                out[i] = rec
    return out


def mia_scores(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    k: float = DEFAULT_K,
    batch_size: int = 32,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> dict[str, list[float]]:
    """Every attack's per-example score (higher = less likely a member) for QA or raw-text records."""
    stats = token_stats(
        model, tokenizer, [encode_record(tokenizer, r, max_length, template) for r in records], batch_size, moments=True
    )
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    for s in stats:
        text = tokenizer.decode(s["labels"].tolist(), skip_special_tokens=True)
        out["loss"].append(loss_score(s["logp"]))
        out["zlib"].append(zlib_score(s["logp"], text))
        out["min_k"].append(min_k_score(s["logp"], k))
        out["min_k_plus_plus"].append(min_k_plus_plus_score(s["logp"], s["mu"], s["sigma"], k))
    return out


def gradnorm_scores(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    p: float = 2.0,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> list[float]:
    """Per example: the mean over parameter tensors of the p-norm of the gradient of its mean answer NLL
    (one backward pass per example; the model's gradients are left cleared)."""
    import torch

    from jobs.data.format import collate, sequence_nll
    from jobs.evaluate.placement import input_device

    device = input_device(model)
    params = [q for q in model.parameters() if q.requires_grad]
    if any(q.is_meta for q in params):  # an offloaded module's gradients never reach its meta parameters
        raise ValueError(
            "the gradnorm attack needs every weight on a device, but this model has modules "
            "offloaded to the CPU or disk; set eval.mia.gradnorm: false or give the task more GPUs"
        )
    out = []
    try:
        for r in records:
            batch = collate(
                [encode_record(tokenizer, r, max_length, template)],
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            )
            model.zero_grad(set_to_none=True)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            nll, n = sequence_nll(logits, batch["labels"].to(device))
            if int(n[0]) == 0:
                out.append(float("nan"))
                continue
            (nll[0] / n[0]).backward()
            # on the CPU: a model dispatched over several GPUs has its gradients on each
            norms = [q.grad.detach().float().norm(p).cpu() for q in params if q.grad is not None]
            out.append(float(torch.stack(norms).mean()))
    finally:
        model.zero_grad(set_to_none=True)
    return out


class MiaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: float = Field(DEFAULT_K, gt=0, le=1, description="min-k and min-k++: the fraction of lowest tokens averaged")
    gradnorm: bool = Field(True, description="the gradient-norm attack (a backward pass per example)")
    gradnorm_p: Literal[1, 2, "inf"] = Field(2, description="gradnorm: the norm of each parameter's gradient")
    reference_model: Optional[str] = Field(
        None,
        description="model folder of the reference attack (never trained on the members); default: the "
        "run's oracle (eval.oracle)",
    )
    privleak_attack: Literal["loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"] = Field(
        "min_k", description="the attack whose AUC privleak compares with the oracle's (MUSE: min_k, k = 0.4)"
    )


def privleak_vs_oracle(result: dict, oracle: dict) -> Optional[float]:
    """MUSE's privleak from the model's and the oracle's AUC of the ``privleak_attack`` (:func:`privleak`)."""
    attack = result.get("raw", {}).get("mia_privleak_attack", "min_k")
    mine, ref = result["metrics"].get(f"mia_{attack}_auc"), oracle["metrics"].get(f"mia_{attack}_auc")
    return None if mine is None or ref is None else privleak(mine, ref)


def reference_vs_oracle(result: dict, oracle: dict) -> Optional[float]:
    """The reference attack against the oracle (no ``reference_model`` given): AUC of ``loss(model) -
    loss(oracle)`` per example, members (forget) against non-members (holdout), from both runs' raw scores."""
    if "mia_reference_auc" in result["metrics"]:
        return None  # scored in the task against the given reference_model
    mine, ref = (r.get("raw", {}).get("mia_scores", {}).get("loss") for r in (result, oracle))
    if not mine or not ref or any(len(mine[s]) != len(ref[s]) for s in ("forget", "holdout")):
        return None
    diff = {s: np.asarray(mine[s]) - np.asarray(ref[s]) for s in ("forget", "holdout")}
    return mia_auc(diff["forget"], diff["holdout"])


@register_suite(
    "mia",
    needs=("forget", "holdout"),
    options=MiaOptions,
    path_options=("reference_model",),
    groups=(("Privacy", r"^(mia_.*|privleak)$"),),
    references=(Reference("privleak", privleak_vs_oracle), Reference("mia_reference_auc", reference_vs_oracle)),
)
def mia_suite(ctx: SuiteContext, data: dict[str, list[dict]], opts: MiaOptions) -> dict:
    """Membership inference of ``forget`` (members) against ``holdout`` (non-members).

    Metrics ``mia_{attack}_auc`` for attack in loss, zlib, min_k, min_k_plus_plus, gradnorm (``gradnorm``
    on) and reference (against ``reference_model``, or the oracle once every model is scored); see
    :func:`mia_auc`; against the oracle's AUC of ``privleak_attack``, :func:`privleak`. ``raw``:
    ``mia_scores = {attack: {"forget": [...], "holdout": [...]}}``.
    """
    missing = [s for s in ("forget", "holdout") if not data.get(s)]
    if missing:
        raise ValueError(f"the 'mia' suite needs non-empty 'forget' and 'holdout' splits; missing: {missing}")
    kw = dict(batch_size=ctx.batch_size, max_length=ctx.max_length, template=ctx.template)
    splits = ("forget", "holdout")
    scores = {s: mia_scores(ctx.model, ctx.tokenizer, data[s], k=opts.k, **kw) for s in splits}
    if opts.gradnorm:
        p = float("inf") if opts.gradnorm_p == "inf" else float(opts.gradnorm_p)
        for s in splits:
            scores[s]["gradnorm"] = gradnorm_scores(ctx.model, ctx.tokenizer, data[s], p, ctx.max_length, ctx.template)
    if opts.reference_model:
        from jobs.evaluate.placement import place_for_eval
        from jobs.models import load_tokenizer

        ref_tok = load_tokenizer(opts.reference_model)
        # placed like the scored model, in the GPU memory it left free
        ref, _ = place_for_eval(opts.reference_model, dtype=str(ctx.model.dtype).removeprefix("torch."))
        ref.eval()
        for s in splits:
            ref_loss = mia_scores(ref, ref_tok, data[s], k=opts.k, **kw)["loss"]
            scores[s]["reference"] = (np.asarray(scores[s]["loss"]) - np.asarray(ref_loss)).tolist()
        del ref
    attacks = list(scores["forget"])
    metrics = {f"mia_{a}_auc": mia_auc(scores["forget"][a], scores["holdout"][a]) for a in attacks}
    raw = {
        "mia_scores": {a: {s: scores[s][a] for s in splits} for a in attacks},
        "mia_privleak_attack": opts.privleak_attack,
    }
    return {"metrics": metrics, "raw": raw}
