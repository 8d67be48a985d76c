"""tests/sanitize/run_ops.py is the workload that scripts/gpu_check.sh runs under
compute-sanitizer; run it on CPU here so that it keeps working where no GPU is."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sanitizer_workload_runs_on_cpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    child = subprocess.run([sys.executable, str(ROOT / "tests" / "sanitize" / "run_ops.py"), "--device", "cpu"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    assert "operator calls (forward and backward) on cpu" in child.stdout
