"""Determinism: every operator's forward and backward give the same bits on repeated runs,
for 1, 2, 3 and 4 intra-op threads on CPU, and with torch.use_deterministic_algorithms(True)
(which must not raise). Inputs are large enough that each kernel splits its work over
threads (more positions and rows than one task holds)."""

from typing import Callable, Dict, List, Tuple

import pytest
import torch

from helpers import DEVICES, assert_bitwise_identical_across_thread_counts, in_layout
from models import TinyAllFamiliesCNN

ops = torch.ops.cnn_attention
SHAPE = (3, 24, 40, 44)  # 1760 positions, 72 rows of channels
Case = Callable[[Dict[str, torch.Tensor]], torch.Tensor]


def _scores(channels: int):
    return lambda t: torch.randn((SHAPE[0], channels) + SHAPE[2:])


def _self_attention_params(qk: int, v: int) -> Dict[str, Callable]:
    c = SHAPE[1]
    return {"qkv_weight": lambda t: torch.randn(2 * qk + v, c) / c**0.5, "qkv_bias": lambda t: torch.randn(2 * qk + v),
            "out_weight": lambda t: torch.randn(c, v) / v**0.5, "out_bias": lambda t: torch.randn(c),
            "gamma": lambda t: torch.full((1,), 0.7)}


# name -> (extra inputs besides x, by name and maker; the call)
CASES: Dict[str, Tuple[Dict[str, Callable], Case]] = {
    **{f"channel_attention_{pool}_{gate}": (
        {"fc1_weight": lambda t: torch.randn(6, SHAPE[1]), "fc1_bias": lambda t: torch.randn(6),
         "fc2_weight": lambda t: torch.randn(SHAPE[1], 6), "fc2_bias": lambda t: torch.randn(SHAPE[1])},
        lambda a, pool=pool, gate=gate: ops.channel_attention(
            a["x"], a["fc1_weight"], a["fc1_bias"], a["fc2_weight"], a["fc2_bias"], pool, gate))
       for pool, gate in [("avg", "sigmoid"), ("max", "softmax"), ("avgmax", "sigmoid")]},
    "channel_pool": ({}, lambda a: ops.channel_pool(a["x"])),
    **{f"soft_attention_{normalize}_{channels}": (
        {"scores": _scores(channels)},
        lambda a, normalize=normalize: ops.soft_attention(a["x"], a["scores"], normalize, 0.8))
       for normalize in ["sigmoid", "softmax"] for channels in [1, SHAPE[1]]},
    **{f"soft_attention_pool_{channels}": (
        {"scores": _scores(channels)}, lambda a: ops.soft_attention_pool(a["x"], a["scores"], 0.8))
       for channels in [1, SHAPE[1]]},
    **{f"hard_attention_{mode}_{channels}": (
        {"scores": _scores(channels)},
        lambda a, mode=mode: ops.hard_attention(a["x"], a["scores"], mode, 0.4, 700, "sigmoid", 1.0)[0])
       for mode in ["threshold", "topk"] for channels in [1, SHAPE[1]]},
    # Query/key heads narrower than value heads, as wide (the shape ATen's CPU flash kernel
    # would take), and keys and values pooled by 2.
    "self_attention_narrow_heads": (
        _self_attention_params(8, 24), lambda a: ops.self_attention(*_self_args(a), 8, 2, 1)),
    "self_attention_equal_heads": (
        _self_attention_params(24, 24), lambda a: ops.self_attention(*_self_args(a), 24, 2, 1)),
    "self_attention_kv_stride_2": (
        _self_attention_params(8, 24), lambda a: ops.self_attention(*_self_args(a), 8, 2, 2)),
}


def _self_args(a: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [a[name] for name in ["x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma"]]


def _forward_and_backward(case: str, device: str, dtype: torch.dtype, layout: str) -> Callable[[], List[torch.Tensor]]:
    """A function returning the output and the gradient of every input, from fixed inputs."""
    makers, call = CASES[case]
    torch.manual_seed(11)
    inputs = {"x": in_layout(torch.randn(SHAPE), layout)}
    inputs.update({name: make(inputs["x"]) for name, make in makers.items()})
    if "scores" in inputs:
        inputs["scores"] = in_layout(inputs["scores"], layout)
    inputs = {name: t.to(device=device, dtype=dtype) for name, t in inputs.items()}

    def run() -> List[torch.Tensor]:
        leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
        out = call(leaves)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        grads = torch.autograd.grad(out, list(leaves.values()), grad)
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
    if not case.startswith("channel_attention"):
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
