"""Merging with mergekit: the merged tensors equal hand-computed task arithmetic and TIES."""

import pytest
import torch
from safetensors.torch import load_file

from jobs.merge import merge_method_names, merge_models
from jobs.models import load_model, load_tokenizer, save_model
from jobs.spec import MergeSpec


@pytest.fixture(scope="module")
def three_models(tiny_dir, tmp_path_factory):
    """base, and two fine-tuned copies whose deltas we choose: a = base + d1, b = base + d2."""
    d = tmp_path_factory.mktemp("merge")
    tok = load_tokenizer(tiny_dir / "model")
    base = load_model(tiny_dir / "model")
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for name in ("a", "b"):
        m = load_model(tiny_dir / "model")
        sd = m.state_dict()
        deltas[name] = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in sd.items()}
        save_model(m, tok, d / name, state_dict={k: v + deltas[name][k] for k, v in sd.items()})
    return tiny_dir / "model", d, base.state_dict(), deltas


def merged_state(spec) -> dict:
    merge_models(spec)
    return load_file(f"{spec.output_dir}/model.safetensors")


def test_every_mergekit_method_name_is_known():
    assert {"ties", "task_arithmetic", "linear", "dare_ties"} <= set(merge_method_names())


def test_task_arithmetic_adds_both_deltas(three_models, tmp_path):
    base_dir, d, base, deltas = three_models
    out = merged_state(
        MergeSpec(
            base_model_path=str(base_dir),
            model_paths={"a": str(d / "a"), "b": str(d / "b")},
            method="task_arithmetic",
            output_dir=str(tmp_path / "m"),
        )
    )
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[k], base[k] + deltas["a"][k] + deltas["b"][k], atol=1e-6, rtol=1e-5)


def test_ties_at_full_density_keeps_sign_agreeing_deltas_and_averages_them(three_models, tmp_path):
    base_dir, d, base, deltas = three_models
    out = merged_state(
        MergeSpec(
            base_model_path=str(base_dir),
            model_paths={"a": str(d / "a"), "b": str(d / "b")},
            method="ties",
            parameters={"density": 1.0},
            output_dir=str(tmp_path / "m"),
        )
    )
    k = "model.layers.1.self_attn.q_proj.weight"
    d1, d2 = deltas["a"][k], deltas["b"][k]
    sign = torch.sign(d1 + d2)
    keep1, keep2 = (torch.sign(d1) == sign).float(), (torch.sign(d2) == sign).float()
    want = base[k] + (d1 * keep1 + d2 * keep2) / (keep1 + keep2).clamp(min=1)
    torch.testing.assert_close(out[k], want, atol=1e-6, rtol=1e-5)
    assert (tmp_path / "m" / "tokenizer.json").exists() and (tmp_path / "m" / "spunge_merge.json").exists()


# --- streaming merge (jobs.merge_stream) against mergekit's run_merge -------------------------------------


def _stream_and_mergekit(spec, tmp_path):
    """(streamed tensors, run_merge tensors) of one spec, each written to its own folder."""
    from jobs.merge import run_mergekit
    from jobs.merge_stream import stream_merge, stream_reason

    assert stream_reason(spec) is None
    streamed = spec.model_copy(update={"output_dir": str(tmp_path / "stream")})
    reference = spec.model_copy(update={"output_dir": str(tmp_path / "mergekit")})
    stream_merge(streamed)
    run_mergekit(reference)
    return (
        load_file(f"{streamed.output_dir}/model.safetensors"),
        load_file(f"{reference.output_dir}/model.safetensors"),
    )


@pytest.mark.parametrize(
    "method, parameters, model_parameters",
    [
        ("task_arithmetic", {"weight": 1.0}, {"a": {"weight": 0.7}}),
        ("task_arithmetic", {"weight": 0.5, "normalize": True, "lambda": 0.8}, {}),
        ("linear", {"weight": 1.0}, {"b": {"weight": 3.0}}),
        ("ties", {"density": 0.5, "weight": 1.0, "normalize": True}, {}),
        ("ties", {"density": 0.3, "weight": 1.0, "normalize": False, "lambda": 1.5}, {"a": {"weight": 0.6}}),
        ("ties", {"density": 0.7, "rescale": True, "int8_mask": True}, {"b": {"density": 0.4}}),
        ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05, "weight": 1.0}, {}),
        ("breadcrumbs", {"density": 0.6, "gamma": 0.05, "weight": 1.0}, {}),
    ],
)
def test_streaming_merge_gives_mergekits_tensors(three_models, tmp_path, method, parameters, model_parameters):
    base_dir, d, _, _ = three_models
    spec = MergeSpec(
        base_model_path=str(base_dir),
        model_paths={"a": str(d / "a"), "b": str(d / "b")},
        method=method,
        parameters=parameters,
        model_parameters=model_parameters,
        output_dir=str(tmp_path / "m"),
    )
    streamed, reference = _stream_and_mergekit(spec, tmp_path)
    assert set(streamed) == set(reference)
    for name in reference:
        torch.testing.assert_close(streamed[name], reference[name], atol=1e-7, rtol=0, msg=name)


