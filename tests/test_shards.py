"""Sharded safetensors folders: the writer (jobs/shards.py), and every merge engine reading sharded inputs and
writing sharded outputs (1 MB shards of a small Llama), a hub-name base resolved from the Hugging Face cache, the
merge actor's memory request and storage.max_shard_size's validation."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from jobs.merge import MERGE_MARKER, merge_models, run_mergekit
from jobs.models import load_model, load_tokenizer, save_model
from jobs.shards import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ShardedWriter,
    folder_tensors,
    parse_size,
    plan_shards,
    read_header,
    remove_weights,
    weight_files,
)
from jobs.spec import MergeSpec

SHARD = "1MB"
LAYOUT = {
    "a": (torch.float32, (100,)),
    "b": (torch.float32, (10, 10)),
    "c": (torch.float32, (300,)),
    "d": (torch.int64, (25,)),
}  # 400, 400, 1200 and 200 bytes


def tensors_of(layout, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(s, generator=g) if d.is_floating_point else torch.randint(0, 9, s, generator=g)).to(d)
        for n, (d, s) in layout.items()
    }


def folder_state(folder) -> dict:
    """Every tensor of a folder's weights, read through its index when it has one."""
    out = {}
    for path in weight_files(folder):
        out.update(load_file(path))
    return out


