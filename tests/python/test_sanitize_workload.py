"""tests/sanitize/run_ops.py is the workload that scripts/gpu_check.sh runs under
compute-sanitizer; run it on CPU here so that it keeps working where no GPU is, and check that
it calls every operator of the operator table."""

import os
import re
import subprocess
import sys
from pathlib import Path

from operators import OPS

ROOT = Path(__file__).resolve().parents[2]


def test_sanitizer_workload_runs_on_cpu_and_calls_every_operator() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    code = (
        "import runpy, sys, torch, torch.utils._python_dispatch\n"
        "called = set()\n"
        "class Record(torch.utils._python_dispatch.TorchDispatchMode):\n"
        "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
        "        called.add(str(func))\n"
        "        return func(*args, **(kwargs or {}))\n"
        "sys.argv = [sys.argv[1], '--device', 'cpu']\n"
        "with Record():\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "print(sorted(c for c in called if 'cnn_attention' in c))\n"
    )
    child = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests" / "sanitize" / "run_ops.py")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    assert "operator calls (forward and backward) on cpu" in child.stdout
    called = set(re.findall(r"cnn_attention\.(\w+)", child.stdout))
    # Below autograd, a forward is the operator itself or its private _<op>_forward.
    for op in OPS:
        assert op.name in called or f"_{op.name}_forward" in called, (op.name, called)
        assert f"_{op.name}_backward" in called, (op.name, called)
