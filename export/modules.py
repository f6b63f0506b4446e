"""Export forms of an adapted model's linears (the adapter graph surgery).

For the formats that keep the NF4 base, every frozen bitsandbytes linear is
replaced by an `NF4Linear`: the exact NF4 bytes it was trained against,
exported as `com.microsoft::MatMulBnb4`, plus (if the layer is adapted and
its rank is above 0) a low-rank branch x A^T (s B diag(E))^T of that layer's
own rank. In "input" mode the branch's two matrices come from graph inputs,
so one graph serves adapters of any rank pattern. Heads and other plain
modules stay as they are. Merged formats are built layer by layer in
`streamed` instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qelalora.method.layer import ElaLoRALinear

NF4, FP4 = 1, 0  # MatMulBnb4's quant_type attribute


def _bnb_linear_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def nf4_parts(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, int]:
    """(packed uint8, fp32 absmax, 16-entry code, K, N, block, quant_type) of a Linear4bit.

    Double quantisation is undone here: ONNX Runtime wants one fp32 absmax per block.
    """
    import bitsandbytes.functional as bnbf

    weight = base.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("NF4 weights are in bitsandbytes' CPU inference layout; load the model with qelalora")
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n, k = state.shape
    quant_type = NF4 if state.quant_type == "nf4" else FP4
    return weight.data.flatten(), absmax.float(), state.code.float(), k, n, state.blocksize, quant_type


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantisation in plain torch: high nibble first, one absmax per block."""
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten().long()[: n * k]
    values = code[idx].view(-1, block) * absmax[:, None]
    return values.flatten()[: n * k].view(n, k)


class _MatMulBnb4(torch.autograd.Function):
    """y = x @ dequant(W)^T; exports as one com.microsoft::MatMulBnb4 node."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, k, n, block, quant_type):
        return F.linear(x, dequantize_packed(packed, absmax, code, n, k, block).to(x.dtype))

    @staticmethod
    def symbolic(g, x, packed, absmax, code, k, n, block, quant_type):
        y = g.op("com.microsoft::MatMulBnb4", x, packed, absmax, K_i=k, N_i=n, block_size_i=block, quant_type_i=quant_type)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter the output shape: [..., N]
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y


class NF4Linear(nn.Module):
    """A frozen NF4 linear for export, with an optional low-rank adapter branch."""

    def __init__(self, base: nn.Module, adapter: ElaLoRALinear | None = None, adapter_as_input: bool = False):
        super().__init__()
        packed, absmax, code, self.k, self.n, self.block, self.quant_type = nf4_parts(base)
        self.register_buffer("packed", packed.clone())
        self.register_buffer("absmax", absmax.clone())
        self.register_buffer("code", code.clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().float().clone(), requires_grad=False)
        self.adapter_as_input = adapter_as_input
        self.branch: tuple[torch.Tensor, torch.Tensor] | None = None  # (A [r, K], s B diag(E) [N, r])
        if adapter is not None and adapter.rank > 0 and not adapter_as_input:
            a, b = branch_matrices(adapter)
            self.register_buffer("lora_a", a)
            self.register_buffer("lora_b", b)
            self.branch = (self.lora_a, self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulBnb4.apply(x, self.packed, self.absmax, self.code, self.k, self.n, self.block, self.quant_type)
        if self.bias is not None:
            y = y + self.bias
        if self.branch is not None:
            a, b = self.branch
            y = y + F.linear(F.linear(x, a), b)
        return y


def branch_matrices(adapter: ElaLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s B diag(E)): the two matrices of a layer's low-rank branch."""
    with torch.no_grad():
        return adapter.lora_A.detach().clone(), (adapter.lora_B * (adapter.lora_E * adapter.scaling)).detach().clone()


def _replace(model: nn.Module, build) -> list[str]:
    """Replace every ElaLoRA layer and every bitsandbytes linear (outermost first) by `build(module)`."""
    linear4 = _bnb_linear_class()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (ElaLoRALinear, linear4))]
    replaced = []
    for name, module in targets:
        if any(name.startswith(r + ".") for r in replaced):
            continue  # the NF4 base inside an ElaLoRA layer replaced as a whole
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, build(module))
        replaced.append(name)
    return replaced


def nf4_adapter_model(model: nn.Module, adapter_as_input: bool = False) -> dict[str, NF4Linear]:
    """In place: NF4 linears keep their bytes (MatMulBnb4); adapted ones get their branch. Returns the adapted ones."""
    adapted: dict[str, NF4Linear] = {}

    def build(module):
        if isinstance(module, ElaLoRALinear):
            layer = NF4Linear(module.base, module, adapter_as_input)
            adapted[_name_of[id(module)]] = layer
            return layer
        return NF4Linear(module)

    _name_of = {id(m): n for n, m in model.named_modules()}
    _replace(model, build)
    return adapted
