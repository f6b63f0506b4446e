"""The runtimes people put an export on: transformers.js in Node, and the export's page in headless Chromium
(transformers.js over onnxruntime-web's WASM build), each answering as `qelalora infer` does.

They need Node's npm (transformers.js and puppeteer-core are installed from npm once, into QELALORA_JS_DIR or a
per-user cache) and, for the page, Debian's `chromium`; without them they skip and say why."""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from qelalora.export.exporter import export_run
from qelalora.export.runtime import open_export
from tests.cli_helpers import run_cli, write_cls_data, write_lm_data, write_recipe

JS = Path(__file__).parent / "js"
PUPPETEER = "puppeteer-core@24.43.1"
PRECISIONS = {"merged-fp32": "fp32", "merged-int8": "q8", "merged-int4": "q4"}


@pytest.fixture(scope="module")
def js_dir():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js and npm are not installed (apt install nodejs npm)")
    from qelalora.errors import UserError
    from qelalora.export.web import node_modules

    try:
        return node_modules().parent
    except UserError as err:
        pytest.skip(f"transformers.js could not be installed from npm: {err}")


def _train(tmp_path_factory, name, model_dir, causal):
    from qelalora.run.recipe import load_recipe
    from qelalora.run.train.loop import run_train

    folder = tmp_path_factory.mktemp(name)
    data = write_lm_data(folder / "d.jsonl") if causal else write_cls_data(folder / "d.jsonl")
    recipe = write_recipe(folder / "r.yaml", model_dir, data, causal=causal)
    if not causal:  # classes with names, as the default job's
        text = yaml.safe_load(recipe.read_text())
        text["data"]["label_names"] = ["negative", "positive"]
        recipe.write_text(yaml.safe_dump(text))
    run_train(load_recipe(str(recipe)), folder / "run", progress=False, log=lambda *a: None)
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, tiny_llama_dir):
    return {"bert": _train(tmp_path_factory, "bert", tiny_bert_dir, False),
            "llama": _train(tmp_path_factory, "llama", tiny_llama_dir, True)}


TEXTS = {"bert": ["tok1 tok2 tok3", "tok4 tok5", "tok9"], "llama": ["def add(a, b):", "tok3 tok4"]}


