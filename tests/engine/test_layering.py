"""The engine is usable without the UI: importing it must not pull in textual."""
import subprocess
import sys


def test_engine_and_chat_core_do_not_import_the_ui():
    code = (
        "import sys, rwkv_chat.engine, rwkv_chat.errors\n"
        "import importlib.util\n"
        "for name in ('rwkv_chat.pipeline', 'rwkv_chat.chat.session'):\n"
        "    if importlib.util.find_spec(name.rsplit('.', 1)[0]) and importlib.util.find_spec(name):\n"
        "        importlib.import_module(name) if False else __import__(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'click', 'rwkv'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_package_import_is_lazy():
    code = "import sys, rwkv_chat; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
