"""Bad calls of every public operator, for the operator table (tests/shared/operators.py):
each operator has one valid call (its arguments by schema name) and a list of changes to it,
each with the RuntimeError message the operator must raise, naming itself, the argument and
what it expected. test_operators.py makes every call on the CPU and on "meta" (the checks are
shared by every backend)."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

Arguments = Dict[str, Any]
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class BadCall:
    id: str
    # The valid call's arguments -> the bad call's (a new dict).
    change: Callable[[Arguments], Arguments]
    # A regular expression the message must match (re.search).
    message: str


def replace(**values: Any) -> Callable[[Arguments], Arguments]:
    """A change that sets arguments to fixed values."""
    return lambda a: {**a, **values}


def empty_batch(**values: Any) -> Callable[[Arguments], Arguments]:
    """A change to a call with no samples (nothing to compute: options are still checked)."""
    return lambda a: {**a, **{n: t[:0] for n, t in a.items() if n in ("x", "scores")}, **values}


def _bad_temperatures(op: str, values=((0.0, "0"), (-1.5, "-1.5"), (NAN, "nan"), (INF, "inf"))
                      ) -> Tuple[BadCall, ...]:
    return tuple(BadCall(f"temperature_{shown}", replace(temperature=t),
                         rf"{op}: temperature must be finite and positive, got {shown}$") for t, shown in values)


# ---- channel_attention ----

def channel_attention_call() -> Arguments:
    return {"x": torch.randn(2, 8, 5, 5), "fc1_weight": torch.randn(4, 8), "fc1_bias": torch.randn(4),
            "fc2_weight": torch.randn(8, 4), "fc2_bias": torch.randn(8), "pool": "avg", "gate": "sigmoid",
            "activation": "relu"}


CHANNEL_ATTENTION = (
    BadCall("rank", lambda a: {**a, "x": a["x"][0, 0]},
            r"channel_attention: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(5, 5\)"),
    BadCall("rank6", replace(x=torch.randn(1, 8, 2, 2, 2, 2)),
            r"channel_attention: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 6 dims"),
    BadCall("channels", replace(x=torch.randn(2, 6, 5, 5)),
            r"channel_attention: fc1_weight must be \(R, C\) with C = 6, got \(4, 8\)"),
    BadCall("hidden", replace(fc2_weight=torch.randn(8, 3)),
            r"channel_attention: fc2_weight must be \(C, R\) = \(8, 4\), got \(8, 3\)"),
    BadCall("fc1_bias", replace(fc1_bias=torch.randn(5)), r"channel_attention: fc1_bias must be \(R,\) = \(4,\), got \(5,\)"),
    BadCall("fc2_bias", replace(fc2_bias=torch.randn(7)), r"channel_attention: fc2_bias must be \(C,\) = \(8,\), got \(7,\)"),
    BadCall("weight_dtype", lambda a: {**a, "fc1_weight": a["fc1_weight"].double()},
            r"channel_attention: fc1_weight must have the dtype of x \(Float\), got Double"),
    BadCall("bias_dtype", lambda a: {**a, "fc2_bias": a["fc2_bias"].half()},
            r"channel_attention: fc2_bias must have the dtype of x \(Float\), got Half"),
    BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
            r"channel_attention: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
    BadCall("bool_x", lambda a: {**a, "x": a["x"] > 0}, r"channel_attention: x must have a floating dtype .* got Bool"),
    BadCall("fc1_rank", lambda a: {**a, "fc1_weight": a["fc1_weight"].flatten()},
            r"channel_attention: fc1_weight must be \(R, C\) with C = 8, got \(32,\)"),
    BadCall("pool", replace(pool="mean"), r'channel_attention: pool must be one of "avg", "max", "avgmax", got "mean"'),
    BadCall("gate", replace(gate="tanh"),
            r'channel_attention: gate must be one of "sigmoid", "softmax", "hard_sigmoid", got "tanh"'),
    BadCall("activation", replace(activation="tanh"),
            r'channel_attention: activation must be one of "relu", "silu", "gelu", "identity", got "tanh"'),
    BadCall("activation_without_samples", empty_batch(activation="swish"), r"channel_attention: activation must be one of"),
    BadCall("pool_without_samples", empty_batch(pool="mean"), r"channel_attention: pool must be one of"),
)


# ---- cbam ----

def cbam_call() -> Arguments:
    return {"x": torch.randn(2, 8, 5, 5), "fc1_weight": torch.randn(4, 8), "fc1_bias": torch.randn(4),
            "fc2_weight": torch.randn(8, 4), "fc2_bias": torch.randn(8), "conv_weight": torch.randn(1, 2, 3, 3),
            "conv_bias": torch.randn(1), "gate": "sigmoid", "activation": "relu"}


CBAM = (
    BadCall("rank", lambda a: {**a, "x": a["x"][0, 0]},
            r"cbam: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(5, 5\)"),
    BadCall("channels", replace(x=torch.randn(2, 6, 5, 5)), r"cbam: fc1_weight must be \(R, C\) with C = 6, got \(4, 8\)"),
    BadCall("hidden", replace(fc2_weight=torch.randn(8, 3)), r"cbam: fc2_weight must be \(C, R\) = \(8, 4\), got \(8, 3\)"),
    BadCall("fc2_bias", replace(fc2_bias=torch.randn(7)), r"cbam: fc2_bias must be \(C,\) = \(8,\), got \(7,\)"),
    BadCall("weight_dtype", lambda a: {**a, "fc1_weight": a["fc1_weight"].double()},
            r"cbam: fc1_weight must have the dtype of x \(Float\), got Double"),
    BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
            r"cbam: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
    BadCall("conv_even", replace(conv_weight=torch.randn(1, 2, 4, 4)),
            r"cbam: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, got \(1, 2, 4, 4\)"),
    BadCall("conv_not_square", replace(conv_weight=torch.randn(1, 2, 3, 5)),
            r"cbam: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, got \(1, 2, 3, 5\)"),
    BadCall("conv_channels", replace(conv_weight=torch.randn(1, 1, 3, 3)),
            r"cbam: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, got \(1, 1, 3, 3\)"),
    BadCall("conv_outputs", replace(conv_weight=torch.randn(2, 2, 3, 3)),
            r"cbam: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, got \(2, 2, 3, 3\)"),
    BadCall("conv_rank", replace(conv_weight=torch.randn(1, 2, 3)),
            r"cbam: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, got \(1, 2, 3\)"),
    BadCall("conv_dtype", lambda a: {**a, "conv_weight": a["conv_weight"].double()},
            r"cbam: conv_weight must have the dtype of x \(Float\), got Double"),
    BadCall("conv_bias", replace(conv_bias=torch.randn(2)), r"cbam: conv_bias must be \(1,\) = \(1,\), got \(2,\)"),
    BadCall("conv_bias_dtype", lambda a: {**a, "conv_bias": a["conv_bias"].half()},
            r"cbam: conv_bias must have the dtype of x \(Float\), got Half"),
    BadCall("gate", replace(gate="tanh"), r'cbam: gate must be one of "sigmoid", "softmax", "hard_sigmoid", got "tanh"'),
    BadCall("activation", replace(activation="tanh"),
            r'cbam: activation must be one of "relu", "silu", "gelu", "identity", got "tanh"'),
    BadCall("activation_without_samples", empty_batch(activation="swish"), r"cbam: activation must be one of"),
)


# ---- cbam_spatial ----

def cbam_spatial_call() -> Arguments:
    return {"x": torch.randn(2, 8, 5, 5), "conv_weight": torch.randn(1, 2, 3, 3), "conv_bias": torch.randn(1),
            "normalize": "sigmoid", "temperature": 1.0}


CBAM_SPATIAL = _bad_temperatures("cbam_spatial") + (
    BadCall("rank", lambda a: {**a, "x": a["x"][0, 0]},
            r"cbam_spatial: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(5, 5\)"),
    BadCall("no_channels", lambda a: {**a, "x": a["x"][:, :0]},
            r"cbam_spatial: x must have at least one channel \(C >= 1\), got sizes \(2, 0, 5, 5\)"),
    BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
            r"cbam_spatial: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
    BadCall("conv_even", replace(conv_weight=torch.randn(1, 2, 4, 4)),
            r"cbam_spatial: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, "
            r"got \(1, 2, 4, 4\)"),
    BadCall("conv_rank", replace(conv_weight=torch.randn(1, 2, 3, 3, 3)),
            r"cbam_spatial: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, "
            r"got \(1, 2, 3, 3, 3\)"),
    BadCall("conv_channels", replace(conv_weight=torch.randn(1, 3, 3, 3)),
            r"cbam_spatial: conv_weight must be \(1, 2, k, k\) with k odd, one k per spatial dim of x, "
            r"got \(1, 3, 3, 3\)"),
    BadCall("conv_dtype", lambda a: {**a, "conv_weight": a["conv_weight"].double()},
            r"cbam_spatial: conv_weight must have the dtype of x \(Float\), got Double"),
    BadCall("conv_bias", replace(conv_bias=torch.randn(1, 1)),
            r"cbam_spatial: conv_bias must be \(1,\) = \(1,\), got \(1, 1\)"),
    BadCall("conv_bias_dtype", lambda a: {**a, "conv_bias": a["conv_bias"].bfloat16()},
            r"cbam_spatial: conv_bias must have the dtype of x \(Float\), got BFloat16"),
    BadCall("normalize", replace(normalize="tanh"),
            r'cbam_spatial: normalize must be one of "sigmoid", "softmax", got "tanh"'),
    BadCall("normalize_without_samples", empty_batch(normalize="tanh"), r"cbam_spatial: normalize must be one of"),
    BadCall("temperature_without_samples", empty_batch(temperature=0.0),
            r"cbam_spatial: temperature must be finite and positive, got 0"),
)


# ---- channel_gate ----

def channel_gate_call() -> Arguments:
    return {"x": torch.randn(2, 8, 5, 5), "logits": torch.randn(2, 8), "gate": "sigmoid"}


CHANNEL_GATE = (
    BadCall("rank", lambda a: {**a, "x": a["x"][0, 0]},
            r"channel_gate: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(5, 5\)"),
    BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
            r"channel_gate: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
    BadCall("channels", replace(x=torch.randn(2, 6, 5, 5)),
            r"channel_gate: logits must be \(N, C\) = \(2, 6\), got \(2, 8\)"),
    BadCall("batch", replace(logits=torch.randn(3, 8)),
            r"channel_gate: logits must be \(N, C\) = \(2, 8\), got \(3, 8\)"),
    BadCall("logits_rank", lambda a: {**a, "logits": a["logits"][:, :, None, None]},
            r"channel_gate: logits must be \(N, C\) = \(2, 8\), got \(2, 8, 1, 1\)"),
    BadCall("logits_dtype", lambda a: {**a, "logits": a["logits"].double()},
            r"channel_gate: logits must have the dtype of x \(Float\), got Double"),
    BadCall("gate", replace(gate="relu"),
            r'channel_gate: gate must be one of "sigmoid", "softmax", "hard_sigmoid", got "relu"'),
    BadCall("gate_without_samples", lambda a: {**a, "x": a["x"][:0], "logits": a["logits"][:0], "gate": "tanh"},
            r"channel_gate: gate must be one of"),
)


# ---- channel_pool ----

def channel_pool_call() -> Arguments:
    return {"x": torch.randn(2, 3, 4)}


CHANNEL_POOL = (
    BadCall("rank", replace(x=torch.randn(3, 4)),
            r"channel_pool: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(3, 4\)"),
    BadCall("int_x", replace(x=torch.zeros(1, 2, 3, dtype=torch.long)),
            r"channel_pool: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Long"),
    BadCall("bool_x", replace(x=torch.zeros(1, 2, 3, dtype=torch.bool)), r"channel_pool: x must have a floating dtype .* got Bool"),
    BadCall("no_channels", replace(x=torch.zeros(1, 0, 3)),
            r"channel_pool: x must have at least one channel \(C >= 1\), got sizes \(1, 0, 3\)"),
)


# ---- soft_attention, soft_attention_pool, hard_attention: x (2, 3, 4, 5), scores (2, 1, 4, 5) ----

def _scored_call(**options: Any) -> Callable[[], Arguments]:
    return lambda: {"x": torch.randn(2, 3, 4, 5), "scores": torch.randn(2, 1, 4, 5), **options}


def _scores_message(op: str, got: str) -> str:
    return rf"{op}: scores must be \(N, 1, \*S\) or \(N, C, \*S\) = \(2, 1 or 3, 4, 5\), got \({got}\)"


def _scored_bad_calls(op: str) -> Tuple[BadCall, ...]:
    """The checks of x and scores every operator with scores makes."""
    return (
        BadCall("batch", replace(scores=torch.randn(3, 1, 4, 5)), _scores_message(op, "3, 1, 4, 5")),
        BadCall("channels", replace(scores=torch.randn(2, 2, 4, 5)), _scores_message(op, "2, 2, 4, 5")),
        BadCall("spatial", replace(scores=torch.randn(2, 1, 4, 6)), _scores_message(op, "2, 1, 4, 6")),
        BadCall("spatial_transposed", replace(scores=torch.randn(2, 1, 5, 4)), _scores_message(op, "2, 1, 5, 4")),
        BadCall("scores_rank_low", lambda a: {**a, "scores": a["scores"][:, :, 0]}, _scores_message(op, "2, 1, 5")),
        BadCall("scores_flat", lambda a: {**a, "scores": a["scores"].flatten(2)}, _scores_message(op, "2, 1, 20")),
        BadCall("scores_rank_high", lambda a: {**a, "scores": a["scores"][..., None]}, _scores_message(op, "2, 1, 4, 5, 1")),
        BadCall("x_rank", lambda a: {**a, "x": a["x"][0, 0], "scores": a["scores"][0, 0]},
                rf"{op}: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(4, 5\)"),
        BadCall("x_rank6", replace(x=torch.randn(1, 3, 2, 2, 2, 2), scores=torch.randn(1, 1, 2, 2, 2, 2)),
                rf"{op}: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 6 dims"),
        BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
                rf"{op}: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
        BadCall("short_x", lambda a: {**a, "x": a["x"].to(torch.int16)}, rf"{op}: x must have a floating dtype .* got Short"),
        BadCall("long_x", lambda a: {**a, "x": a["x"].long()}, rf"{op}: x must have a floating dtype .* got Long"),
        BadCall("bool_x", lambda a: {**a, "x": a["x"] > 0}, rf"{op}: x must have a floating dtype .* got Bool"),
        BadCall("long_scores", lambda a: {**a, "scores": a["scores"].long()},
                rf"{op}: scores must have the dtype of x \(Float\), got Long"),
        BadCall("int_scores", lambda a: {**a, "scores": a["scores"].int()},
                rf"{op}: scores must have the dtype of x \(Float\), got Int"),
        BadCall("double_scores", lambda a: {**a, "scores": a["scores"].double()},
                rf"{op}: scores must have the dtype of x \(Float\), got Double"),
        BadCall("bfloat16_scores", lambda a: {**a, "scores": a["scores"].bfloat16()},
                rf"{op}: scores must have the dtype of x \(Float\), got BFloat16"),
        BadCall("half_x", lambda a: {**a, "x": a["x"].half()}, rf"{op}: scores must have the dtype of x \(Half\), got Float"),
        BadCall("double_x", lambda a: {**a, "x": a["x"].double()},
                rf"{op}: scores must have the dtype of x \(Double\), got Float"),
    )


soft_attention_call = _scored_call(normalize="sigmoid", temperature=1.0)
SOFT_ATTENTION = _scored_bad_calls("soft_attention") + _bad_temperatures("soft_attention") + (
    BadCall("normalize", replace(normalize="tanh"), r'soft_attention: normalize must be one of "sigmoid", "softmax", got "tanh"'),
    BadCall("normalize_without_samples", empty_batch(normalize="tanh"), r"soft_attention: normalize must be one of"),
    BadCall("temperature_without_samples", empty_batch(temperature=0.0),
            r"soft_attention: temperature must be finite and positive, got 0"),
)

soft_attention_pool_call = _scored_call(temperature=1.0)
SOFT_ATTENTION_POOL = _scored_bad_calls("soft_attention_pool") + _bad_temperatures(
    "soft_attention_pool", values=((0.0, "0"), (-2.0, "-2"), (NAN, "nan"), (INF, "inf"))) + (
    BadCall("temperature_without_positions",
            lambda a: {**a, "x": a["x"][:, :, :0], "scores": a["scores"][:, :, :0], "temperature": 0.0},
            r"soft_attention_pool: temperature must be finite and positive, got 0"),
)

hard_attention_call = _scored_call(mode="threshold", threshold=0.5, k=1, estimator="sigmoid", temperature=1.0)
HARD_ATTENTION = _scored_bad_calls("hard_attention") + _bad_temperatures(
    "hard_attention", values=((0.0, "0"), (-1.0, "-1"), (NAN, "nan"), (INF, "inf"))) + (
    BadCall("mode", replace(mode="top"), r'hard_attention: mode must be one of "threshold", "topk", got "top"'),
    BadCall("estimator", replace(estimator="ste"), r'hard_attention: estimator must be one of "sigmoid", "identity", got "ste"'),
    *(BadCall(f"threshold_{shown}", replace(threshold=t),
              rf"hard_attention: threshold must be finite and in \[0, 1\], got {shown}$")
      for t, shown in [(-0.1, "-0.1"), (1.5, "1.5"), (NAN, "nan"), (INF, "inf")]),
    *(BadCall(f"k_{k}", replace(mode="topk", k=k), rf"hard_attention: k must be in \[1, P\] with P = 20 in top-k mode, got {k}$")
      for k in (0, -1, 21)),
    BadCall("mode_without_samples", empty_batch(mode="top"), r"hard_attention: mode must be one of"),
    BadCall("k_without_samples", empty_batch(mode="topk", k=21),
            r"hard_attention: k must be in \[1, P\] with P = 20 in top-k mode, got 21"),
)


# ---- self_attention: C = 8, qk_dim = 4, v_dim = 8 (qkv_weight has 16 rows), S = (4, 5) ----

def self_attention_call() -> Arguments:
    return {"x": torch.randn(2, 8, 4, 5), "qkv_weight": torch.randn(16, 8) / 8**0.5, "qkv_bias": torch.randn(16),
            "out_weight": torch.randn(8, 8) / 8**0.5, "out_bias": torch.randn(8), "gamma": torch.full((1,), 0.8),
            "qk_dim": 4, "num_heads": 2, "kv_stride": 1}


def _qk_dim_message(got: str) -> str:
    return (r"self_attention: qk_dim must be in \[1, 7\] so that qkv_weight \(16 rows = 2 \* qk_dim \+ v_dim\) "
            rf"leaves v_dim >= 1, got {got}")


SELF_ATTENTION = (
    BadCall("x_rank", lambda a: {**a, "x": a["x"][0, 0]},
            r"self_attention: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 2 dims with sizes \(4, 5\)"),
    BadCall("x_rank6", replace(x=torch.randn(1, 8, 2, 2, 2, 2)),
            r"self_attention: x must be \(N, C, \*S\) with 1 to 3 spatial dims, got 6 dims"),
    BadCall("int_x", lambda a: {**a, "x": a["x"].to(torch.int32)},
            r"self_attention: x must have a floating dtype \(float16, bfloat16, float32, float64\), got Int"),
    BadCall("channels", replace(x=torch.randn(2, 7, 4, 5)),
            r"self_attention: qkv_weight must be \(2 \* qk_dim \+ v_dim, C\) with C = 7, got \(16, 8\)"),
    BadCall("qkv_weight_columns", replace(qkv_weight=torch.randn(16, 6)),
            r"self_attention: qkv_weight must be \(2 \* qk_dim \+ v_dim, C\) with C = 8, got \(16, 6\)"),
    BadCall("qkv_weight_rank", lambda a: {**a, "qkv_weight": a["qkv_weight"][None]},
            r"self_attention: qkv_weight must be \(2 \* qk_dim \+ v_dim, C\) with C = 8, got \(1, 16, 8\)"),
    BadCall("qkv_weight_dtype", lambda a: {**a, "qkv_weight": a["qkv_weight"].double()},
            r"self_attention: qkv_weight must have the dtype of x \(Float\), got Double"),
    BadCall("qk_dim_too_large", replace(qk_dim=8), _qk_dim_message("8")),
    BadCall("qk_dim_zero", replace(qk_dim=0), _qk_dim_message("0")),
    BadCall("qk_dim_negative", replace(qk_dim=-2), _qk_dim_message("-2")),
    # 2 * qk_dim would overflow int64 and pass a naive 2 * qk_dim < rows.
    BadCall("qk_dim_huge", replace(qk_dim=2**63 - 1), _qk_dim_message("9223372036854775807")),
    # qk_dim = 5 instead of 4: v_dim = 6, which out_weight (8, 8) does not match.
    BadCall("qk_dim_inconsistent", replace(qk_dim=5, num_heads=1),
            r"self_attention: out_weight must be \(C, v_dim\) = \(8, 6\), got \(8, 8\)"),
    BadCall("heads_qk", replace(num_heads=3), r"self_attention: num_heads must divide qk_dim = 4 and v_dim = 8, got 3"),
    BadCall("heads_v", replace(qkv_weight=torch.randn(14, 8), out_weight=torch.randn(8, 6), num_heads=4),
            r"self_attention: num_heads must divide qk_dim = 4 and v_dim = 6, got 4"),
    BadCall("heads_zero", replace(num_heads=0), r"self_attention: num_heads must divide qk_dim = 4 and v_dim = 8, got 0"),
    BadCall("heads_negative", replace(num_heads=-2), r"self_attention: num_heads must divide qk_dim = 4 and v_dim = 8, got -2"),
    BadCall("qkv_bias", replace(qkv_bias=torch.randn(15)),
            r"self_attention: qkv_bias must be \(2 \* qk_dim \+ v_dim,\) = \(16,\), got \(15,\)"),
    BadCall("qkv_bias_dtype", lambda a: {**a, "qkv_bias": a["qkv_bias"].half()},
            r"self_attention: qkv_bias must have the dtype of x \(Float\), got Half"),
    BadCall("out_weight", replace(out_weight=torch.randn(8, 7)),
            r"self_attention: out_weight must be \(C, v_dim\) = \(8, 8\), got \(8, 7\)"),
    BadCall("out_weight_rows", replace(out_weight=torch.randn(7, 8)),
            r"self_attention: out_weight must be \(C, v_dim\) = \(8, 8\), got \(7, 8\)"),
    BadCall("out_weight_dtype", lambda a: {**a, "out_weight": a["out_weight"].bfloat16()},
            r"self_attention: out_weight must have the dtype of x \(Float\), got BFloat16"),
    BadCall("out_bias", replace(out_bias=torch.randn(7)), r"self_attention: out_bias must be \(C,\) = \(8,\), got \(7,\)"),
    BadCall("out_bias_dtype", lambda a: {**a, "out_bias": a["out_bias"].double()},
            r"self_attention: out_bias must have the dtype of x \(Float\), got Double"),
    BadCall("gamma_two", replace(gamma=torch.ones(2)), r"self_attention: gamma must have one element, got sizes \(2,\)"),
    BadCall("gamma_empty", replace(gamma=torch.ones(0)), r"self_attention: gamma must have one element, got sizes \(0,\)"),
    BadCall("gamma_dtype", lambda a: {**a, "gamma": a["gamma"].double()},
            r"self_attention: gamma must have the dtype of x \(Float\), got Double"),
    *(BadCall(f"kv_stride_{s}", replace(kv_stride=s),
              rf"self_attention: kv_stride must be in \[1, 4\] \(the smallest spatial size of x\), got {s}")
      for s in (0, -1, 5)),
    BadCall("heads_without_samples", empty_batch(num_heads=3),
            r"self_attention: num_heads must divide qk_dim = 4 and v_dim = 8, got 3"),
    BadCall("kv_stride_without_samples", empty_batch(kv_stride=5), r"self_attention: kv_stride must be in \[1, 4\]"),
    BadCall("gamma_without_samples", empty_batch(gamma=torch.ones(3)), r"self_attention: gamma must have one element"),
)
