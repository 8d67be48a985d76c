"""Hypothesis property tests: every operator, forward and the gradient of every differentiable
input, against the float64 references of helpers.py on random shapes (no samples, one
channel, one position, no positions, a few thousand positions), dtypes, layouts of every
feature-map argument, options and values. test_operator_table draws every operator of the
operator table (tests/shared/operators.py) from its entry alone; the properties per operator
draw option values between the table's variants and model the errors of their sums.

`make test` runs conftest.py's derandomized default profile (a bounded number of examples per
test); the fuzz profile runs 10,000 fresh ones per test:

    python -m pytest tests/python/test_properties.py --hypothesis-profile=fuzz \
        --hypothesis-show-statistics -q -p no:cacheprovider

Every example is valid by construction (no filtering), and a failing one prints its case,
seed included: the tensors are drawn from torch.manual_seed(case.seed), so the case alone
reproduces them."""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from helpers import (
    DTYPES,
    PROPERTY_LAYOUTS,
    TOLERANCE,
    channel_attention_reference,
    channel_pool_reference,
    float64_leaves,
    grads_of,
    hard_attention_backward_reference,
    hard_attention_reference,
    layout_view,
    self_attention_reference,
    soft_attention_pool_reference,
    soft_attention_reference,
)
from hypothesis import event, given
from hypothesis import strategies as st
from operators import OPS, Sample, check_against_reference
from test_channel_attention import make_params as channel_attention_params
from test_self_attention import make_params as self_attention_params
from torch import Tensor

ops = torch.ops.cnn_attention
HALF = (torch.float16, torch.bfloat16)
Layout = tuple[str, int]  # (layout name, the dim an "expanded" view repeats)


