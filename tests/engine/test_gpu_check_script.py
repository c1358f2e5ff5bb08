"""scripts/gpu_check.py runs its plumbing on a CPU (the GPU run itself needs a GPU machine)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_smoke(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
               "--sections", "env,kernels", "--budget", "120", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["torch"]
    assert any(v["what"].startswith("kernels") for v in report["verdicts"])
    assert "=== summary" in (tmp_path / "gpu_check.log").read_text()
