"""Reading a safetensors checkpoint one tensor at a time, so loading never holds the whole file.

transformers opens each checkpoint file once with `safe_open`, which maps the
whole file into memory, and reads every tensor through that mapping; each page
read stays in the process's resident set until the file is closed at the end
of the file. A 1B model's single 4 GiB fp32 file therefore peaks at 4 GiB of
RSS above the NF4 weights it is quantised into, although each weight is needed
only for the moment it takes to quantise it.

`one_tensor_at_a_time()` keeps transformers' loader (its key renaming, dtype
rules, quantiser calls and the initialisation of missing weights) and changes
only how the bytes are read: each tensor is read from the file into memory of
its own (on the CPU; elsewhere through a mapping of its own, unmapped at
once). The peak of a load becomes the NF4 weights, the float tensors that
stay float, and the largest single tensor.

`full_precision_weights` reads a checkpoint's own (unquantised) weights of some layers, one at a time, for
the residual start.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import UserError


class _Slice:
    """One tensor of a checkpoint file; indexing it (`[...]`, as transformers does) reads it."""

    def __init__(self, reader, filename: str, name: str, framework: str, device):
        self._slice = reader.get_slice(name)
        self._where = (filename, name, framework, device)

    def __getattr__(self, attr):  # get_shape, get_dtype: from the file's header
        return getattr(self._slice, attr)

    def __getitem__(self, index):
        return _read_owned(*self._where)[index]


def _read_owned(filename: str, name: str, framework: str, device) -> torch.Tensor:
    """The tensor in memory of its own. On the CPU its bytes are read from the file into a fresh buffer (pages
    read through a mapping would count in the process's memory until unmapped, doubling the largest tensor's
    cost while it is copied); elsewhere the file is mapped for this read only."""
    entry = _header(filename).get(name)
    if framework == "pt" and str(device) == "cpu" and entry is not None and entry["dtype"] in _DTYPES:
        return _read_bytes(filename, entry)
    from safetensors import safe_open

    with safe_open(filename, framework=framework, device=device) as f:
        tensor = f.get_tensor(name)
    return tensor.clone() if tensor.device.type == "cpu" else tensor  # a CPU tensor may still view the mapping


# safetensors' dtype names (little-endian, as the format stores them, and as this reader assumes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(filename: str) -> dict:
    """The file's header: tensor name -> dtype, shape and byte offsets in the file (read once per file version)."""
    stat = os.stat(filename)
    return _read_header(filename, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_header(filename: str, mtime_ns: int, file_size: int) -> dict:  # the version: its cache key
    with open(filename, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        entries = json.loads(f.read(size))
    entries.pop("__metadata__", None)
    for entry in entries.values():
        entry["data_offsets"] = [8 + size + o for o in entry["data_offsets"]]
    return entries


def _read_bytes(filename: str, entry: dict) -> torch.Tensor:
    start, end = entry["data_offsets"]
    out = torch.empty(end - start, dtype=torch.uint8)
    view = memoryview(out.numpy())
    with open(filename, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < len(view):  # one read returns at most ~2 GiB on Linux
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{filename} ends inside a tensor (truncated checkpoint?)")
            done += got
    return out.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class _Reader:
    """A stand-in for `safe_open` whose tensors are read one at a time into memory of their own (`_read_owned`);
    names, shapes and dtypes come through the long-lived `safe_open`, which is never paged in beyond the header."""

    def __init__(self, filename, framework: str = "pt", device="cpu"):
        from safetensors import safe_open

        self._file = safe_open(filename, framework=framework, device=device)
        self._where = (str(filename), framework, device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __getattr__(self, attr):  # keys, metadata, offset_keys
        return getattr(self._file, attr)

    def get_slice(self, name: str) -> _Slice:
        filename, framework, device = self._where
        return _Slice(self._file, filename, name, framework, device)

    def get_tensor(self, name: str) -> torch.Tensor:
        filename, framework, device = self._where
        return _read_owned(filename, name, framework, device)


@contextlib.contextmanager
def one_tensor_at_a_time():
    """While active, transformers' `from_pretrained` reads safetensors files one tensor at a time."""
    import transformers.modeling_utils as loader

    original = loader.safe_open
    loader.safe_open = _Reader
    try:
        yield
    finally:
        loader.safe_open = original


def checkpoint_mapped() -> bool:
    """Whether a safetensors file is still mapped into this process (Linux; elsewhere False)."""
    maps = Path("/proc/self/maps")
    return maps.exists() and any(line.rstrip().endswith(".safetensors") for line in maps.read_text().splitlines())


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def _local_folder(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))


def full_precision_weights(name_or_path: str, paths: Sequence[str], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's own (unquantised) weight of each module path, one at a time, as fp32.

    Checkpoints name tensors with or without the model's base prefix (`bert.`,
    `model.`), so both spellings are tried.
    """
    from safetensors import safe_open

    files = _weight_files(_local_folder(name_or_path))
    if not files:
        raise UserError(f"the residual start needs the model's safetensors weights; none found for {name_or_path!r}")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                where[key] = f
    for path in paths:
        candidates = [f"{path}.weight"]
        if prefix and path.startswith(prefix + "."):
            candidates.append(f"{path[len(prefix) + 1:]}.weight")
        elif prefix:
            candidates.append(f"{prefix}.{path}.weight")
        key = next((k for k in candidates if k in where), None)
        if key is None:
            raise UserError(f"the residual start cannot find {path}'s weight in {name_or_path!r} (tried {candidates})")
        with safe_open(where[key], framework="pt") as handle:
            yield path, handle.get_tensor(key).float()
