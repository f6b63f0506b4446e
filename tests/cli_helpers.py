"""Recipes and data files for CLI tests on the tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from qelalora.cli import main

POSITIVE = ["good great film", "lovely warm funny", "smart moving acting", "great good lovely"]
NEGATIVE = ["bad awful movie", "dull boring weak", "poor messy jokes", "awful dull poor"]


def write_cls_data(path: Path, n: int = 120) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            text, label = (POSITIVE[i % 4], 1) if i % 2 else (NEGATIVE[i % 4], 0)
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def write_lm_data(path: Path, n: int = 120) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "def add(a, b):", "completion": f" return a + b  # {i % 7}"}) + "\n")
    return path


def write_recipe(path: Path, model_dir: str, data: Path, causal: bool = False, **sections) -> Path:
    recipe = {
        "model": {"name": model_dir, "quantize": "nf4"},
        "data": {"source": str(data), "max_length": 24, "val_size": 16, "test_size": 16},
        "train": {"steps": 30, "batch_size": 8, "lr": 5e-3, "checkpoint_every": 10, "log_every": 5, "warmup_steps": 2},
        "elalora": {"budget_mb": 0.3, "t_init": 5, "t_final": 8, "delta": 3, "b0": 3},
    }
    if causal:
        recipe["data"].update(prompt_field="prompt", completion_field="completion")
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `qelalora ARGS` in this process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_process(*args, **kwargs) -> subprocess.Popen:
    """`python -m qelalora ARGS` as a child process (stdout+stderr to a pipe)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qelalora", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs
    )
