"""Safetensors folders written tensor by tensor, sharded as Hugging Face shards them.

A model whose weights fit ``max_shard_size`` is one ``model.safetensors``; a larger one is
``model-0000i-of-0000n.safetensors`` files plus ``model.safetensors.index.json`` (``{"metadata": {"total_size"},
"weight_map": {name: file}}``), the layout ``from_pretrained``, mergekit and ``jobs.merge_stream.Checkpoint`` read.
The split is huggingface_hub's (``split_state_dict_into_shards_factory``: tensors in order, a new shard when the
next one would pass the limit, a tensor above the limit alone); a writer only needs each tensor's dtype and
shape up front, so a streaming merge or a ZeRO-3 gather holds one tensor at a time, never the model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # storage.max_shard_size: transformers 4's default; the Hub caps a file at 50 GB
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

SAFETENSORS_TORCH = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape), in writing order


def parse_size(size: Union[int, str]) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1MB`` (powers of ten, as huggingface_hub) or an int."""
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def plan_shards(layout: Layout, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> dict[str, list[str]]:
    """File name -> the tensor names it holds, in ``layout`` order (one file: ``model.safetensors``)."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(layout),
        get_storage_size=lambda spec: tensor_bytes(*spec),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )
    return split.filename_to_tensors


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is written
    first from the declared layout, then each tensor's bytes in that order."""

    def __init__(self, path: Path, layout: Layout):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = tensor_bytes(dtype, shape)
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.layout, self.order = path, layout, iter(layout)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self.order, None)
        if name != expected or (tensor.dtype, tuple(tensor.shape)) != self.layout[name]:
            raise RuntimeError(
                f"{self.path}: writing {name} {tensor.dtype}{list(tensor.shape)} where the header "
                f"declares {expected} {self.layout.get(expected)}"
            )
        # the array's own buffer, not a bytes copy of the tensor
        self.file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.file.close()


Progress = Callable[[int, int], None]  # (done, total): how far a long write or merge has come


class ShardedWriter:
    """A folder's weights written tensor by tensor, split into shards of at most ``max_shard_size`` (each file's
    header is written when its first tensor comes); ``close`` writes the index when there is more than one file.
    Tensors come in ``order`` (the files' order: a tensor above the limit takes a file of its own at once, so
    this can differ from ``layout``'s). Holds no tensor: the caller's, one at a time. ``progress(written, total)``
    is called after each tensor (a long merge says where it is)."""

    def __init__(
        self,
        folder: Union[str, Path],
        layout: Layout,
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        progress: Optional[Progress] = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.files = plan_shards(layout, max_shard_size)
        self.file_of = {name: file for file, names in self.files.items() for name in names}
        self.order = [name for names in self.files.values() for name in names]
        self.current: SafetensorsWriter | None = None
        self.done: set[str] = set()
        self.progress, self.written = progress, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file = self.file_of.get(name)
        if file is None:
            raise RuntimeError(f"{self.folder}: {name} is not in the declared layout")
        if self.current is None or self.current.path.name != file:
            if file in self.done:
                raise RuntimeError(f"{self.folder}: {name} comes after {file} was closed; write in ShardedWriter.order")
            if self.current is not None:
                self.current.close()
                self.done.add(self.current.path.name)
            self.current = SafetensorsWriter(self.folder / file, {n: self.layout[n] for n in self.files[file]})
        self.current.write(name, tensor)
        self.written += 1
        if self.progress is not None:
            self.progress(self.written, len(self.order))

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        """``close`` after the last tensor; after an error only the open file, so that error is the one raised."""
        if kind is None:
            self.close()
        elif self.current is not None:
            self.current.close()
            self.current = None

    def close(self) -> list[str]:
        """Closes the last file and writes the index (several files); returns the file names."""
        if self.current is not None:
            self.current.close()
            self.done.add(self.current.path.name)
            self.current = None
        missing = [f for f in self.files if f not in self.done]
        if missing:
            raise RuntimeError(f"{self.folder}: closed before {missing[0]} was written")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(tensor_bytes(*spec) for spec in self.layout.values())},
                "weight_map": dict(sorted(self.file_of.items())),
            }
            (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


def weight_files(folder: Union[str, Path]) -> list[Path]:
    """The safetensors files of a model folder: the index's, else every ``*.safetensors`` there."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Union[str, Path]) -> tuple[dict[str, dict[str, Any]], int]:
    """One safetensors file's tensors (``{name: {"dtype", "shape", "data_offsets"}}``, offsets relative to the
    data) and the byte where its data starts: the layout is a little-endian u64 n, n bytes of JSON, the data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def folder_tensors(folder: Union[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a model folder's weights (``weight_files``): name -> (safetensors dtype code, shape), read
    from the files' headers only."""
    ckpt = Checkpoint(str(folder))
    return {name: (ckpt.dtypes[name], ckpt.shapes[name]) for name in ckpt.shapes}


def remove_weights(folder: Union[str, Path]) -> None:
    """Deletes a folder's safetensors weights and index before new ones are written in their place: a write
    with another shard count would otherwise leave files (or an index) of the old one beside the new."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_NAME
    indexed = weight_files(folder) if index.exists() else []
    for path in {*indexed, *folder.glob("model*.safetensors"), index}:
        path.unlink(missing_ok=True)


class Checkpoint:
    """A folder's safetensors weights (one file, or the shards its index names): names, shapes, dtypes and byte
    offsets from the files' headers up front; each read opens and closes the file, so no file stays
    memory-mapped (mapped pages count as resident memory)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.offsets: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its file
        for path in weight_files(self.folder):
            header, start = read_header(path)
            for name, meta in header.items():
                self.file_of[name] = path.name
                self.shapes[name] = tuple(meta["shape"])
                self.dtypes[name] = meta["dtype"]
                self.offsets[name] = (start + meta["data_offsets"][0], start + meta["data_offsets"][1])

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.file_of[name], "pt") as handle:
            return handle.get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` read into ``out`` (contiguous, its stored dtype and shape) with one read call. Reused
        across models, ``out``'s pages are already resident: a fresh tensor or a mapped file faults in every
        page of every read (docs/benchmarks.md "Merge: streaming vs mergekit" has the difference)."""
        begin, end = self.offsets[name]
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.folder / self.file_of[name], "rb", buffering=0) as f:
            f.seek(begin)
            got = f.readinto(view)
        if got != end - begin or len(view) != got:
            raise ValueError(
                f"{self.folder / self.file_of[name]}: {name}: read {got} of {end - begin} bytes into {len(view)}"
            )
        return out

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name`` flattened (row-major, as ZeRO-3 partitions a parameter), in
        its stored dtype, read with one call and nothing else of the file."""
        begin, end = self.offsets[name]
        dtype = SAFETENSORS_TORCH[self.dtypes[name]]
        size = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= stop <= (end - begin) // size:
            raise ValueError(f"{self.folder}: {name}: elements {start}:{stop} outside its {(end - begin) // size}")
        out = torch.empty(stop - start, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        with open(self.folder / self.file_of[name], "rb", buffering=0) as f:
            f.seek(begin + start * size)
            got = f.readinto(view)
        if got != len(view):
            raise ValueError(f"{self.folder / self.file_of[name]}: {name}: read {got} of {len(view)} bytes")
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (dim 0), read without the rest."""
        from safetensors import safe_open

        with safe_open(self.folder / self.file_of[name], "pt") as handle:
            return handle.get_slice(name)[start:stop]