def _node(*args, timeout=300) -> list[dict]:
    done = subprocess.run(["node", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expected(folder: Path, fmt: str, arch: str):
    """`qelalora infer`'s answers (its runtime, ONNX Runtime in Python), in the JS drivers' shape."""
    model = open_export(folder, fmt=fmt)
    if arch == "bert":
        return [{"name": r["name"], "probabilities": r["probabilities"]} for r in model.classify(TEXTS[arch])]
    return [model.generate_ids(model.tokenizer(p)["input_ids"], 32) for p in TEXTS[arch]]


def _check(got: list[dict], expected, arch: str, names: list[str] | None = None, atol: float = 3e-4) -> None:
    """The same label names and probabilities within `atol` (`infer` prints 4 decimals), or the same greedy ids."""
    if arch == "bert":
        for g, e in zip(got, expected, strict=True):
            scores = {s["label"]: s["score"] for s in g["scores"]}
            assert g["scores"][0]["label"] == e["name"]
            assert np.allclose([scores[n] for n in names], e["probabilities"], atol=atol)
    else:
        assert [g["ids"] for g in got] == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_transformers_js_in_node_opens_every_precision_as_written(arch, runs, js_dir, tmp_path):
    folder = tmp_path / "onnx"
    for fmt in PRECISIONS:
        export_run(runs[arch], folder, fmt, log=lambda *a: None)
    config = json.loads((folder / "config.json").read_text())
    names = None
    if arch == "bert":
        names = ["negative", "positive"]
        assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["transformers.js_config"] == {"dtype": "q4"}
    for fmt, dtype in PRECISIONS.items():
        got = _node(JS / "node_run.mjs", js_dir, folder, dtype, json.dumps(TEXTS[arch]), 32)
        _check(got, _expected(folder, fmt, arch), arch, names)


@pytest.fixture(scope="module")
def browser(js_dir):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt install chromium)")
    if not (js_dir / "node_modules" / "puppeteer-core").is_dir():
        done = subprocess.run(["npm", "install", "--prefix", str(js_dir), "--no-audit", "--no-fund", "--ignore-scripts",
                               PUPPETEER], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"npm could not install {PUPPETEER}: {done.stderr.strip()[-300:]}")
    return chromium


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", [("bert", "merged-int8"), ("llama", "merged-int4")])
def test_the_export_page_answers_in_chromium_as_qelalora_infer_does(arch, fmt, runs, js_dir, browser, tmp_path, capsys):
    from qelalora.export.layout import format_info
    from qelalora.export.serve import make_server

    folder = tmp_path / "onnx"
    code, _, err = run_cli(capsys, "export", str(runs[arch]), "-f", fmt, "--web", "-o", str(folder))
    assert code == 0, err
    page = (folder / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # every script and WASM file from the folder
    assert sorted(p.name for p in (folder / "web").iterdir()) == [
        "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
        "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm", "transformers.min.js"]
    server = make_server(folder, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/?device=wasm"
        shot = os.environ.get("QELALORA_SCREENSHOTS")
        args = [JS / "browser_run.mjs", js_dir, url, json.dumps(TEXTS[arch])]
        got = _node(*args, *([Path(shot) / f"page-{arch}.png"] if shot else []), timeout=600)
    finally:
        server.shutdown()
        server.server_close()
    _check(got, _expected(folder, fmt, arch), arch, ["negative", "positive"] if arch == "bert" else None, atol=1e-3)
    assert format_info(folder, fmt)["weight_only"]["accuracy_level"] is None  # fp32 compute, as the WASM kernels'
    assert not format_info(folder, fmt)["weight_only"]["embeddings"]  # no GatherBlockQuantized in the WASM build
    export_run(runs[arch], folder, "merged-fp32", log=lambda *a: None)  # a precision added later is offered too
    settings = json.loads(page.split("const SETTINGS = ")[1].split(";\n")[0])
    assert settings["dtypes"] == [PRECISIONS[fmt]]
    page = (folder / "index.html").read_text()
    assert json.loads(page.split("const SETTINGS = ")[1].split(";\n")[0])["dtypes"] == [PRECISIONS[fmt], "fp32"]


@pytest.mark.parametrize("arch,fmt", [("bert", "merged-int8"), ("llama", "merged-int4")])
def test_mobile_writes_an_ort_file_that_runs_as_the_graph_does(arch, fmt, runs, tmp_path, capsys):
    from qelalora.export.layout import format_info

    folder = tmp_path / "onnx"
    code, out, err = run_cli(capsys, "export", str(runs[arch]), "-f", fmt, "--mobile", "-o", str(folder))
    assert code == 0, err
    info = format_info(folder, fmt)
    ort_file, operators = folder / info["mobile"]["file"], folder / info["mobile"]["operators"]
    assert ort_file.name == Path(info["file"]).name.replace(".onnx", ".ort") and "ONNX Runtime Mobile" in out
    listed = operators.read_text()
    assert "com.microsoft;1;" in listed and "MatMulNBits" in listed and str(tmp_path) not in listed
    assert 0.5 * info["files"][info["file"]] < info["files"][info["mobile"]["file"]] < 1.5 * info["files"][info["file"]]
    graph, mobile = open_export(folder, fmt=fmt), open_export(folder, fmt=fmt, mobile=True)
    rows = [graph.tokenizer(t)["input_ids"] for t in TEXTS[arch]]
    for row in rows:
        want, got = graph.logits([row]), mobile.logits([row])
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    check = info["mobile"]["parity"]
    assert abs(check["metric_delta"] - info["parity"]["metric_delta"]) <= 1e-3 * max(1.0, abs(check["metric_pytorch"]))
    if arch == "llama":
        assert mobile.generate_ids(rows[0], 32) == graph.generate_ids(rows[0], 32)
        assert not info["weight_only"]["embeddings"]  # the ORT format has no type for a 4-bit table's zero points
        code, _, err = run_cli(capsys, "export", str(runs[arch]), "-f", fmt, "--mobile", "--int4-embeddings",
                               "-o", str(tmp_path / "x"))
        assert code == 2 and "cannot hold a 4-bit embedding table" in err
