"""The whole training footprint: predicted before a run, measured after it.

The byte budget covers the adapter state only (exact, see `budget`). Beside
it users need to know whether the whole job fits: the NF4 base weights, the
adapter state, and activations at the recipe's batch and sequence length.
The base is counted from the model's real shapes (built on the meta device,
so `qelalora plan` needs no weights); activations come from a step traced on
fake tensors (`run.trace`), with the standard per-layer estimate (Korthikanti
et al. 2022) as the fallback where a model's code cannot be traced. On a CPU
the process holds more than its tensors; `process_bytes` predicts how much.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

NF4_BLOCK = 64
DQ_BLOCK = 256  # double quantisation: the fp32 absmax of blocks is itself quantised to uint8 in blocks of 256
C_HEAP_MMAP_LIMIT = 32 * 2**20  # glibc's mmap threshold rises to at most this: smaller blocks come from its heap
HEAP_KEPT = 0.7  # freed blocks glibc's heap holds at a step's peak, per byte of live blocks it serves (bench/plan_check.py)
RUNTIME_BYTES = 64 * 2**20  # code loaded with the model (transformers' model classes, bitsandbytes), data set readers
PLANNER_BYTES = 67 * 2**20  # what the plan's first trace leaves loaded (PyTorch's fake tensors, symbolic shapes)
LOAD_COPIES = 1  # a tensor being loaded exists once more for a moment: as read, beside its place in the model
TOKENISER_BYTES_PER_TOKEN = 600  # a loaded fast tokeniser (vocabulary and merges): 14-31 MiB at 30-49k, ~150 MiB at 262k


def nf4_weight_bytes(numel: int) -> int:
    """Packed 4-bit values + uint8 absmax per 64-block + fp32 absmax per 256 of those + the 256-entry code."""
    blocks = -(-numel // NF4_BLOCK)
    return numel // 2 + blocks + 4 * -(-blocks // DQ_BLOCK) + 4 * 256 + 4


@dataclass
class Footprint:
    base_bytes: int
    adapter_bytes: int
    activation_bytes: int
    budget_bytes: int
    eval_bytes: int = 0  # the evaluation pass (no autograd; a causal LM's logits over its vocabulary at 2x the batch)
    traced: bool = False  # activations and evaluation from a traced step (`run.trace`), else from the formula
    process_resident_bytes: int | None = None  # CPU: what the process holds above its start once loaded (`process_bytes`)
    process_bytes: int | None = None  # CPU: the process's expected peak above its start
    loading_bytes: int = 0  # above the base while loading: the largest tensor, once more (`loading_bytes`)

    @property
    def load_peak_bytes(self) -> int:
        return self.base_bytes + self.loading_bytes

    @property
    def total_bytes(self) -> int:
        return max(self.base_bytes + self.adapter_bytes + max(self.activation_bytes, self.eval_bytes), self.load_peak_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "load_peak_bytes": self.load_peak_bytes, "total_bytes": self.total_bytes}


def base_bytes(model: nn.Module, quantize: str, skip: tuple[str, ...], dtype_bytes: int) -> int:
    """Frozen weights as they will sit in memory (NF4 linears, other tensors in the compute dtype)."""
    total = 0
    seen: set[int] = set()
    quantized: set[int] = set()
    if quantize == "nf4":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(s in name for s in skip):
                quantized.add(id(module.weight))
                total += nf4_weight_bytes(module.weight.numel())
    for p in model.parameters():
        if id(p) in seen or id(p) in quantized:
            continue
        seen.add(id(p))
        total += p.numel() * dtype_bytes
    return total


def largest_dequantized_bytes(model: nn.Module, quantize: str, skip: tuple[str, ...], dtype_bytes: int) -> int:
    """bitsandbytes dequantises an NF4 weight to the compute dtype for each matmul: one such weight is alive at once."""
    if quantize != "nf4":
        return 0
    sizes = [m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and not any(s in name for s in skip)]
    return max(sizes, default=0) * dtype_bytes


def loading_bytes(model: nn.Module, dtype_bytes: int) -> int:
    """What loading holds above the finished model's weights, at its peak: the largest tensor of the checkpoint
    in the compute dtype, once more (as read, beside its place in the model: the 8B width's second 2.1 GB table
    is read while the first is in place, bench/scale.py). The checkpoint is read one tensor at a time
    (`checkpoint_reads`), so this is all that remains of its size."""
    return LOAD_COPIES * max((p.numel() for p in model.parameters()), default=0) * dtype_bytes


def process_bytes(fp: Footprint, traced, vocab_size: int) -> tuple[int, int]:
    """What a CPU process holds at its peak beyond its start: the tensors, the code and tokeniser loaded with the
    model and with the plan (a run plans in its own process), and the blocks glibc's heap keeps. glibc maps a
    block of its own only when it is over its mmap threshold, which climbs with every mapped block freed (to
    32 MiB at most), so blocks under `C_HEAP_MMAP_LIMIT` are taken to come from the heap, which does not hand
    freed ones back during a step: it peaks at (1 + HEAP_KEPT) x the live small blocks (1.5-1.9x measured over
    nine model / shape pairs, bench/plan_check.py). Evaluation runs after `release_free_heap`. Without a trace
    (`traced` None) every activation counts as small. Returns (resident once loaded, peak)."""
    small_step = traced.step_small if traced else fp.activation_bytes
    small_eval = traced.evaluation_small if traced else fp.eval_bytes
    resident = fp.base_bytes + fp.adapter_bytes + RUNTIME_BYTES + PLANNER_BYTES + TOKENISER_BYTES_PER_TOKEN * vocab_size
    phases = max(fp.activation_bytes + HEAP_KEPT * small_step, fp.eval_bytes + HEAP_KEPT * small_eval)
    loading = fp.load_peak_bytes + RUNTIME_BYTES + PLANNER_BYTES  # before the tokeniser and the adapters
    return int(resident), int(max(resident + phases, loading))


def activation_bytes(config, batch: int, seq: int, dtype_bytes: int, causal_lm: bool, checkpointing: bool = False) -> int:
    """Tensors autograd keeps for the backward pass. With gradient checkpointing only each block's input is
    kept, and one block's activations exist at a time while it is recomputed."""
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    per_layer = seq * batch * h * (34 + 5 * heads * seq / h) * dtype_bytes / 2
    if checkpointing:
        total = layers * seq * batch * h * dtype_bytes + per_layer
    else:
        total = per_layer * layers
    if causal_lm:
        total += 2 * batch * seq * config.vocab_size * 4  # logits and their fp32 softmax/grad
    return int(total)


