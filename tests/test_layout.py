"""The package's structure: no import cycle between graphrt modules (imports inside functions
included), layers import only downwards, and files stay small."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "graphrt"
# A lower layer never imports a higher one (the data path: weights -> plan -> exec -> API).
LAYERS = [("config", "sampling", "text"), ("models", "weights"), ("plan",), ("exec",),
          ("runtime", "load_plan", "chat", "default_model", "speculative"), ("bench", "cli", "cli_plan", "cli_bench", "__init__")]


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: Path = PKG) -> set[str]:
    """graphrt modules imported anywhere in the file (absolute or relative, top level or not)."""
    mod = module_name(path, pkg)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("graphrt"):
                found.add(n)
    return found


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    files = {module_name(p, pkg): p for p in pkg.rglob("*.py")}
    edges = {}
    for mod, path in files.items():
        edges[mod] = {n for n in imports(path, pkg) if n in files and n != mod and not mod.startswith(n + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n, stack + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer_of(mod: str) -> int:
    top = mod.split(".")[1] if mod.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_layers_import_downwards():
    bad = [(m, n) for m, targets in graph().items() for n in targets if layer_of(n) > layer_of(m)]
    assert not bad, f"imports against the data path: {bad}"


def test_cycle_detector_catches_a_cycle(tmp_path):
    """The checker itself: a two-module cycle written to disk is found."""
    pkg = tmp_path / "graphrt"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    (pkg / "c.py").write_text("import graphrt.a\n")
    assert find_cycle(graph(pkg)) == ["graphrt.a", "graphrt.b", "graphrt.a"]
    (pkg / "b.py").write_text("x = 1\n")
    assert find_cycle(graph(pkg)) is None


def test_files_stay_small():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 320}
    assert not long, f"split these files (over 320 lines): {long}"
