"""What the process holds: tensors counted as a GPU counts them, weights in the process's own memory,
token ids stored compactly."""

import gc
import sys
from pathlib import Path

import pytest
import torch

from qelalora.base.footprint import TensorBytes, live_tensor_bytes
from qelalora.base.models import load_base_model


def test_tensor_bytes_counts_new_storages_until_they_are_freed():
    kept = torch.zeros(1024)  # made before: not counted, nor are in-place ops and views of it
    with TensorBytes() as counted:
        a = torch.ones(256, 1024)  # 1 MiB
        b = a * 2  # another MiB
        assert counted.live == 2 * 2**20
        del b
        kept.add_(1)
        view = kept[:10]
        c = torch.ones(128, 1024)  # half a MiB while a is alive
    assert counted.live == 1.5 * 2**20 and counted.peak == 2 * 2**20
    del a, c, view
    assert counted.live == 0


def test_live_tensor_bytes_sees_a_new_tensor():
    gc.collect()
    before = live_tensor_bytes()
    x = torch.empty(3, 2**18)  # 3 MiB
    assert live_tensor_bytes() - before == 3 * 2**20
    del x


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_leave_the_checkpoint_file_unmapped(tiny_llama_dir):
    model, _ = load_base_model(str(tiny_llama_dir), "nf4", device="cpu")
    gc.collect()
    mapped = Path("/proc/self/maps").read_text()
    files = [p.name for p in Path(tiny_llama_dir).glob("*.safetensors")]
    assert files and not any(name in mapped for name in files)
    assert model.model.embed_tokens.weight.abs().sum() > 0  # the copied weights are the checkpoint's