def test_a_checkpoint_reads_each_tensor_from_its_header_offsets_into_a_reused_buffer(tmp_path):
    from safetensors.torch import save_file

    from jobs.merge_stream import Checkpoint, Reader

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "f": torch.randn(7, generator=g).half(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6).reshape(2, 3),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ckpt = Checkpoint(str(tmp_path))
    assert ckpt.dtypes == {"w": "F32", "h": "BF16", "f": "F16", "scalar": "F32", "empty": "F32", "ids": "I64"}
    assert ckpt.shapes == {k: tuple(v.shape) for k, v in tensors.items()}
    for name, t in tensors.items():
        assert torch.equal(ckpt.read_into(name, torch.empty_like(t)), t), name
    read = Reader((4, 2), torch.float32)
    first = read(ckpt, "h")
    assert first.dtype == torch.float32 and torch.equal(first, tensors["h"].float())
    assert read(ckpt, "h").data_ptr() == first.data_ptr()  # the same buffer, read again
    with pytest.raises(ValueError, match="w: read 4 of 60 bytes into 4"):
        ckpt.read_into("w", torch.empty(1))


def test_checkpoints_holding_a_dtype_the_stream_does_not_read_fall_back_to_mergekit(tmp_path):
    from safetensors.torch import save_file

    from jobs.merge_stream import stream_reason

    save_file({"w": torch.zeros(3, 2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    spec = MergeSpec(
        base_model_path=str(tmp_path),
        model_paths={"a": str(tmp_path)},
        method="ties",
        parameters={"density": 0.5},
        output_dir=str(tmp_path / "m"),
    )
    assert stream_reason(spec) == f"{tmp_path} holds tensors of dtype F8_E4M3"


def test_merge_models_streams_the_covered_methods_and_falls_back_for_random_ones(three_models, tmp_path):
    import json

    base_dir, d, _, _ = three_models
    paths = {"a": str(d / "a"), "b": str(d / "b")}
    calls = []
    merge_models(
        MergeSpec(base_model_path=str(base_dir), model_paths=paths, method="ties", output_dir=str(tmp_path / "s")),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert json.loads((tmp_path / "s" / "spunge_merge.json").read_text())["engine"].startswith("spunge streaming")
    n = len(load_file(str(tmp_path / "s" / "model.safetensors")))  # each tensor merged is reported, in order
    assert calls == [(i, n) for i in range(1, n + 1)] and n > 10
    merge_models(
        MergeSpec(base_model_path=str(base_dir), model_paths=paths, method="dare_ties", output_dir=str(tmp_path / "r"))
    )
    marker = json.loads((tmp_path / "r" / "spunge_merge.json").read_text())
    assert marker["engine"].startswith("mergekit run_merge") and "mergekit_config" in marker
    assert (tmp_path / "s" / "tokenizer.json").exists() and (tmp_path / "s" / "config.json").exists()


@pytest.fixture(scope="module")
def tied_models(tiny_dir, tmp_path_factory):
    """A tiny tied-embedding base and two perturbed copies (saved without lm_head, as transformers does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tied")
    tok = load_tokenizer(tiny_dir / "model")
    torch.manual_seed(3)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    save_model(model, tok, d / "base")
    g = torch.Generator().manual_seed(4)
    for name in ("a", "b"):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        save_model(model, tok, d / name, state_dict=sd)
    return d


def test_streaming_merge_keeps_tied_embeddings_tied(tied_models, tmp_path):
    d = tied_models
    spec = MergeSpec(
        base_model_path=str(d / "base"),
        model_paths={"a": str(d / "a"), "b": str(d / "b")},
        method="ties",
        output_dir=str(tmp_path / "m"),
    )
    streamed, reference = _stream_and_mergekit(spec, tmp_path)
    assert "lm_head.weight" not in streamed and set(streamed) == set(load_file(d / "base" / "model.safetensors"))
    for name in reference:
        torch.testing.assert_close(streamed[name], reference[name], atol=1e-7, rtol=0, msg=name)
    merged = load_model(tmp_path / "stream")
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


class _LiveReads:
    """Counts the elements of tensors read from checkpoints that are still alive, and the most at once."""

    def __init__(self):
        self.live, self.peak = 0, 0

    def track(self, tensor):
        import weakref

        n = tensor.numel()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, n)
        return tensor

    def _release(self, n):
        self.live -= n


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_streaming_merge_holds_a_bounded_number_of_input_tensors(three_models, tmp_path, monkeypatch, method):
    from jobs import merge_stream
    from jobs.merge_stream import Checkpoint, stream_merge

    base_dir, d, base, _ = three_models
    reads = _LiveReads()
    tensor, rows = Checkpoint.tensor, Checkpoint.rows
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.track(tensor(self, name)))
    monkeypatch.setattr(Checkpoint, "rows", lambda self, name, a, b: reads.track(rows(self, name, a, b)))
    monkeypatch.setattr(merge_stream, "CHUNK_ELEMENTS", 256)
    paths = {name: str(d / name) for name in ("a", "b")}
    stream_merge(
        MergeSpec(
            base_model_path=str(base_dir),
            model_paths={**paths, "c": paths["a"], "d": paths["b"]},
            method=method,
            output_dir=str(tmp_path / "m"),
        )
    )
    largest = max(v.numel() for v in base.values())
    row = max(v.shape[-1] if v.dim() > 1 else 1 for v in base.values())
    # ties: the base tensor and one model's tensor; task_arithmetic: k + 1 chunks of <= 256 elements (a row)
    bound = 2 * largest if method == "ties" else 5 * max(256, row)
    assert 0 < reads.peak <= bound