@dataclass(frozen=True)
class Case:
    """One example: x's shape, the dtype, the layout of every feature-map argument, the
    operator's options and the seed of every tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    layouts: dict[str, Layout] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return math.prod(self.shape[2:])

    @property
    def empty(self) -> bool:
        return self.shape[0] == 0 or self.positions == 0


# ---- strategies ----

@st.composite
def spatial_sizes(draw: st.DrawFn, max_positions: int, large_every: int) -> tuple[int, ...]:
    """One to three spatial sizes: mostly small and odd, often 1, sometimes 0 (no positions),
    in about one example in `large_every` from a third of `max_positions` to all of them
    (many vector blocks, long reductions). Never more than `max_positions` positions."""
    rank = draw(st.integers(1, 3))
    if draw(st.sampled_from([False] * (large_every - 1) + [True])):
        leading = [draw(st.sampled_from([1, 3, 5, 7, 9, 13])) for _ in range(rank - 1)]
        target = draw(st.integers(max_positions // 3, max_positions))
        return (*leading, max(1, target // math.prod(leading)))
    sizes = [draw(st.sampled_from([1, 1, 2, 3, 4, 5, 7, 9, 11])) for _ in range(rank)]
    sizes[-1] = min(sizes[-1], max_positions // math.prod(sizes[:-1]))
    if draw(st.sampled_from([False] * 15 + [True])):
        sizes[draw(st.integers(0, rank - 1))] = 0
    return tuple(sizes)


@st.composite
def layouts(draw: st.DrawFn, rank: int) -> Layout:
    """A layout of PROPERTY_LAYOUTS; for "expanded", the dim (batch, channel or spatial)
    whose first slice is repeated by a stride-0 view."""
    layout = draw(st.sampled_from(PROPERTY_LAYOUTS))
    return layout, draw(st.integers(0, rank - 1)) if layout == "expanded" else 0


@st.composite
def base_cases(draw: st.DrawFn, arguments: Sequence[str], max_positions: int = 4096, large_every: int = 8) -> Case:
    """Shape, dtype, seed and a layout for each feature-map argument in `arguments`."""
    spatial = draw(spatial_sizes(max_positions, large_every))
    # N = 0 in about one example in ten, C = 1 in about one in three.
    batch = draw(st.sampled_from([1, 2, 3, 1, 2, 3, 1, 2, 3, 0]))
    channels = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    shape = (batch, channels, *spatial)
    return Case(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
        layouts={name: draw(layouts(len(shape))) for name in arguments},
    )


def temperatures() -> st.SearchStrategy[float]:
    return st.one_of(st.just(1.0), st.floats(0.1, 10.0))


def with_options(case: Case, **options: object) -> Case:
    return Case(case.shape, case.dtype, case.seed, case.layouts, options)


# ---- building inputs and checking results ----

def feature_map(shape: Sequence[int], dtype: torch.dtype, layout: Layout, scale: float = 1.0) -> Tensor:
    """Standard normal values (times `scale`) rounded to `dtype`, in `layout`, as a leaf
    that requires grad."""
    t = (scale * torch.randn(tuple(shape), dtype=torch.float64)).to(dtype)
    return layout_view(t, *layout).requires_grad_(True)


def record(case: Case) -> None:
    """Statistics for --hypothesis-show-statistics: how often each dtype, layout and kind of
    shape comes up."""
    event(f"dtype {str(case.dtype).removeprefix('torch.')}")
    for name, (layout, _) in case.layouts.items():
        event(f"{name} layout {layout}")
    event("N = 0 or P = 0" if case.empty else "P = 1" if case.positions == 1
          else "P < 256" if case.positions < 256 else "P >= 256")


def assert_matches(actual: Tensor, expected: Tensor, dtype: torch.dtype, name: str,
                   scale: float = 1.0, norm: float | Tensor = 0.0, slack: float = 0.0) -> None:
    """`actual` (in `dtype`) against the float64 `expected`: the same shape and dtype, no NaN
    where the reference is finite, and |actual - expected| <= scale * (atol + rtol * (norm +
    |expected|)) + slack with TOLERANCE[dtype]'s atol and rtol. `norm` (a number, or one per
    element) is the size of the terms a sum cancels: a result that cancels to near zero is off
    by the dtype's precision of its terms, not of itself. Values beyond the dtype's range
    compare as its largest finite value: an overflow to inf there is the dtype's, not the
    operator's."""
    assert actual.shape == expected.shape and actual.dtype == dtype, name
    assert not (actual.isnan() & expected.isfinite()).any(), f"{name}: NaN where the reference is finite"
    atol, rtol = TOLERANCE[dtype]
    big = torch.finfo(dtype).max
    actual, expected = actual.detach().double().clamp(-big, big), expected.detach().clamp(-big, big)
    error = (actual - expected).abs()
    allowed = scale * (atol + rtol * (norm + expected.abs())) + slack
    excess = torch.where(expected.isnan() & actual.isnan(), -1.0, error - allowed)
    if excess.numel() and excess.max() > 0:
        worst = int(excess.argmax())
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.numel()} elements differ; the worst, at flat index "
            f"{worst}, is {actual.flatten()[worst]:.8g} instead of {expected.flatten()[worst]:.8g} (error "
            f"{error.flatten()[worst]:.3g}, allowed {allowed.broadcast_to(error.shape).flatten()[worst]:.3g})"
        )


def softmax_score_terms(x: Tensor, scores: Tensor, grad: Tensor, temperature: float, factor: float) -> Tensor:
    """The size of the terms of the score gradient through softmax(scores / T) over the
    positions, for a result factor * softmax * x: factor / T * p_i * (A_i + sum_j p_j A_j),
    with A = |grad * x| summed over the channels that share a score. Where one position takes
    almost all the weight, its gradient is the difference of two such terms, nearly equal."""
    a = (grad.double() * x.detach().double()).abs()
    if scores.shape[1] == 1:
        a = a.sum(1, keepdim=True)
    p = torch.softmax(scores.detach().double().flatten(2) / temperature, -1)
    a = a.flatten(2)
    return (factor / temperature * p * (a + (p * a).sum(-1, keepdim=True))).reshape(scores.shape)


def assert_empty_result(out: Tensor, grads: Sequence[Optional[Tensor]], leaves: Sequence[Optional[Tensor]]) -> None:
    """N = 0 or P = 0: an empty result (a zero pooled one) and zero gradients of the right shape."""
    assert torch.count_nonzero(out) == 0
    for g, leaf in zip(grads, leaves):
        if leaf is not None:
            assert g.shape == leaf.shape and g.dtype == leaf.dtype and torch.count_nonzero(g) == 0


