"""The numerical check of an export: ONNX Runtime against the PyTorch model the run trained.

Reference outputs are taken from the trained (unpruned) PyTorch model before
anything is changed; the exported folder is then run with the same
torch-free runtime users get (`runtime.open_export`: ONNX Runtime, or ONNX
Runtime GenAI for `genai` folders).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qelalora.run.data import collate, evaluate
from qelalora.errors import UserError

# Max |logit difference| allowed per format, per unit of the largest |logit| (at least 1): a 30-layer
# LM with logits near 20 accumulates fp32 rounding that a 2-class head does not. None: report the
# task-metric delta instead.
THRESHOLDS = {
    "merged-fp32": 1e-4,
    "nf4-adapters": 1e-3,
    "swappable": 1e-3,
    "merged-fp16": 1e-2,
    "merged-int8": None,
    "merged-int8-dynamic": None,
    "merged-int4": None,
    "genai-fp32": 1e-4,
    "genai-fp16": 1e-2,
    "genai-int4": None,
    "genai-int4-mixed": None,
}
GREEDY_TOKENS = 32


class ParityError(UserError):
    """The exported graph does not reproduce the PyTorch model closely enough."""

    exit_code = 6


@dataclass
class Reference:
    """What the PyTorch model produced on the held-out inputs."""

    rows: list[list[int]]
    logits: np.ndarray  # [batch, (seq,) classes or vocab], padded positions zeroed for decoders
    mask: np.ndarray
    metric: dict
    greedy_prompt: list[int] | None = None
    greedy_tokens: list[int] | None = None


@torch.no_grad()
def reference_outputs(model, task: str, examples: list[dict], pad_id: int, metric_examples: list[dict], eos_id) -> Reference:
    batch = collate(examples, pad_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().numpy()
    mask = batch["attention_mask"].numpy()
    metric = evaluate(model, metric_examples, task, 16, pad_id, "cpu")
    ref = Reference([list(e["input_ids"]) for e in examples], out, mask, metric)
    if task == "causal-lm":
        prompt = list(examples[0]["input_ids"][:16])
        generated = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
        )
        ref.greedy_prompt, ref.greedy_tokens = prompt, generated[0, len(prompt):].tolist()
    return ref


def check(edge, ref: Reference, fmt: str, metric_examples: list[dict]) -> dict:
    """Compare an EdgeModel with the reference; raises ParityError past the format's threshold."""
    got = edge.logits(ref.rows)
    if got.ndim == 3:  # decoders: compare real (unpadded) positions only
        keep = ref.mask.astype(bool)
        diff = float(np.abs(got[keep] - ref.logits[keep]).max())
        agree = float((got[keep].argmax(-1) == ref.logits[keep].argmax(-1)).mean())
    else:
        diff = float(np.abs(got - ref.logits).max())
        agree = float((got.argmax(-1) == ref.logits.argmax(-1)).mean())
    scale = max(1.0, float(np.abs(ref.logits).max()))
    result = {"max_abs_logit_diff": diff, "logit_scale": scale, "argmax_agreement": agree, "threshold": THRESHOLDS[fmt],
              "examples": len(ref.rows)}
    metric = edge.evaluate(metric_examples)
    key = "accuracy" if "accuracy" in metric else "perplexity"
    result.update({"metric": key, "metric_pytorch": ref.metric[key], "metric_onnx": metric[key],
                   "metric_delta": metric[key] - ref.metric[key]})
    if ref.greedy_tokens is not None:
        tokens = edge.generate_ids(ref.greedy_prompt, GREEDY_TOKENS)
        n = min(len(tokens), len(ref.greedy_tokens))
        result["greedy_tokens_equal"] = tokens == ref.greedy_tokens
        result["greedy_first_mismatch"] = next((i for i in range(n) if tokens[i] != ref.greedy_tokens[i]), None if len(tokens) == len(ref.greedy_tokens) else n)
    threshold = THRESHOLDS[fmt]
    if threshold is not None and diff > threshold * scale:
        raise ParityError(
            f"{fmt}: ONNX Runtime differs from PyTorch by {diff:.3g} in the logits "
            f"(allowed {threshold:g} x the largest logit magnitude {scale:.3g} = {threshold * scale:.3g})"
        )
    exact = threshold is not None and threshold <= 1e-3  # fp16 may flip a near-tie token: reported, not fatal
    if exact and ref.greedy_tokens is not None and not result["greedy_tokens_equal"]:
        raise ParityError(f"{fmt}: greedy generation differs from PyTorch at token {result['greedy_first_mismatch']}")
    return result
