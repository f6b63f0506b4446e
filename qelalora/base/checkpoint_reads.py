"""Reading a safetensors checkpoint one tensor at a time, so loading never holds the whole file.

transformers opens each checkpoint file once with `safe_open`, which maps the
whole file into memory, and reads every tensor through that mapping; each page
read stays in the process's resident set until the file is closed at the end
of the file. A 1B model's single 4 GiB fp32 file therefore peaks at 4 GiB of
RSS above the NF4 weights it is quantised into, although each weight is needed
only for the moment it takes to quantise it.

`one_tensor_at_a_time()` keeps transformers' loader (its key renaming, dtype
rules, quantiser calls and the initialisation of missing weights) and changes
only how the bytes are read: each tensor through a mapping of its own, copied
into the process's memory and unmapped at once. The peak of a load becomes the
NF4 weights, the float tensors that stay float, and the largest single tensor.
"""

from __future__ import annotations

import contextlib

import torch


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
    """The tensor in memory of its own: the file is mapped for this read only."""
    from safetensors import safe_open

    with safe_open(filename, framework=framework, device=device) as f:
        tensor = f.get_tensor(name)
    return tensor.clone() if tensor.device.type == "cpu" else tensor  # a CPU tensor may still view the mapping


class _Reader:
    """A stand-in for `safe_open` whose tensors are read through short-lived mappings (the header through the
    long-lived one, which is never paged in beyond it)."""

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
    from pathlib import Path

    maps = Path("/proc/self/maps")
    return maps.exists() and any(line.rstrip().endswith(".safetensors") for line in maps.read_text().splitlines())
