"""The C source of the CPU kernels (kernels/cpu/): it compiles without a single warning, and the
package data rules ship it."""
from __future__ import annotations

import fnmatch
import platform
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from rwkv_chat.engine import cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
STRICT = ["-std=gnu11", "-pthread", "-fPIC", "-O2", "-fopenmp-simd", "-Wall", "-Wextra", "-Werror",
          "-Wmissing-prototypes", "-Wshadow"]
# the portable loops, the machine's own code paths, and (on x86) the AVX2-only and every AVX-512 path
TARGETS = ["-march=native"] + (["-march=x86-64", "-march=x86-64-v3", "-march=sapphirerapids"]
                               if platform.machine() in ("x86_64", "AMD64") else [])


@pytest.mark.skipif(CC is None, reason="no C compiler on PATH")
@pytest.mark.parametrize("target", TARGETS)
def test_the_c_source_compiles_without_warnings(tmp_path, target):
    proc = subprocess.run([CC, *STRICT, target, "-c", str(cpu_kernels.SOURCE_DIR / "rwkv_cpu.c"),
                           "-I", str(cpu_kernels.SOURCE_DIR), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_compiled_text_is_the_files(tmp_path):
    """What is built (and hashed into the cache name) is the .c file with its header pasted in."""
    text = cpu_kernels.source()
    header = (cpu_kernels.SOURCE_DIR / "rwkv_cpu.h").read_text()
    main = (cpu_kernels.SOURCE_DIR / "rwkv_cpu.c").read_text()
    assert header in text and '#include "rwkv_cpu.h"' not in text
    assert text.replace(header, "") == main.replace('#include "rwkv_cpu.h"', "")


def test_every_kernel_source_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["rwkv_chat"]
    assert (ROOT / "rwkv_chat" / "kernels").resolve() == (ROOT / "kernels").resolve()  # the link the wheel follows
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").rglob("*") if p.is_file()]
    assert "kernels/cpu/rwkv_cpu.c" in sources and "kernels/wkv7.cu" in sources
    missing = [s for s in sources if not any(fnmatch.fnmatch(s, p) and s.count("/") == p.count("/") for p in patterns)]
    assert not missing, f"not shipped in the wheel: {missing}"
