"""How a question/answer record becomes tokens: one place, shared by training, unlearning and eval.

A record is a dict with the canonical fields ``question`` and ``answer`` (the loader renames a user's
columns to these). A :class:`PromptFormat` says how the prompt is built:

* a plain template (default ``"Question: {question}\nAnswer:"``): the prompt is
  ``template.format(question=...)`` encoded with the tokenizer's own special tokens (a BOS where the
  tokenizer adds one itself, as Llama's do; none where it does not, as SmolLM2's and Qwen's; never two);
  the answer follows after one space and ends with the tokenizer's EOS when ``answer_eos`` is on;
* ``template: chat``: the prompt is the tokenizer's chat template (``apply_chat_template``) over an
  optional system turn and the question as the user turn, with the generation prompt; the answer is the
  assistant turn's content and ends with the template's own end-of-turn (``<|im_end|>``, ``<|eot_id|>``,
  ``</s>``, ...) when ``answer_eos`` is on.

``answer_eos`` (default on, as in TOFU and open-unlearning) makes the end of the answer part of what is
trained and scored; turn it off for knowledge a model learned in pretraining (WMDP/RWKU-style facts),
where the end-of-answer token after a bare completion is improbable and would dominate the per-token mean.
Prompt and answer are tokenized separately and concatenated, so the answer's token boundary is the same
whatever the answer is (paraphrased, perturbed, generated). Labels are -100 on the prompt, so losses and
probabilities cover answer tokens only.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported where a tensor is made: config checks and `spunge validate` need none
    import torch

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
CHAT = "chat"
IGNORE_INDEX = -100
_SENTINEL = "\u2063SPUNGE-ANSWER\u2063"  # a string no chat template alters, to find the assistant turn


class FormatError(ValueError):
    """A prompt format the tokenizer cannot serve (e.g. ``chat`` without a chat template)."""


class PromptFormat(BaseModel):
    """How questions become prompts and how answers end (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(DEFAULT_TEMPLATE, description="a template with {question}, or 'chat'")
    system_prompt: Optional[str] = Field(None, description="chat: the system turn (default: the template's own)")
    answer_eos: bool = Field(True, description="answers end with EOS (plain) or the end-of-turn (chat)")

    @property
    def chat(self) -> bool:
        return self.template == CHAT


PromptLike = Union[str, PromptFormat]


def as_format(fmt: PromptLike) -> PromptFormat:
    """A ``PromptFormat`` from itself or from a plain template string."""
    return fmt if isinstance(fmt, PromptFormat) else PromptFormat(template=fmt)


def special_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` encoded with the tokenizer's own special tokens at the start (``add_special_tokens``),
    without a trailing EOS a tokenizer may append (a prompt or document continues) and without a
    doubled BOS when ``text`` already starts with the BOS string."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is not None and len(ids) > len(plain) and ids[-1] == eos and (not plain or plain[-1] != eos):
        ids = ids[:-1]
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def check_chat_template(tokenizer: Any) -> None:
    """``FormatError`` unless the tokenizer has a chat template (``data.template: chat`` needs one)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FormatError(
            f"tokenizer of {name} has no chat template: use a plain data.template "
            "(e.g. 'Question: {question}\\nAnswer:')"
        )


def _messages(fmt: PromptFormat, question: str) -> list[dict[str, str]]:
    sys = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt is not None else []
    return sys + [{"role": "user", "content": question}]


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_TURNS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def chat_turn(tokenizer: Any, fmt: PromptFormat) -> tuple[str, str]:
    """What the chat template puts around the assistant's content after the generation prompt:
    ``(lead, end)``, e.g. ``("", "<|im_end|>")`` for ChatML or ``(" ", " </s>")`` for Llama-2. ``end`` is
    the template's end-of-turn with trailing whitespace dropped (the next turn's separator)."""
    cache = _TURNS.setdefault(tokenizer, {})
    if fmt.system_prompt not in cache:
        msgs = _messages(fmt, "Q")
        prompt = _render(tokenizer, msgs, True)
        full = _render(tokenizer, msgs + [{"role": "assistant", "content": _SENTINEL}], False)
        cut = full.index(_SENTINEL)
        start = len(prompt) if full.startswith(prompt) and len(prompt) <= cut else cut
        cache[fmt.system_prompt] = (full[start:cut], full[cut + len(_SENTINEL) :].rstrip())
    return cache[fmt.system_prompt]


def prompt_text(tokenizer: Any, question: str, fmt: PromptLike = DEFAULT_TEMPLATE) -> str:
    """The prompt as a string: the template filled in, or the rendered chat with the generation prompt."""
    fmt = as_format(fmt)
    if fmt.chat:
        return _render(tokenizer, _messages(fmt, question), True)
    return fmt.template.format(question=question)


def prompt_ids(tokenizer: Any, question: str, fmt: PromptLike = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of the prompt. A chat prompt holds the template's own special tokens as text, so it is
    encoded without adding any (as ``apply_chat_template`` does); a plain one with the tokenizer's own."""
    fmt = as_format(fmt)
    text = prompt_text(tokenizer, question, fmt)
    if fmt.chat:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return special_ids(tokenizer, text)


def answer_ids(tokenizer: Any, answer: str, fmt: PromptLike = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of an answer as it follows its prompt: ``" " + answer`` (plain) or the assistant content
    (chat), then EOS or the end-of-turn when ``fmt.answer_eos``."""
    fmt = as_format(fmt)
    if fmt.chat:
        lead, end = chat_turn(tokenizer, fmt)
        ids = tokenizer(lead + answer.strip(), add_special_tokens=False)["input_ids"]
        if fmt.answer_eos and end:
            ids = ids + tokenizer(end, add_special_tokens=False)["input_ids"]
        return ids
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if fmt.answer_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def stop_token_ids(tokenizer: Any, fmt: PromptLike = DEFAULT_TEMPLATE) -> list[int]:
    """Tokens that end a generated answer: EOS, and with a chat format the end-of-turn's special tokens."""
    fmt = as_format(fmt)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt.chat:
        end = chat_turn(tokenizer, fmt)[1]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids += [t for t in tokenizer(end, add_special_tokens=False)["input_ids"] if t in special]
    return list(dict.fromkeys(ids))


def encode_qa(
    tokenizer: Any,
    question: str,
    answer: str,
    max_length: int = 128,
    template: PromptLike = DEFAULT_TEMPLATE,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (prompt masked) for one question/answer pair, cut to max_length.
    ``template`` is a plain template string or a :class:`PromptFormat`."""
    p = prompt_ids(tokenizer, question, template)
    a = answer_ids(tokenizer, answer, template)
    ids = (p + a)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + a)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer: Any, text: str, max_length: int = 128) -> dict[str, list[int]]:
    """Plain text (general corpus): the tokenizer's own special tokens, the text and EOS (a document ends
    there, as in a pretraining corpus), cut to ``max_length``; every token is a target."""
    ids = special_ids(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL over target tokens and the count of target tokens.

    ``logits`` [B, T, V] predict the next token; ``labels`` [B, T] with -100 where no target.
    """
    import torch

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.clamp(min=0)
    logp = torch.log_softmax(shift_logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = -(logp * mask).sum(dim=1)
    return nll, mask.sum(dim=1)