def assert_sharded(folder, files_at_least=2) -> list[str]:
    """The folder holds an index naming several files, each present, and no lone model.safetensors."""
    index = json.loads((Path(folder) / WEIGHTS_INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= files_at_least and all((Path(folder) / f).is_file() for f in files)
    assert not (Path(folder) / WEIGHTS_NAME).exists()
    assert sorted(p.name for p in Path(folder).glob("*.safetensors")) == files
    return files


# --- jobs/shards.py ---------------------------------------------------------------------------------------


def test_sizes_are_powers_of_ten_as_hugging_faces():
    assert parse_size("1MB") == 10**6 and parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 10**5
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("abc")


def test_the_plan_fills_shards_in_order_and_gives_a_tensor_above_the_limit_a_file_of_its_own():
    # a + b = 800 bytes; c (1200) is above the 1000-byte limit: alone, first; d (200) still fits beside a and b
    assert plan_shards(LAYOUT, 1000) == {
        "model-00001-of-00002.safetensors": ["c"],
        "model-00002-of-00002.safetensors": ["a", "b", "d"],
    }
    assert plan_shards(LAYOUT, 999) == {
        "model-00001-of-00003.safetensors": ["c"],
        "model-00002-of-00003.safetensors": ["a", "b"],
        "model-00003-of-00003.safetensors": ["d"],
    }
    assert plan_shards(LAYOUT, "5GB") == {WEIGHTS_NAME: ["a", "b", "c", "d"]}


def test_the_writer_writes_shards_in_its_order_and_an_index_that_loaders_read(tmp_path):
    tensors = tensors_of(LAYOUT)
    with ShardedWriter(tmp_path, LAYOUT, 1000) as writer:
        assert writer.order == ["c", "a", "b", "d"]
        for name in writer.order:
            writer.write(name, tensors[name])
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    assert index == {
        "metadata": {"total_size": 2200},
        "weight_map": {
            "a": "model-00002-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors",
            "d": "model-00002-of-00002.safetensors",
        },
    }
    assert list(load_file(tmp_path / "model-00001-of-00002.safetensors")) == ["c"]
    back = folder_state(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    header, start = read_header(tmp_path / "model-00002-of-00002.safetensors")
    assert header["b"] == {"dtype": "F32", "shape": [10, 10], "data_offsets": [400, 800]} and start % 8 == 0
    assert folder_tensors(tmp_path) == {
        "a": ("F32", (100,)),
        "b": ("F32", (10, 10)),
        "c": ("F32", (300,)),
        "d": ("I64", (25,)),
    }


def test_one_file_below_the_limit_has_no_index(tmp_path):
    tensors = tensors_of(LAYOUT)
    writer = ShardedWriter(tmp_path, LAYOUT)
    for name in writer.order:
        writer.write(name, tensors[name])
    assert writer.close() == [WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]
    assert all(torch.equal(load_file(tmp_path / WEIGHTS_NAME)[n], t) for n, t in tensors.items())


def test_writes_out_of_order_or_off_the_layout_raise(tmp_path):
    tensors = tensors_of(LAYOUT)
    writer = ShardedWriter(tmp_path / "within", LAYOUT, 1000)
    writer.write("c", tensors["c"])
    with pytest.raises(RuntimeError, match="writing b .* where the header declares a"):
        writer.write("b", tensors["b"])  # the second file's header lists a first
    writer = ShardedWriter(tmp_path / "across", LAYOUT, 1000)
    writer.write("a", tensors["a"])
    writer.write("c", tensors["c"])  # back to the first file: the second one is closed, half written
    with pytest.raises(RuntimeError, match="b comes after model-00002-of-00002.safetensors was closed"):
        writer.write("b", tensors["b"])
    writer = ShardedWriter(tmp_path / "other", LAYOUT, 1000)
    with pytest.raises(RuntimeError, match="e is not in the declared layout"):
        writer.write("e", tensors["a"])
    with pytest.raises(RuntimeError, match="writing c torch.float64"):
        writer.write("c", tensors["c"].double())
    writer = ShardedWriter(tmp_path / "short", LAYOUT, 1000)
    writer.write("c", tensors["c"])
    with pytest.raises(RuntimeError, match="closed before model-00002-of-00002.safetensors was written"):
        writer.close()


def test_an_error_inside_the_writer_is_the_one_raised_and_leaves_no_index(tmp_path):
    with pytest.raises(KeyError, match="boom"):
        with ShardedWriter(tmp_path, LAYOUT, 1000) as writer:
            writer.write("c", tensors_of(LAYOUT)["c"])
            raise KeyError("boom")
    assert writer.current is None and not (tmp_path / WEIGHTS_INDEX_NAME).exists()


def test_remove_weights_deletes_weights_and_index_only(tmp_path):
    for name in (
        WEIGHTS_NAME,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
        "tokenizer.json",
        "adapter_model.safetensors",
    ):
        (tmp_path / name).write_text("x")
    (tmp_path / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    remove_weights(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "config.json", "tokenizer.json"]


# --- a small Llama in 1 MB shards, merged by every engine ---------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tiny_dir, tmp_path_factory):
    """A Llama (the tiny tokenizer, hidden 128, 4 layers: 3.7 MB of float32) and two perturbed copies, all saved
    in 1 MB shards: (folder, {name: subset folder})."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("sharded")
    tok = load_tokenizer(tiny_dir / "model")
    torch.manual_seed(5)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    save_model(model, tok, d / "base", max_shard_size=SHARD)
    g = torch.Generator().manual_seed(6)
    subsets = {}
    for name in ("a", "b"):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        save_model(model, tok, d / name, state_dict=sd, max_shard_size=SHARD)
        subsets[name] = str(d / name)
    return d / "base", subsets


def test_save_model_writes_the_small_llama_in_several_1mb_shards(sharded):
    base, subsets = sharded
    for folder in (base, *subsets.values()):
        files = assert_sharded(folder, files_at_least=4)
        assert all((Path(folder) / f).stat().st_size <= parse_size(SHARD) + 10**4 for f in files)  # + its header


def test_a_checkpoint_reads_sharded_inputs_through_their_index(sharded):
    from jobs.merge_stream import Checkpoint

    base, _ = sharded
    ckpt = Checkpoint(str(base))
    state = folder_state(base)
    assert ckpt.shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert len(set(ckpt.file_of.values())) >= 4
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(ckpt.read_into(name, torch.empty_like(state[name])), state[name])
        assert torch.equal(ckpt.rows(name, 3, 7), state[name][3:7])


def logits(model) -> torch.Tensor:
    ids = torch.arange(1, 41).reshape(2, 20)
    with torch.no_grad():
        return model(input_ids=ids).logits


def model_from(folder_like, state) -> torch.Tensor:
    """Logits of a model of ``folder_like``'s config holding ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder_like))
    model.load_state_dict(state)
    return logits(model.eval())


@pytest.mark.parametrize(
    "method, parameters", [("ties", {"density": 0.5, "normalize": True}), ("task_arithmetic", {"weight": 0.7})]
)
def test_stream_merge_of_sharded_checkpoints_equals_mergekit_bit_for_bit_and_is_sharded(
    sharded, tmp_path, method, parameters
):
    from jobs.merge_stream import stream_merge, stream_reason

    base, subsets = sharded
    spec = MergeSpec(
        base_model_path=str(base),
        model_paths=subsets,
        method=method,
        parameters=parameters,
        max_shard_size=SHARD,
        output_dir=str(tmp_path / "stream"),
    )
    assert stream_reason(spec) is None
    stream_merge(spec)
    run_mergekit(spec.model_copy(update={"output_dir": str(tmp_path / "mergekit")}))
    files = assert_sharded(tmp_path / "stream", files_at_least=4)
    assert_sharded(tmp_path / "mergekit", files_at_least=4)  # mergekit's out_shard_size follows max_shard_size
    streamed, reference = folder_state(tmp_path / "stream"), folder_state(tmp_path / "mergekit")
    assert streamed.keys() == reference.keys() == folder_state(base).keys()
    for name in reference:
        assert torch.equal(streamed[name], reference[name]), name
    weight_map = json.loads((tmp_path / "stream" / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
    assert set(weight_map) == set(streamed) and sorted(set(weight_map.values())) == files
    merged = load_model(tmp_path / "stream")
    assert torch.equal(logits(merged.eval()), model_from(tmp_path / "stream", reference))
    assert not torch.equal(logits(merged), logits(load_model(base).eval()))


def test_merge_models_streams_sharded_inputs_and_writes_one_file_under_the_default_size(sharded, tmp_path):
    base, subsets = sharded
    merge_models(
        MergeSpec(base_model_path=str(base), model_paths=subsets, method="ties", output_dir=str(tmp_path / "m"))
    )
    marker = json.loads((tmp_path / "m" / MERGE_MARKER).read_text())
    assert marker["engine"].startswith("spunge streaming") and marker["base_model_folder"] == str(base)
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == [WEIGHTS_NAME]
    assert not (tmp_path / "m" / WEIGHTS_INDEX_NAME).exists()


def test_the_lora_full_output_is_sharded_and_loadable(sharded, tmp_path):
    from tests.test_merge_lora import make_adapter

    base, _ = sharded
    adapters = {
        n: make_adapter(base, tmp_path / f"adapter-{n}", seed, target_modules=["q_proj", "down_proj"])
        for seed, n in enumerate(("a", "b"))
    }
    spec = MergeSpec(
        base_model_path=str(base),
        model_paths=adapters,
        method="ties",
        parameters={"density": 0.5},
        max_shard_size=SHARD,
        output_dir=str(tmp_path / "sharded"),
    )
    merge_models(spec)
    merge_models(spec.model_copy(update={"max_shard_size": "5GB", "output_dir": str(tmp_path / "one")}))
    assert json.loads((tmp_path / "sharded" / MERGE_MARKER).read_text())["output"] == "full"
    assert_sharded(tmp_path / "sharded", files_at_least=4)
    sharded_state, one = folder_state(tmp_path / "sharded"), load_file(tmp_path / "one" / WEIGHTS_NAME)
    assert sharded_state.keys() == one.keys() == folder_state(base).keys()
    assert all(torch.equal(sharded_state[n], one[n]) for n in one)
    assert any(not torch.equal(one[n], t) for n, t in folder_state(base).items())  # the deltas are in
    merged = load_model(tmp_path / "sharded")
    assert torch.equal(logits(merged.eval()), model_from(tmp_path / "one", one))


@pytest.mark.parametrize("before, after", [(SHARD, "5GB"), ("5GB", SHARD)])
def test_the_rewrite_after_a_merge_leaves_no_weights_of_the_old_shard_count(sharded, tmp_path, before, after):
    from jobs.merge import rewrite_merged
    from jobs.unlearn.methods import build_method

    base, subsets = sharded
    out = tmp_path / "m"
    merge_models(
        MergeSpec(
            base_model_path=str(base),
            model_paths=subsets,
            method="task_arithmetic",
            max_shard_size=before,
            output_dir=str(out),
        )
    )
    merged = folder_state(out)
    tvn = build_method("tvn", {"lam": 1.0})
    rewrite_merged(str(out), str(base), tvn, max_shard_size=after)
    if after == SHARD:
        assert_sharded(out, files_at_least=4)
    else:
        assert sorted(p.name for p in out.glob("*.safetensors")) == [WEIGHTS_NAME]
        assert not (out / WEIGHTS_INDEX_NAME).exists()
    rewritten, base_state = folder_state(out), folder_state(base)
    assert rewritten.keys() == merged.keys()
    for name in merged:  # tvn: base - lam (merged - base)
        torch.testing.assert_close(rewritten[name], 2 * base_state[name] - merged[name], atol=1e-6, rtol=0)


# --- a hub-name base, resolved from the Hugging Face cache ---------------------------------------------------

REPO, COMMIT = "spunge-test/small-llama", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(sharded, tmp_path, monkeypatch):
    """A Hugging Face cache holding the sharded base as REPO (blobs, a snapshot of links to them, refs/main),
    offline: (the cache, the snapshot folder)."""
    import hashlib

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--spunge-test--small-llama"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in Path(sharded[0]).iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for key, value in {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snapshot


def test_a_hub_name_base_is_merged_from_its_cached_snapshot_by_the_streaming_merge(sharded, hub_cache, tmp_path):
    from jobs.merge import resolve_base

    base, subsets = sharded
    _, snapshot = hub_cache
    assert Path(resolve_base(REPO)) == snapshot and Path(resolve_base(REPO, local_only=True)) == snapshot
    merge_models(
        MergeSpec(
            base_model_path=REPO,
            model_paths=subsets,
            method="ties",
            max_shard_size=SHARD,
            output_dir=str(tmp_path / "hub"),
        )
    )
    marker = json.loads((tmp_path / "hub" / MERGE_MARKER).read_text())
    assert marker["engine"] == "spunge streaming merge (mergekit kernels)"
    assert Path(marker["base_model_folder"]) == snapshot
    merge_models(
        MergeSpec(base_model_path=str(base), model_paths=subsets, method="ties", output_dir=str(tmp_path / "local"))
    )
    hub, local = folder_state(tmp_path / "hub"), load_file(tmp_path / "local" / WEIGHTS_NAME)
    assert hub.keys() == local.keys() and all(torch.equal(hub[n], local[n]) for n in local)
    assert (tmp_path / "hub" / "tokenizer.json").is_file() and not (tmp_path / "hub" / "tokenizer.json").is_symlink()
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["dtype"] == "float32"


def test_lora_adapters_on_a_hub_name_base_merge_from_its_snapshot_into_an_adapter_naming_the_hub(
    sharded, hub_cache, tmp_path
):
    from tests.test_merge_lora import make_adapter

    base, _ = sharded
    adapters = {
        n: make_adapter(base, tmp_path / f"adapter-{n}", seed, target_modules=["q_proj"])
        for seed, n in enumerate(("a", "b"))
    }
    out = Path(
        merge_models(
            MergeSpec(
                base_model_path=REPO,
                model_paths=adapters,
                method="task_arithmetic",
                output="adapter",
                output_dir=str(tmp_path / "merged"),
            )
        )
    )
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    marker = json.loads((out / MERGE_MARKER).read_text())
    assert marker["output"] == "adapter" and Path(marker["base_model_folder"]) == hub_cache[1]


def test_a_hub_name_neither_cached_nor_reachable_is_one_line(hub_cache):
    from jobs.merge import resolve_base

    with pytest.raises(ValueError) as err:
        resolve_base("spunge-test/not-cached")
    assert str(err.value).startswith("merge: base model 'spunge-test/not-cached' is neither a local folder")
    assert "\n" not in str(err.value)


# --- the merge actor's memory request ----------------------------------------------------------------------


def test_merge_memory_bytes_by_engine_hand_computed():
    from jobs.merge import PROCESS_BYTES, merge_memory_bytes
    from jobs.merge_stream import CHUNK_ELEMENTS

    assert CHUNK_ELEMENTS == 2**21 and PROCESS_BYTES == 2**29
    gb, e = 10**9, 10**8  # a 1 GB float32 model whose largest tensor has 1e8 elements (T = 0.4 GB)
    # streaming TIES, k = 4: 10 T + 4 masks of 1e8 / 8 bytes = 4.0e9 + 5.0e7
    assert merge_memory_bytes("stream-sparse", 4, gb, e, 4) == 2**29 + 4_050_000_000
    # task arithmetic, k = 4: T + 2 (4 + 2) chunks of 2^21 float32 = 4.0e8 + 12 * 8388608
    assert merge_memory_bytes("stream-elementwise", 4, gb, e, 4) == 2**29 + 400_000_000 + 100_663_296
    # a tensor smaller than a chunk bounds the chunks: 1000 * 2 + 2 * 4 * 1000 * 2 (bf16, k = 2)
    assert merge_memory_bytes("stream-elementwise", 2, 10**6, 1000, 2) == 2**29 + 2_000 + 16_000
    # mergekit, k = 4: (5 * 4 + 2) T + 2 shards; the shard is the whole model below max_shard_size, else the limit
    assert merge_memory_bytes("mergekit", 4, gb, e, 4) == 2**29 + 22 * 400_000_000 + 2 * gb
    assert merge_memory_bytes("mergekit", 4, gb, e, 4, max_shard_size="100MB") == 2**29 + 8_800_000_000 + 2 * 10**8
    # LoRA in float32 whatever the merge dtype, k = 3: (6 * 3 + 6) * 4e8 + 2 * 5e7 of adapters
    assert merge_memory_bytes("lora", 3, gb // 2, e, 2, adapter_bytes=5 * 10**7) == 2**29 + 9_600_000_000 + 10**8
    # the tvn rewrite, 3 models + a shard = 4e9, counts only where it is the larger (not against TIES' 4.05e9)
    assert merge_memory_bytes("stream-sparse", 4, gb, e, 4, rewrite=True) == 2**29 + 4_050_000_000
    assert merge_memory_bytes("stream-elementwise", 4, gb, e, 4, rewrite=True) == 2**29 + 4 * gb
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        merge_memory_bytes("fast", 1, gb, e, 4)


def pipeline_config(base, **sections):
    from orchestrator.config.schema import PipelineConfig

    sections.setdefault("model", {"path": str(base)})
    return PipelineConfig(split={"attribute": "group"}, data={"forget": "f.jsonl"}, **sections)


def test_merge_memory_sizes_the_engine_the_merge_will_run_from_the_base_headers(sharded):
    from jobs.merge import merge_memory_bytes
    from orchestrator.stages.merge import merge_memory

    base, _ = sharded
    state = folder_state(base)
    model_bytes = sum(t.numel() * 4 for t in state.values())
    largest = max(t.numel() for t in state.values())
    keys = ["subset/a", "subset/b"]
    need, what = merge_memory(pipeline_config(base), keys)
    assert need == merge_memory_bytes("stream-sparse", 2, model_bytes, largest, 4)
    assert what.startswith("stream-sparse merge of 2 checkpoints")
    need, _ = merge_memory(
        pipeline_config(base, model={"path": str(base), "dtype": "bfloat16"}, merge={"method": "dare_ties"}), keys
    )
    assert need == merge_memory_bytes("mergekit", 2, model_bytes // 2, largest, 2)
    need, _ = merge_memory(
        pipeline_config(
            base,
            merge={"method": "task_arithmetic"},
            unlearn={"method": "tvn", "params": {"order": "merge_then_negate"}},
        ),
        keys,
    )
    assert need == merge_memory_bytes("stream-elementwise", 2, model_bytes, largest, 4, rewrite=True)
    lora = pipeline_config(base, unlearn={"lora": {"r": 4}})
    linear = sum(sum(t.shape) for t in state.values() if t.dim() == 2)  # rows + cols of every matrix
    assert merge_memory(lora, keys)[0] == merge_memory_bytes(
        "lora", 2, model_bytes, largest, 4, adapter_bytes=2 * 4 * 4 * linear
    )
    assert merge_memory(pipeline_config(base, merge={"memory_gb": 1.5}), keys) == (int(1.5 * 2**30), "merge.memory_gb")
    assert merge_memory(pipeline_config(base), [])[0] == 0
    assert merge_memory(pipeline_config("spunge-test/nowhere"), keys)[0] == 0  # no folder, not cached: unknown


def test_the_merge_actor_asks_for_its_memory_and_a_need_no_node_offers_fails_at_once(sharded, monkeypatch):
    import orchestrator.stages.merge as stage
    import orchestrator.stages.merge.actor as actor_module
    from orchestrator.run.context import PipelineError
    from orchestrator.stages.merge import merge_memory, start_merge_actor

    base, _ = sharded
    started = []

    class FakeActor:
        @staticmethod
        def options(**options):
            return SimpleNamespace(remote=lambda *args: started.append((options, args)) or "actor")

    monkeypatch.setattr(actor_module, "MergeActor", FakeActor)
    cfg = pipeline_config(base)
    ctx = SimpleNamespace(
        cfg=cfg,
        merge_actor=None,
        subset_jobs=lambda: [SimpleNamespace(key="subset/a"), SimpleNamespace(key="subset/b")],
    )
    need = merge_memory(cfg, ["subset/a", "subset/b"])[0]
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2, "memory": 64 * 2**30}},
        {"Alive": False, "Resources": {"memory": 512 * 2**30}},
    ]
    monkeypatch.setattr(stage.ray, "nodes", lambda: nodes)
    start_merge_actor(ctx)
    assert ctx.merge_actor == "actor"
    options, args = started[0]
    assert len(started) == 1 and args == (str(base), ["subset/a", "subset/b"])
    assert options["num_cpus"] == 0 and options["memory"] == need
    assert options["scheduling_strategy"].placement_group is None  # outside a tune trial's placement group
    nodes[0]["Resources"]["memory"] = 2**30  # a node too small (the dead one does not count)
    ctx.cfg = pipeline_config(base, merge={"memory_gb": 3.5})
    with pytest.raises(PipelineError) as err:
        start_merge_actor(ctx)
    assert str(err.value) == (
        "merge: the merge actor needs 3.5 GiB of memory (merge.memory_gb) but the largest Ray "
        "node offers 1.0 GiB; set merge.memory_gb (0: reserve none) or add a node with more "
        "memory"
    )
    ctx.cfg = pipeline_config(base, merge={"memory_gb": 0})
    start_merge_actor(ctx)
    assert "memory" not in started[-1][0]


# --- storage.max_shard_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["5 GB?", "abc", "0MB", "10MiB"])
def test_a_bad_max_shard_size_is_one_line_naming_the_field(tmp_path, value):
    from orchestrator.config.parse import parse_config
    from orchestrator.config.schema import ConfigError

    raw = {
        "model": {"path": "m"},
        "split": {"attribute": "group"},
        "data": {"forget": "f.jsonl"},
        "storage": {"max_shard_size": value},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, tmp_path)
    assert err.value.problems == [
        f"storage.max_shard_size: expected a positive size such as 5GB, 500MB or 100KB "
        f"(units KB, MB, GB, TB: powers of ten), got {value!r}"
    ]


def test_the_merge_stage_hands_max_shard_size_to_the_actor_outside_its_stage_key(tmp_path, monkeypatch):
    import orchestrator.stages.merge as stage

    calls = []
    monkeypatch.setattr(stage, "follow_merge", lambda ctx, ref: ref)
    quiet = SimpleNamespace(add=lambda *a, **k: None, update=lambda *a, **k: None, finish=lambda *a, **k: None)
    for size in ("2GB", "5GB"):
        ctx = SimpleNamespace(
            cfg=pipeline_config("m", storage={"max_shard_size": size}),
            out=tmp_path,
            resume=False,
            display=quiet,
            merge_actor=SimpleNamespace(merge=SimpleNamespace(remote=calls.append)),
            subset_jobs=lambda: [SimpleNamespace(key="subset/a", model_dir="a", model_hash="h")],
        )
        ctx.merge_actor.merge.remote = lambda *args: calls.append(args)
        stage.merge(ctx)
    assert [c[-1] for c in calls] == ["2GB", "5GB"]
    assert calls[0][4] == calls[1][4]  # the same stage folder: the shard size is where files go, not what they hold
