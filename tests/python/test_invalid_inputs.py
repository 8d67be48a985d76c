"""Invalid-input fuzzing (tests/fuzz/invalid_inputs.py) with a bounded count.

The fuzzer runs in a child process: a crash (a signal) in an operator must fail this test
with the call that caused it, not take pytest down with it. `make fuzz` runs it longer.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from operators import OPS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fuzz" / "invalid_inputs.py"
CALLS = 2000
SEED = 20240611


def test_invalid_inputs(tmp_path: Path) -> None:
    report, trace = tmp_path / "fuzz.json", tmp_path / "trace.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(SCRIPT), "--calls", str(CALLS), "--seed", str(SEED),
               "--json", str(report), "--trace", str(trace)]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    print(child.stdout)
    if child.returncode < 0:
        lines = trace.read_text().splitlines() if trace.exists() else []
        last = lines[-1] if lines else "(no call traced)"
        raise AssertionError(
            f"the fuzzer died of {signal.Signals(-child.returncode).name} at call {last}\n"
            f"replay: {sys.executable} {SCRIPT} --seed {SEED} --replay {last.split(' ', 1)[0]}\n"
            f"{child.stderr[-4000:]}"
        )
    assert report.exists(), f"no report (exit status {child.returncode}):\n{child.stderr[-4000:]}"
    results = json.loads(report.read_text())
    idle = [t for t, counts in results["targets"].items() if counts["calls"] == 0]
    assert not idle, f"targets that got no call: {idle}"
    assert child.returncode == 0, (
        f"{len(results['failures'])} failures (exit status {child.returncode}); the table and the "
        f"groups are above, every failure is in the JSON report. {child.stderr[-2000:]}"
    )


def _none_cases():
    """(operator, its table's valid call with one required tensor (a `Tensor` argument of its
    schema) replaced by None, that tensor's name)."""
    for op in OPS:
        schema = getattr(torch.ops.cnn_attention, op.name).default._schema
        required = [a.name for a in schema.arguments if str(a.type) == "Tensor"]
        for name in required:
            arguments = {**op.valid_call(), name: None}
            yield op.name, [arguments[n] for n in op.arguments], name


def test_none_for_a_required_tensor_names_the_operator() -> None:
    """torch's autograd layer would say "tensor does not have a device": the operators check
    first, with and without gradients (inference mode skips the autograd layer)."""
    for op, args, name in _none_cases():
        for mode in (torch.enable_grad, torch.inference_mode):
            with mode(), pytest.raises(RuntimeError, match=rf"^{op}: |cnn_attention::{op}"):
                getattr(torch.ops.cnn_attention, op)(*args)
        with pytest.raises(RuntimeError, match=rf"^{op}: {name} must be a tensor, got None"):
            getattr(torch.ops.cnn_attention, op)(*args)


def _fuzzer():
    """The fuzzer as a module (it is a script, not on the import path); a fresh one each call,
    since a test removes generators from its OP_KINDS. Registered before it runs: its
    dataclasses look their module up in sys.modules."""
    spec = importlib.util.spec_from_file_location("invalid_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["invalid_inputs"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_the_fuzzer_oracle_agrees_with_the_operator_table(op):
    """The fuzzer's oracle (its model of validity, written from docs/design.md) and the
    operator table's fixed calls (tests/shared/bad_calls.py) are two descriptions of the same
    checks: the oracle must accept the table's valid call and reject every bad call."""
    kinds = _fuzzer().OP_KINDS
    if op.name not in kinds:
        pytest.skip(f"the fuzzer has no oracle for {op.name}: it fuzzes it from the table")
    oracle = kinds[op.name].valid
    assert oracle(op.valid_call()), f"{op.name}: the oracle rejects the valid call"
    accepted = [bad.id for bad in op.bad_calls if oracle(bad.change(op.valid_call()))]
    assert not accepted, f"{op.name}: the oracle accepts the bad calls {accepted}"


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_the_fuzzer_fuzzes_an_operator_of_the_table_without_its_generator(op):
    """An operator the fuzzer has no generator and oracle for is fuzzed from its table entry,
    its private operators too: calls that are accepted and calls that are rejected, none with
    a problem (a disallowed exception, a message that does not name the operator, a hang)."""
    fuzzer = _fuzzer()
    private = {name for name, kind in fuzzer.table_op_kinds().items() if kind.base == op.name and name != op.name}
    for name in {op.name, *private}:
        fuzzer.OP_KINDS.pop(name, None)
    weights = fuzzer.targets()
    assert {op.name, *private} <= set(fuzzer.TABLE_OP_KINDS)
    outcomes = [fuzzer.run_call(fuzzer.make_call(SEED, i, {name: 1.0 for name in {op.name, *private}}), slow=10.0)
                for i in range(300)]
    problems = [(i, o.problem, o.message) for i, o in enumerate(outcomes) if o.problem]
    assert not problems, problems[:5]
    assert any(o.accepted for o in outcomes) and any(not o.accepted for o in outcomes)
    assert set(weights) >= {op.name, *private}
