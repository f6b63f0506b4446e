"""The numerical check of an export: ONNX Runtime against the PyTorch model the run trained.

Reference outputs are taken from the trained (unpruned) PyTorch model before
anything is changed; the exported folder is then run with the same
torch-free runtime users get (`runtime.open_export`: ONNX Runtime, or ONNX
Runtime GenAI for `genai` folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qelalora.errors import UserError
from qelalora.run.train.evaluate import evaluate

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
LOGITS_BYTES = 128 * 2**20  # one evaluation batch's fp32 logits at most: a 262k-token vocabulary gets small batches


def batch_size(examples: list[dict], vocab: int, most: int = 16) -> int:
    """Examples per evaluation batch, so that a batch's logits stay under `LOGITS_BYTES` (at least one)."""
    longest = max((len(e["input_ids"]) for e in examples), default=1)
    return max(1, min(most, LOGITS_BYTES // (4 * longest * vocab)))


class ParityError(UserError):
    """The exported graph does not reproduce the PyTorch model closely enough."""

    exit_code = 6


@dataclass
class Reference:
    """What the PyTorch model produced on the held-out inputs. Each row's logits are kept in a file of their
    own in `folder` (a decoder's are rows x vocabulary: 1 GiB for 8 rows of 128 tokens over 262k), read back
    one at a time by the check."""

    rows: list[list[int]]
    folder: Path
    metric: dict
    scale: float  # the largest |logit|
    greedy_prompt: list[int] | None = None
    greedy_tokens: list[int] | None = None

    def logits(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"{i}.npy")


@torch.no_grad()
def reference_outputs(model, task: str, examples: list[dict], pad_id: int, metric_examples: list[dict], eos_id,
                      folder: Path) -> Reference:
    """The trained model's outputs on the held-out rows (one at a time, kept in `folder`), its task metric and,
    for decoders, its greedy tokens."""
    scale = 0.0
    for i, example in enumerate(examples):
        ids = torch.tensor([example["input_ids"]])
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()
        scale = max(scale, float(np.abs(out).max()))
        np.save(folder / f"{i}.npy", out)
        del out
    vocab = model.config.vocab_size if task == "causal-lm" else 1
    metric = evaluate(model, metric_examples, task, batch_size(metric_examples, vocab), pad_id, "cpu")
    ref = Reference([list(e["input_ids"]) for e in examples], folder, metric, max(1.0, scale))
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
    diff, agreeing, positions, vocab = 0.0, 0, 0, 1
    for i, row in enumerate(ref.rows):  # one row at a time: unpadded, so every position is compared
        got, want = edge.logits([row])[0], ref.logits(i)
        agreeing += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += int(np.prod(want.shape[:-1]))
        vocab = got.shape[-1] if got.ndim == 2 else 1
        np.subtract(got, want, out=want)  # in place: a row of a 262k-token vocabulary's logits is 1 MiB a token
        diff = max(diff, float(np.abs(want, out=want).max()))
        del got, want
    agree = agreeing / max(positions, 1)
    scale = ref.scale
    result = {"max_abs_logit_diff": diff, "logit_scale": scale, "argmax_agreement": agree, "threshold": THRESHOLDS[fmt],
              "examples": len(ref.rows)}
    metric = edge.evaluate(metric_examples, batch_size(metric_examples, vocab))
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
