"""The import graph, built from the source (every import, lazy ones inside functions included):
no cycle between files, and every arrow points down the layers of docs/ARCHITECTURE.md."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flap_deploy", "exporters", "serving", "flap_deploy_cli")
# Bottom first. A module may import its own layer group's modules and any layer below; never above,
# and never a different group of its own layer.
LAYERS = [
    ["flap_deploy.errors", "flap_deploy.version"],
    ["flap_deploy.model"],
    ["flap_deploy.io"],
    ["flap_deploy.streaming"],
    ["flap_deploy.pruning"],
    ["flap_deploy.heal", "flap_deploy.evaluation", "flap_deploy.generation"],
    ["flap_deploy"],  # the package's own __init__: public names, loaded lazily by name
    ["exporters"],  # its package root
    ["exporters.onnx", "exporters.vllm"],
    ["serving"],  # its package root
    ["serving.process", "serving.child_guard", "serving.settings"],
    ["serving.onnx", "serving.vllm"],
    ["serving.backends"],
    ["serving.measure"],
    ["flap_deploy_cli"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def unresolved(name: str, path: Path, known: set[str]) -> list[str]:
    """Project modules ``name`` imports that do not exist (a lazy import moved away from under it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            bases = [base]
        else:
            continue
        missing += [b for b in bases if b.split(".")[0] in PACKAGES and b not in known]
    return missing


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for rank, groups in enumerate(LAYERS):
        for group in groups:
            if (module == group or module.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (rank, group)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best


def test_every_project_import_names_a_module_that_exists():
    mods = modules()
    missing = [f"{name}: {m}" for name, path in mods.items() for m in unresolved(name, path, set(mods))]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        rank, group = layer_of(module)
        for target in targets:
            t_rank, t_group = layer_of(target)
            if t_rank > rank or (t_rank == rank and t_group != group):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)



def test_serving_never_starts_the_cli():
    for path in (REPO / "serving").rglob("*.py"):
        assert "flap_deploy_cli" not in path.read_text(), path
