"""Probe, outside the product: a PiSSA-style principal start at fixed rank, before building it into qelalora.

Each adapted layer starts with A, E, B from the top-r SVD of its (dequantised
NF4) base weight, s B diag(E) A = U_r S_r V_r^T, and a frozen copy of that
product is subtracted in the forward pass, so the model at step 0 is the NF4
base (PiSSA's training dynamics without re-quantising a residual base; all of
S sits in E here, where PiSSA splits sqrt(S) between A and B).
Rank rounds are off (`fixed`), so no triplet is pruned. MiniLM, validation split.

    python bench/probe_principal.py --rank 2 --seed 0 [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import quality  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "probe_principal.jsonl"


def principal_start(layers) -> None:
    import torch
    import torch.nn.functional as F

    from qelalora.method.base_weight import dequantized_base_weight

    with torch.no_grad():
        for layer in layers.values():
            u, s, vh = torch.linalg.svd(dequantized_base_weight(layer.base).cpu(), full_matrices=False)
            r = layer.rank
            layer.lora_A.copy_(vh[:r])
            layer.lora_B.copy_(u[:, :r])
            layer.lora_E.copy_(s[:r] / layer.scaling)
            layer.register_buffer("offset", layer.delta_weight().detach().clone(), persistent=False)
            plain = layer.forward

            def forward(self, x, plain=plain):
                return plain(x) - F.linear(x.to(self.offset.dtype), self.offset).to(x.dtype)

            layer.forward = types.MethodType(forward, layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    original = quality.ElaLoRAMethod.__init__

    def patched(self, *a, **kw):
        original(self, *a, **kw)
        principal_start(self.state.layers)

    quality.ElaLoRAMethod.__init__ = patched
    cell = quality.Cell("minilm", "fixed", args.rank, args.seed, split="val", lr=args.lr)
    result = quality.run_cell(cell, args.threads)
    result.update(key=f"{cell.key}/principal", start="principal-offset")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{cell.key} lr {args.lr or 'task'}: {result['metric']:.4f} (loss {result['final_loss']:.3f})")


if __name__ == "__main__":
    main()
