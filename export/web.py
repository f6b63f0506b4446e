"""`--web`: a static page beside an export that classifies or generates in the browser with transformers.js
(onnxruntime-web: WASM, or WebGPU where the browser has it).

Every script and WASM file the page loads is copied into the folder (`web/`) from transformers.js's npm package,
which is installed once per machine with npm; at page load nothing is fetched from a CDN or the Hub. Any static
server works (`qelalora serve FOLDER`); the page reads the graphs from the folder it sits in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from qelalora.errors import UserError

from .layout import GRAPHS, read_summary

PACKAGE, VERSION = "@huggingface/transformers", "4.3.2"
# page file -> where it is in node_modules: the self-contained browser build, and onnxruntime-web's runtimes for
# WASM (asyncify) and WebGPU (jsep), each a loader and its WASM binary (about 27 MB each)
ASSETS = {
    "transformers.min.js": "@huggingface/transformers/dist/transformers.min.js",
    **{f"ort-wasm-simd-threaded.{kind}.{ext}": f"onnxruntime-web/dist/ort-wasm-simd-threaded.{kind}.{ext}"
       for kind in ("asyncify", "jsep") for ext in ("mjs", "wasm")},
}
PAGE, ASSET_DIR = "index.html", "web"
# operators ONNX Runtime has on the CPU but onnxruntime-web's WASM build does not (a session fails to load)
MISSING_IN_WASM = {"GatherBlockQuantized", "MatMulBnb4"}


def node_modules() -> Path:
    """transformers.js's `node_modules`: under $QELALORA_JS_DIR, else a per-user cache, installed there with npm
    on first use (`--ignore-scripts`: the browser build needs no native binaries)."""
    root = Path(os.environ.get("QELALORA_JS_DIR") or Path.home() / ".cache" / "qelalora" / f"transformers.js-{VERSION}")
    modules = root / "node_modules"
    if all((modules / path).is_file() for path in ASSETS.values()):
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("--web copies transformers.js from npm once per machine; install Node.js's npm "
                        "(e.g. apt install npm) or point QELALORA_JS_DIR at a folder whose node_modules holds "
                        f"{PACKAGE}@{VERSION}")
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", "--ignore-scripts",
                           f"{PACKAGE}@{VERSION}"], capture_output=True, text=True)
    missing = [path for path in ASSETS.values() if not (modules / path).is_file()]
    if done.returncode or missing:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"npm could not install {PACKAGE}@{VERSION} into {root}: {last[:300]}")
    return modules


def _ops(graph: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(graph), load_external_data=False).graph.node}


def write_page(folder: Path, assets: bool = True) -> list[str]:
    """Write `index.html` (and with `assets` the scripts and WASM files it loads) into an export folder; returns
    the transformers.js dtypes it offers (every precision in the folder that runs in the browser, the config's
    default first)."""
    summary = read_summary(folder)
    if summary["task"] not in ("seq-cls", "causal-lm"):
        raise UserError(f"--web: no page for task {summary['task']!r}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    default = config.get("transformers.js_config", {}).get("dtype")
    dtypes = [GRAPHS[f][1] for f in GRAPHS if f in summary["formats"] and GRAPHS[f][1]
              and not _ops(folder / summary["formats"][f]["file"]) & MISSING_IN_WASM]
    if not dtypes:
        raise UserError("--web: this folder holds no precision that runs in the browser (swappable graphs take their "
                        "adapter as inputs; nf4-adapters and quantised embedding tables use operators onnxruntime-web "
                        "lacks); export merged-int4, merged-int8 or merged-fp32 with --web")
    dtypes.sort(key=lambda d: d != default)
    if assets:
        modules = node_modules()
        (folder / ASSET_DIR).mkdir(exist_ok=True)
        for name, path in ASSETS.items():
            shutil.copyfile(modules / path, folder / ASSET_DIR / name)
    settings = {"task": summary["task"], "dtypes": dtypes, "model": summary.get("base_model")}
    template = resources.files("qelalora.export").joinpath("web_page.html").read_text(encoding="utf-8")
    page = template.replace("/*SETTINGS*/{}", json.dumps(settings))
    partial = folder / f".{PAGE}.partial"
    partial.write_text(page, encoding="utf-8")
    partial.replace(folder / PAGE)
    return dtypes
