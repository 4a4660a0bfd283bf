"""The layering of ``swift_model``: one folder per layer, imports (top-level and inside functions) point into the
module's own folder or a folder of an earlier layer, and the import graph has no cycle.

Layers, first to last (``FOLDERS``): ``io`` (key naming, files, video) -> ``nets`` (the networks) -> ``loading``
(weights, LoRA, the checks before a weight is read) -> ``generation`` (one generation) -> ``planning``,
``training`` and ``batch`` (siblings: none imports another) -> ``cli`` -> the package's ``__init__`` (the facade).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOLDERS: dict[str, int] = {
    "io": 1,
    "nets": 2,
    "loading": 3,
    "generation": 4,
    "planning": 5,
    "training": 5,
    "batch": 5,
    "cli": 6,
}
FACADE = "__init__"  # the package's own __init__: the top layer
FACADE_LAYER = 7


def _modules(package: Path) -> dict[str, Path]:
    """``{dotted name relative to the package: file}``; a folder's ``__init__.py`` is ``folder.__init__``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        found[".".join(parts)] = path
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every ``*.py`` under ``package``, counting imports
    anywhere in a file: at the top, inside functions, inside ``if``/``try``. Names imported from a package (a
    folder's ``__init__``, or the facade) count as imports of that ``__init__`` unless they are its modules."""
    name = package.name
    modules = _modules(package)

    def resolve(parts: list[str], alias: str | None) -> str | None:
        dotted = ".".join(parts)
        if alias is not None and ".".join(parts + [alias]) in modules:
            return ".".join(parts + [alias])
        if dotted in modules:
            return dotted
        init = ".".join(parts + ["__init__"]) if parts else FACADE
        return init if init in modules else None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        own = mod.split(".")[:-1]  # the folders of the module (for a folder's __init__: the folder)
        edges: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == name or a.name.startswith(name + "."):
                        edges.add(resolve(a.name.split(".")[1:], None))
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    if node.module is None or not (node.module == name or node.module.startswith(name + ".")):
                        continue
                    base = node.module.split(".")[1:]
                else:
                    if node.level - 1 > len(own):
                        continue  # beyond the package: not ours
                    base = own[: len(own) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                for a in node.names:
                    edges.add(resolve(base, a.name))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def layer_of(module: str, folders: dict[str, int]) -> tuple[str, int] | None:
    """``(folder, layer)`` of a module; the facade is ``(FACADE, FACADE_LAYER)``; ``None`` outside any folder."""
    if module == FACADE:
        return FACADE, FACADE_LAYER
    top = module.split(".")[0]
    if "." in module and top in folders:
        return top, folders[top]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one representative per back edge)."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def layering_problems(graph: dict[str, set[str]], folders: dict[str, int]) -> list[str]:
    """Human-readable violations: modules in no layer's folder, imports of a later layer or of a sibling folder
    of the same layer, import cycles."""
    problems = [f"{m} is in no layer's folder" for m in sorted(graph) if layer_of(m, folders) is None]
    for m, deps in sorted(graph.items()):
        here = layer_of(m, folders)
        for d in sorted(deps):
            there = layer_of(d, folders)
            if here is None or there is None or here[0] == there[0]:
                continue
            if there[1] > here[1]:
                problems.append(f"{m} (layer {here[1]}) imports {d} (layer {there[1]})")
            elif there[1] == here[1]:
                problems.append(f"{m} imports {d}: {here[0]} and {there[0]} are siblings of layer {here[1]}")
    problems += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    return problems


def test_swift_model_layers_one_way():
    graph = import_graph(ROOT / "swift_model")
    assert layering_problems(graph, FOLDERS) == []
    # every folder of the package is a layer, and every layer has its folder
    folders = {p.name for p in (ROOT / "swift_model").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FOLDERS), "a new folder needs a place in FOLDERS (and in the README's architecture)"
    # the edges that the layering is about exist (the check is not vacuous)
    assert {"io.keys", "io.files"} <= graph["loading.checkpoint"]
    assert any(d.startswith("nets.dit") for d in graph["loading.checkpoint"]) and "loading.lora" in graph["loading.checkpoint"]
    assert "io.files" in graph["loading.lora"] and "io.files" in graph["nets.vae"] and "io.files" in graph["nets.encoders"]
    assert "generation.pipeline" in graph["planning.planner"]


# The names ``from swift_model import ...`` offered before the package was split into folders: they must stay.
PUBLIC_BEFORE_THE_FOLDERS = (
    "CheckpointError", "CheckpointNotFoundError", "ContextCache", "DiTCheckpoint", "WanDiT", "WanDiTConfig",
    "inspect_dit", "load_dit", "load_lora", "load_state_dict", "merge_lora", "read_dit_config", "save_dit",
    "to_diffusers_keys", "to_wan_keys", "SwiftI2VPipeline", "GenerationResult", "CSGPlan", "CSGWindow", "run_csg",
    "flow_steps", "WanVAE", "TextEncoder", "ImageEncoder", "load_prompt_embeds", "save_prompt_embeds",
    "hybrid_reference", "read_image", "write_mp4",
)


def test_public_names_are_kept():
    """Every public name of the facade imports (lazily or not), those of before the folders among them."""
    code = ("import swift_model, swift_kernels\n"
            f"names = {PUBLIC_BEFORE_THE_FOLDERS!r}\n"
            "assert set(names) <= set(swift_model.__all__), set(names) - set(swift_model.__all__)\n"
            "for n in swift_model.__all__: getattr(swift_model, n)\n"
            "for n in swift_kernels.__all__: getattr(swift_kernels, n)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_swift_kernels_never_imports_swift_model():
    for path in (ROOT / "swift_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == "swift_model" or n.startswith("swift_model.") for n in names), path


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    for name, text in files.items():
        path = pkg / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_the_check_catches_lazy_cycles_upward_and_sideways_imports(tmp_path):
    """The shape of the old cycle: a later layer imports the DiT, and the DiT imports it back inside a function
    (``WanDiT.from_pretrained`` importing the loader lazily). The cycle and the upward import must be reported,
    as must an import of the package facade from a folder, an import between sibling folders, and a module
    outside every layer's folder."""
    pkg = _package(tmp_path, {
        "__init__": "from .loading.loader import load\n",
        "io.__init__": "", "io.keys": "",
        "nets.__init__": "",
        "nets.model": "import torch\n\nclass M:\n    @classmethod\n    def load(cls):\n"
                      "        from ..loading.loader import load\n        return load()\n",
        "loading.__init__": "",
        "loading.loader": "from ..nets.model import M\nfrom ..io import keys\n\ndef load():\n    return M()\n",
        "loading.helper": "from pkg import load\n",
        "planning.__init__": "", "planning.a": "from ..training import b\n",
        "training.__init__": "", "training.b": "",
        "stray": "",
    })
    graph = import_graph(pkg)
    assert graph["nets.model"] == {"loading.loader"} and graph["loading.loader"] == {"nets.model", "io.keys"}
    assert graph["loading.helper"] == {FACADE} and graph["planning.a"] == {"training.b"}
    folders = {"io": 1, "nets": 2, "loading": 3, "planning": 4, "training": 4}
    problems = layering_problems(graph, folders)
    assert "nets.model (layer 2) imports loading.loader (layer 3)" in problems
    assert f"loading.helper (layer 3) imports {FACADE} (layer {FACADE_LAYER})" in problems
    assert "planning.a imports training.b: planning and training are siblings of layer 4" in problems
    assert "stray is in no layer's folder" in problems
    assert any(p.startswith("import cycle:") and "nets.model" in p and "loading.loader" in p for p in problems)
    clean = {**graph, "nets.model": set(), "loading.helper": set(), "planning.a": set()}
    del clean["stray"]
    assert layering_problems(clean, folders) == []


def test_from_pretrained_works_after_importing_the_dit_module_alone(tmp_path):
    """``WanDiT.from_pretrained`` reaches the loader through the hook the loading layer registers: importing
    ``swift_model.nets.dit`` runs the package's ``__init__`` first, which imports the loader."""
    code = ("import sys\nfrom swift_model.nets.dit import WanDiT\n"
            "from swift_model.nets.config import WanDiTConfig\n"
            "import swift_model.loading.checkpoint as ck\n"
            "import swift_model.nets.dit as dit\n"
            "assert dit._pretrained_loader is ck.load_dit\n"
            "m = WanDiT(WanDiTConfig.preset('tiny-t2v'))\n"
            "ck.save_dit(m, sys.argv[1])\n"
            "assert type(WanDiT.from_pretrained(sys.argv[1], device='cpu')) is WanDiT\n"
            "class Sub(WanDiT):\n    pass\n"
            "assert type(Sub.from_pretrained(sys.argv[1], device='cpu')) is Sub\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


if __name__ == "__main__":  # python tests/test_layering.py [package folder]: print the problems of a package
    pkg = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "swift_model"
    for p in layering_problems(import_graph(pkg), FOLDERS):
        print(p)
