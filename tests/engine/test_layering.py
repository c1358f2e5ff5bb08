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
def test_engine_imports_no_ui_library():
    modules = imported_after("import rwkv_chat.engine.model, rwkv_chat.engine.loader, rwkv_chat.pipeline")
    assert "rwkv_chat.engine.model" in modules
    ui = sorted(m for m in modules if m.split(".")[0] in ("rich", "textual", "click"))
    assert ui == [], "the engine reports loading progress through a callback; the caller draws it"


def test_loading_reports_progress_through_the_callback(tmp_path):
    from rwkv_chat.engine.model import RWKV
    from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

    calls = []
    path = save_checkpoint(tmp_path / "m.pth", make_checkpoint("7", 2, 64, vocab_size=256))
    RWKV(path, progress=lambda done, total, what: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] == 3  # two layers, then the head
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_reading_the_config_does_not_start_the_ui():
    modules = imported_after("import rwkv_chat.config; rwkv_chat.config.parse_config({'keys': {'stop': 'f9'}})")
    assert "rwkv_chat.tui.keys" in modules  # the binding ids belong to the TUI ...
    assert not any(m.startswith("rwkv_chat.tui.") and m != "rwkv_chat.tui.keys" for m in modules)
    assert "textual.app" not in modules  # ... which is not started to read them


def test_the_chat_layer_owns_no_key_bindings_or_app_config():
    modules = imported_after("import rwkv_chat.chat, rwkv_chat.chat.session, rwkv_chat.chat.snapshot, "
                             "rwkv_chat.chat.state_files, rwkv_chat.chat.store")
    assert not any(m.startswith("rwkv_chat.tui") for m in modules)
    assert "rwkv_chat.config" not in modules


def test_the_runtime_never_imports_the_trainer(tmp_path):
    """Everything but training/ and testing/ (the CLI with the demo model included) runs without
    importing rwkv_chat.training."""
    import pkgutil

    import rwkv_chat

    runtime = sorted(m.name for m in pkgutil.walk_packages(rwkv_chat.__path__, "rwkv_chat.")
                     if not m.name.startswith(("rwkv_chat.training", "rwkv_chat.testing", "rwkv_chat.tui")))
    assert "rwkv_chat.demo" in runtime and "rwkv_chat.cli" in runtime
    modules = imported_after("import " + ", ".join(runtime) + "; import rwkv_chat.tui.app, rwkv_chat.tui.keys\n"
                             f"from rwkv_chat.demo import demo_model_path; demo_model_path({str(tmp_path)!r})")
    assert "rwkv_chat.cli" in modules and "rwkv_chat.demo" in modules
    assert sorted(m for m in modules if m.startswith("rwkv_chat.training")) == []
