"""The code's shape: no import cycles (imports inside functions count too), run-folder file names in one module,
short functions, and a command line that only parses and prints."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qelalora": ROOT / "qelalora", "qelalora.export": ROOT / "export"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, at the top or inside a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from package import module`
    return {m for m in out if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 50 and graph["qelalora.cli"]  # the walk found the code

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# Each stage imports only the stages before it (recipe -> data -> plan -> train); the run folder's package (names,
# writers, readers) imports none of them, so that training writes through it and the exporter reads through it.
LATER_STAGES = {
    "qelalora.method": ("qelalora.base", "qelalora.run", "qelalora.export", "qelalora.cli"),
    "qelalora.base": ("qelalora.run", "qelalora.export", "qelalora.cli"),
    "qelalora.run.recipe": ("qelalora.run.data", "qelalora.run.plan", "qelalora.run.train", "qelalora.run.folder"),
    "qelalora.run.data": ("qelalora.run.plan", "qelalora.run.train", "qelalora.run.folder"),
    "qelalora.run.plan": ("qelalora.run.train", "qelalora.run.folder"),
    "qelalora.run.folder": ("qelalora.run.train", "qelalora.run.plan", "qelalora.run.data"),
    "qelalora.run": ("qelalora.export", "qelalora.cli"),
}


def test_each_stage_imports_only_earlier_ones():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for stage, later in LATER_STAGES.items():
            if name == stage or name.startswith(stage + "."):
                upward += [f"{name} -> {dep}" for dep in sorted(_imports(name, path, modules))
                           if any(dep == s or dep.startswith(s + ".") for s in later)]
    assert not upward, upward


RUN_FOLDER_NAMES = ("recipe.yaml", "memory_plan.json", "metrics.jsonl", "adapter.safetensors", "adapter_config.json",
                    "adapter_model.safetensors", "rank_pattern.json", "rank_final.png", "rank_heatmap.png",
                    "memory.json", "report.json", ".qelalora.lock", "tensors.safetensors", "state.json",
                    "manifest.json", "onnx-genai", '"checkpoints"', '"peft"')


def test_run_folder_names_live_in_one_module():
    owner = ROOT / "qelalora" / "run" / "folder" / "layout.py"
    for path in _modules().values():
        if path == owner:
            continue
        text = path.read_text()
        named = [n for n in RUN_FOLDER_NAMES if n in text]
        assert not named, f"{path.relative_to(ROOT)} names {named}; run-folder names belong to {owner.relative_to(ROOT)}"
    assert all(n.strip('"') in owner.read_text() for n in RUN_FOLDER_NAMES)


MAX_FUNCTION_LINES = 60


def test_functions_are_short():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_command_line_reads_no_files():
    text = (ROOT / "qelalora" / "cli.py").read_text()
    found = re.findall(r"\b(open\(|read_text|read_bytes|json\.load|iterdir|glob\()", text)
    assert not found, found


def test_every_package_is_installed():
    """pyproject.toml names the packages one by one: a new sub-package must be added there, or a wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)
