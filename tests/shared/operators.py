"""The operator table: every public operator of cnn_attention described once for the tests, in
the spirit of PyTorch's OpInfo. An entry gives the operator's tensor arguments for a shape of
x (their shapes, and which are feature maps laid out like x), its variants (sets of options),
its float64 reference and the tolerance of the comparison with it, which arguments are
differentiable, which inputs a test may poison, and its valid call and bad calls
(bad_calls.py). The suites iterate over OPS (docs/design.md section 3 lists them); an
operator's own tests check their special inputs with check_against_reference. Adding an
operator's tests is one entry here and in bad_calls.py plus its reference in
tests/python/helpers.py.

    for op in OPS:
        for sample in op.samples((2, 5, 7, 9), torch.float32, "cpu", "channels_last", generator):
            y = sample.output(sample.call())
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import bad_calls
import helpers
from bad_calls import Arguments, BadCall

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Sample:
    """One call of an operator: its tensors and options by schema name."""

    op: "OpInfo"
    tensors: Dict[str, Optional[Tensor]]
    options: Dict[str, object]

    def args(self, tensors: Optional[Dict[str, Optional[Tensor]]] = None) -> List[object]:
        """The arguments in schema order, with `tensors` (default: the sample's own)."""
        tensors = self.tensors if tensors is None else tensors
        return [tensors[name] if name in tensors else self.options[name] for name in self.op.arguments]

    def call(self, tensors: Optional[Dict[str, Optional[Tensor]]] = None):
        return getattr(torch.ops.cnn_attention, self.op.name)(*self.args(tensors))

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["x"].dtype

    def reference(self, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
        """The float64 reference of the differentiable output, from float64 `tensors`."""
        return self.op.reference(*self.args(tensors), **self.op.reference_options(self))

    def output(self, result) -> Tensor:
        """The differentiable output of a call's result."""
        return result if self.op.output_index is None else result[self.op.output_index]

    def leaves(self, requires_grad: bool = True) -> Dict[str, Optional[Tensor]]:
        """Fresh copies of the tensors with the same strides, the differentiable ones requiring
        grad when `requires_grad`."""
        return {name: None if t is None else same_strides_copy(t).requires_grad_(
            requires_grad and name in self.op.differentiable) for name, t in self.tensors.items()}

    def differentiable_names(self, tensors: Dict[str, Optional[Tensor]]) -> List[str]:
        """The differentiable arguments present in `tensors` (absent optional ones left out), in
        schema order."""
        return [name for name in self.op.differentiable if tensors.get(name) is not None]

    def inputs_to_differentiate(self, tensors: Dict[str, Optional[Tensor]]) -> List[Tensor]:
        return [tensors[name] for name in self.differentiable_names(tensors)]


def same_strides_copy(t: Tensor) -> Tensor:
    """A copy of `t` stored with t's strides (an expanded, stride-0 view becomes dense)."""
    if 0 in t.stride():
        return t.detach().clone()
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


@dataclass(frozen=True)
class OpInfo:
    name: str
    # Every argument name, in schema order.
    arguments: Tuple[str, ...]
    # shape of x and a variant -> {tensor name: shape}; feature maps (laid out like x) are the
    # names in `feature_maps`.
    tensor_shapes: Callable[[Shape, Dict[str, object]], Dict[str, Optional[Shape]]]
    # The variants: option sets, each with an "id"; options may depend on the shape (see resolve).
    variants: Tuple[Dict[str, object], ...]
    reference: Callable[..., Tensor]
    differentiable: Tuple[str, ...]
    feature_maps: Tuple[str, ...] = ("x",)
    # Other tensors with a batch dim (N first), e.g. channel_gate's logits (N, C): a model's
    # inputs with the feature maps in the runtime tests.
    per_sample: Tuple[str, ...] = ()
    # Which element of a tuple result is the differentiable output (None: the result itself).
    output_index: Optional[int] = None
    # The inputs a non-finite value test poisons, and how many of their elements.
    poison_targets: Tuple[str, ...] = ("x",)
    poison_count: int = 2
    # Poisoned input -> gradients in which an infinity may stand for the reference's NaN when the
    # poison is infinite (the operator factors the input out of a sum whose +inf and -inf terms
    # give eager NaN).
    factored_gradients: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    # shape, variant -> the schema's options (e.g. k from a fraction of the positions).
    resolve: Callable[[Shape, Dict[str, object]], Dict[str, object]] = lambda shape, variant: {
        k: v for k, v in variant.items() if k != "id"
    }
    # shape, variant -> whether the variant can run on that shape.
    applies: Callable[[Shape, Dict[str, object]], bool] = lambda shape, variant: True
    # Whether the operator computes a softmax over a row as short as C with ATen's softmax
    # (channel attention's softmax gate); any other softmax must be the operator's own kernel.
    aten_softmax_over_channels: bool = False
    # Whether torch.autograd.gradcheck applies (hard attention's straight-through gradient is
    # not the derivative of its 0/1 mask).
    gradcheck: bool = True
    # sample, the gradient of the differentiable output -> the calls of the private operators
    # (name, arguments) that the operator's autograd makes, for torch.library.opcheck.
    private_calls: Callable[["Sample", Tensor], List[Tuple[str, tuple]]] = lambda sample, grad: []
    # Scale of every parameter tensor (weights, biases): name -> factor on randn, from x's shape.
    parameter_scale: Callable[[str, Shape, Dict[str, object]], float] = lambda name, shape, variant: 1.0
    # sample -> keyword arguments of the reference that depend on the sample's dtype (where the
    # operator rounds in the input's precision by definition).
    reference_options: Callable[["Sample"], Dict[str, object]] = lambda sample: {}
    # Tolerance of the comparison with the reference, as a factor on helpers.TOLERANCE of the
    # dtype: "output" or a differentiable argument's name (its gradient) -> factor (default 1;
    # 0: exact).
    tolerance_scales: Dict[str, float] = field(default_factory=dict)
    # Replaces the comparison for operators whose error model is not a fixed tolerance:
    # (comparison, "output" or argument name, actual, float64 expected) -> asserts.
    compare: Optional[Callable[["Comparison", str, Tensor, Tensor], None]] = None
    # Checks of the other outputs of a tuple result: (comparison, result) -> asserts.
    check_other_outputs: Callable[["Comparison", object], None] = lambda comparison, result: None
    # Channel counts of x in the tests against the reference.
    reference_channels: Tuple[int, ...] = (6,)
    # The most positions the property test gives the reference (which may be quadratic in P).
    reference_max_positions: int = 4096
    # One valid call (arguments by schema name) and the bad calls made from it, each with the
    # message the operator must raise (tests/shared/bad_calls.py).
    valid_call: Optional[Callable[[], Arguments]] = None
    bad_calls: Tuple[BadCall, ...] = ()

    def sample(self, shape: Shape, variant: Dict[str, object], dtype: torch.dtype, device, layout: str,
               generator: Optional[torch.Generator] = None) -> Sample:
        """The sample for one variant: random values (float64 drawn, then cast), feature maps in
        `layout` (helpers.in_layout), parameters contiguous."""
        tensors: Dict[str, Optional[Tensor]] = {}
        for name, tensor_shape in self.tensor_shapes(shape, variant).items():
            if tensor_shape is None:
                tensors[name] = None
                continue
            values = torch.randn(tensor_shape, generator=generator, dtype=torch.float64)
            if name not in self.feature_maps:
                values = values * self.parameter_scale(name, shape, variant)
            t = values.to(device=device, dtype=dtype)
            tensors[name] = helpers.in_layout(t, layout) if name in self.feature_maps else t
        return Sample(self, tensors, self.resolve(shape, variant))

    def samples(self, shape: Shape, dtype: torch.dtype, device, layout: str,
                generator: Optional[torch.Generator] = None) -> List[Sample]:
        return [self.sample(shape, v, dtype, device, layout, generator) for v in self.variants if self.applies(shape, v)]


@dataclass(frozen=True)
class Comparison:
    """What a comparison with the reference may need besides the two tensors."""

    sample: Sample
    # The sample's tensors in float64, the differentiable ones leaves of the reference's graph.
    inputs: Dict[str, Optional[Tensor]]
    # The gradient of the output, in float64.
    grad: Tensor
    # A factor on every tolerance (a test's inputs that sum more terms than the table's).
    scale: float = 1.0
    # "output" or argument name -> an absolute error allowed beyond the tolerance.
    slack: Dict[str, float] = field(default_factory=dict)


def check_against_reference(sample: Sample, generator: Optional[torch.Generator] = None, scale: float = 1.0,
                            eager_slack: bool = False):
    """The sample's call against its float64 reference: the output and the gradient of every
    differentiable argument (for a random output gradient laid out like the output), each in the
    sample's dtype and shape, within the operator's tolerance (times `scale`). With
    `eager_slack`, a result may also come within 4 times the error of the eager composition (the
    reference computed in the sample's dtype: what a user would otherwise get) where that is
    larger: random shapes and values reach cancellations no fixed tolerance models. Returns the
    call's result and the gradients by argument name."""
    op, dtype = sample.op, sample.dtype
    leaves = sample.leaves()
    inputs = {name: None if t is None else t.detach().double().requires_grad_(name in op.differentiable)
              for name, t in sample.tensors.items()}
    result = sample.call(leaves)
    out, expected = sample.output(result), sample.reference(inputs)
    assert out.dtype == dtype and out.shape == expected.shape, f"{op.name}: output {out.dtype} {tuple(out.shape)}"
    grad = torch.empty_like(out).copy_(torch.randn(out.shape, generator=generator, dtype=torch.float64))
    names = sample.differentiable_names(leaves)
    wanted = torch.autograd.grad(expected, [inputs[name] for name in names], grad.double())
    slack: Dict[str, float] = {}
    if eager_slack and dtype != torch.float64:
        eager_leaves = sample.leaves()
        eager = sample.reference(eager_leaves)
        eager_grads = torch.autograd.grad(eager, [eager_leaves[name] for name in names], grad)
        for name, e, w in [("output", eager, expected), *zip(names, eager_grads, wanted)]:
            slack[name] = 4 * float((e.detach().double() - w.detach()).abs().max()) if w.numel() else 0.0
    comparison = Comparison(sample, inputs, grad.double(), scale, slack)
    compare = op.compare or _compare_in_tolerance
    compare(comparison, "output", out, expected)
    op.check_other_outputs(comparison, result)
    actual = torch.autograd.grad(out, [leaves[name] for name in names], grad)
    for name, a, w in zip(names, actual, wanted):
        assert a.dtype == dtype and a.shape == leaves[name].shape, f"{op.name}: gradient of {name}"
        compare(comparison, name, a, w)
    return result, dict(zip(names, actual))


def _compare_in_tolerance(comparison: Comparison, name: str, actual: Tensor, expected: Tensor) -> None:
    scale = comparison.scale * comparison.sample.op.tolerance_scales.get(name, 1.0)
    atol, rtol = helpers.TOLERANCE[comparison.sample.dtype]
    atol = atol * scale + comparison.slack.get(name, 0.0)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol * scale,
                               msg=lambda m: f"{comparison.sample.op.name}, {name}: {m}")


def _positions(shape: Shape) -> int:
    return math.prod(shape[2:])


def _score_channels(shape: Shape, variant) -> int:
    return 1 if variant["score_channels"] == "one" else shape[1]


def _hidden(channels: int) -> int:
    return max(1, (channels + 3) // 4)


def _fan_in_scale(name: str, fan_in: int) -> float:
    return 1.0 if name.endswith("bias") or name == "gamma" else 1.0 / math.sqrt(max(1, fan_in))


def _channel_attention_shapes(shape, variant):
    c, r = shape[1], _hidden(shape[1])
    bias = variant.get("bias", True)
    return {"x": shape, "fc1_weight": (r, c), "fc1_bias": (r,) if bias else None, "fc2_weight": (c, r),
            "fc2_bias": (c,) if bias else None}


def _channel_attention_variants():
    """pool x gate x with and without biases; the MLP's activation cycles through relu, silu,
    gelu and identity, so that each meets every pool and gate."""
    variants = []
    for pool in ("avg", "max", "avgmax"):
        for gate in ("sigmoid", "softmax", "hard_sigmoid"):
            for bias in (True, False):
                activation = ("relu", "silu", "gelu", "identity")[len(variants) % 4]
                variants.append({"id": f"{pool}_{gate}_{activation}" + ("" if bias else "_no_bias"), "pool": pool,
                                 "gate": gate, "activation": activation, "bias": bias})
    return tuple(variants)


def _score_conv_shapes(shape, variant):
    k, bias = variant["kernel_size"], variant["bias"]
    return {"conv_weight": (1, 2) + (k,) * (len(shape) - 2), "conv_bias": (1,) if bias else None}


def _score_conv_scale(name, shape, variant):
    return _fan_in_scale(name, 2 * variant["kernel_size"] ** (len(shape) - 2))


def _cbam_shapes(shape, variant):
    return {**_channel_attention_shapes(shape, variant), **_score_conv_shapes(shape, variant)}


def _cbam_variants():
    """gate x with and without biases; the activation cycles as in channel attention's, the
    score kernel through 1, 3 and 5."""
    variants = []
    for gate in ("sigmoid", "softmax", "hard_sigmoid"):
        for bias in (True, False):
            activation = ("relu", "silu", "gelu", "identity")[len(variants) % 4]
            k = (3, 1, 5)[len(variants) % 3]
            variants.append({"id": f"{gate}_{activation}_k{k}" + ("" if bias else "_no_bias"), "gate": gate,
                             "activation": activation, "kernel_size": k, "bias": bias})
    return tuple(variants)


def _cbam_spatial_variants():
    """normalize x temperature, with and without the bias; the score kernel cycles through 3, 1
    and 5."""
    variants = []
    for normalize in ("sigmoid", "softmax"):
        for temperature in (1.0, 0.7):
            for bias in (True, False):
                k = (3, 1, 5)[len(variants) % 3]
                variants.append({"id": f"{normalize}_t{temperature}_k{k}" + ("" if bias else "_no_bias"),
                                 "normalize": normalize, "temperature": temperature, "kernel_size": k,
                                 "bias": bias})
    return tuple(variants)


def _scores_shapes(shape, variant):
    return {"x": shape, "scores": (shape[0], _score_channels(shape, variant)) + tuple(shape[2:])}


def _self_attention_dims(shape, variant) -> Tuple[int, int]:
    return variant["qk"], shape[1] if variant["v"] == "C" else variant["v"]


def _self_attention_shapes(shape, variant):
    c = shape[1]
    qk, v = _self_attention_dims(shape, variant)
    bias = variant.get("bias", True)
    return {"x": shape, "qkv_weight": (2 * qk + v, c), "qkv_bias": (2 * qk + v,) if bias else None,
            "out_weight": (c, v), "out_bias": (c,) if bias else None, "gamma": (1,)}


def _self_attention_scale(name, shape, variant):
    _, v = _self_attention_dims(shape, variant)
    # The logits q.k / sqrt(d) of a standard normal x then have a standard deviation of about
    # 1.5**2: the softmax is neither flat nor one-hot.
    if name == "qkv_weight":
        return 1.5 * _fan_in_scale(name, shape[1])
    return _fan_in_scale(name, v if name == "out_weight" else shape[1])


def _hard_attention_options(shape, variant):
    # round(P * fraction) <= P, so k is a valid count wherever top-k applies (P > 0).
    k = max(1, round(_positions(shape) * variant["k_fraction"]))
    return {"mode": variant["mode"], "threshold": variant["threshold"], "k": k, "estimator": variant["estimator"],
            "temperature": variant["temperature"]}


def _hard_attention_variants():
    """mode x estimator x score channels; the threshold (0.5 or 0.25), k (40% of the positions
    or 1) and the temperature (1 or 0.5) vary with them."""
    variants = []
    for mode in ("threshold", "topk"):
        for estimator in ("sigmoid", "identity"):
            for channels in ("one", "all"):
                variant = {"mode": mode, "estimator": estimator, "score_channels": channels,
                           "threshold": 0.5 if estimator == "sigmoid" else 0.25,
                           "k_fraction": 0.4 if estimator == "sigmoid" else 0.0,
                           "temperature": 1.0 if channels == "one" else 0.5}
                chosen = f"t{variant['threshold']}" if mode == "threshold" else f"k{variant['k_fraction']}"
                variants.append({"id": f"{mode}_{estimator}_{channels}_{chosen}_T{variant['temperature']}", **variant})
    return tuple(variants)


def _plain(sample: "Sample", *names: str) -> List[Optional[Tensor]]:
    """The sample's tensors `names`, detached (as the autograd kernels pass them on)."""
    return [None if sample.tensors[n] is None else sample.tensors[n].detach() for n in names]


def _options(sample: "Sample", *names: str) -> List[object]:
    return [sample.options[n] for n in names]


def _self_attention_private_calls(sample: "Sample", grad: Tensor) -> List[Tuple[str, tuple]]:
    names = ("x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma")
    options = _options(sample, "qk_dim", "num_heads", "kv_stride")
    forward = (*_plain(sample, *names), *options)
    lse = torch.ops.cnn_attention._self_attention_forward(*forward)[2]
    # The projection kept by the forward (the autograd kernel asks for it where x has few tokens
    # for its channels) and read by the backward.
    _, _, kept_lse, projection = torch.ops.cnn_attention._self_attention_forward(*forward, True)
    backward = (grad, *_plain(sample, *names))
    return [("_self_attention_forward", forward),
            ("_self_attention_forward", (*forward, True)),
            ("_self_attention_backward", (*backward, lse, *options)),
            ("_self_attention_backward", (*backward, kept_lse, *options, projection))]


def _cbam_private_calls(sample: "Sample", grad: Tensor) -> List[Tuple[str, tuple]]:
    forward = (*_plain(sample, "x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight", "conv_bias"),
               *_options(sample, "gate", "activation"))
    _, channel_stats, channel_argmax = torch.ops.cnn_attention._cbam_forward(*forward)
    return [("_cbam_forward", forward),
            ("_cbam_backward", (grad, *forward[:-2], channel_stats, channel_argmax, *forward[-2:]))]


class _StraightThrough(torch.autograd.Function):
    """y = x * mask with hard_attention's straight-through gradients (float64)."""

    @staticmethod
    def forward(ctx, x, scores, mask, estimator, temperature):
        ctx.save_for_backward(x, scores, mask)
        ctx.estimator, ctx.temperature = estimator, temperature
        return x * mask

    @staticmethod
    def backward(ctx, grad_y):
        x, scores, mask = ctx.saved_tensors
        grad_x, grad_scores = helpers.hard_attention_backward_reference(
            grad_y, x, scores, mask, ctx.estimator, ctx.temperature)
        return grad_x, grad_scores, None, None, None


def _hard_attention_reference(x, scores, mode, threshold, k, estimator, temperature, dtype=torch.float64):
    """`dtype`: the operator's input dtype, whose accumulation precision decides the threshold
    mask (helpers.hard_attention_reference)."""
    _, mask = helpers.hard_attention_reference(x.detach(), scores.detach().to(dtype), mode, threshold, k, temperature)
    return _StraightThrough.apply(x, scores, mask, estimator, temperature)


def _check_hard_attention_mask(comparison: Comparison, result) -> None:
    """The mask is exact, in x's dtype, shaped like the scores, outside autograd; top-k keeps k
    positions per sample and score channel."""
    sample, options = comparison.sample, comparison.sample.options
    mask = result[1]
    _, expected = helpers.hard_attention_reference(
        comparison.inputs["x"].detach(), sample.tensors["scores"].detach(), options["mode"], options["threshold"],
        options["k"], options["temperature"])
    assert mask.dtype == sample.dtype and mask.shape == sample.tensors["scores"].shape
    assert not mask.requires_grad
    torch.testing.assert_close(mask.double(), expected, rtol=0, atol=0)
    if options["mode"] == "topk":
        assert (mask.flatten(2).sum(-1) == options["k"]).all()


_HALF = (torch.float16, torch.bfloat16)


def _self_attention_reference_options(sample: Sample) -> Dict[str, object]:
    # In half precision the operator picks each pooling window's maximum among the rounded keys
    # and values.
    return {"pool_dtype": sample.dtype if sample.dtype in _HALF else None}


def _self_attention_compare(comparison: Comparison, name: str, actual: Tensor, expected: Tensor) -> None:
    """The output within the dtype's tolerance (twice it in half precision: y = x + gamma * out
    rounds out and then y), times |gamma| where that is above 1 (it scales out's error). A
    gradient within 4 times it, as it runs back through two projections, the softmax and the
    pooling; each of its elements sums N * P products (gamma's
    N * C * P), each rounded by the dtype's precision of its own size, so an element that cancels
    to near zero (the key bias's is exactly zero: a softmax ignores a shift of all its logits) is
    off by that much of the size of what is summed (the largest element, or for gamma the root
    sum of squares of its terms): the tolerance has a part relative to that size too. (The eager
    composition in the same dtype lands as far off.)"""
    sample = comparison.sample
    atol, rtol = helpers.TOLERANCE[sample.dtype]
    if name == "output":
        gamma = float(comparison.inputs["gamma"].detach().abs().max())
        scale = comparison.scale * (2.0 if sample.dtype in _HALF else 1.0) * max(1.0, gamma)
        torch.testing.assert_close(actual.double(), expected, atol=scale * atol + comparison.slack.get(name, 0.0),
                                   rtol=scale * rtol)
        return
    if name == "gamma":
        with torch.no_grad():
            inputs = {n: None if t is None else t.detach() for n, t in comparison.inputs.items()}
            out = sample.reference({**inputs, "gamma": torch.ones_like(inputs["gamma"])}) - inputs["x"]
            norm = float((comparison.grad * out).square().sum().sqrt())
    else:
        norm = float(expected.abs().max()) if expected.numel() else 0.0
    scale = 4 * comparison.scale
    torch.testing.assert_close(actual.double(), expected,
                               atol=scale * (atol + rtol * norm) + comparison.slack.get(name, 0.0), rtol=scale * rtol,
                               msg=lambda m: f"self_attention, gradient of {name}: {m}")


OPS: Tuple[OpInfo, ...] = (
    OpInfo(
        name="channel_attention",
        arguments=("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "pool", "gate", "activation"),
        tensor_shapes=_channel_attention_shapes,
        variants=_channel_attention_variants(),
        reference=helpers.channel_attention_reference,
        differentiable=("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
        poison_targets=("x", "fc1_weight"),
        resolve=lambda shape, variant: {"pool": variant["pool"], "gate": variant["gate"],
                                        "activation": variant["activation"]},
        private_calls=lambda sample, grad: [("_channel_attention_backward", (
            grad, *_plain(sample, "x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
            *_options(sample, "pool", "gate", "activation")))],
        aten_softmax_over_channels=True,
        parameter_scale=lambda name, shape, variant: _fan_in_scale(
            name, shape[1] if name == "fc1_weight" else _hidden(shape[1])),
        # Parameter gradients sum over N * P terms rounded to the dtype once.
        tolerance_scales={"fc1_weight": 4.0, "fc1_bias": 4.0, "fc2_weight": 4.0, "fc2_bias": 4.0},
        reference_channels=(12,),
        valid_call=bad_calls.channel_attention_call,
        bad_calls=bad_calls.CHANNEL_ATTENTION,
    ),
    OpInfo(
        name="cbam",
        arguments=("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight", "conv_bias", "gate",
                   "activation"),
        tensor_shapes=_cbam_shapes,
        variants=_cbam_variants(),
        reference=helpers.cbam_reference,
        differentiable=("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight", "conv_bias"),
        poison_targets=("x", "fc1_weight", "conv_weight"),
        resolve=lambda shape, variant: {"gate": variant["gate"], "activation": variant["activation"]},
        private_calls=_cbam_private_calls,
        aten_softmax_over_channels=True,
        parameter_scale=lambda name, shape, variant: _score_conv_scale(name, shape, variant)
        if name == "conv_weight" else _fan_in_scale(name, shape[1] if name == "fc1_weight" else _hidden(shape[1])),
        # Parameter gradients sum over N * P terms rounded to the dtype once; x's gradient adds
        # the score head's to the channel weights'.
        tolerance_scales={"x": 2.0, "fc1_weight": 4.0, "fc1_bias": 4.0, "fc2_weight": 4.0, "fc2_bias": 4.0,
                          "conv_weight": 4.0, "conv_bias": 4.0},
        reference_channels=(12,),
        valid_call=bad_calls.cbam_call,
        bad_calls=bad_calls.CBAM,
    ),
    OpInfo(
        name="cbam_spatial",
        arguments=("x", "conv_weight", "conv_bias", "normalize", "temperature"),
        tensor_shapes=lambda shape, variant: {"x": shape, **_score_conv_shapes(shape, variant)},
        variants=_cbam_spatial_variants(),
        reference=helpers.cbam_spatial_reference,
        differentiable=("x", "conv_weight", "conv_bias"),
        poison_targets=("x", "conv_weight"),
        resolve=lambda shape, variant: {"normalize": variant["normalize"], "temperature": variant["temperature"]},
        private_calls=lambda sample, grad: [("_cbam_spatial_backward", (
            grad, *_plain(sample, "x", "conv_weight", "conv_bias"), *_options(sample, "normalize", "temperature")))],
        parameter_scale=_score_conv_scale,
        # The parameter gradients sum over N * P terms rounded to the dtype once; x's gradient
        # adds the score head's to grad_y * w.
        tolerance_scales={"x": 2.0, "conv_weight": 4.0, "conv_bias": 4.0},
        reference_channels=(1, 12),
        valid_call=bad_calls.cbam_spatial_call,
        bad_calls=bad_calls.CBAM_SPATIAL,
    ),
    OpInfo(
        name="channel_gate",
        arguments=("x", "logits", "gate"),
        tensor_shapes=lambda shape, variant: {"x": shape, "logits": (shape[0], shape[1])},
        per_sample=("logits",),
        variants=tuple({"id": gate, "gate": gate} for gate in ("sigmoid", "softmax", "hard_sigmoid")),
        reference=helpers.channel_gate_reference,
        differentiable=("x", "logits"),
        poison_targets=("x", "logits"),
        private_calls=lambda sample, grad: [("_channel_gate_backward", (
            grad, *_plain(sample, "x", "logits"), *_options(sample, "gate")))],
        aten_softmax_over_channels=True,
        # The logits' gradient sums P terms rounded to the dtype once.
        tolerance_scales={"logits": 4.0},
        reference_channels=(12,),
        valid_call=bad_calls.channel_gate_call,
        bad_calls=bad_calls.CHANNEL_GATE,
    ),
    OpInfo(
        name="channel_pool",
        arguments=("x",),
        tensor_shapes=lambda shape, variant: {"x": shape},
        variants=({"id": "mean_max"},),
        reference=helpers.channel_pool_reference,
        differentiable=("x",),
        private_calls=lambda sample, grad: [("_channel_pool_backward", (grad, *_plain(sample, "x")))],
        # Several poisoned elements, some sharing a position: the mean and the max over channels
        # meet NaN and infinities together.
        poison_count=12,
        reference_channels=(1, 5, 40),
        valid_call=bad_calls.channel_pool_call,
        bad_calls=bad_calls.CHANNEL_POOL,
    ),
    OpInfo(
        name="soft_attention",
        arguments=("x", "scores", "normalize", "temperature"),
        tensor_shapes=_scores_shapes,
        variants=tuple({"id": f"{normalize}_{channels}_t{temperature}", "normalize": normalize,
                        "score_channels": channels, "temperature": temperature}
                       for normalize in ("sigmoid", "softmax") for channels in ("one", "all")
                       for temperature in (1.0, 0.7)),
        reference=helpers.soft_attention_reference,
        differentiable=("x", "scores"),
        feature_maps=("x", "scores"),
        poison_targets=("x", "scores"),
        resolve=lambda shape, variant: {"normalize": variant["normalize"], "temperature": variant["temperature"]},
        private_calls=lambda sample, grad: [("_soft_attention_backward", (
            grad, *_plain(sample, "x", "scores"), *_options(sample, "normalize", "temperature")))],
        # The score gradient sums over channels (shared scores) and over positions (softmax).
        tolerance_scales={"scores": 2.0},
        valid_call=bad_calls.soft_attention_call,
        bad_calls=bad_calls.SOFT_ATTENTION,
    ),
    OpInfo(
        name="soft_attention_pool",
        arguments=("x", "scores", "temperature"),
        tensor_shapes=_scores_shapes,
        variants=tuple({"id": f"{channels}_t{temperature}", "score_channels": channels, "temperature": temperature}
                       for channels in ("one", "all") for temperature in (1.0, 1.3)),
        reference=helpers.soft_attention_pool_reference,
        differentiable=("x", "scores"),
        feature_maps=("x", "scores"),
        poison_targets=("x", "scores"),
        resolve=lambda shape, variant: {"temperature": variant["temperature"]},
        private_calls=lambda sample, grad: [("_soft_attention_pool_backward", (
            grad, *_plain(sample, "x", "scores"), *_options(sample, "temperature")))],
        # The output and the score gradient are sums over positions rounded to the dtype once.
        tolerance_scales={"output": 2.0, "scores": 2.0},
        valid_call=bad_calls.soft_attention_pool_call,
        bad_calls=bad_calls.SOFT_ATTENTION_POOL,
    ),
    OpInfo(
        name="hard_attention",
        arguments=("x", "scores", "mode", "threshold", "k", "estimator", "temperature"),
        tensor_shapes=_scores_shapes,
        variants=_hard_attention_variants(),
        reference=_hard_attention_reference,
        differentiable=("x", "scores"),
        feature_maps=("x", "scores"),
        output_index=0,
        poison_targets=("x", "scores"),
        poison_count=6,
        resolve=_hard_attention_options,
        gradcheck=False,
        # A threshold mask is recomputed in the backward (None); a top-k mask is passed on.
        private_calls=lambda sample, grad: [("_hard_attention_backward", (
            grad, *_plain(sample, "x", "scores"), sample.call()[1] if sample.options["mode"] == "topk" else None,
            *_options(sample, "mode", "threshold", "estimator", "temperature")))],
        applies=lambda shape, variant: variant["mode"] != "topk" or _positions(shape) > 0,
        reference_options=lambda sample: {"dtype": sample.dtype},
        # y is x times 0 or 1, and so is the gradient of x; the score gradient sums over channels.
        tolerance_scales={"output": 0.0, "x": 0.0, "scores": 2.0},
        check_other_outputs=_check_hard_attention_mask,
        valid_call=bad_calls.hard_attention_call,
        bad_calls=bad_calls.HARD_ATTENTION,
    ),
    OpInfo(
        name="self_attention",
        arguments=("x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma", "qk_dim", "num_heads",
                   "kv_stride"),
        tensor_shapes=_self_attention_shapes,
        # Query/key heads narrower than value heads, as wide, one head of width 2, heads whose
        # widths are multiples of 8 (torch's memory-efficient kernel on CUDA) and not, keys and
        # values pooled by 2 and 3, with and without biases.
        variants=(
            {"id": "narrow_heads", "qk": 8, "v": 24, "heads": 2, "kv_stride": 1},
            {"id": "equal_heads", "qk": 24, "v": 24, "heads": 2, "kv_stride": 1},
            {"id": "narrow_heads_kv_stride_2", "qk": 8, "v": 24, "heads": 2, "kv_stride": 2},
            {"id": "heads_of_8", "qk": 16, "v": 16, "heads": 2, "kv_stride": 1},
            {"id": "one_head_of_2", "qk": 2, "v": "C", "heads": 1, "kv_stride": 1},
            {"id": "odd_heads", "qk": 4, "v": 6, "heads": 2, "kv_stride": 1},
            {"id": "odd_heads_kv_stride_2", "qk": 4, "v": 6, "heads": 2, "kv_stride": 2},
            {"id": "odd_heads_no_bias", "qk": 4, "v": 6, "heads": 2, "kv_stride": 2, "bias": False},
            {"id": "odd_heads_kv_stride_3", "qk": 4, "v": 6, "heads": 2, "kv_stride": 3},
            {"id": "one_head_kv_stride_2", "qk": 4, "v": 6, "heads": 1, "kv_stride": 2},
            {"id": "one_head_kv_stride_3_no_bias", "qk": 4, "v": 6, "heads": 1, "kv_stride": 3, "bias": False},
        ),
        reference=helpers.self_attention_reference,
        differentiable=("x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma"),
        # One poisoned element reaches every row of its sample through the keys, or every
        # position through gamma or the weights.
        poison_targets=("x", "qkv_weight", "gamma"),
        poison_count=1,
        # The operator takes gamma out of the sums over positions that give the out_weight and
        # out_bias gradients (gamma * sum(grad_y * heads)).
        factored_gradients={"gamma": ("out_weight", "out_bias")},
        resolve=lambda shape, variant: {"qk_dim": variant["qk"], "num_heads": variant["heads"],
                                        "kv_stride": variant["kv_stride"]},
        applies=lambda shape, variant: variant["kv_stride"] <= min(shape[2:], default=1),
        parameter_scale=_self_attention_scale,
        private_calls=_self_attention_private_calls,
        reference_options=_self_attention_reference_options,
        compare=_self_attention_compare,
        # The reference materialises the P x P matrix of every sample and head, and its gradient.
        reference_max_positions=1024,
        valid_call=bad_calls.self_attention_call,
        bad_calls=bad_calls.SELF_ATTENTION,
    ),
)

BY_NAME: Dict[str, OpInfo] = {op.name: op for op in OPS}


class OperatorCall(torch.nn.Module):
    """One call of an operator as a model (for the runtime and ONNX tests): its inputs are the
    sample's feature maps and per-sample tensors (`inputs`), its other tensors buffers, its
    options constants. Returns the whole result."""

    def __init__(self, sample: Sample):
        super().__init__()
        self.sample = sample
        batched = sample.op.feature_maps + sample.op.per_sample
        self.maps = [name for name in batched if sample.tensors.get(name) is not None]
        self.names = [name for name, t in sample.tensors.items() if t is not None and name not in self.maps]
        for name in self.names:
            self.register_buffer(name, sample.tensors[name].detach().clone())

    @property
    def inputs(self) -> Tuple[Tensor, ...]:
        return tuple(self.sample.tensors[name] for name in self.maps)

    def forward(self, *maps: Tensor):
        tensors = {name: None for name in self.sample.tensors}
        tensors.update(zip(self.maps, maps))
        tensors.update({name: getattr(self, name) for name in self.names})
        return self.sample.call(tensors)


def all_samples(shape: Shape, dtype: torch.dtype, device, layout: str,
                generator: Optional[torch.Generator] = None) -> List[Sample]:
    return [sample for op in OPS for sample in op.samples(shape, dtype, device, layout, generator)]
