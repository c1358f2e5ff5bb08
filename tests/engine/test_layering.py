"""Imports flow one way: the engine and the chat core never pull in the UI."""
import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_engine_and_chat_core_do_not_import_the_ui():
    modules = imported_after("import rwkv_chat.engine, rwkv_chat.pipeline, rwkv_chat.chat.session")
    assert "rwkv_chat.pipeline" in modules and "rwkv_chat.chat.session" in modules
    ui = sorted(m for m in modules if m.split(".")[0] in ("textual", "click") or m.startswith("rwkv_chat.tui"))
    assert ui == []
    assert "rwkv" not in modules, "the reference implementation is a test oracle, never a runtime import"


def test_compat_layer_is_engine_side():
    modules = imported_after("import rwkv_chat.compat.model, rwkv_chat.compat.utils")
    assert "rwkv_chat.compat.utils" in modules and "rwkv_chat.engine.model" in modules
    above = sorted(m for m in modules if m.split(".")[0] in ("textual", "click")
                   or m.startswith(("rwkv_chat.tui", "rwkv_chat.chat")))
    assert above == []
    assert "rwkv" not in modules, "the compat layer reimplements the rwkv package's API; it never imports it"


def test_package_import_is_lazy():
    modules = imported_after("import rwkv_chat")
    assert "torch" not in modules


def engine_import_graph() -> dict[str, set[str]]:
    """module -> the rwkv_chat.engine modules it imports (anywhere in the file, lazy imports too)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "rwkv_chat"
    names = {}
    for path in (root / "engine").rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    return graph


def test_the_engine_has_no_import_cycles():
    graph = engine_import_graph()
    assert "rwkv_chat.engine.cuda" in graph["rwkv_chat.engine.ops.cuda"]  # the graph sees relative imports
    assert "rwkv_chat.engine.ops.torch_ref" in graph["rwkv_chat.engine.cuda"]
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_version_modules_do_not_pick_backends():
    """The math calls `w.ops.*`; which backend runs is decided at load (engine/ops/select.py)."""
    graph = engine_import_graph()
    backends = {"rwkv_chat.engine.cuda", "rwkv_chat.engine.cpu_kernels", "rwkv_chat.engine.ops.cpu",
                "rwkv_chat.engine.ops.cuda", "rwkv_chat.engine.ops.torch_ref"}
    for version in ("v4", "v5_2", "v6", "v7"):
        assert not graph[f"rwkv_chat.engine.{version}"] & backends, version
