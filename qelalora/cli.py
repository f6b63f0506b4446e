"""The `qelalora` command line: train, plan, recipes, report, export, infer, serve, eval. It parses and prints;
the work is the run's and the exporter's.

Errors the user can fix are printed as one paragraph with a non-zero exit
code; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError
from .run.folder.layout import EXPORT_DIR, GENAI_EXPORT_DIR

app = typer.Typer(
    name="qelalora",
    help="ElaLoRA fine-tuning over a 4-bit NF4 base under a hard memory budget, for edge deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Shipped recipe name or YAML file (default: minilm-l6-rotten-tomatoes).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any recipe key: section.key=value (repeatable).")]
BudgetOpt = Annotated[Optional[float], typer.Option("--budget-mb", help="Hard cap on adapter training state, MiB (elalora.budget_mb).")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _overrides(sets, budget_mb=None, steps=None, model=None, data=None, device=None, seed=None) -> list[str]:
    out = list(sets or [])
    for key, value in (("elalora.budget_mb", budget_mb), ("train.steps", steps), ("model.name", model),
                       ("data.source", data), ("train.device", device), ("train.seed", seed)):
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return out


@app.command()
def train(
    recipe: RecipeOpt = None,
    budget_mb: BudgetOpt = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (train.steps).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model: hub id, local folder or embedded:... (model.name).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data: file path or built-in set (data.source).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (train.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (train.seed).")] = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Output folder (default: runs/<recipe>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder from its last good checkpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, non-empty run folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[int, typer.Option(help="Train with N processes on this machine (starts torchrun; N GPUs, or CPU cores shared).", min=1)] = 1,
):
    """Train ElaLoRA adapters. With no recipe: MiniLM-L6 (NF4) on Rotten Tomatoes sentiment.

    Examples:

      qelalora train --budget-mb 512

      qelalora train -r smollm2-135m-python-docs --budget-mb 64 --steps 200

      qelalora train -r my.yaml --set train.lr=1e-4 --set elalora.b0=8 -o runs/mine

      qelalora train --resume runs/mine

      qelalora train -r my.yaml -o runs/two --nproc 2     (or: torchrun --nproc-per-node 2 -m qelalora train ...)
    """
    from .run.folder.layout import RunFolder
    from .run.recipe import DEFAULT_RECIPE, load_recipe
    from .run.train.distributed import relaunch
    from .run.train.loop import run_train

    _quiet_libraries()
    if resume is not None:
        if any(v is not None for v in (recipe, budget_mb, steps, model, data, device, seed)) or set_:
            raise UserError("--resume continues a run with its saved recipe; give no recipe options with it")
        if nproc > 1:
            relaunch(nproc, ["--resume", str(resume)], progress)
        run_train(None, resume, resume=True, progress=progress)
        return
    sets = _overrides(set_, budget_mb, steps, model, data, device, seed)
    loaded = load_recipe(recipe, sets)
    if run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("with several processes, name the run folder with -o/--run-dir so that all of them write to the same one")
    out = run_dir or RunFolder.new_name(Path(recipe).stem if recipe else DEFAULT_RECIPE)
    if nproc > 1:
        args = (["-r", recipe] if recipe else []) + [a for s in sets for a in ("--set", s)] + ["-o", str(out)]
        relaunch(nproc, args + (["--overwrite"] if overwrite else []), progress)
    run_train(loaded, out, overwrite=overwrite, progress=progress)


@app.command()
def plan(
    recipe: RecipeOpt = None,
    budget_mb: BudgetOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Model (model.name).")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    measure: Annotated[bool, typer.Option(help="Also load the model and run two steps at the recipe's largest batch; "
                                                 "print measured memory beside the plan.")] = False,
    gpu_gb: Annotated[Optional[float], typer.Option(help="Also plan for a CUDA GPU of this many GB (bf16 compute): "
                                                         "what fits with and without gradient checkpointing.")] = None,
):
    """Show the memory plan (initial ranks, adapter bytes, predicted footprint) without training.

    Activations come from one step traced on fake tensors; on a CPU the plan also predicts the peak RSS.

    Examples:

      qelalora plan --budget-mb 512

      qelalora plan -r llama-3.1-8b --budget-mb 512 --json

      qelalora plan --budget-mb 512 --measure            (loads the model and runs two steps)

      qelalora plan -r llama-3.1-8b --gpu-gb 24           (what fits a 24 GB card; no weights needed)
    """
    from .run.plan.memory_plan import describe_gpu_fit, gpu_fit, memory_plan
    from .run.recipe import load_recipe

    _quiet_libraries()
    loaded = load_recipe(recipe, _overrides(set_, budget_mb, model=model))
    measured = None
    if measure:
        from .run.train.measure import measure as run_measure

        result, measured = run_measure(loaded)  # the run that measures makes the plan, as `train` does
    else:
        result = memory_plan(loaded)
    gpu = gpu_fit(loaded, gpu_gb) if gpu_gb else None
    if as_json:
        extra = {**({"gpu": gpu} if gpu else {}), **({"measured": measured} if measured else {})}
        typer.echo(json.dumps({**result.to_dict(), **extra}, indent=2))
        return
    typer.echo(result.describe())
    if gpu:
        typer.echo(describe_gpu_fit(gpu))
    if measured:
        from .run.train.measure import describe

        typer.echo(describe(measured))


@recipes_app.command("list")
def recipes_list():
    """List the shipped recipes.

    Example: qelalora recipes list
    """
    from .run.recipe import load_recipe, shipped_recipes

    for name in sorted(shipped_recipes()):
        r = load_recipe(name)
        typer.echo(f"{name:32s} {r.model.name:40s} {r.description.splitlines()[0] if r.description else ''}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or YAML file.")]):
    """Print a recipe with every default filled in.

    Example: qelalora recipes show minilm-l6-rotten-tomatoes
    """
    from .run.recipe import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(name)))


@recipes_app.command("validate")
def recipes_validate(paths: Annotated[list[str], typer.Argument(help="Recipe names or YAML files.")]):
    """Check recipes and list every problem in each.

    Example: qelalora recipes validate my.yaml recipes/*.yaml
    """
    from .run.recipe import load_recipe

    bad = 0
    for p in paths:
        try:
            load_recipe(p)
            typer.echo(f"ok: {p}")
        except UserError as err:
            bad += 1
            typer.echo(f"invalid: {err}", err=True)
    if bad:
        raise typer.Exit(2)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")]):
    """Summarise a run and redraw its rank pictures.

    Example: qelalora report runs/minilm-l6-rotten-tomatoes-20261129-120000
    """
    from .run.folder.layout import RunFolder
    from .run.folder.report import summarise

    typer.echo(summarise(RunFolder(run_dir)))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="merged-fp32 | merged-fp16 | merged-int4 | merged-int8 (weight-only) | merged-int8-dynamic | nf4-adapters | swappable | genai (ONNX Runtime GenAI folder, decoders)")] = "nf4-adapters",
    genai_precision: Annotated[str, typer.Option(help="genai: int4-mixed (the default: the builder's fp32 graph with merged-int4's decoder mix; SmolLM2 perplexity 1.05x), int4 (the builder's own, 1.6x) or fp32 (fp16 graphs do not run on ONNX Runtime GenAI's CPU provider).")] = "int4-mixed",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Output folder (default: RUN_DIR/{EXPORT_DIR}; genai: RUN_DIR/{GENAI_EXPORT_DIR}). Precisions of one run share a folder: config.json and the tokenizer at the top, one graph each under onnx/ (the Hub and transformers.js layout).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace this precision in the output folder, or the whole folder when it holds something else.")] = False,
    prune_threshold: Annotated[float, typer.Option(help="Drop triplets whose update has spectral norm below this.")] = 1e-6,
    int4_algo: Annotated[str, typer.Option(help="Weight-only algorithm of merged-int4: rtn | hqq | k-quant | gptq (calibrated on the run's training examples).")] = "rtn",
    int4_block_size: Annotated[int, typer.Option(help="Block size of merged-int4 / merged-int8 (MatMulNBits).")] = 32,
    int4_symmetric: Annotated[bool, typer.Option(help="Symmetric blocks (no zero points; default asymmetric).")] = False,
    accuracy_level: Annotated[int, typer.Option(help="MatMulNBits CPU compute type: 4 = int8 activations (the default: fastest, measured in BENCHMARKS.md), 1 = fp32, 0 = ONNX Runtime's default.", min=0, max=4)] = 4,
    head: Annotated[Optional[str], typer.Option(help="merged-int4 / merged-int8: the output projection (LM head, classifier): same (quantised like the rest), int8, or float. Default: int8 for a decoder's merged-int4, else same.")] = None,
    int4_embeddings: Annotated[Optional[bool], typer.Option("--int4-embeddings/--no-int4-embeddings", help="merged-int4 (rtn): quantise the embedding table too (4-bit GatherBlockQuantized; SmolLM2: half the file for +1.1% perplexity; MiniLM: 3.5x smaller, 83.0% against 82.6% on validation). Default: on (off with --web or --mobile, whose runtimes lack it).", show_default=False)] = None,
    int8_layers: Annotated[Optional[str], typer.Option(help="merged-int4: layers kept at 8 bits, comma-separated names from the graph's node paths (e.g. down_proj,lm_head; BERT: value,output), or none. Default: v_proj,up_proj,down_proj on decoders (measured on SmolLM2: perplexity 1.52x -> 1.09x PyTorch's), none on encoders.", show_default=False)] = None,
    adapter_only: Annotated[Optional[Path], typer.Option(help="Write only this run's .onnx_adapter file here (for a swappable graph of the same base).")] = None,
    metric_examples: Annotated[int, typer.Option(help="Held-out examples for the task-metric comparison: a seeded random sample of the test split (all of it when smaller).")] = 500,
    genai_adapters: Annotated[bool, typer.Option("--genai-adapters", help="genai: keep the base merged-free and this run's adapter in adapters/RUN.onnx_adapter, which ONNX Runtime GenAI (og.Adapters) switches at run time; add other runs' with --adapter-only.")] = False,
    mobile: Annotated[bool, typer.Option("--mobile", help="Also write the graph in ONNX Runtime's format (onnx/<graph>.ort, optimised once for ARM) for ONNX Runtime Mobile, with the operator list for a reduced build; checked like the graph.")] = False,
    web: Annotated[bool, typer.Option("--web", help="Also write index.html: the model in the browser with transformers.js (WASM, or WebGPU), every script local (npm fetches transformers.js once per machine). Open it with qelalora serve FOLDER. Weight-only graphs then compute in fp32 and keep a float embedding table, as onnxruntime-web's WASM kernels do.")] = False,
):
    """Export a trained run to ONNX and check it against PyTorch with ONNX Runtime.

    Examples:

      qelalora export runs/mine --format merged-int4      (runs/mine/onnx/onnx/model_q4.onnx)

      qelalora export runs/mine --format merged-fp32      (adds runs/mine/onnx/onnx/model.onnx beside it)

      qelalora export runs/mine -f merged-int4 --int4-algo gptq --accuracy-level 4

      qelalora export runs/smollm2 -f merged-int4 --int8-layers none --no-int4-embeddings --head same   (all 4-bit)

      qelalora export runs/smollm2 -f genai      (int4-mixed; needs the genai extra)

      qelalora export runs/smollm2 -f genai --genai-adapters -o edge/genai
      qelalora export runs/other --adapter-only edge/genai/adapters/other.onnx_adapter   (a second task, same base)

      qelalora export runs/mine -f merged-int8 --web     (then: qelalora serve runs/mine/onnx)

      qelalora export runs/mine -f merged-int4 --mobile  (adds onnx/model_q4.ort for ONNX Runtime Mobile)

      qelalora export runs/mine -f swappable -o edge/model

      qelalora export runs/other --adapter-only edge/other.onnx_adapter
    """
    from .export.exporter import export_adapter_only, export_run
    from .run.folder.layout import RunFolder

    _quiet_libraries()
    if adapter_only is not None:
        ranks = export_adapter_only(run_dir, adapter_only, overwrite)
        typer.echo(f"wrote {adapter_only}: total rank {sum(ranks.values())} over {sum(1 for r in ranks.values() if r)} live layers")
        return
    from .export.quantise import WeightOnly

    eight = None if int8_layers is None else tuple(n.strip() for n in int8_layers.split(",") if n.strip() not in ("", "none"))
    quant = WeightOnly(int4_algo, int4_block_size, int4_symmetric, accuracy_level or None, head, int4_embeddings, eight)
    export_run(run_dir, out or RunFolder(run_dir).export_dir(format_), format_, overwrite, prune_threshold, quant, metric_examples=metric_examples,
               genai_precision=genai_precision, web=web, mobile=mobile, genai_adapters=genai_adapters)


@app.command()
def infer(
    onnx_dir: Annotated[Path, typer.Argument(help="An exported folder.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify, or prompts to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (decoders).")] = 32,
    adapter: Annotated[Optional[Path], typer.Option(help="An .onnx_adapter to activate (swappable exports).")] = None,
    format_: Annotated[Optional[str], typer.Option("--format", "-f", help="Which precision of a folder that holds several (default: the one transformers.js opens, the smallest).")] = None,
):
    """Classify texts or generate text with ONNX Runtime only (no PyTorch); genai folders with ONNX Runtime GenAI.

    Examples:

      qelalora infer runs/mine/onnx "a warm, funny film" "a dull mess"

      qelalora infer runs/mine/onnx -f merged-fp32 "a warm, funny film"

      qelalora infer edge/model --adapter edge/other.onnx_adapter "def add(a, b):"
    """
    from .export.runtime import open_export

    model = open_export(onnx_dir, fmt=format_)
    if adapter is not None:
        model.use_adapter(adapter)
    if model.task == "seq-cls":
        for text, result in zip(texts, model.classify(texts)):
            typer.echo(json.dumps({"text": text, **result}))
    else:
        for text in texts:
            typer.echo(json.dumps({"prompt": text, "completion": model.generate(text, max_new_tokens)}))


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="An export folder written with --web.")],
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
):
    """Serve an export folder's browser page (index.html) until Ctrl-C. Any static server works as well.

    Examples:

      qelalora serve runs/mine/onnx                 (then open http://127.0.0.1:8000/)

      qelalora serve runs/mine/onnx --host 0.0.0.0 --port 8080
    """
    from .export.serve import make_server

    server = make_server(folder, host, port)
    typer.echo(f"serving {folder} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


@app.command("eval")
def evaluate_onnx(
    onnx_dir: Annotated[Path, typer.Argument(help="An exported folder.")],
    data: Annotated[Optional[str], typer.Option(help="Data file or built-in set (default: the run's own).")] = None,
    split: Annotated[str, typer.Option(help="test | val | train split of that data.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Evaluate at most this many examples.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="An .onnx_adapter to activate.")] = None,
    format_: Annotated[Optional[str], typer.Option("--format", "-f", help="Which precision of a folder that holds several (default: the smallest).")] = None,
):
    """Accuracy (classification) or perplexity (causal LM) with ONNX Runtime only (genai folders: ONNX Runtime GenAI).

    Examples:

      qelalora eval runs/mine/onnx -f nf4-adapters

      qelalora eval edge/model --data reviews.csv --split test --limit 500
    """
    from .export.eval_data import evaluation_examples
    from .export.runtime import open_export

    model = open_export(onnx_dir, fmt=format_)
    if adapter is not None:
        model.use_adapter(adapter)
    examples = evaluation_examples(model, data, split)
    result = model.evaluate(examples[:limit] if limit else examples)
    typer.echo(json.dumps(result))


def _who() -> str:
    """'' in the main process; 'process K: ' in the others of a torchrun job (torchrun may stop the main one first)."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"process {rank}: "


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="qelalora")
    except UserError as err:
        typer.echo(f"{_who()}error: {err}", err=True)
        sys.exit(err.exit_code)
    except MemoryError:
        typer.echo("error: out of memory; lower train.batch_size or data.max_length, or the budget", err=True)
        sys.exit(4)
    except OSError as err:
        typer.echo(f"error: {err.strerror or err} ({err.filename or ''}); check that the folder is writable and the disk has space", err=True)
        sys.exit(5)
