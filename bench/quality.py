"""Quality at equal budget: qelalora ElaLoRA vs PEFT LoRA and AdaLoRA over the same NF4 base.

Every cell (task, method, average rank, seed) trains from the same bitsandbytes
NF4 base, on the same batches in the same order, with the same steps, AdamW,
linear warm-up/decay LR schedule, batch and sequence length, and trains the
task head in full. Each cell runs in its own process, so its peak memory is
its own and a rerun with the same seed starts from nothing.

Methods
  elalora   qelalora, rank r everywhere at the start; byte budget = that start's adapter state
  fixed     qelalora with rank rounds off (b0 = 0): fixed-rank baseline inside our own code
  lora      PEFT LoRA r (QLoRA)
  adalora   PEFT AdaLoRA, init_r = 1.5 r pruned to target_r = r (same final rank count)
  elalora-reset-moments  ablation: every round drops all Adam moments (the reference code's effect)
  elalora-const-lr       ablation: the LR stays at its peak after the first round (the reference code's effect)
  elalora-rank-budget    ablation: total rank capped at its start, bytes unbounded (the reference's budget)
  <method>-g0            the same with the orthogonality regulariser off (gamma / orth_reg_weight = 0)

A cell's `variant` (bench/variants.py) changes qelalora's method settings
(e.g. `reference`: the paper's configuration) or, for lora, its rank
(`eqbytes`: the rank whose adapter state fills the bytes of qelalora's default
at rank r). `split` says which held-out split is scored: settings are chosen on
`val`, and confirmed on `test`. `steps` and `lr` override the task's.

    python bench/quality.py                      # the original suite (resumes: finished cells are kept)
    python bench/quality.py --suite sweep        # settings tried on the validation split
    python bench/quality.py --suite confirm      # the chosen defaults on the test split, 3 seeds
    python bench/quality.py --report             # tables and pictures from the results
    python bench/quality.py --cell '{"task": "minilm", "method": "elalora", "rank": 2, "seed": 0}'
    nice -n 19 python bench/quality.py --suite rank_de --jobs 1 --threads 1   # rank curves (bench/rank_tasks.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Per task: recipe, steps and the rank schedule shared by ElaLoRA and AdaLoRA.
TASKS = {
    "minilm": dict(recipe="minilm-l6-rotten-tomatoes", steps=300, batch=16, lr=1e-3, warmup=0.06,
                   t_init=0.15, t_final=0.3, delta=10, b0=4, eval_batch=64, metric="accuracy",
                   data={"test_size": 2000, "val_size": 1000}),
    "smollm2": dict(recipe="smollm2-135m-python-docs", steps=80, batch=4, lr=5e-4, warmup=0.05,
                    t_init=0.15, t_final=0.3, delta=4, b0=12, eval_batch=8, metric="perplexity",
                    data={"test_size": 100, "val_size": 100, "max_train_examples": 2000}),
    # Rank-sensitivity candidates (bench/rank_tasks.py): a small-data regime of the MiniLM task
    # (the same validation and test snippets, 200 training snippets, 12 epochs) and SmolLM2 on German man pages.
    "minilm200": dict(recipe="minilm-l6-rotten-tomatoes", steps=150, batch=16, lr=1e-3, warmup=0.06,
                      t_init=0.15, t_final=0.3, delta=5, b0=4, eval_batch=64, metric="accuracy",
                      data={"test_size": 2000, "val_size": 1000, "max_train_examples": 200}),
    "smollm2_de": dict(recipe="smollm2-135m-python-docs", steps=80, batch=4, lr=1e-3, warmup=0.05,
                       t_init=0.15, t_final=0.3, delta=4, b0=12, eval_batch=8, metric="perplexity", prepare="manpages_de",
                       data={"max_length": 128, "test_size": 200, "val_size": 200, "max_train_examples": 2000}),
}
METHODS = ("elalora", "fixed", "lora", "adalora")
ABLATIONS = ("elalora-reset-moments", "elalora-const-lr", "elalora-rank-budget")
NO_REGULARISER = ("elalora-g0", "fixed-g0", "adalora-g0")


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    rank: int
    seed: int
    repeat: int = 0  # 1 = a rerun of the same cell, to show the numbers reproduce
    variant: str = ""  # a name in bench/variants.py
    split: str = "test"  # the held-out split scored: "val" to choose settings, "test" to confirm them
    steps: int = 0  # 0 = the task's
    lr: float = 0.0  # 0 = the task's
    probe: int = 0  # every this many steps, record update norms per layer (bench/diagnose.py)

    @property
    def base_method(self) -> str:
        return self.method.removesuffix("-g0")

    @property
    def gamma(self) -> float | None:
        """Orthogonality regulariser weight: 0 if the method ends in -g0, else PEFT's default (0.1) / the variant's."""
        return 0.0 if self.method.endswith("-g0") else None

    @property
    def label(self) -> str:
        return f"{self.method}[{self.variant}]" if self.variant else self.method

    @property
    def key(self) -> str:
        extra = "".join(f"/{k}{v:g}" if isinstance(v, float) else f"/{k}{v}"
                        for k, v in (("", self.split), ("steps", self.steps), ("lr", self.lr), ("probe", self.probe))
                        if v and v != "test")
        return f"{self.task}/{self.label}/r{self.rank}/s{self.seed}/{self.repeat}{extra}"


def original_suite() -> list[Cell]:
    """The first comparison (qelalora's settings of then = the `reference` variant)."""
    ref = lambda task, m, r, s, **kw: Cell(task, m, r, s, variant="reference" if m not in ("lora", "adalora", "adalora-g0") else "", **kw)  # noqa: E731
    smollm2 = [ref("smollm2", m, 4, s) for s in (0, 1) for m in METHODS]
    cells = smollm2[:4]  # the costliest cells first, so a failure shows early
    cells += [ref("minilm", m, r, s) for s in (0, 1, 2) for r in (2, 8) for m in METHODS]
    cells += [ref("minilm", m, 2, s) for s in (0, 1, 2) for m in ABLATIONS]
    cells += [ref("minilm", "elalora", 2, 0, repeat=1)]
    cells += smollm2[4:]
    cells += [ref("smollm2", "elalora-g0", 4, 0)]
    return cells + [ref("minilm", m, 2, s) for s in (0, 1, 2) for m in NO_REGULARISER]


def suite(name: str) -> list[Cell]:
    if name == "original":
        return original_suite()
    from rank_tasks import RANK_SUITES
    from variants import SUITES

    return {**SUITES, **RANK_SUITES}[name]()


# ---------------------------------------------------------------- one cell (runs in a worker process)


def _load_data(cell: Cell, recipe, tokenizer, spec):
    """Tokenised train and held-out (cell.split) examples; the causal-LM blocks are cached (tokenising the docs takes a while)."""
    from qelalora.run.data.records import load_task_data

    if spec.task == "seq-cls":
        data = load_task_data(recipe.data, spec.task, tokenizer, recipe.model.num_labels)
        return data.train, getattr(data, cell.split), data.pad_id
    import numpy as np

    d = recipe.data
    source = f"-{Path(d.source).stem}" if "/" in str(d.source) else ""  # a built data file's name carries its version
    cache = RESULTS.parent / "out" / "cache" / f"{cell.task}{source}-{d.max_length}-{d.val_size}-{d.test_size}-{d.max_train_examples}.npz"
    if not cache.exists():
        data = load_task_data(recipe.data, spec.task, tokenizer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # two cells may build it at once
        blocks = lambda examples: np.array([e["input_ids"] for e in examples], dtype=np.int64)  # noqa: E731
        np.savez(tmp, train=blocks(data.train), val=blocks(data.val), test=blocks(data.test), pad=np.array(data.pad_id))
        tmp.replace(cache)
    arrays = np.load(cache, allow_pickle=False)
    as_examples = lambda a: [{"input_ids": row.tolist()} for row in a]  # noqa: E731
    return as_examples(arrays["train"]), as_examples(arrays[cell.split]), int(arrays["pad"])


def _schedule_steps(t: dict) -> tuple[int, int, int, int]:
    """(LR warm-up, rank warm-up, stabilisation, round interval) in steps, shared by every method."""
    from qelalora.method.config import steps_of

    return steps_of(t["warmup"], t["steps"]), steps_of(t["t_init"], t["steps"]), steps_of(t["t_final"], t["steps"]), t["delta"]


def elalora_config(cell: Cell, t: dict):
    """qelalora's settings for a cell: its defaults, then the variant's changes, then the task's schedule."""
    from dataclasses import replace

    from variants import VARIANTS

    from qelalora.method.config import PRESETS, ElaLoRAConfig, steps_of

    options = dict(VARIANTS[cell.variant]) if cell.variant else {}
    preset = options.pop("preset", None)
    options = {**(PRESETS[preset] if preset else {}), **options}
    if cell.gamma is not None:
        options["gamma"] = cell.gamma
    _, t_init, t_final, delta = _schedule_steps(t)
    settings = {"t_init": t_init, "t_final": t_final, "delta": delta, "b0": t["b0"], **options}  # a variant may change the schedule
    if cell.base_method == "fixed":
        settings["b0"] = 0
    for key in ("t_init", "t_final", "delta"):
        settings[key] = steps_of(settings[key], t["steps"])
    return replace(ElaLoRAConfig(), budget_mb=1e6, rank=cell.rank, max_init_rank=cell.rank, **settings)


class ElaLoRAMethod:
    """qelalora's own training state, with the ablation switches the bench needs."""

    def __init__(self, cell: Cell, model, spec, paths, t: dict, weights_from: str):
        from qelalora.base.models import head_params
        from qelalora.run.train.step import prepare_training, train_step

        self._train_step = train_step
        warmup = _schedule_steps(t)[0]
        cfg = elalora_config(cell, t)
        self.config = asdict(cfg)
        self.state = prepare_training(model, paths, head_params(model, spec), cfg, t["steps"], t["lr"], warmup, seed=cell.seed,
                                      weights_from=weights_from)
        ranks = self.state.ranks
        if cell.method == "elalora-rank-budget":
            ranks.max_total_rank = ranks.total_rank
        else:
            ranks.budget_bytes = ranks.adapter_bytes()  # equal budget: the uniform-rank start's adapter state
        self.round_seconds = 0.0
        self.peak_lr = t["lr"]
        self._wrap_rounds(cell.method)

    def _wrap_rounds(self, method: str) -> None:
        import torch

        state, run_round = self.state, self.state.ranks.run_round

        def timed_round(step, b, optimizer):
            t0 = time.perf_counter()
            record = run_round(step, b, optimizer)
            if method == "elalora-reset-moments":
                optimizer.state.clear()
            if method == "elalora-const-lr" and len(state.ranks.history) == 1:
                for group in optimizer.param_groups:
                    group["initial_lr"] = self.peak_lr
                state.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            self.round_seconds += time.perf_counter() - t0
            return record

        state.ranks.run_round = timed_round

    def step(self, batch) -> float:
        return self._train_step(self.state, batch, lambda m, b: m(**b).loss)

    def lr(self) -> float:
        return self.state.optimizer.param_groups[0]["lr"]

    def ranks(self) -> dict[str, int]:
        return self.state.ranks.rank_pattern()

    def exported_params(self) -> int:
        return sum(l.rank * (l.in_features + l.out_features + 1) for l in self.state.layers.values())

    def state_bytes(self) -> int:
        return self.state.ranks.adapter_bytes() - self.state.ranks.fixed_bytes

    def rounds(self) -> int:
        return sum(1 for r in self.state.ranks.history if r.pruned or r.grown)

    def factors(self) -> dict[str, tuple]:
        """Per layer: ||delta W||_F and the sizes of its factors (median |E|, median A row norm, median B column norm)."""
        import torch

        out = {}
        with torch.no_grad():
            for name, layer in self.state.layers.items():
                if layer.rank == 0:
                    out[name] = (0.0, 0.0, 0.0, 0.0)
                    continue
                out[name] = (layer.delta_weight().norm().item(), layer.lora_E.abs().median().item(),
                             layer.lora_A.norm(dim=1).median().item(), layer.lora_B.norm(dim=0).median().item())
        return out


def lora_rank_for_bytes(shapes, rank: int) -> int:
    """The LoRA rank whose training state (fp32 weights, gradients, two AdamW moments) fills the adapter
    state of qelalora's default settings at `rank` on the same layers (at least `rank`)."""
    from qelalora.method.budget import StateCost, layer_bytes, tensor_train_bytes
    from qelalora.method.config import ElaLoRAConfig

    default = ElaLoRAConfig()
    ours = sum(layer_bytes(s.d_in, s.d_out, rank, StateCost(default.optimizer, default.score_state)) for s in shapes)
    lora = lambda q: sum(tensor_train_bytes(q * s.d_in, StateCost("adamw")) + tensor_train_bytes(q * s.d_out, StateCost("adamw"))  # noqa: E731
                         for s in shapes)
    q = rank
    while lora(q + 1) <= ours:
        q += 1
    return q


class PeftMethod:
    """PEFT LoRA or AdaLoRA on the same base, heads trained in full, same optimiser and schedule."""

    def __init__(self, cell: Cell, model, spec, paths, t: dict, weights_from: str):
        import torch
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        from transformers import get_linear_schedule_with_warmup

        from qelalora.base.models import head_params
        from qelalora.run.plan.ranks import target_shapes

        torch.manual_seed(cell.seed)
        heads = head_params(model, spec)
        self.adalora = cell.base_method == "adalora"
        warmup, t_init, t_final, delta = _schedule_steps(t)
        self.rank = lora_rank_for_bytes(target_shapes(model, paths), cell.rank) if cell.variant == "eqbytes" else cell.rank
        gamma = 0.1 if cell.gamma is None else cell.gamma
        if self.adalora:
            config = AdaLoraConfig(init_r=math.ceil(1.5 * cell.rank), target_r=cell.rank, tinit=t_init, tfinal=t_final,
                                   deltaT=delta, beta1=0.85, beta2=0.85, orth_reg_weight=gamma, total_step=t["steps"],
                                   lora_alpha=16, lora_dropout=0.0, target_modules=paths)
        else:
            config = LoraConfig(r=self.rank, lora_alpha=16, lora_dropout=0.0, target_modules=paths)
        self.model = get_peft_model(model, config)
        for p in heads:
            p.requires_grad_(True)
        self.adapter = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        self.optimizer = torch.optim.AdamW(self.adapter + heads, lr=t["lr"], weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, t["steps"])
        self.round_seconds = 0.0
        self.global_step = 0

    def step(self, batch) -> float:
        self.model.train()
        # Through the tuner model: the generic PeftModel.forward skips AdaLoraModel.forward, which adds the
        # orthogonality term.
        loss = self.model.base_model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.global_step += 1
        if self.adalora:
            t0 = time.perf_counter()
            self.model.base_model.update_and_allocate(self.global_step)
            self.round_seconds += time.perf_counter() - t0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _lora_layers(self):
        return {n: m for n, m in self.model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}

    def ranks(self) -> dict[str, int]:
        out = {}
        for name, m in self._lora_layers().items():
            name = name.removeprefix("base_model.model.")
            out[name] = int((m.lora_E["default"] != 0).sum()) if self.adalora else m.r["default"]
        return out

    def exported_params(self) -> int:
        total = 0
        for m in self._lora_layers().values():
            d_out, d_in = m.out_features, m.in_features
            total += (int((m.lora_E["default"] != 0).sum()) * (d_in + d_out + 1)) if self.adalora else m.r["default"] * (d_in + d_out)
        return total

    def state_bytes(self) -> int:
        n = sum(p.numel() for p in self.adapter)
        extra = 0
        if self.adalora:
            alloc = self.model.base_model.rankallocator
            extra = sum(v.numel() for d in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc) for v in d.values())
        return 16 * n + 4 * extra  # fp32 weight, grad, two Adam moments; AdaLoRA's fp32 importance tensors

    def rounds(self) -> int:
        return 0

    def factors(self) -> dict[str, tuple]:
        """Per layer: ||delta W||_F, then 1.0 (no E), median A row norm, median B column norm."""
        import torch

        out = {}
        with torch.no_grad():
            for name, m in self._lora_layers().items():
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                delta = m.scaling["default"] * (b @ a)
                out[name.removeprefix("base_model.model.")] = (delta.norm().item(), 1.0, a.norm(dim=1).median().item(),
                                                                b.norm(dim=0).median().item())
        return out


def _drop_groups(method: ElaLoRAMethod, seed: int) -> dict[str, list[str]]:
    """Top and bottom 25% of layers by final rank; ties broken by a seeded shuffle."""
    ranks = method.ranks()
    names = list(ranks)
    random.Random(seed).shuffle(names)
    ordered = sorted(names, key=lambda n: ranks[n])
    quarter = max(1, len(ordered) // 4)
    return {"top": ordered[-quarter:], "bottom": ordered[:quarter]}


def _evaluate_without(method: ElaLoRAMethod, names: list[str], evaluate) -> float:
    import torch

    layers = method.state.layers
    saved = {n: layers[n].lora_E.data.clone() for n in names}
    with torch.no_grad():
        for n in names:
            layers[n].lora_E.data.zero_()
    try:
        return evaluate()
    finally:
        for n in names:
            layers[n].lora_E.data.copy_(saved[n])


def run_cell(cell: Cell, threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from qelalora.base import embedded
    from qelalora.base.footprint import PeakRSS, current_rss_bytes
    from qelalora.base.models import load_base_model, target_paths
    from qelalora.run.data.batches import BatchStream
    from qelalora.run.recipe import load_recipe
    from qelalora.run.train.evaluate import evaluate

    torch.set_num_threads(threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t = dict(TASKS[cell.task])
    if cell.steps:  # a longer or shorter run keeps the number of rank rounds: the interval scales with it
        t["delta"] = max(1, round(t["delta"] * cell.steps / t["steps"]))
    t.update({k: v for k, v in (("steps", cell.steps), ("lr", cell.lr)) if v})
    if "prepare" in t:  # a task whose data file is built on this machine (bench/rank_tasks.py)
        from rank_tasks import PREPARE

        t["data"] = {**t["data"], "source": str(PREPARE[t["prepare"]]())}
    overrides = [f"data.{k}={v}" for k, v in t["data"].items()] + [f"train.batch_size={t['batch']}"]
    recipe = load_recipe(t["recipe"], overrides)
    name = embedded.resolve_model(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cell.seed)  # the fresh classifier head
    model, spec = load_base_model(name, "nf4", recipe.model.num_labels)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    train, test, pad_id = _load_data(cell, recipe, tokenizer, spec)
    paths = target_paths(model, spec, recipe.model.targets or list(spec.targets))

    rss = PeakRSS()
    rss.reset()
    rss_before = current_rss_bytes()
    method = (PeftMethod if cell.base_method in ("lora", "adalora") else ElaLoRAMethod)(cell, model, spec, paths, t, name)
    stream = BatchStream(train, t["batch"], pad_id, cell.seed)
    losses, step_times, lrs, probes = [], [], [], []
    started = time.perf_counter()
    for step in range(1, t["steps"] + 1):
        batch = next(stream)
        t0 = time.perf_counter()
        losses.append(method.step(batch))
        step_times.append(time.perf_counter() - t0)
        lrs.append(method.lr())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{cell.key}: loss {losses[-1]} at step {len(losses)}")
        if cell.probe and (step % cell.probe == 0 or step == 1):
            probes.append({"step": step, "loss": statistics.fmean(losses[-cell.probe:]), "layers": method.factors()})
    train_seconds = time.perf_counter() - started
    peak_train = rss.peak() - rss_before

    eval_model = method.model if isinstance(method, PeftMethod) else model

    def metric() -> float:
        out = evaluate(eval_model, test, spec.task, t["eval_batch"], pad_id, "cpu")
        return out[t["metric"]]

    result = {
        **asdict(cell),
        "key": cell.key,
        "metric_name": t["metric"],
        "metric": metric(),
        "steps": t["steps"],
        "final_loss": statistics.fmean(losses[-20:]),
        "loss_curve": [statistics.fmean(losses[i:i + 25]) for i in range(0, len(losses), 25)],
        "lr_at": {str(s): lrs[s - 1] for s in (1, t["steps"] // 4, t["steps"] // 2, t["steps"])},
        "ranks": method.ranks(),
        "rounds": method.rounds(),
        "exported_params": method.exported_params(),
        "state_bytes": method.state_bytes(),
        "train_seconds": train_seconds,
        "median_step_s": statistics.median(step_times[5:]),
        "round_seconds": method.round_seconds,
        "peak_train_rss_bytes": peak_train,
        "threads": threads,
    }
    if isinstance(method, ElaLoRAMethod):
        result["config"] = method.config
    if isinstance(method, PeftMethod):
        result["lora_rank"] = method.rank
    if probes:
        result["probes"] = probes
    if cell.base_method == "elalora" and cell.split == "test" and not cell.probe:
        groups = _drop_groups(method, cell.seed)
        ranks = result["ranks"]
        result["drop"] = {
            g: {"metric": _evaluate_without(method, names, metric), "mean_rank": statistics.fmean(ranks[n] for n in names)}
            for g, names in groups.items()
        }
    return result


# ---------------------------------------------------------------- the suite (driver process)


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_suite(name: str, out: Path, jobs: int, only: str | None, threads: int | None = None,
              max_cells: int | None = None, stop_at: float | None = None) -> None:
    done = {r["key"] for r in read_results(out) if "error" not in r}
    todo = [c for c in suite(name) if c.key not in done and (only is None or c.task == only)][:max_cells]
    threads = threads or max(1, (os.cpu_count() or 2) // jobs)
    print(f"{len(todo)} cells to run ({len(done)} already in {out}), {jobs} at a time, {threads} thread(s) each", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def work(cell: Cell) -> None:
        if stop_at is not None and time.time() >= stop_at:
            print(f"{cell.key}: not started (past --stop-at)", flush=True)
            return
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--cell", json.dumps(asdict(cell)), "--threads", str(threads)],
            check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"},
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            record = json.loads(lines[-1])
        else:
            record = {**asdict(cell), "key": cell.key, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
        record["wall_seconds"] = round(time.time() - t0, 1)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = record.get("error") or f"{record['metric_name']} {record['metric']:.4f}"
        print(f"[{time.time() - started:7.0f} s] {cell.key}: {shown} ({record['wall_seconds']} s)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, todo))
    print(f"suite done in {time.time() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="original", help="original | sweep | confirm | ... (bench/variants.py SUITES)")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/<suite>.jsonl; quality.jsonl for original)")
    parser.add_argument("--jobs", type=int, default=2, help="cells run at once (each gets cpu_count/jobs threads)")
    parser.add_argument("--only", choices=sorted(TASKS), help="run only this task's cells")
    parser.add_argument("--max-cells", type=int, help="run at most this many of the suite's unfinished cells, in its order")
    parser.add_argument("--stop-at", help="HH:MM (this machine's clock): start no cell at or after then")
    parser.add_argument("--report", action="store_true", help="write tables and pictures from the results")
    parser.add_argument("--cell", help="run one cell (JSON) and print its result")
    parser.add_argument("--threads", type=int, help="threads per cell (default: 2 for --cell, cpu_count/jobs for a suite)")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS / ("quality.jsonl" if args.suite == "original" else f"{args.suite}.jsonl")
    if args.cell:
        print(json.dumps(run_cell(Cell(**json.loads(args.cell)), args.threads or 2)))
    elif args.report:
        from quality_report import write_method_report, write_report

        write_report(read_results(args.out), args.out.parent) if args.suite == "original" else write_method_report(args.suite)
    else:
        stop_at = None
        if args.stop_at:
            import datetime

            now = datetime.datetime.now()
            hour, minute = map(int, args.stop_at.split(":"))
            stop = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            stop_at = (stop if stop > now else stop + datetime.timedelta(days=1)).timestamp()
        run_suite(args.suite, args.out, args.jobs, args.only, args.threads, args.max_cells, stop_at)


if __name__ == "__main__":
    main()