def run(call: Callable[..., Tensor], leaves: Sequence[Optional[Tensor]], dtype: torch.dtype,
        centred: bool = False) -> tuple[Tensor, list[Optional[Tensor]], Tensor]:
    """(out, the gradients of `leaves`, grad_out): the operator, then its backward from a
    standard normal grad_out, `centred` over the positions of each sample and channel (as
    behind a normalisation layer: sums over positions in the backward cancel)."""
    out = call(*leaves)
    grad = torch.randn(out.shape, dtype=torch.float64)
    if centred:
        grad -= grad.mean(tuple(range(2, grad.dim())), keepdim=True)
    grad = grad.to(dtype)
    return out, grads_of(out, grad, leaves), grad


def run_reference(reference: Callable[..., Tensor], leaves: Sequence[Optional[Tensor]], grad: Tensor
                  ) -> tuple[Tensor, list[Optional[Tensor]]]:
    """The float64 reference on float64 copies of the values of `leaves`, and its gradients
    from the same grad_out."""
    ref_inputs = float64_leaves(leaves)
    expected = reference(*ref_inputs)
    return expected, grads_of(expected, grad.double(), ref_inputs)


# ---- channel_attention ----

@st.composite
def channel_attention_cases(draw: st.DrawFn) -> Case:
    case = draw(base_cases(["x"]))
    return with_options(
        case,
        pool=draw(st.sampled_from(["avg", "max", "avgmax"])),
        gate=draw(st.sampled_from(["sigmoid", "softmax", "hard_sigmoid"])),
        activation=draw(st.sampled_from(["relu", "silu", "gelu", "identity"])),
        hidden=draw(st.integers(1, 8)),
        fc1_bias=draw(st.booleans()),
        fc2_bias=draw(st.booleans()),
    )


@given(case=channel_attention_cases())
def test_channel_attention(case: Case) -> None:
    record(case)
    torch.manual_seed(case.seed)
    o = case.options
    x = feature_map(case.shape, case.dtype, case.layouts["x"])
    w1, b1, w2, b2 = channel_attention_params(case.shape[1], o["hidden"], case.dtype, "cpu")
    params = [w1, b1 if o["fc1_bias"] else None, w2, b2 if o["fc2_bias"] else None]
    leaves = [x, *[None if p is None else p.requires_grad_(True) for p in params]]
    y, actual, grad = run(lambda *a: ops.channel_attention(*a, o["pool"], o["gate"], o["activation"]), leaves,
                          case.dtype)
    if case.empty:
        assert_empty_result(y, actual, leaves)
        return
    reference = lambda *a: channel_attention_reference(*a, o["pool"], o["gate"], o["activation"])  # noqa: E731
    expected, wanted = run_reference(reference, leaves, grad)
    assert_matches(y, expected, case.dtype, "y")
    # The gradient of the pooled statistics passes through the gate's backward (the softmax
    # gate's w * (g - mean(g w)) cancels) and the MLP's: with few channels and hidden units
    # these can cancel to a small fraction of the sums over positions they start from, whose
    # rounding then dominates (make fuzz, float32, C = 7, one hidden unit, P = 2659: 3.0e-5
    # against 1.35e-5 allowed at the maximum's position, where the eager composition in
    # float32 is off by 4.1e-5). Such a gradient must come within the tolerance or within 4
    # times the eager composition's error in the same dtype.
    eager_slack = [0.0] * len(leaves)
    if case.dtype != torch.float64:
        eager_leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
        eager_y = reference(*eager_leaves)
        eager_slack = [0.0 if e is None else 4 * float((e.double() - w).abs().max())
                       for e, w in zip(grads_of(eager_y, grad, eager_leaves), wanted)]
    for name, a, w, extra in zip(["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"], actual, wanted,
                                 eager_slack):
        if a is not None:
            # Parameter gradients sum over N * P terms rounded to the dtype once.
            assert_matches(a, w, case.dtype, f"grad {name}", 1.0 if name == "x" else 4.0, slack=extra)


# ---- channel_pool ----

@given(case=base_cases(["x"]))
def test_channel_pool(case: Case) -> None:
    record(case)
    torch.manual_seed(case.seed)
    x = feature_map(case.shape, case.dtype, case.layouts["x"])
    y, (gx,), grad = run(ops.channel_pool, [x], case.dtype)
    assert y.shape == (case.shape[0], 2, *case.shape[2:])
    if case.empty:
        assert_empty_result(y, [gx], [x])
        return
    expected, (wx,) = run_reference(channel_pool_reference, [x], grad)
    assert_matches(y, expected, case.dtype, "y")
    assert_matches(gx, wx, case.dtype, "grad x")


