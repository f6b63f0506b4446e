"""Running an exported folder with ONNX Runtime alone: no torch import on this path.

An export folder (`layout`: the Hub layout) holds `tokenizer.json`, `qelalora_export.json`
(task, labels, the run's data section, one entry per format) and one graph per precision
under `onnx/`; the swappable format's `adapter.onnx_adapter` sits beside its graph.
Decoders are run with their KV cache (optimum's input layout: input_ids,
attention_mask, position_ids, past_key_values.N.key/value).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qelalora.errors import UserError

from .layout import format_info


def empty_past(inputs: dict, batch: int) -> dict[str, np.ndarray]:
    """An empty KV cache for a decoder graph's `past_key_values.*` inputs (none for other graphs)."""
    feed = {}
    for name, meta in inputs.items():
        if name.startswith("past_key_values."):
            heads, dim = meta.shape[1], meta.shape[3]
            feed[name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return feed


class EdgeTokenizer:
    """The `tokenizers` library behind the small interface `qelalora.run.data.records` needs."""

    def __init__(self, path: Path, eos_token_id: int | None, pad_token_id: int | None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation and max_length:
            ids = [x[:max_length] for x in ids]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def token_losses(logits: np.ndarray, labels: np.ndarray, positions: int = 16) -> float:
    """The summed cross-entropy of `labels` (-100: not counted) under `logits` [positions, vocab], a few positions
    at a time, so that a 262k-token vocabulary's temporaries stay small."""
    total = 0.0
    for start in range(0, len(labels), positions):
        pred, want = logits[start : start + positions], labels[start : start + positions]
        keep = want != -100
        top = pred.max(-1)
        log_norm = top + np.log(np.exp(pred - top[:, None]).sum(-1))
        total += float((log_norm - pred[np.arange(len(want)), np.where(keep, want, 0)])[keep].sum())
    return total


def open_export(folder: Path, threads: int | None = None, fmt: str | None = None, mobile: bool = False):
    """The runner for one format of an export folder (without `fmt`: its only one, or the one transformers.js
    opens by default): ONNX Runtime for the ONNX formats (`mobile`: its `.ort` file), ONNX Runtime GenAI for
    `genai`."""
    folder = Path(folder)
    info = format_info(folder, fmt)
    return GenaiModel(folder) if info["format"] == "genai" else EdgeModel(folder, threads, info["format"], mobile)


class Runner:
    """Generation and evaluation over `logits` and `generate_ids`, whichever runtime provides them."""

    task: str
    info: dict
    folder: Path

    @functools.cached_property
    def tokenizer(self) -> EdgeTokenizer:
        """Loaded on first use: checks that feed token ids never pay for it (a 262k-token vocabulary's tokenizer
        takes about 240 MiB)."""
        return EdgeTokenizer(self.folder / "tokenizer.json", self.info.get("eos_token_id"), self.info.get("pad_token_id"))

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        raise NotImplementedError

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        return self.tokenizer.decode(self.generate_ids(self.tokenizer(prompt)["input_ids"], max_new_tokens))

    def evaluate(self, examples: list[dict], batch_size: int = 16) -> dict:
        """Accuracy (classification) or token-weighted loss and perplexity (causal LM)."""
        if not examples:
            raise UserError("no examples to evaluate")
        examples = sorted(examples, key=lambda e: len(e["input_ids"]))  # each batch padded only to its neighbours
        if self.task == "seq-cls":
            correct = 0
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                pred = self.logits([e["input_ids"] for e in chunk]).argmax(-1)
                correct += int(sum(int(p) == e["labels"] for p, e in zip(pred, chunk)))
            return {"accuracy": correct / len(examples), "examples": len(examples)}
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            logits = self.logits([e["input_ids"] for e in chunk])
            for row, e in zip(logits, chunk):
                labels = np.array(e.get("labels", e["input_ids"]))[1:]
                loss_sum += token_losses(row[: len(labels)], labels)
                tokens += int((labels != -100).sum())
            del logits
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens}


def _run_options() -> ort.RunOptions:
    """Each run hands the memory-arena blocks it no longer uses back: the largest batch's buffers (a 262k-token
    vocabulary's logits are 1 MiB a token) would otherwise stay allocated for the session's life. On a 1B decoder
    this lowers a parity check's peak above the session from 380 to 325 MiB; without the arena it is 740 MiB."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class EdgeModel(Runner):
    """An exported ONNX graph, ready for classification, generation and evaluation."""

    def __init__(self, folder: Path, threads: int | None = None, fmt: str | None = None, mobile: bool = False):
        folder = Path(folder)
        self.folder = folder
        self.info = format_info(folder, fmt)
        graph = self.info["file"]
        if mobile:
            if not self.info.get("mobile"):
                raise UserError(f"{folder} has no .ort file for {self.info['format']}; export it with --mobile")
            graph = self.info["mobile"]["file"]
        if self.info.get("format") == "genai":
            raise UserError(f"{folder} is an ONNX Runtime GenAI folder: open it with open_export (GenaiModel)")
        self.task = self.info["task"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.run_options = _run_options()
        if self.info.get("adapter"):
            self.use_adapter(folder / self.info["adapter"])
        self.pad_id = self.info.get("pad_token_id") or 0
        self.has_cache = any(n.startswith("past_key_values.") for n in self.inputs)

    def use_adapter(self, path: Path) -> None:
        """Make the adapter in `path` (an .onnx_adapter file) the active one."""
        self._adapter = ort.LoraAdapter()  # kept alive: RunOptions only refers to it
        self._adapter.Load(str(path))
        self.run_options = _run_options()
        self.run_options.add_active_adapter(self._adapter)

    def _feed_ids(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return empty_past(self.inputs, batch)

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        """Logits for right-padded token rows (no cache: one full forward)."""
        feed = self._feed_ids(rows)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.maximum(np.cumsum(feed["attention_mask"], axis=1) - 1, 0)
        if self.has_cache:
            feed.update(self._empty_past(len(rows)))
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        return self.session.run(["logits"], feed, self.run_options)[0]

    def classify(self, texts: list[str]) -> list[dict]:
        max_length = self.info["data"]["max_length"]
        rows = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        logits = self.logits(rows)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        names = self.info.get("label_names")
        return [{"label": int(p.argmax()), **({"name": names[int(p.argmax())]} if names else {}),
                 "probabilities": [round(float(x), 4) for x in p]} for p in probs]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy decoding with the KV cache; returns the new token ids."""
        if not self.has_cache:  # logits-only graph (swappable decoders): one full forward per token
            new = []
            for _ in range(max_new_tokens):
                token = int(self.logits([list(prompt_ids) + new])[0, -1].argmax())
                new.append(token)
                if token == self.info.get("eos_token_id"):
                    break
            return new
        ids = np.array([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(ids.shape[1])[None], **self._empty_past(1)}
        out_names = [o.name for o in self.session.get_outputs()]
        new: list[int] = []
        for _ in range(max_new_tokens):
            outputs = dict(zip(out_names, self.session.run(out_names, {k: v for k, v in feed.items() if k in self.inputs}, self.run_options)))
            token = int(outputs["logits"][0, -1].argmax())
            new.append(token)
            if token == self.info.get("eos_token_id"):
                break
            past_len = mask.shape[1]
            mask = np.ones((1, past_len + 1), dtype=np.int64)
            feed = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": mask,
                    "position_ids": np.array([[past_len]], dtype=np.int64)}
            for name in out_names:
                if name.startswith("present."):
                    feed["past_key_values." + name[len("present."):]] = outputs[name]
        return new


class GenaiModel(Runner):
    """A `genai` export, run with ONNX Runtime GenAI (`og.Model`; a fresh `og.Generator` per sequence).

    Causal LMs only. `logits` runs each row as one prompt (the generator returns logits for every prompt
    position), so evaluation is exact per row, not batched.
    """

    def __init__(self, folder: Path):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError(f"{folder} is an ONNX Runtime GenAI folder: pip install 'qelalora[genai]' to run it") from None
        self.og, self.folder = og, Path(folder)
        self.info = format_info(self.folder, "genai")
        self.task = self.info["task"]
        self.model = og.Model(str(self.folder))
        self.adapters, self.loaded, self.active = None, set(), None
        if self.info.get("adapter"):  # built with --genai-adapters: the run's own adapter is active at first
            self.use_adapter(self.folder / self.info["adapter"])

    def use_adapter(self, path: Path) -> None:
        """Make the adapter in `path` (an .onnx_adapter file) the active one for every later generator; adapters
        stay loaded, so switching back is free."""
        if not self.info.get("adapter"):
            raise UserError("this genai export has its adapters merged; export with --genai-adapters to switch them")
        path = Path(path)
        if self.adapters is None:
            self.adapters = self.og.Adapters(self.model)
        name = str(path.resolve())
        if name not in self.loaded:
            self.adapters.load(name, name)
            self.loaded.add(name)
        self.active = name

    def _generator(self, prompt_ids, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        generator = self.og.Generator(self.model, params)
        if self.active is not None:
            generator.set_active_adapter(self.adapters, self.active)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        return generator

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        """Logits for every position of each row, right-padded with zeros to the longest row."""
        out = None
        for i, row in enumerate(rows):
            got = self._generator(row, len(row) + 1).get_output("logits")[0]
            if out is None:
                out = np.zeros((len(rows), max(len(r) for r in rows), got.shape[-1]), dtype=np.float32)
            out[i, : len(row)] = got
        return out

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy decoding; stops at the model's end-of-sequence token as PyTorch's generate does."""
        generator = self._generator(prompt_ids, len(prompt_ids) + max_new_tokens)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new
