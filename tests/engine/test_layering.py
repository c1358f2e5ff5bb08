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