# ---- soft_attention and soft_attention_pool ----

@st.composite
def scored_cases(draw: st.DrawFn, **options: st.SearchStrategy) -> Case:
    """x and scores, (N, 1, *S) or (N, C, *S), each in its own layout, and `options`."""
    case = draw(base_cases(["x", "scores"]))
    return with_options(
        case,
        score_channels=draw(st.sampled_from([1, case.shape[1]])),
        # Scores 4 times larger saturate the sigmoid and sharpen the softmax.
        score_scale=draw(st.sampled_from([1.0, 4.0])),
        temperature=draw(temperatures()),
        **{name: draw(strategy) for name, strategy in options.items()},
    )


def feature_map_and_scores(case: Case) -> tuple[Tensor, Tensor]:
    x = feature_map(case.shape, case.dtype, case.layouts["x"])
    scores_shape = (case.shape[0], case.options["score_channels"], *case.shape[2:])
    return x, feature_map(scores_shape, case.dtype, case.layouts["scores"], case.options["score_scale"])


@given(case=scored_cases(normalize=st.sampled_from(["sigmoid", "softmax"])))
def test_soft_attention(case: Case) -> None:
    record(case)
    torch.manual_seed(case.seed)
    o = case.options
    x, scores = feature_map_and_scores(case)
    y, (gx, gs), grad = run(
        lambda *a: ops.soft_attention(*a, o["normalize"], o["temperature"]), [x, scores], case.dtype)
    if case.empty:
        assert_empty_result(y, [gx, gs], [x, scores])
        return
    expected, (wx, ws) = run_reference(
        lambda *a: soft_attention_reference(*a, o["normalize"], o["temperature"]), [x, scores], grad)
    assert_matches(y, expected, case.dtype, "y")
    assert_matches(gx, wx, case.dtype, "grad x")
    # The score gradient sums over channels (shared scores) and over positions (softmax).
    terms = 0.0
    if o["normalize"] == "softmax":
        terms = softmax_score_terms(x, scores, grad, o["temperature"], case.positions)
    assert_matches(gs, ws, case.dtype, "grad scores", 2.0, terms)


@given(case=scored_cases())
def test_soft_attention_pool(case: Case) -> None:
    record(case)
    torch.manual_seed(case.seed)
    o = case.options
    x, scores = feature_map_and_scores(case)
    out, (gx, gs), grad = run(lambda *a: ops.soft_attention_pool(*a, o["temperature"]), [x, scores], case.dtype)
    assert out.shape == case.shape[:2]
    if case.empty:
        assert_empty_result(out, [gx, gs], [x, scores])
        return
    expected, (wx, ws) = run_reference(
        lambda *a: soft_attention_pool_reference(*a, o["temperature"]), [x, scores], grad)
    # Sums over positions (of terms p_i |x_i|) rounded to the dtype once.
    weights = torch.softmax(scores.detach().double().flatten(2) / o["temperature"], -1)
    assert_matches(out, expected, case.dtype, "out", 2.0, (weights * x.detach().double().abs().flatten(2)).sum(-1))
    assert_matches(gx, wx, case.dtype, "grad x")
    terms = softmax_score_terms(x, scores, grad.reshape(grad.shape + (1,) * (x.dim() - 2)), o["temperature"], 1.0)
    assert_matches(gs, ws, case.dtype, "grad scores", 2.0, terms)


# ---- hard_attention ----

@st.composite
def hard_attention_cases(draw: st.DrawFn) -> Case:
    case = draw(scored_cases(
        threshold=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)),
        estimator=st.sampled_from(["sigmoid", "identity"]),
    ))
    # Top-k needs 1 <= k <= P; k is ignored in threshold mode, so any k goes there.
    topk = case.positions > 0 and draw(st.booleans())
    k = draw(st.integers(1, case.positions)) if topk else draw(st.integers(-2, 3))
    return with_options(case, **case.options, mode="topk" if topk else "threshold", k=k)


