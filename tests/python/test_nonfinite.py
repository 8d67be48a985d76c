"""Non-finite values: NaN and infinities in any input propagate as in the eager composition
(the float64 references of helpers.py), forward and backward, element for element; rows of
scores that are all NaN give the defined results the README states."""

import math
import zlib

import pytest
import torch

from helpers import DEVICES, hard_attention_reference, soft_attention_reference
from operators import BY_NAME, OPS, Sample

ops = torch.ops.cnn_attention
VALUES = [float("nan"), float("inf"), -float("inf")]
DTYPES = [torch.float64, torch.float32]


def poison(t: torch.Tensor, value: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """A copy of `t` with `count` elements at random places set to `value`."""
    t = t.clone()
    if t.numel():
        where = torch.randperm(t.numel(), generator=generator)[:count]
        t.view(-1)[where.to(t.device)] = value
    return t


def assert_finite_values_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Where the reference is finite: within 1e-4 relative, and 1e-5 of the largest finite
    value absolute (a value near zero is a cancellation of terms that size: on CUDA a float32
    weight gradient of terms near 50 came out 1.2e-5 where the reference has 4e-14)."""
    finite = expected.isfinite()
    scale = max(1.0, float(expected[finite].detach().abs().max())) if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal NaN, +inf and -inf positions, and close finite values."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual == math.inf, expected == math.inf), f"{what}: +inf positions differ"
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{what}: -inf positions differ"
    assert_finite_values_close(actual, expected, what)


def assert_nonfinite_where_reference_is(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Non-finite exactly where the reference is, close elsewhere; an infinity may stand for
    the reference's NaN (a sum of +inf and -inf terms that the operator never forms)."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{what}: non-finite positions differ"
    assert_finite_values_close(actual, expected, what)


def check_forward_and_backward(sample: Sample, tensors, what: str, factored=()) -> None:
    """The sample's call on `tensors` against its float64 reference, and the gradient of every
    differentiable input, NaN/inf positions included; for the inputs named in `factored`, see
    assert_nonfinite_where_reference_is."""
    op = sample.op
    leaves = {name: None if t is None else t.detach().clone().requires_grad_(name in op.differentiable)
              for name, t in tensors.items()}
    ref_leaves = {name: None if t is None else t.detach().double().requires_grad_(name in op.differentiable)
                  for name, t in tensors.items()}
    out, expected = sample.output(sample.call(leaves)), sample.reference(ref_leaves)
    assert_same_values(out, expected, f"{what}: forward")
    grad = torch.randn(out.shape, dtype=torch.float64).to(out)
    got = torch.autograd.grad(out, sample.inputs_to_differentiate(leaves), grad)
    want = torch.autograd.grad(expected, sample.inputs_to_differentiate(ref_leaves), grad.double())
    for name, a, b in zip(sample.differentiable_names(tensors), got, want):
        check = assert_nonfinite_where_reference_is if name in factored else assert_same_values
        check(a, b, f"{what}: gradient of {name}")


SHAPE = (3, 6, 5, 7)
CASES = [(op, variant, target) for op in OPS for variant in op.variants if op.applies(SHAPE, variant)
         for target in op.poison_targets]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("op,variant,target", CASES,
                         ids=[f"{op.name}-{variant['id']}-{target}" for op, variant, target in CASES])
def test_operator(device, dtype, value, op, variant, target):
    """Every variant of every operator of the operator table, with non-finite values in each
    input the table names: the forward and every gradient against the float64 reference."""
    what = f"{op.name} {variant['id']} {value} in {target}"
    # A seed that is the same in every process (str hashes are salted per process).
    g = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    sample = op.sample(SHAPE, variant, dtype, device, "contiguous", g)
    tensors = dict(sample.tensors)
    tensors[target] = poison(tensors[target], value, op.poison_count, g)
    factored = op.factored_gradients.get(target, ()) if math.isinf(value) else ()
    check_forward_and_backward(sample, tensors, what, factored)


POOLED_SHAPES = [(2, 6, 9), (2, 6, 5, 4, 5)]
POOLED_CASES = [(variant, shape) for variant in BY_NAME["self_attention"].variants
                for shape in POOLED_SHAPES
                if variant["kv_stride"] > 1 and BY_NAME["self_attention"].applies(shape, variant)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
@pytest.mark.parametrize("variant,shape", POOLED_CASES,
                         ids=[f"{v['id']}-{len(s) - 2}d" for v, s in POOLED_CASES])
def test_self_attention_pooling_windows_of_infinities(device, value, variant, shape):
    """An infinity in qkv_weight makes whole pooling windows of keys or values -inf in 1 and 3
    spatial dims (test_operator has 2): their gradients go to each window's first position,
    as in the reference. ATen's CUDA pooling of channels-last maps names position 0 for such
    a window; on an H200 that sent qkv_weight's gradient astray by up to 17.7."""
    op = BY_NAME["self_attention"]
    what = f"self_attention {variant['id']} {value} in qkv_weight, {len(shape) - 2}-d"
    g = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    sample = op.sample(shape, variant, torch.float64, device, "contiguous", g)
    tensors = dict(sample.tensors)
    tensors["qkv_weight"] = poison(tensors["qkv_weight"], value, op.poison_count, g)
    check_forward_and_backward(sample, tensors, what, op.factored_gradients.get("qkv_weight", ()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
def test_channel_pool_meets_both_infinities_at_one_position(device, dtype, value):
    g = torch.Generator().manual_seed(1)
    sample = BY_NAME["channel_pool"].sample((2, 5, 6, 7), {"id": "mean_max"}, dtype, device, "contiguous", g)
    x = poison(sample.tensors["x"], value, 12, g)
    x[0, 1:3, 2, 2] = torch.tensor([math.inf, -math.inf], dtype=dtype)
    check_forward_and_backward(sample, {"x": x}, f"channel_pool {value}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("target", ["x", "scores"])
def test_hard_attention_mask(device, dtype, value, mode, target):
    """The 0/1 mask (the second result) of poisoned inputs equals the reference's."""
    g = torch.Generator().manual_seed(4)
    variant = {"id": mode, "mode": mode, "estimator": "sigmoid", "score_channels": "one", "k_fraction": 0.25,
               "threshold": 0.5, "temperature": 1.0}
    sample = BY_NAME["hard_attention"].sample((3, 4, 5, 6), variant, dtype, device, "contiguous", g)
    tensors = dict(sample.tensors)
    tensors[target] = poison(tensors[target], value, 6, g)
    _, mask = sample.call(tensors)
    options = sample.options
    _, mask_ref = hard_attention_reference(tensors["x"], tensors["scores"], options["mode"], options["threshold"],
                                           options["k"], options["temperature"])
    assert torch.equal(mask.double(), mask_ref), f"hard_attention {mode} {value} in {target}: mask"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("kv_stride", [1, 2])
def test_self_attention_non_finite_query_rows(device, dtype, value, kv_stride):
    """Only the scores are non-finite (the values finite): the softmax itself must give NaN."""
    g = torch.Generator().manual_seed(5)
    variant = {"id": "odd_heads", "qk": 4, "v": 6, "heads": 2, "kv_stride": kv_stride}
    sample = BY_NAME["self_attention"].sample(SHAPE, variant, dtype, device, "contiguous", g)
    tensors = dict(sample.tensors)
    tensors["qkv_weight"] = tensors["qkv_weight"].clone()
    tensors["qkv_weight"][1, 2] = value  # row 1 is a query row
    check_forward_and_backward(sample, tensors, f"self_attention {value} in a query row")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("variant_id", ["one_head_of_2", "narrow_heads", "one_head_kv_stride_2"])
def test_self_attention_non_finite_output_gradient_in_one_sample(device, dtype, value, variant_id):
    """The CPU backward takes the output projection's and the values' gradients from the sums
    T = p^T grad_y where they take fewer multiply-adds than recomputing the heads (these
    variants at 8 x 8 positions), a chunk of samples at a time (here one sample each). It
    associates the products otherwise than the reference, so infinities would spread otherwise:
    a chunk whose T or v is not finite takes the heads' way. A NaN or infinity in one sample's
    output gradient: NaN and infinity positions as in the reference, the other samples'
    gradients finite and close. gamma's gradient is one sum, formed from the output
    projection's gradient product G = sum grad_y^T attn (every backward way): there an
    infinity of grad_y meets terms of both signs (NaN) where the reference's sum of grad_y * out
    has it once (an infinity); both are non-finite."""
    op = BY_NAME["self_attention"]
    variant = next(v for v in op.variants if v["id"] == variant_id)
    what = f"self_attention {variant_id} {value} in one sample's grad_y"
    g = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    sample = op.sample((4, 6, 8, 8), variant, dtype, device, "contiguous", g)
    leaves = {name: None if t is None else t.detach().clone().requires_grad_(name in op.differentiable)
              for name, t in sample.tensors.items()}
    ref_leaves = {name: None if t is None else t.detach().double().requires_grad_(name in op.differentiable)
                  for name, t in sample.tensors.items()}
    out, expected = sample.output(sample.call(leaves)), sample.reference(ref_leaves)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    grad[2] = poison(grad[2], value, 3, g)
    grad = grad.to(device)
    got = torch.autograd.grad(out, sample.inputs_to_differentiate(leaves), grad.to(dtype))
    want = torch.autograd.grad(expected, sample.inputs_to_differentiate(ref_leaves), grad)
    names = sample.differentiable_names(sample.tensors)
    assert not want[names.index("x")][[0, 1, 3]].isnan().any()
    for name, a, b in zip(names, got, want):
        check = assert_nonfinite_where_reference_is if name == "gamma" else assert_same_values
        check(a, b, f"{what}: gradient of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_self_attention_non_finite_output_gradient_of_a_lone_sample(dtype, value, layout):
    """A batch of one sample whose values are as wide as its tokens (v = C; T's way), where the
    CPU backward writes the values, and then their gradient, into grad_x's memory: a NaN or
    infinity in the output gradient makes G non-finite, and the backward takes the heads' way
    from the projection again. NaN and infinity positions as in the reference (gamma's gradient
    non-finite where the reference's is: see
    test_self_attention_non_finite_output_gradient_in_one_sample)."""
    op = BY_NAME["self_attention"]
    what = f"self_attention lone sample {value} in grad_y, {layout}"
    g = torch.Generator().manual_seed(zlib.crc32(what.encode()))
    channels, qk_dim = 16, 2  # q and k narrow next to v: the values go to grad_x's memory
    x = torch.randn(1, channels, 8, 8, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    tensors = {
        "x": x,
        # Logits of about unit size: no probability underflows to 0 in float32 (0 * inf is NaN
        # where the reference has an infinity).
        "qkv_weight": torch.randn(2 * qk_dim + channels, channels, dtype=torch.float64, generator=g)
        / channels**0.5,
        "qkv_bias": 0.1 * torch.randn(2 * qk_dim + channels, dtype=torch.float64, generator=g),
        "out_weight": torch.randn(channels, channels, dtype=torch.float64, generator=g) / channels**0.5,
        "out_bias": 0.1 * torch.randn(channels, dtype=torch.float64, generator=g),
        "gamma": torch.full((1,), 0.8, dtype=torch.float64),
    }
    sample = Sample(op, {name: t.to(dtype) for name, t in tensors.items()},
                    {"qk_dim": qk_dim, "num_heads": 1, "kv_stride": 1})
    leaves = {name: t.detach().clone().requires_grad_(name in op.differentiable)
              for name, t in sample.tensors.items()}
    ref_leaves = {name: t.detach().double().requires_grad_(name in op.differentiable)
                  for name, t in sample.tensors.items()}
    out, expected = sample.output(sample.call(leaves)), sample.reference(ref_leaves)
    grad = poison(torch.randn(out.shape, dtype=torch.float64, generator=g), value, 3, g)
    got = torch.autograd.grad(out, sample.inputs_to_differentiate(leaves), grad.to(dtype))
    want = torch.autograd.grad(expected, sample.inputs_to_differentiate(ref_leaves), grad)
    for name, a, b in zip(sample.differentiable_names(sample.tensors), got, want):
        check = assert_nonfinite_where_reference_is if name == "gamma" else assert_same_values
        check(a, b, f"{what}: gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_all_nan_score_rows(device):
    """A sample whose scores are all NaN: softmax weights are NaN (as torch.softmax gives),
    top-k keeps the first k positions (NaN ranks as +inf, ties to the lower index), threshold
    keeps none; the other samples are untouched."""
    x = torch.randn(2, 3, 4, 5, device=device)
    scores = torch.randn(2, 1, 4, 5, device=device)
    scores[1] = float("nan")
    for normalize in ["softmax", "sigmoid"]:
        y = ops.soft_attention(x, scores, normalize, 1.0)
        assert y[1].isnan().all()
        torch.testing.assert_close(y[0], soft_attention_reference(x, scores, normalize)[0])
    pooled = ops.soft_attention_pool(x, scores, 1.0)
    assert pooled[1].isnan().all() and pooled[0].isfinite().all()
    y, mask = ops.hard_attention(x, scores, "topk", 0.5, 6, "sigmoid", 1.0)
    assert torch.equal(mask[1].flatten(), (torch.arange(20, device=device) < 6).float())
    assert torch.equal(y[1], x[1] * mask[1])
    y, mask = ops.hard_attention(x, scores, "threshold", 0.5, 1, "sigmoid", 1.0)
    assert not mask[1].any() and torch.equal(y[1], torch.zeros_like(y[1]))
    # Channel attention's softmax gate over all-NaN logits (a NaN MLP weight): NaN weights.
    w1, w2 = torch.randn(2, 3, device=device), torch.full((3, 2), float("nan"), device=device)
    assert ops.channel_attention(x, w1, None, w2, None, "avg", "softmax").isnan().all()