def eval_bytes(config, batch: int, seq: int, causal_lm: bool) -> int:
    """The evaluation pass's peak: for a causal LM its fp32 logits and their log-softmax for the loss (2.25x one
    logits tensor measured on SmolLM2; a 262k vocabulary makes this the run's peak); small otherwise."""
    return 2 * batch * seq * config.vocab_size * 4 if causal_lm else 0


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing to do).

    Loading frees a lot at once (float weights after quantising them, the tokeniser's intermediate lists),
    and glibc keeps freed small blocks in the process: 210 MiB after loading SmolLM2, 55 MiB after MiniLM.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): it returns memory on its own terms
        return
    libc.malloc_trim(0)


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """The process's peak RSS since the last `reset()`: Linux lets a process reset its own high-water mark
    (/proc/self/clear_refs), so a phase's peak is its own even late in a long process. Elsewhere the peak
    since the process started (getrusage), which is the same for a fresh `qelalora plan --measure`."""

    def __init__(self):
        self.resettable = Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def measured_peak(device: str, baseline_rss: int) -> dict:
    """What the run really used: CUDA max allocated, or on CPU the peak RSS above the RSS before loading."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        return {"measured_peak_bytes": peak, "measured": "torch.cuda.max_memory_allocated", "measured_training_bytes": peak}
    peak = PeakRSS().peak()  # never reset in a training process: the peak since it started
    return {
        "measured_peak_bytes": peak,
        "measured": "peak RSS of the process",
        "baseline_rss_bytes": baseline_rss,
        "measured_training_bytes": peak - baseline_rss,  # peak RSS minus the RSS before the model was loaded
    }


def live_tensor_bytes() -> int:
    """Bytes of every CPU or GPU tensor storage reachable from Python now (weights, quantisation state,
    optimiser state; at rest between steps there are no others)."""
    sizes = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type != "meta"]
    for t in tensors:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    sizes.pop(0, None)
    return sum(sizes.values())


class TensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensors created while active: on a CPU, what `torch.cuda.memory_allocated` and
    `max_memory_allocated` count on a GPU (tensor storages only, no allocator or library memory).

    Every op's outputs pass through this dispatch mode; a new storage counts from its creation until it is freed
    (storages keep their Python object while alive, so a weak reference sees the free). Tensors made before
    the mode was entered are not counted. Storages are told apart by their C++ object, so fake tensors (which
    have no data pointer) count too. `peak_small`: of the peak, the bytes in storages under `small` bytes.
    """

    def __init__(self, small: int = C_HEAP_MMAP_LIMIT):
        super().__init__()
        self.small = small
        self.live = self.live_small = 0
        self.peak = self.peak_small = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:  # in-place ops and views return their input's storage: not new
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage()._cdata not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = n = storage.nbytes()
        self.live += n
        self.live_small += n if n < self.small else 0
        if self.live > self.peak:
            self.peak, self.peak_small = self.live, self.live_small
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        n = self._sizes.pop(key, 0)
        self.live -= n
        self.live_small -= n if n < self.small else 0