def threshold_is_ambiguous(scores: Tensor, threshold: float, temperature: float) -> Tensor:
    """Where sigmoid(scores / T) lies within a few ulps of the accumulation dtype (float32,
    float64 for float64 scores) of the threshold: another evaluation order of the same
    formula may put such a score on either side."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    soft = torch.sigmoid(scores.detach().to(acc) / temperature).double()
    return (soft - threshold).abs() < 16 * torch.finfo(acc).eps * torch.maximum(soft, torch.tensor(threshold))


@given(case=hard_attention_cases())
def test_hard_attention(case: Case) -> None:
    record(case)
    event(f"mode {case.options['mode']}")
    torch.manual_seed(case.seed)
    o = case.options
    x, scores = feature_map_and_scores(case)
    y, mask = ops.hard_attention(x, scores, o["mode"], o["threshold"], o["k"], o["estimator"], o["temperature"])
    assert y.shape == x.shape and mask.shape == scores.shape
    assert y.dtype == case.dtype and mask.dtype == case.dtype and not mask.requires_grad
    grad = torch.randn(y.shape, dtype=torch.float64).to(case.dtype)
    gx, gs = torch.autograd.grad(y, [x, scores], grad)
    if case.empty:
        assert_empty_result(y, [gx, gs], [x, scores])
        return
    _, wanted_mask = hard_attention_reference(
        x.detach(), scores.detach(), o["mode"], o["threshold"], o["k"], o["temperature"])
    if o["mode"] == "threshold":
        ambiguous = threshold_is_ambiguous(scores, o["threshold"], o["temperature"])
        wanted_mask = torch.where(ambiguous, mask.double(), wanted_mask)
    else:
        assert (mask.flatten(2).sum(-1) == o["k"]).all()
    # The mask is 0/1, y is x times it and so is the gradient of x: all exact.
    torch.testing.assert_close(mask.double(), wanted_mask, rtol=0, atol=0)
    torch.testing.assert_close(y.double(), x.detach().double() * wanted_mask, rtol=0, atol=0)
    wx, ws = hard_attention_backward_reference(
        grad, x.detach(), scores.detach(), wanted_mask, o["estimator"], o["temperature"])
    torch.testing.assert_close(gx.double(), wx, rtol=0, atol=0)
    # The score gradient sums over the channels of shared scores.
    assert_matches(gs, ws, case.dtype, "grad scores", 2.0)


# ---- self_attention ----

@st.composite
def self_attention_cases(draw: st.DrawFn) -> Case:
    # The reference materialises the P x P matrix of every sample and head (and its
    # gradient): up to 1024 positions, more than 256 in one example in 16 and then in one
    # sample.
    case = draw(base_cases(["x"], max_positions=1024, large_every=16))
    if case.positions > 256:
        case = Case((min(case.shape[0], 1), *case.shape[1:]), case.dtype, case.seed, case.layouts)
    heads = draw(st.integers(1, 3))
    smallest = min(case.shape[2:])
    return with_options(
        case,
        num_heads=heads,
        qk_dim=heads * draw(st.integers(1, 3)),
        v_dim=heads * draw(st.integers(1, 3)),
        # Any stride is valid without positions.
        kv_stride=draw(st.integers(1, smallest if smallest > 0 else 3)),
        qkv_bias=draw(st.sampled_from([None, 0.1, 3.0])),  # absent, or the scale of its values
        out_bias=draw(st.booleans()),
        centred_grad=draw(st.booleans()),
        gamma=draw(st.sampled_from([0.8, 0.0, -1.5])),
    )


@given(case=self_attention_cases())
def test_self_attention(case: Case) -> None:
    record(case)
    torch.manual_seed(case.seed)
    o = case.options
    dtype = case.dtype
    x = feature_map(case.shape, dtype, case.layouts["x"])
    qkv_weight, qkv_bias, out_weight, out_bias, gamma = self_attention_params(
        case.shape[1], o["qk_dim"], o["v_dim"], dtype, "cpu", gamma=o["gamma"])
    # A large bias gives every position's keys and values a large common part.
    qkv_bias = None if o["qkv_bias"] is None else qkv_bias * (o["qkv_bias"] / 0.1)
    params = [qkv_weight, qkv_bias, out_weight, out_bias if o["out_bias"] else None, gamma]
    leaves = [x, *[None if p is None else p.requires_grad_(True) for p in params]]
    sizes = (o["qk_dim"], o["num_heads"], o["kv_stride"])
    pool_dtype = dtype if dtype in HALF else None
    y, actual, grad = run(lambda *a: ops.self_attention(*a, *sizes), leaves, dtype, o["centred_grad"])
    # The head outputs of the forward, (N, P, v_dim) in the dtype, for the check of the weight
    # gradients' sums below: the backward recomputes them bit for bit (the forward is
    # deterministic and its rows do not depend on the other samples).
    with torch.no_grad():
        attn = ops._self_attention_forward(*leaves, *sizes)[1]
    if case.empty:
        assert_empty_result(y, actual, leaves)
        return
    # The reference with gamma = 1 is x + out: y = x + gamma * out from it gives the output
    # projection `out` as well, for the size of gamma's gradient terms (grad * out) below.
    ones = torch.ones(1, dtype=torch.float64)
    projected: list[Tensor] = []
    # In float16/bfloat16 the reference follows the operator's documented contract: q, k and
    # v rounded to the dtype, as the operator stores them. (The CPU backward recomputes the
    # softmax correction from the weights, not from the rounded head outputs, so the
    # reference needs no model of that.)
    stored_dtype = dtype if dtype in HALF else None

    def reference(x: Tensor, *params: Optional[Tensor]) -> Tensor:
        projected.append(self_attention_reference(x, *params[:4], ones, *sizes, pool_dtype, stored_dtype) - x)
        return x + params[4] * projected[0]

    expected, wanted = run_reference(reference, leaves, grad)
    layout, expand_dim = case.layouts["x"]
    # The reference does not model every rounding of the operator in half precision: the
    # head outputs and the gradient of the heads (gamma * grad @ out_weight) it stores in the
    # dtype, a pooling window whose two largest values the
    # operator's float32 projection and the float64 one round an ulp apart. With few keys
    # (a large kv_stride) or a sharp softmax, and sums that cancel (centred gradients, a
    # large qkv_bias), these exceed the fixed tolerance in about one example in a few hundred
    # (measured on 3,000 half examples, the worst at 4 times it). The operator must then come
    # within 4 times the largest error of the eager composition in the same dtype (which
    # makes these roundings too: what a user would otherwise compute) against the same
    # reference. The same holds in float32, where sums that cancel exactly (every position
    # equal, a centred gradient) or a very sharp softmax recomputed by the backward leave
    # errors just past the fixed tolerance (found by make fuzz: about 1 example in 2,000).
    eager: list[Optional[Tensor]] = [None] * (1 + len(leaves))  # y, then the gradients
    if dtype != torch.float64:
        eager_leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
        eager_y = self_attention_reference(*eager_leaves, *sizes)
        eager = [eager_y.detach(), *grads_of(eager_y, grad, eager_leaves)]
    if layout == "expanded" and expand_dim >= 2 and o["kv_stride"] > 1:
        # A pooling window of equal inputs holds keys and values equal up to the rounding of
        # each position's projection, which may pick another maximum than the reference's:
        # compare the gradient of the repeated slice, wherever in the window it lands.
        actual[0], wanted[0] = actual[0].sum(expand_dim, keepdim=True), wanted[0].sum(expand_dim, keepdim=True)
        if eager[1] is not None:
            eager[1] = eager[1].sum(expand_dim, keepdim=True)
    slack = [0.0 if e is None else 4 * float((e.double() - w.detach()).abs().max())
             for e, w in zip(eager, [expected, *wanted])]
    # y = x + gamma * out rounds out and then y to the dtype: in half precision twice.
    assert_matches(y, expected, dtype, "y", 2.0 if dtype in HALF else 1.0, slack=slack[0])
    # gamma's gradient sums grad * out over N * C * P terms: their root sum of squares.
    gamma_terms = float((grad.double() * projected[0].detach()).square().sum().sqrt())
    names = ["x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma"]
    # The gradients that flow through the scores (x, qkv_weight, qkv_bias) come from
    # probs * (grad_probs - delta): where the softmax is one-hot (a single key after pooling)
    # the exact result is 0. The operator's delta is the mean of the very grad_probs it is
    # subtracted from, summed in double, so the difference keeps its accuracy there: the same
    # 4 times the tolerance as every other gradient.
    ulp = 8 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    grad64, attn64 = grad.double().flatten(2), attn.double()
    own_product = torch.einsum("ncp,npv->cv", grad64, attn64)  # sum of grad x attn
    own_sizes = torch.einsum("ncp,npv->cv", grad64.abs(), attn64.abs())
    gamma_value = gamma.detach().double().reshape(())
    gamma_sizes = (own_sizes * out_weight.detach().double().abs()).sum()
    if o["out_bias"]:
        gamma_sizes = gamma_sizes + (grad64.abs().sum((0, 2)) * out_bias.detach().double().abs()).sum()
    # out_weight's and gamma's gradients are sums over positions that may cancel (a centred
    # gradient times a head output that hardly varies, e.g. one key): float32 summation may
    # lose a few ulps of the sum of the terms' sizes there (make fuzz: 1.1e-4 against 5.4e-5
    # allowed, P = 811, one key), as in the own-attn checks below.
    term_slack = {"out_weight": ulp * own_sizes * gamma_value.abs(), "gamma": ulp * gamma_sizes}
    for name, a, w, extra in zip(names, actual, wanted, slack[1:]):
        if a is not None:
            # As test_self_attention.assert_gradient_close: 4 times the tolerance, relative
            # to the size of what each element sums.
            norm = gamma_terms if name == "gamma" else float(w.abs().max())
            assert_matches(a, w, dtype, f"grad {name}", 4.0, norm, extra + term_slack.get(name, 0.0))
    # The weight gradients sum over all N * P positions (tokens_outer): in a half dtype they
    # must accumulate in float32 (a half running sum loses its small terms where the sum
    # cancels). Those of out_weight and gamma are exact sums of the operator's own head
    # outputs: they must match those sums, in float64, within the dtype's tolerance plus 8
    # float32 (float64 for float64) ulps of the sum of the terms' sizes (what an accumulation in
    # that dtype may lose where the sum cancels; a half accumulation loses thousands of times
    # more), with no allowance for the eager composition (qkv_weight's comes from the same
    # tokens_outer).
    assert_matches(actual[3], own_product * gamma_value, dtype, "grad out_weight (own attn)",
                   norm=float(own_product.abs().max() * gamma_value.abs()),
                   slack=ulp * own_sizes * gamma_value.abs())
    own_gamma = (own_product * out_weight.detach().double()).sum()
    if o["out_bias"]:
        own_gamma = own_gamma + (grad64.sum((0, 2)) * out_bias.detach().double()).sum()
    assert_matches(actual[5], own_gamma.reshape(actual[5].shape), dtype, "grad gamma (own attn)",
                   slack=ulp * float(gamma_sizes))


# ---- every operator of the operator table ----

@st.composite
def table_cases(draw: st.DrawFn) -> Case:
    """An operator of tests/shared/operators.py and one of its variants that applies to the
    drawn shape (an example whose shape none applies to draws the operator's first variant and
    a shape with positions)."""
    op = draw(st.sampled_from(OPS))
    case = draw(base_cases(op.feature_maps, max_positions=op.reference_max_positions, large_every=16))
    applicable = [v for v in op.variants if op.applies(case.shape, v)]
    if not applicable:
        case = Case((*case.shape[:2], *(max(1, s) for s in case.shape[2:])), case.dtype, case.seed, case.layouts)
        applicable = [v for v in op.variants if op.applies(case.shape, v)]
    return with_options(case, op=op, variant=draw(st.sampled_from(applicable)))


@given(case=table_cases())
def test_operator_table(case: Case) -> None:
    """Every operator of the operator table, from its own description: random shapes, dtypes,
    layouts of every feature-map argument and variants, the forward and every gradient against
    the float64 reference within the table's tolerance or 4 times the eager composition's error.
    (The properties above refine this for each operator: option values between the variants,
    error models of their sums.)"""
    record(case)
    op, variant = case.options["op"], case.options["variant"]
    event(op.name)
    generator = torch.Generator().manual_seed(case.seed)
    drawn = op.sample(case.shape, variant, case.dtype, "cpu", "contiguous", generator)
    tensors = {name: layout_view(t, *case.layouts[name]) if t is not None and name in op.feature_maps else t
               for name, t in drawn.tensors.items()}
    sample = Sample(op, tensors, drawn.options)
    if case.empty:
        leaves = sample.leaves()
        out = sample.output(sample.call(leaves))
        names = sample.differentiable_names(leaves)
        grads = torch.autograd.grad(out, [leaves[n] for n in names], torch.randn(out.shape).to(out), allow_unused=True)
        assert_empty_result(out, grads, [leaves[n] for n in names])
        return
    check_against_reference(sample, generator, eager_slack=True)
