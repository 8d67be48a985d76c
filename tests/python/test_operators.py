"""The checks every operator of the operator table (tests/shared/operators.py) gets the same way:
the forward and every gradient against the float64 reference over every variant x dtype x
layout x spatial rank (with the layout of every output), the bad calls and their messages,
gradcheck in float64 over every variant and spatial rank, and torch.library.opcheck (schema,
fake tensor, autograd registration, AOT dispatch) of the operator and of the private operators
its autograd calls, over every dtype the kernels dispatch on x every layout x every spatial
rank, cycling through the variants. Each operator's own semantics (ties, identities, empty
inputs, bad backward arguments, modules) are in its test_<op>.py."""

import itertools

import pytest
import torch
from torch import Tensor
from helpers import DEVICES, DTYPES, LAYOUTS, SPATIAL, in_layout
from operators import OPS, check_against_reference

REFERENCE_CASES = [
    (op, variant, dtype, layout, shape)
    for op in OPS
    for channels in op.reference_channels
    for spatial in SPATIAL
    for shape in [(3, channels) + spatial]
    for variant in op.variants if op.applies(shape, variant)
    for dtype in DTYPES
    for layout in LAYOUTS
]


def _assert_laid_out_like_x(t, x, layout, what):
    """A feature map the operator allocates (output or gradient) is stored channels-last for a
    channels-last x and contiguous otherwise."""
    if t.dim() != x.dim():
        return
    if layout == "channels_last":
        if x.is_contiguous():
            return  # one channel or one position: the layouts are the same
        order = [0] + list(range(2, t.dim())) + [1]
        assert t.permute(order).is_contiguous(), f"{what}: channels_last input must give channels_last {what}"
    else:
        assert t.is_contiguous(), f"{what} must be contiguous"


def _case_id(op, variant, dtype, layout, where):
    return f"{op.name}-{variant['id']}-{str(dtype)[6:]}-{layout}-{where}"


@pytest.fixture
def torch_default_tf32():
    """torch's default float32 precision on CUDA, as users run: cuDNN convolutions in TF32
    (conftest.py turns that off for the eager compositions). The operators' float32 results
    must not depend on it; the float64 references are not touched by it."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,variant,dtype,layout,shape", REFERENCE_CASES,
                         ids=[_case_id(*case[:4], "x".join(map(str, case[4]))) for case in REFERENCE_CASES])
def test_matches_float64_reference(device, op, variant, dtype, layout, shape, torch_default_tf32):
    generator = torch.Generator().manual_seed(sum(shape) + len(variant["id"]))
    sample = op.sample(shape, variant, dtype, device, layout, generator)
    result, grads = check_against_reference(sample, generator)
    x = sample.tensors["x"]
    for i, out in enumerate(result if isinstance(result, tuple) else (result,)):
        _assert_laid_out_like_x(out, x, layout, f"{op.name} output {i}")
    for name in op.feature_maps:
        if name in grads and sample.tensors[name].shape == x.shape:
            _assert_laid_out_like_x(grads[name], x, layout, f"{op.name} gradient of {name}")

BATCH_AND_CHANNELS = (2, 3)
GRADCHECK_SPATIAL = [(5,), (3, 4), (2, 3, 2)]
GRADCHECK_CASES = [
    (op, variant, spatial)
    for op in OPS if op.gradcheck
    for variant in op.variants
    for spatial in GRADCHECK_SPATIAL
    if op.applies(BATCH_AND_CHANNELS + spatial, variant)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,variant,spatial", GRADCHECK_CASES,
                         ids=[f"{op.name}-{variant['id']}-{len(spatial)}d" for op, variant, spatial in GRADCHECK_CASES])
def test_gradcheck(device, op, variant, spatial):
    # Random inputs: a max (pooling, kv_stride > 1) is not differentiable where values tie.
    generator = torch.Generator().manual_seed(len(spatial))
    sample = op.sample(BATCH_AND_CHANNELS + spatial, variant, torch.float64, device, "contiguous", generator)
    leaves = sample.leaves()
    names = [name for name in op.differentiable if leaves[name] is not None]

    def call(*tensors):
        return sample.output(sample.call({**leaves, **dict(zip(names, tensors))}))

    assert torch.autograd.gradcheck(call, [leaves[name] for name in names])


BAD_CALLS = [(op, bad) for op in OPS for bad in op.bad_calls]


def _call_on(op, arguments, device):
    arguments = {name: value.to(device) if isinstance(value, Tensor) else value for name, value in arguments.items()}
    return getattr(torch.ops.cnn_attention, op.name)(*[arguments[name] for name in op.arguments])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_the_valid_call_of_the_bad_calls_runs(device, op):
    assert op.valid_call is not None and op.bad_calls, f"{op.name}: the table must give its bad calls"
    _call_on(op, op.valid_call(), device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op,bad", BAD_CALLS, ids=[f"{op.name}-{bad.id}" for op, bad in BAD_CALLS])
def test_bad_call_raises_runtime_error_naming_operator_and_argument(device, op, bad):
    with pytest.raises(RuntimeError, match=bad.message):
        _call_on(op, bad.change(op.valid_call()), device)


OPCHECK_UTILS_PRIVATE = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_SPATIAL = [(6,), (4, 5), (2, 3, 4)]


def _opcheck_cases():
    """Every dtype x layout x spatial rank per operator, each with the next of its variants."""
    cases = []
    for op in OPS:
        combinations = itertools.product([torch.float64, torch.float32, torch.bfloat16], LAYOUTS, OPCHECK_SPATIAL)
        for i, (dtype, layout, spatial) in enumerate(combinations):
            variant = op.variants[i % len(op.variants)]
            if op.applies((2, 4) + spatial, variant):
                cases.append((op, variant, dtype, layout, spatial))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,variant,dtype,layout,spatial", OPCHECK_CASES,
                         ids=[_case_id(*case[:4], f"{len(case[4])}d") for case in OPCHECK_CASES])
def test_opcheck(device, op, variant, dtype, layout, spatial):
    shape = (2, 4) + spatial
    sample = op.sample(shape, variant, dtype, device, layout, torch.Generator().manual_seed(3))
    torch.library.opcheck(getattr(torch.ops.cnn_attention, op.name), tuple(sample.args(sample.leaves())))
    out = sample.output(sample.call())
    grad = in_layout(torch.randn(out.shape, device=device).to(dtype), layout)
    private = op.private_calls(sample, grad)
    assert private, f"{op.name}: its autograd calls private operators; the table must name them"
    for name, args in private:
        torch.library.opcheck(getattr(torch.ops.cnn_attention, name), args, test_utils=OPCHECK_UTILS_PRIVATE)
