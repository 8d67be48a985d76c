"""Determinism: every operator's forward and backward give the same bits on repeated runs,
for 1, 2, 3 and 4 intra-op threads on CPU, and with torch.use_deterministic_algorithms(True)
(which must not raise). Inputs are large enough that each kernel splits its work over
threads (more positions and rows than one task holds)."""

from typing import Callable, Dict, List, Tuple

import pytest
import torch

from helpers import DEVICES, assert_bitwise_identical_across_thread_counts
from models import TinyAllFamiliesCNN
from operators import OPS, OpInfo

SHAPE = (3, 24, 40, 44)  # 1760 positions, 72 rows of channels
# Every variant of every operator of the operator table, by name.
CASES: Dict[str, Tuple[OpInfo, dict]] = {
    f"{op.name}_{variant['id']}": (op, variant) for op in OPS for variant in op.variants if op.applies(SHAPE, variant)
}


def _forward_and_backward(case: str, device: str, dtype: torch.dtype, layout: str) -> Callable[[], List[torch.Tensor]]:
    """A function returning the output and the gradient of every differentiable input, from
    fixed inputs."""
    op, variant = CASES[case]
    sample = op.sample(SHAPE, variant, dtype, device, layout, torch.Generator().manual_seed(11))

    def run() -> List[torch.Tensor]:
        leaves = sample.leaves()
        out = sample.output(sample.call(leaves))
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        grads = torch.autograd.grad(out, sample.inputs_to_differentiate(leaves), grad)
        return [out.detach()] + list(grads)

    return run


def _assert_equal_runs(results: List[List[torch.Tensor]]) -> None:
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_results_do_not_depend_on_runs_or_threads(case, dtype, layout):
    run = _forward_and_backward(case, "cpu", dtype, layout)
    assert_bitwise_identical_across_thread_counts(run)
    _assert_equal_runs([run() for _ in range(3)])


# ATen CPU operators whose results may change with the thread count or the CPU: BLAS
# products (MKL splits a product by thread count, and on AMD processors changes kernels with
# the split) and CPU flash attention, which is built on them. The operators compute these
# products themselves.
BLAS_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
            "aten::linear", "aten::mv", "aten::addmv", "aten::dot", "aten::vdot",
            "aten::_scaled_dot_product_flash_attention_for_cpu"}
# ATen's CPU softmax, whose vector sums stall on rows longer than 2^24 positions. (Channel
# attention's softmax gate runs over the channels, a row as short as C.)
SOFTMAX_OPS = {"aten::softmax", "aten::_softmax", "aten::_softmax_backward_data", "aten::log_softmax"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_operators_call_no_blas_and_no_aten_softmax(case):
    run = _forward_and_backward(case, "cpu", torch.float32, "contiguous")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    called = {event.name for event in profile.events()}
    # The profile sees the operators and the ATen calls inside them (their allocations).
    assert any(name.startswith("cnn_attention::") for name in called) and "aten::empty" in called
    assert not called & BLAS_OPS, sorted(called & BLAS_OPS)
    if not CASES[case][0].aten_softmax_over_channels:
        assert not called & SOFTMAX_OPS, sorted(called & SOFTMAX_OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_results_under_use_deterministic_algorithms(device, case):
    """Deterministic mode raises nothing and, on CPU, changes nothing; on CUDA the repeated
    runs agree bit for bit (torch's memory-efficient attention backward is deterministic only
    in this mode)."""
    run = _forward_and_backward(case, device, torch.float32, "contiguous")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = [run() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    _assert_equal_runs(results)
    if device == "cpu":
        _assert_equal_runs([results[0], run()])


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_runs_agree_without_deterministic_mode(device):
    """Our own kernels use no atomics: repeated runs agree even outside deterministic mode
    (on CUDA, self attention's memory-efficient backward is the exception, see above)."""
    for case in sorted(CASES):
        if device == "cuda" and case.startswith("self_attention"):
            continue
        run = _forward_and_backward(case, device, torch.float32, "channels_last")
        _assert_equal_runs([run() for _ in range(3)])


@pytest.mark.parametrize("device", DEVICES)
def test_model_with_every_module_trains_deterministically(device):
    """Two training steps of a model with all four families under deterministic mode, twice:
    the same loss, outputs and parameters bit for bit."""

    def train() -> List[torch.Tensor]:
        torch.manual_seed(4)
        model = TinyAllFamiliesCNN().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(4, 3, 24, 24, device=device)
        labels = torch.randint(0, 10, (4,), device=device)
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
        return [loss.detach()] + [p.detach().clone() for p in model.parameters()]

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _assert_equal_runs([train(), train()])
    finally:
        torch.use_deterministic_algorithms(before)
