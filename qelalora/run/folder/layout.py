"""The run folder: the one place that names its files, and the writer that writes them whole (torch-free).

    RUN/
      recipe.yaml          the recipe with every default filled in (written first: a folder with it is a run)
      memory_plan.json     the plan made before any weight loads
      metrics.jsonl        loss, learning rate, rank and bytes per logged step; validation; the held-out scores
      checkpoints/         step-NNNNNNNN/ with tensors.safetensors, state.json, manifest.json (run/train/checkpoint.py)
      adapter/             adapter.safetensors + adapter_config.json: qelalora's format (run/folder/adapter_io.py)
      peft/                adapter_model.safetensors + adapter_config.json: the same adapter as PEFT LoRA
      rank_pattern.json    initial and final rank per layer, and every round; rank_final.png, rank_heatmap.png
      memory.json          the plan beside the memory measured
      report.json          the summary `qelalora report` prints
      onnx/, onnx-genai/   where `qelalora export` writes by default (export/layout.py names what is inside)
      .qelalora.lock       held while a process trains into the folder (run/folder/run_lock.py)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qelalora.errors import RunDirError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"  # in any adapter folder
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's name; its config is ADAPTER_CONFIG too
CHECKPOINT_TENSORS, CHECKPOINT_STATE, CHECKPOINT_MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
CHECKPOINT_PREFIX = "step-"
LOCK_NAME = ".qelalora.lock"
EXPORT_DIR, GENAI_EXPORT_DIR = "onnx", "onnx-genai"  # `qelalora export`'s default destinations in a run folder
RUNS = Path("runs")  # where `qelalora train` puts a run not named with -o


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to `path` via a temporary file beside it and a rename, so a reader sees all of it or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder, and what reads or changes the folder as a whole."""

    path: Path

    @staticmethod
    def new_name(recipe_name: str) -> Path:
        """`runs/<recipe>-<date>-<time>`: a fresh folder for a run not named on the command line."""
        return RUNS / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    recipe = property(lambda self: self.path / "recipe.yaml")
    memory_plan = property(lambda self: self.path / "memory_plan.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    adapter_weights = property(lambda self: self.adapter / ADAPTER_WEIGHTS)
    adapter_config = property(lambda self: self.adapter / ADAPTER_CONFIG)
    peft = property(lambda self: self.path / "peft")
    rank_pattern = property(lambda self: self.path / "rank_pattern.json")
    rank_final = property(lambda self: self.path / "rank_final.png")
    rank_heatmap = property(lambda self: self.path / "rank_heatmap.png")
    memory = property(lambda self: self.path / "memory.json")
    report = property(lambda self: self.path / "report.json")
    lock = property(lambda self: self.path / LOCK_NAME)

    def export_dir(self, fmt: str) -> Path:
        """`qelalora export`'s default destination: `onnx/` (every precision), `onnx-genai/` (ONNX Runtime GenAI's)."""
        return self.path / (GENAI_EXPORT_DIR if fmt == "genai" else EXPORT_DIR)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"

    def require(self, paths: tuple[Path, ...], what: str, advice: str = "") -> None:
        """Stop with the names of `paths` that are missing: `RUN is not <what> (missing ...)`."""
        missing = [str(p.relative_to(self.path)) for p in paths if not p.is_file()]
        if missing:
            raise RunDirError(f"{self.path} is not {what} (missing {', '.join(missing)}){advice}")

    def require_trained(self) -> None:
        """A run whose adapters were written: what `export` and loading a run back need."""
        self.require((self.recipe, self.adapter_weights, self.adapter_config), "a finished qelalora run", "; train it first")

    def require_resumable(self) -> None:
        self.require((self.recipe,), "a qelalora run directory", "; cannot resume")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Check (resume) or empty (new run) a run folder that this process holds the lock of."""
        if resume:
            self.require_resumable()
            return
        entries = [p for p in self.path.iterdir() if p.name != LOCK_NAME] if self.path.exists() else []
        if entries:
            if not overwrite:
                raise RunDirError(f"{self.path} already exists and is not empty; pass --overwrite to replace it, or choose another --run-dir")
            for entry in entries:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def remove_if_empty(self) -> None:
        """A run that stopped before writing anything (bad data, say) leaves no empty folder behind."""
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, forget log lines written after the checkpoint the run continues from."""
        if not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics.write_text("".join(line + "\n" for line in kept))
