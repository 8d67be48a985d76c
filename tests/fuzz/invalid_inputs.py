#!/usr/bin/env python3
"""Invalid-input fuzzing of every cnn_attention operator, functional wrapper and module.

    python tests/fuzz/invalid_inputs.py --calls N --seed S [--json PATH] [--trace PATH]
    python tests/fuzz/invalid_inputs.py --seed S --replay I    # re-run call I with a traceback

Each call starts from a valid call and applies zero to three mutations (tensor ranks, sizes,
dtypes, devices, layouts, non-tensors where tensors go, odd strings, NaN / inf / huge
numbers, wrong argument counts). An oracle written from docs/design.md and the checks in
csrc/ops says whether the call is valid. An operator of the operator table
(tests/shared/operators.py) without a generator and oracle here is fuzzed from its table
entry, with validity unknown (only the rules on exceptions, messages and time apply). Rules:

- a call returns or raises RuntimeError, ValueError, TypeError, IndexError or
  NotImplementedError whose message names the operator (a module: its class name or an
  operator it calls); any other exception type, or a message that names neither, fails;
- a valid call succeeds (a backward through it too) and its result has the contracted
  shape, dtype and device, the same values for a strided input as for a contiguous copy, and
  a 0/1 mask with k ones per row in top-k mode; an invalid call is rejected;
- no call takes longer than --slow seconds (a watchdog kills the process after --hang).

Shapes are small; huge sizes are stride-0 expanded views, which on the CPU only appear in
calls made invalid by an argument the operator checks before allocating. A huge request that
still fails to allocate is listed apart, as are messages that come from torch's dispatcher
before our code runs (known patterns below). The exit status is 0 only without failures.
Every call draws from its own generator seeded by (seed, index), so a run and a single call
are reproducible.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent / "python"), str(TESTS / "python"), str(TESTS / "shared")]
import cnn_attention  # noqa: E402
import operators as operator_table  # noqa: E402
from cnn_attention import functional as caf  # noqa: E402

OPS = torch.ops.cnn_attention
NAN, INF = float("nan"), float("inf")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPES = FLOATING + (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8)
LAYOUTS = ("contiguous", "contiguous", "channels_last", "slice", "expand", "transpose", "offset")

# Elements really allocated for one tensor; larger shapes are stride-0 expanded views.
MAX_REAL = 4096
# A CPU view in (MID_LO, MID_HI) elements goes to "meta" instead: if an operator wrongly
# allocated its output, that much memory could be granted and exhaust the machine, whereas
# beyond MID_HI the allocation fails cleanly.
MID_LO, MID_HI = 2**22, 2**40
# expand() and the byte counts of outputs stay representable.
MAX_VIEW = 2**58
BIG_SIZES = (2**20, 2**31, 2**40)

ALLOWED = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
ALLOC_RE = re.compile(
    r"can't allocate memory|not enough memory|out of memory|Storage size calculation overflowed"
    r"|numel: integer multiplication overflow|Overflow when unpacking long",
    re.IGNORECASE,
)

STRINGS: tuple[Any, ...] = (
    "", " ", "AVG", "Max", "Sigmoid", "SOFTMAX", "Threshold", "TopK", "Identity", " avg", "avg ",
    "avg\x00", "sigmoid\x00softmax", "\x00", "sigmöid", "注意力", "🙂", "\ud800", "a" * 100_000,
    "avg", "max", "avgmax", "sigmoid", "softmax", "threshold", "topk", "identity", "hard_sigmoid", "silu",
    "gelu", "relu",
    None, 0, 1.5, b"avg", ["avg"],
)
FLOAT_VALUES: tuple[Any, ...] = (
    NAN, INF, -INF, 0.0, -0.0, -1.0, -1e-300, 1e300, -1e300, 2**62, 1e-300, 5e-324, 2**64,
    True, False, 2, 0.5, 1.0, 1.5,
)
INT_VALUES: tuple[Any, ...] = (
    -1, 0, 1, 2, 3, 7, INT64_MIN, 2**62, 2**62 + 1, INT64_MAX, 2**63, 2**64, -(2**64),
    1.5, 2.0, NAN, INF, -INF, True, False,
)
# Module options: Python numbers only (no int beyond int64: torch.empty cannot take one).
MODULE_INT_VALUES: tuple[Any, ...] = (
    -1, 0, 1, 2, 3, 4, 7, 8, INT64_MIN, 2**62, 2**62 + 1, INT64_MAX, 1.5, 2.0, NAN, INF, -INF,
    True, False,
)
# Options that size a parameter (channels, min_hidden, kernel_size, num_heads) take no huge
# value: the module would ask for that many elements, a request that cannot succeed.
MODULE_SIZE_VALUES = tuple(v for v in MODULE_INT_VALUES if not (isinstance(v, int) and v >= 2**62))
MODULE_FLOAT_VALUES: tuple[Any, ...] = (
    NAN, INF, -INF, 0.0, -0.0, -1.0, -1e-300, 1e300, -1e300, 2**62, 1e-300, 5e-324, 2, 0.25,
    0.5, 1.0, True,
)
CHANNEL_GATES = ("sigmoid", "softmax", "hard_sigmoid")
CHANNEL_ACTIVATIONS = ("relu", "silu", "gelu", "identity")
NON_TENSORS: tuple[Any, ...] = (None, [1.0, 2.0], [[1.0]], "x", 1.0, 3, (), {"a": 1})


# ---------------------------------------------------------------------------- tensors


@dataclass
class TSpec:
    """A tensor to build: shape, dtype, device and memory layout."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    layout: str = "contiguous"
    special: bool = False  # some NaN / inf values
    requires_grad: bool = False


def prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def extent(shape: tuple[int, ...]) -> int:
    """The element count with empty dims read as 1: what an output sized from the other dims
    (soft_attention_pool's (N, C) for P = 0) may need, and what torch's numel check multiplies."""
    return math.prod(max(d, 1) for d in shape)


def cap_view(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Keep the largest dims from overflowing expand() while leaving the shape huge.
    dims = list(shape)
    while extent(tuple(dims)) > MAX_VIEW:
        i = max(range(len(dims)), key=lambda d: dims[d])
        dims[i] = max(1, dims[i] // 1024)
    return tuple(dims)


def random_values(shape: tuple[int, ...], dtype: torch.dtype, device: str, special: bool) -> Tensor:
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, dtype=dtype)
        if special and t.numel():
            flat = t.view(-1)
            for _ in range(1 + t.numel() // 8):
                flat[int(torch.randint(t.numel(), ()))] = [NAN, INF, -INF][int(torch.randint(3, ()))]
        return t
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype)
    return torch.randint(-8, 8, shape, dtype=dtype)


def materialize(spec: TSpec, rng: random.Random) -> Tensor:
    shape = cap_view(spec.shape)
    n = prod(shape)
    device = spec.device
    if extent(shape) > MAX_REAL:
        if device == "cpu" and MID_LO < extent(shape) < MID_HI:
            device = "meta"
        return torch.zeros([1] * len(shape), dtype=spec.dtype, device=device).expand(shape)
    rank = len(shape)
    layout = spec.layout
    if layout == "channels_last" and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        t = random_values(shape, spec.dtype, device, spec.special).contiguous(memory_format=fmt)
    elif layout == "slice" and rank:
        d = rng.randrange(rank)
        big = list(shape)
        big[d] *= 2
        index = [slice(None)] * rank
        index[d] = slice(None, None, 2)
        t = random_values(tuple(big), spec.dtype, device, spec.special)[tuple(index)]
    elif layout == "expand" and rank:
        base = [1 if rng.random() < 0.5 else s for s in shape]
        t = random_values(tuple(base), spec.dtype, device, spec.special).expand(shape)
    elif layout == "transpose" and rank >= 2:
        i, j = rng.sample(range(rank), 2)
        swapped = list(shape)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        t = random_values(tuple(swapped), spec.dtype, device, spec.special).transpose(i, j)
    elif layout == "offset":
        t = random_values((n + 3,), spec.dtype, device, spec.special)[3:].view(shape)
    elif layout == "sparse" and device == "cpu":
        t = random_values(shape, spec.dtype, device, spec.special).to_sparse()
    else:
        t = random_values(shape, spec.dtype, device, spec.special)
    if spec.requires_grad and (spec.dtype.is_floating_point or spec.dtype.is_complex):
        t = t.detach().requires_grad_(True)
    return t


def materialize_all(value: Any, rng: random.Random) -> Any:
    return materialize(value, rng) if isinstance(value, TSpec) else value


def describe(value: Any) -> str:
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        text = f"T({dtype}, {value.device.type}, {list(value.shape)}"
        if value.layout != torch.strided:
            return text + f", {str(value.layout).replace('torch.', '')})"
        if not value.is_contiguous():
            text += f", stride={list(value.stride())}"
        if value.storage_offset():
            text += f", offset={value.storage_offset()}"
        if value.requires_grad:
            text += ", requires_grad"
        return text + ")"
    if isinstance(value, str):
        return repr(value) if len(value) <= 24 else f"{value[:12]!r}...<{len(value)} chars>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**40:
        return ("-" if value < 0 else "") + power_of_two(abs(value))
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def power_of_two(v: int) -> str:
    """2**62+1, 2**63-1: huge ints as written in a reproduction."""
    e = v.bit_length() - 1
    if 2 ** (e + 1) - v < 2**20:
        return f"2**{e + 1}-{2 ** (e + 1) - v}"
    return f"2**{e}" + (f"+{v - 2**e}" if v > 2**e else "")


def is_fm(x: Any) -> bool:
    """A feature map (N, C, *S) with 1 to 3 spatial dims and a floating dtype."""
    return isinstance(x, Tensor) and x.layout == torch.strided and 3 <= x.dim() <= 5 and x.dtype in FLOATING


def like(t: Any, x: Tensor) -> bool:
    return isinstance(t, Tensor) and t.dtype == x.dtype and t.device == x.device


def shaped(t: Any, x: Tensor, shape: tuple[int, ...]) -> bool:
    return like(t, x) and tuple(t.shape) == tuple(shape)


def positions(x: Tensor) -> int:
    return prod(tuple(x.shape[2:]))


def all3(*values: Optional[bool]) -> Optional[bool]:
    """Three-valued and: False wins, then None (unknown)."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


# ---------------------------------------------------------------------------- operators

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "T", "T?", "str", "float", "int", "bool" (the schema's types)
    default: Any = REQUIRED


def schema_params(op: str) -> tuple[Param, ...]:
    # Read from the registered schema, so that the fuzzer follows the library.
    kinds = {"Tensor": "T", "Tensor?": "T?", "Optional[Tensor]": "T?", "str": "str", "float": "float", "int": "int",
             "bool": "bool"}
    schema = getattr(OPS, op).default._schema
    return tuple(
        Param(a.name, kinds[str(a.type)], a.default_value if a.has_default_value() else REQUIRED)
        for a in schema.arguments
    )


def registered_ops() -> list[str]:
    names = [s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("cnn_attention::")]
    # _build_info takes no input.
    return sorted(n for n in set(names) if n != "_build_info")


@dataclass
class Geometry:
    n: int
    c: int
    spatial: tuple[int, ...]
    dtype: torch.dtype
    device: str

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.n, self.c) + self.spatial

    @property
    def positions(self) -> int:
        return prod(self.spatial)


def pick(rng: random.Random, weighted: dict[Any, float]) -> Any:
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def random_geometry(rng: random.Random, huge: bool, rank: Optional[int] = None,
                    channels: Optional[int] = None, max_positions: int = 64) -> Geometry:
    rank = rank or rng.choice((1, 2, 3))
    dtype = pick(rng, {torch.float32: 4, torch.float64: 2, torch.float16: 1, torch.bfloat16: 1})
    if huge:
        # One huge dim or more, every tensor built from them a stride-0 view.
        n = rng.choice((1, 2, 2**20))
        c = channels if channels is not None else rng.choice((3, 2**16))
        spatial = tuple(rng.choice((3, 2**10, 2**20)) for _ in range(rank))
        if prod((n, c) + spatial) <= MAX_REAL:
            spatial = (2**20,) + spatial[1:]
        return Geometry(n, c, cap_view((n, c) + spatial)[2:], dtype, rng.choice(("cpu", "meta")))
    n = pick(rng, {0: 1, 1: 3, 2: 3, 3: 2})
    c = channels if channels is not None else pick(rng, {0: 1, 1: 3, 2: 3, 3: 3, 4: 2, 5: 2, 8: 1})
    sizes = {0: 1, 1: 3, 2: 3, 3: 3, 4: 2, 5: 2, 7: 1}
    spatial = [pick(rng, sizes) for _ in range(rank)]
    while prod(tuple(spatial)) > max_positions:
        i = max(range(rank), key=lambda d: spatial[d])
        spatial[i] = spatial[i] // 2 + 1 if spatial[i] > 2 else 1
    device = pick(rng, {"cpu": 3, "meta": 1})
    return Geometry(n, c, tuple(spatial), dtype, device)


def spec(rng: random.Random, g: Geometry, shape: tuple[int, ...], dtype: Optional[torch.dtype] = None,
         grad: bool = False) -> TSpec:
    return TSpec(
        shape,
        dtype or g.dtype,
        g.device,
        rng.choice(LAYOUTS),
        special=rng.random() < 0.05,
        requires_grad=grad and rng.random() < 0.25,
    )


def scores_shape(rng: random.Random, g: Geometry) -> tuple[int, ...]:
    return (g.n, 1 if rng.random() < 0.6 else g.c) + g.spatial


def temperature(rng: random.Random) -> float:
    return rng.choice((1.0, 1.0, 0.5, 2.0, 1e-3, 10.0))


def build_channel_attention(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    r = rng.randint(1, 4)
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=not backward),
        "fc1_weight": spec(rng, g, (r, g.c), grad=not backward),
        "fc1_bias": spec(rng, g, (r,)) if rng.random() < 0.8 else None,
        "fc2_weight": spec(rng, g, (g.c, r)),
        "fc2_bias": spec(rng, g, (g.c,)) if rng.random() < 0.8 else None,
        "pool": rng.choice(("avg", "max", "avgmax")),
        "gate": rng.choice(CHANNEL_GATES),
        "activation": rng.choice(CHANNEL_ACTIVATIONS),
    }
    if backward:
        v["grad_y"] = spec(rng, g, g.x_shape)
    return v


def build_channel_gate(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=not backward),
        "logits": spec(rng, g, (g.n, g.c), grad=not backward),
        "gate": rng.choice(CHANNEL_GATES),
    }
    if backward:
        v["grad_y"] = spec(rng, g, g.x_shape)
    return v


def build_channel_pool(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    v: dict[str, Any] = {"x": spec(rng, g, g.x_shape, grad=not backward)}
    if backward:
        v["grad_out"] = spec(rng, g, (g.n, 2) + g.spatial)
    return v


def build_soft_attention(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=not backward),
        "scores": spec(rng, g, scores_shape(rng, g), grad=not backward),
        "normalize": rng.choice(("sigmoid", "softmax")),
        "temperature": temperature(rng),
    }
    if backward:
        v["grad_y"] = spec(rng, g, g.x_shape)
    return v


def build_soft_attention_pool(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=not backward),
        "scores": spec(rng, g, scores_shape(rng, g), grad=not backward),
        "temperature": temperature(rng),
    }
    if backward:
        v["grad_out"] = spec(rng, g, (g.n, g.c))
    return v


def build_hard_attention(rng: random.Random, g: Geometry, backward: bool) -> dict[str, Any]:
    s = scores_shape(rng, g)
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=not backward),
        "scores": spec(rng, g, s, grad=not backward),
        "mode": rng.choice(("threshold", "topk")),
        "threshold": rng.choice((0.0, 0.5, 1.0, rng.random())),
        "k": rng.randint(1, max(1, min(g.positions, 2**20))),
        "estimator": rng.choice(("sigmoid", "identity")),
        "temperature": temperature(rng),
    }
    if backward:
        v["grad_y"] = spec(rng, g, g.x_shape)
        # A top-k mask is passed to the backward, a threshold mask is recomputed (None).
        v["mask"] = spec(rng, g, s) if (v["mode"] == "topk") == (rng.random() < 0.9) else None
    return v


def build_self_attention(rng: random.Random, g: Geometry, backward: bool, forward_only: bool = False) -> dict[str, Any]:
    heads = rng.choice((1, 1, 2, 3))
    qk, vd = heads * rng.randint(1, 3), heads * rng.randint(1, 3)
    rows = 2 * qk + vd
    smallest = min(g.spatial)
    grad = not (backward or forward_only)
    v: dict[str, Any] = {
        "x": spec(rng, g, g.x_shape, grad=grad),
        "qkv_weight": spec(rng, g, (rows, g.c), grad=grad),
        "qkv_bias": spec(rng, g, (rows,)) if rng.random() < 0.8 else None,
        "out_weight": spec(rng, g, (g.c, vd)),
        "out_bias": spec(rng, g, (g.c,)) if rng.random() < 0.8 else None,
        "gamma": spec(rng, g, rng.choice(((1,), (), (1, 1))), grad=grad),
        "qk_dim": qk,
        "num_heads": heads,
        "kv_stride": rng.randint(1, max(1, min(smallest, 4))),
    }
    if forward_only:
        v["keep_projection"] = rng.random() < 0.5
    if backward:
        p = g.positions
        lse_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        v["grad_y"] = spec(rng, g, g.x_shape)
        v["lse"] = spec(rng, g, (g.n, heads, p), dtype=lse_dtype)
        v["projection"] = spec(rng, g, (g.n, p, rows)) if rng.random() < 0.5 else None
    return v


# Oracles: whether a bound call is valid, from docs/design.md section 1 and csrc/ops/<op>.cpp.


def ok_scores(x: Any, s: Any) -> bool:
    return (
        is_fm(x)
        and isinstance(s, Tensor)
        and s.dim() == x.dim()
        and s.shape[0] == x.shape[0]
        and s.shape[1] in (1, x.shape[1])
        and s.shape[2:] == x.shape[2:]
        and like(s, x)
    )


def ok_temperature(t: float) -> bool:
    return math.isfinite(t) and t > 0


def ok_threshold(threshold: float) -> bool:
    return math.isfinite(threshold) and 0 <= threshold <= 1


def valid_channel_attention(a: dict[str, Any]) -> bool:
    x, w1, w2 = a["x"], a["fc1_weight"], a["fc2_weight"]
    if not (is_fm(x) and isinstance(w1, Tensor) and w1.dim() == 2 and w1.shape[1] == x.shape[1]):
        return False
    r, c = w1.shape[0], x.shape[1]
    return (
        r > 0
        and shaped(w1, x, (r, c))
        and shaped(w2, x, (c, r))
        and (a["fc1_bias"] is None or shaped(a["fc1_bias"], x, (r,)))
        and (a["fc2_bias"] is None or shaped(a["fc2_bias"], x, (c,)))
        and a["pool"] in ("avg", "max", "avgmax")
        and a["gate"] in CHANNEL_GATES
        and a.get("activation", "relu") in CHANNEL_ACTIVATIONS
        and ("grad_y" not in a or shaped(a["grad_y"], x, tuple(x.shape)))
    )


def valid_channel_gate(a: dict[str, Any]) -> bool:
    x = a["x"]
    return (
        is_fm(x)
        and shaped(a["logits"], x, (x.shape[0], x.shape[1]))
        and a["gate"] in CHANNEL_GATES
        and ("grad_y" not in a or shaped(a["grad_y"], x, tuple(x.shape)))
    )


def valid_channel_pool(a: dict[str, Any]) -> bool:
    x = a["x"]
    if not (is_fm(x) and x.shape[1] > 0):
        return False
    return "grad_out" not in a or shaped(a["grad_out"], x, (x.shape[0], 2) + tuple(x.shape[2:]))


def valid_soft_attention(a: dict[str, Any]) -> bool:
    x = a["x"]
    return (
        ok_scores(x, a["scores"])
        and a["normalize"] in ("sigmoid", "softmax")
        and ok_temperature(a["temperature"])
        and ("grad_y" not in a or shaped(a["grad_y"], x, tuple(x.shape)))
    )


def valid_soft_attention_pool(a: dict[str, Any]) -> bool:
    x = a["x"]
    return (
        ok_scores(x, a["scores"])
        and ok_temperature(a["temperature"])
        and ("grad_out" not in a or shaped(a["grad_out"], x, tuple(x.shape[:2])))
    )


def valid_hard_attention(a: dict[str, Any]) -> bool:
    x, s = a["x"], a["scores"]
    if not (ok_scores(x, s) and a["estimator"] in ("sigmoid", "identity") and ok_temperature(a["temperature"])):
        return False
    if "grad_y" in a:  # the backward: no k; a mask in top-k mode only
        if not shaped(a["grad_y"], x, tuple(x.shape)):
            return False
        if a["mode"] == "topk":
            return a["mask"] is not None and shaped(a["mask"], x, tuple(s.shape))
        return a["mode"] == "threshold" and a["mask"] is None and ok_threshold(a["threshold"])
    if a["mode"] == "threshold":
        return ok_threshold(a["threshold"])
    p = positions(x)
    return a["mode"] == "topk" and a["k"] >= 1 and (p == 0 or a["k"] <= p)


def valid_self_attention(a: dict[str, Any]) -> bool:
    x, w = a["x"], a["qkv_weight"]
    if not (is_fm(x) and isinstance(w, Tensor) and w.dim() == 2 and w.shape[1] == x.shape[1] and like(w, x)):
        return False
    c, rows, qk, heads, stride = x.shape[1], w.shape[0], a["qk_dim"], a["num_heads"], a["kv_stride"]
    if not (qk >= 1 and 2 * qk < rows):
        return False
    vd = rows - 2 * qk
    smallest = min(x.shape[2:])
    gamma = a["gamma"]
    if not (
        heads >= 1
        and qk % heads == 0
        and vd % heads == 0
        and (a["qkv_bias"] is None or shaped(a["qkv_bias"], x, (rows,)))
        and shaped(a["out_weight"], x, (c, vd))
        and (a["out_bias"] is None or shaped(a["out_bias"], x, (c,)))
        and like(gamma, x)
        and gamma.numel() == 1
        and stride >= 1
        and (smallest == 0 or stride <= smallest)
    ):
        return False
    if "lse" not in a:
        return True
    n, p = x.shape[0], positions(x)
    lse, lse_dtype = a["lse"], torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        shaped(a["grad_y"], x, tuple(x.shape))
        and (a["projection"] is None or shaped(a["projection"], x, (n, p, rows)))
        and isinstance(lse, Tensor)
        and lse.dtype == lse_dtype
        and lse.device == x.device
        and tuple(lse.shape) == (n, heads, p)
    )


# Result checks of accepted valid calls: None when fine, else what is wrong.


def same_meta(t: Any, shape: tuple[int, ...], like_t: Tensor) -> Optional[str]:
    if not isinstance(t, Tensor):
        return f"returned {type(t).__name__}, not a Tensor"
    if tuple(t.shape) != tuple(shape) or t.dtype != like_t.dtype or t.device != like_t.device:
        return f"returned {describe(t)}, expected shape {list(shape)} {like_t.dtype} on {like_t.device}"
    return None


def check_mask(mask: Tensor, a: dict[str, Any]) -> Optional[str]:
    if mask.device.type != "cpu" or mask.numel() == 0:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        return "mask has values other than 0 and 1"
    if a["mode"] == "topk" and positions(a["x"]) > 0:
        kept = mask.flatten(2).sum(-1)
        if not bool((kept == a["k"]).all()):
            return f"top-k mask keeps {sorted(set(kept.flatten().tolist()))} positions per row, not k = {a['k']}"
    return None


def result_problem(op: str, a: dict[str, Any], out: Any) -> Optional[str]:
    x = a["x"]
    first = out[0] if isinstance(out, (tuple, list)) else out
    if op == "channel_pool":
        return same_meta(first, (x.shape[0], 2) + tuple(x.shape[2:]), x)
    if op == "soft_attention_pool":
        return same_meta(first, tuple(x.shape[:2]), x)
    problem = same_meta(first, tuple(x.shape), x)
    if problem or not isinstance(out, (tuple, list)):
        return problem
    if op == "hard_attention":
        return same_meta(out[1], tuple(a["scores"].shape), x) or check_mask(out[1], a)
    if op in ("_soft_attention_backward", "_soft_attention_pool_backward", "_hard_attention_backward"):
        return same_meta(out[1], tuple(a["scores"].shape), x)
    if op == "_self_attention_forward":
        n, p, heads = x.shape[0], positions(x), a["num_heads"]
        vd = a["qkv_weight"].shape[0] - 2 * a["qk_dim"]
        lse_like = torch.empty((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        projection = (n, p, a["qkv_weight"].shape[0]) if a.get("keep_projection") else (0,)
        return (same_meta(out[1], (n, p, vd), x) or same_meta(out[2], (n, heads, p), lse_like)
                or same_meta(out[3], projection, x))
    return None


@dataclass(frozen=True)
class OpKind:
    base: str  # the public operator whose checks (and message prefix) it shares
    build: Callable[[random.Random, Geometry], dict[str, Any]]
    valid: Callable[[dict[str, Any]], bool]


def op_kind(base: str, build: Callable[..., dict[str, Any]], valid: Callable[[dict[str, Any]], bool],
            **options: bool) -> OpKind:
    return OpKind(base, lambda rng, g: build(rng, g, **options), valid)


# Filled by targets(): the operator table's kinds for operators without a generator here.
TABLE_OP_KINDS: dict[str, OpKind] = {}

CA, CP, SA = "channel_attention", "channel_pool", "soft_attention"
SP, HA, SELF = "soft_attention_pool", "hard_attention", "self_attention"
OP_KINDS: dict[str, OpKind] = {
    CA: op_kind(CA, build_channel_attention, valid_channel_attention, backward=False),
    "_channel_attention_backward": op_kind(CA, build_channel_attention, valid_channel_attention, backward=True),
    "channel_gate": op_kind("channel_gate", build_channel_gate, valid_channel_gate, backward=False),
    "_channel_gate_backward": op_kind("channel_gate", build_channel_gate, valid_channel_gate, backward=True),
    CP: op_kind(CP, build_channel_pool, valid_channel_pool, backward=False),
    "_channel_pool_backward": op_kind(CP, build_channel_pool, valid_channel_pool, backward=True),
    SA: op_kind(SA, build_soft_attention, valid_soft_attention, backward=False),
    "_soft_attention_backward": op_kind(SA, build_soft_attention, valid_soft_attention, backward=True),
    SP: op_kind(SP, build_soft_attention_pool, valid_soft_attention_pool, backward=False),
    "_soft_attention_pool_backward": op_kind(SP, build_soft_attention_pool, valid_soft_attention_pool, backward=True),
    HA: op_kind(HA, build_hard_attention, valid_hard_attention, backward=False),
    "_hard_attention_backward": op_kind(HA, build_hard_attention, valid_hard_attention, backward=True),
    SELF: op_kind(SELF, build_self_attention, valid_self_attention, backward=False),
    "_self_attention_forward": op_kind(SELF, build_self_attention, valid_self_attention,
                                       backward=False, forward_only=True),
    "_self_attention_backward": op_kind(SELF, build_self_attention, valid_self_attention, backward=True),
}


# An operator of the operator table (tests/shared/operators.py) without a generator and oracle
# above is fuzzed from its table entry: valid calls drawn from its variants and tensor shapes
# (its private operators from the calls its autograd makes), mutated like the others, with no
# oracle (validity unknown): every call must still return or raise an allowed exception that
# names the operator, in time. A generator and an oracle here add "a valid call succeeds with
# the contracted result, an invalid one is rejected".


def table_build(info: Any) -> Callable[[random.Random, Geometry], dict[str, Any]]:
    def build(rng: random.Random, g: Geometry) -> dict[str, Any]:
        shape = g.x_shape
        variant = rng.choice([v for v in info.variants if info.applies(shape, v)] or list(info.variants))
        values: dict[str, Any] = {
            name: None if tensor_shape is None else spec(rng, g, tensor_shape, grad=name in info.differentiable)
            for name, tensor_shape in info.tensor_shapes(shape, variant).items()
        }
        return {**values, **info.resolve(shape, variant)}

    return build


def table_private_build(info: Any, private: str) -> Callable[[random.Random, Geometry], dict[str, Any]]:
    """The arguments of the private operator as the public one's autograd passes them, from a
    small real sample of the geometry (a huge geometry, or one the public operator rejects,
    such as no channels, is replaced by a small one)."""
    def arguments(shape: tuple[int, ...], dtype: torch.dtype, device: str, rng: random.Random) -> dict[str, Any]:
        applicable = [v for v in info.variants if info.applies(shape, v)]
        sample = info.sample(shape, rng.choice(applicable), dtype, device, rng.choice(("contiguous", "channels_last")))
        out = sample.output(sample.call())
        grad = torch.randn(out.shape, dtype=dtype).to(out.device)
        args = dict(sample.op.private_calls(sample, grad))[private]
        return dict(zip([p.name for p in schema_params(private)], args))

    def build(rng: random.Random, g: Geometry) -> dict[str, Any]:
        if extent(g.x_shape) <= MAX_REAL:
            try:
                return arguments(g.x_shape, g.dtype, g.device, rng)
            except (RuntimeError, IndexError):
                pass
        return arguments((2, 3, 4, 5), g.dtype, g.device, rng)

    return build


def table_op_kinds() -> dict[str, "OpKind"]:
    """Kinds for the operators of the operator table and their private operators."""
    kinds: dict[str, OpKind] = {}
    for info in operator_table.OPS:
        kinds[info.name] = OpKind(info.name, table_build(info), lambda bound: None)
        shape = (2, 3, 4, 5)
        sample = info.sample(shape, next(v for v in info.variants if info.applies(shape, v)), torch.float32, "cpu",
                             "contiguous")
        out = sample.output(sample.call())
        for private, _ in info.private_calls(sample, torch.zeros_like(out)):
            kinds[private] = OpKind(info.name, table_private_build(info, private), lambda bound: None)
    return kinds


# ---------------------------------------------------------------------------- op calls


@dataclass
class Style:
    """How arguments are passed: the first `positional` positionally, the rest by keyword
    unless omitted, plus deliberate extras."""

    positional: int
    omit: set[str] = field(default_factory=set)
    extra_positional: list[Any] = field(default_factory=list)
    extra_keywords: dict[str, Any] = field(default_factory=dict)


def bind(params: tuple[Param, ...], values: dict[str, Any], style: Style) -> Optional[dict[str, Any]]:
    """The arguments the callee sees, or None when the call cannot bind (arity, names)."""
    args, kwargs = call_arguments(params, values, style)
    if len(args) > len(params):
        return None
    # An extra positional argument binds to the next parameter when that one was omitted.
    passed = dict(zip([p.name for p in params], args))
    for name, value in kwargs.items():
        if name in passed or name not in {p.name for p in params}:
            return None
        passed[name] = value
    bound = {}
    for p in params:
        if p.name not in passed:
            if p.default is REQUIRED:
                return None
            bound[p.name] = p.default
        else:
            bound[p.name] = passed[p.name]
        if p.kind == "str" and isinstance(bound[p.name], bytes):
            # torch's argument parser takes bytes for a str.
            try:
                bound[p.name] = bound[p.name].decode("utf-8")
            except UnicodeDecodeError:
                pass
    return bound


def parses(params: tuple[Param, ...], bound: dict[str, Any]) -> bool:
    """Whether the dispatcher converts every argument to its schema type."""
    for p in params:
        v = bound[p.name]
        if p.kind == "T" and not isinstance(v, Tensor):
            return False
        if p.kind == "T?" and not (v is None or isinstance(v, Tensor)):
            return False
        if isinstance(v, Tensor) and v.layout != torch.strided:
            return False  # no kernel for sparse tensors
        if p.kind == "str":
            if not isinstance(v, str):
                return False
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        if p.kind == "float" and not isinstance(v, (int, float)):
            return False
        if p.kind == "int" and not (isinstance(v, int) and INT64_MIN <= v <= INT64_MAX):
            return False
    return True


def call_arguments(params: tuple[Param, ...], values: dict[str, Any], style: Style) -> tuple[list[Any], dict[str, Any]]:
    args = [values[p.name] for p in params[: style.positional]] + list(style.extra_positional)
    kwargs = {p.name: values[p.name] for p in params[style.positional :] if p.name not in style.omit}
    kwargs.update(style.extra_keywords)
    return args, kwargs


def wrap64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def mutate_tensor(rng: random.Random, value: Any, g: Geometry) -> Any:
    if not isinstance(value, TSpec):
        # An omitted optional tensor (None) or a non-tensor becomes some tensor.
        return spec(rng, g, tuple(rng.choice((0, 1, 2, 3, 5)) for _ in range(rng.randint(0, 6))))
    s = TSpec(value.shape, value.dtype, value.device, value.layout, value.special, value.requires_grad)
    how = pick(rng, {"non_tensor": 2, "rank": 2, "size": 3, "dtype": 2, "device": 1.5, "layout": 0.5,
                     "special": 0.5, "big": 1, "grad": 0.5})
    if how == "non_tensor":
        return rng.choice(NON_TENSORS)
    if how == "rank":
        dims = list(s.shape)
        if dims and rng.random() < 0.5:
            del dims[rng.randrange(len(dims))]
        elif len(dims) < 6:
            dims.insert(rng.randint(0, len(dims)), rng.choice((1, 2, 3)))
        if rng.random() < 0.2:
            dims = [rng.choice((0, 1, 2, 3)) for _ in range(rng.randint(0, 6))]
        s.shape = tuple(dims)
    elif how in ("size", "big") and s.shape:
        d = rng.randrange(len(s.shape))
        old = s.shape[d]
        new = rng.choice(BIG_SIZES) if how == "big" else rng.choice((0, 1, old + 1, max(old - 1, 0), 2 * old + 1, 7))
        s.shape = s.shape[:d] + (new,) + s.shape[d + 1 :]
    elif how == "dtype":
        s.dtype = rng.choice([d for d in DTYPES if d != s.dtype])
    elif how == "device":
        s.device = "meta" if s.device == "cpu" else "cpu"
    elif how == "layout":
        s.layout = rng.choice(LAYOUTS + ("sparse", "sparse"))
    elif how == "special":
        s.special = True
    elif how == "grad":
        s.requires_grad = not s.requires_grad
    return s


def int_value(rng: random.Random, name: str, g: Geometry) -> Any:
    p = g.positions
    near = {
        "k": (p, p + 1, 2**31),
        "kv_stride": (min(g.spatial) + 1, max(g.spatial), 2**31),
        "num_heads": (5, 7, 2**31),
        "qk_dim": (INT64_MAX, INT64_MAX - 1, 2**62 + 1, 2**31),
    }.get(name, ())
    return rng.choice(INT_VALUES + near * 2)


def mutate_op(rng: random.Random, params: tuple[Param, ...], values: dict[str, Any], style: Style, g: Geometry) -> None:
    by_kind: dict[str, list[Param]] = defaultdict(list)
    for p in params:
        by_kind["T" if p.kind in ("T", "T?") else p.kind].append(p)
    choices = {k: w for k, w in {"T": 5, "str": 1.5, "float": 1.5, "int": 1.5, "bool": 1}.items() if by_kind[k]}
    choices["arity"] = 0.6
    how = pick(rng, choices)
    if how == "arity":
        what = rng.choice(("omit", "extra_positional", "extra_keyword", "keywords"))
        if what == "omit":
            p = rng.choice(params)
            style.omit.add(p.name)
            style.positional = min(style.positional, params.index(p))
        elif what == "extra_positional":
            style.positional = len(params)
            style.omit.clear()
            style.extra_positional.append(rng.choice((None, 1, "avg", 1.0)))
        elif what == "extra_keyword":
            style.extra_keywords[rng.choice(("bogus", "X", "input", "dim"))] = 1
        else:
            style.positional = 0
        return
    p = rng.choice(by_kind[how])
    if how == "T":
        values[p.name] = mutate_tensor(rng, values[p.name], g)
    elif how == "str":
        values[p.name] = rng.choice(STRINGS)
    elif how == "float":
        values[p.name] = rng.choice(FLOAT_VALUES + ("1.0", None))
    elif how == "bool":  # both valid (keep_projection: what the forward returns besides y)
        values[p.name] = rng.choice((True, False))
    else:
        values[p.name] = int_value(rng, p.name, g)
        if p.name == "qk_dim" and isinstance(values["qk_dim"], int) and rng.random() < 0.7:
            # Size out_weight for v_dim as int64 arithmetic computes it from a
            # huge qk_dim, so that only the qk_dim check stands between the call and the kernel.
            rows = values["qkv_weight"].shape[0] if isinstance(values["qkv_weight"], TSpec) else 0
            vd = wrap64(rows - wrap64(2 * values["qk_dim"]))
            if 1 <= vd <= 64 and isinstance(values["out_weight"], TSpec):
                values["out_weight"].shape = (values["out_weight"].shape[0], vd)


def force_invalid(rng: random.Random, params: tuple[Param, ...], values: dict[str, Any], style: Style) -> None:
    """Make a call whose CPU tensors are huge views invalid by an argument that is checked
    before any allocation (strings and temperature are always checked; these ints too)."""
    names = [p.name for p in params if p.kind == "str" or p.name in ("temperature", "qk_dim", "num_heads", "kv_stride")]
    if names:
        name = rng.choice(names)
        bad = {"temperature": NAN, "qk_dim": 0, "num_heads": 0, "kv_stride": 0}.get(name, "")
        values[name] = bad
        style.omit.discard(name)
    else:  # channel_pool: a valid call has a tensor x
        values["x"] = TSpec(values["x"].shape, torch.int64, "cpu")


def huge_cpu(args: list[Any], kwargs: dict[str, Any]) -> bool:
    return any(
        isinstance(v, Tensor) and v.device.type == "cpu" and extent(tuple(v.shape)) > MAX_REAL
        for v in list(args) + list(kwargs.values())
    )


# ---------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class ModuleSpec:
    cls: type
    # (name, kind, valid value): kind "int", "size" (an int that sizes a parameter), "float",
    # "float?" (None allowed) or "str".
    params: tuple[tuple[str, str, Callable[[random.Random], Any]], ...]
    names: tuple[str, ...]  # what a message may name
    valid: Callable[[dict[str, Any]], Optional[bool]]


def m_int(v: Any, low: int = 1) -> Optional[bool]:
    if isinstance(v, bool):
        return None  # bool is an int to Python; whether it is one to the module is moot
    return isinstance(v, int) and v >= low


def fits_float32(v: float) -> bool:
    """gamma is a float32 parameter: its initial value must be finite there too."""
    return math.isfinite(v) and abs(v) <= torch.finfo(torch.float32).max


def m_float(v: Any, test: Callable[[float], bool]) -> Optional[bool]:
    if isinstance(v, bool):
        return None
    return isinstance(v, (int, float)) and test(float(v))


def m_choice(v: Any, accepted: tuple[str, ...]) -> bool:
    return isinstance(v, str) and v in accepted


def valid_scores_head(a: dict[str, Any]) -> Optional[bool]:
    k, d = a["kernel_size"], a["spatial_dims"]
    return all3(m_int(k), m_int(k) and k % 2 == 1, m_int(d) and d in (1, 2, 3))


def valid_channel_module(a: dict[str, Any]) -> Optional[bool]:
    return all3(m_int(a["channels"]), m_int(a["reduction"]), m_int(a["min_hidden"]),
                m_choice(a.get("pool", "avgmax"), ("avg", "max", "avgmax")),
                m_choice(a.get("gate", "sigmoid"), CHANNEL_GATES),
                m_choice(a.get("activation", "relu"), CHANNEL_ACTIVATIONS))


def valid_soft_module(a: dict[str, Any]) -> Optional[bool]:
    return all3(valid_scores_head(a), m_choice(a["normalize"], ("sigmoid", "softmax")),
                m_float(a["temperature"], lambda t: math.isfinite(t) and t > 0))


def valid_hard_module(a: dict[str, Any]) -> Optional[bool]:
    ratio = a["keep_ratio"]
    ratio_ok = True if ratio is None else all3(
        m_float(ratio, lambda r: 0 < r <= 1), a["mode"] == "topk")
    return all3(valid_scores_head(a), m_choice(a["mode"], ("threshold", "topk")),
                m_choice(a["estimator"], ("sigmoid", "identity")),
                m_float(a["temperature"], lambda t: math.isfinite(t) and t > 0),
                m_float(a["threshold"], lambda t: math.isfinite(t) and 0 <= t <= 1),
                m_int(a["k"]), ratio_ok, m_float(a["noise"], lambda t: math.isfinite(t) and t >= 0))


def valid_self_module(a: dict[str, Any]) -> Optional[bool]:
    ints = [a[n] for n in ("channels", "num_heads", "qk_reduction", "v_reduction", "kv_stride")]
    basic = all3(*(m_int(v) for v in ints), m_float(a["gamma_init"], fits_float32))
    if basic is not True:
        return basic
    c, h = a["channels"], a["num_heads"]
    qk, vd = max(c // a["qk_reduction"], h), max(c // a["v_reduction"], h)
    return qk % h == 0 and vd % h == 0


def valid_cbam(a: dict[str, Any]) -> Optional[bool]:
    return all3(valid_channel_module(a), valid_scores_head(a))


def odd_kernel(rng: random.Random) -> int:
    return rng.choice((1, 3, 3, 5, 7))


MODULES: dict[str, ModuleSpec] = {
    "ChannelAttention": ModuleSpec(
        cnn_attention.ChannelAttention,
        (("channels", "size", lambda r: r.randint(1, 8)), ("reduction", "int", lambda r: r.choice((1, 2, 4, 16))),
         ("min_hidden", "size", lambda r: r.randint(1, 8)),
         ("pool", "str", lambda r: r.choice(("avg", "max", "avgmax"))),
         ("gate", "str", lambda r: r.choice(CHANNEL_GATES)),
         ("activation", "str", lambda r: r.choice(CHANNEL_ACTIVATIONS))),
        ("ChannelAttention", "channel_attention"),
        valid_channel_module,
    ),
    "SpatialScores": ModuleSpec(
        cnn_attention.SpatialScores,
        (("kernel_size", "size", odd_kernel), ("spatial_dims", "int", lambda r: r.choice((1, 2, 3)))),
        ("SpatialScores", "channel_pool"),
        valid_scores_head,
    ),
    "SoftAttention": ModuleSpec(
        cnn_attention.SoftAttention,
        (("kernel_size", "size", odd_kernel), ("normalize", "str", lambda r: r.choice(("sigmoid", "softmax"))),
         ("temperature", "float", temperature), ("spatial_dims", "int", lambda r: r.choice((1, 2, 3)))),
        ("SoftAttention", "cbam_spatial"),
        valid_soft_module,
    ),
    "HardAttention": ModuleSpec(
        cnn_attention.HardAttention,
        (("kernel_size", "size", odd_kernel), ("mode", "str", lambda r: r.choice(("threshold", "topk"))),
         ("threshold", "float", lambda r: r.choice((0.0, 0.5, 1.0, r.random()))),
         ("k", "int", lambda r: r.randint(1, 4)),
         ("keep_ratio", "float?", lambda r: r.choice((None, None, 0.25, 1.0))),
         ("estimator", "str", lambda r: r.choice(("sigmoid", "identity"))), ("temperature", "float", temperature),
         ("noise", "float", lambda r: r.choice((0.0, 0.0, 1.0))),
         ("spatial_dims", "int", lambda r: r.choice((1, 2, 3)))),
        ("HardAttention", "hard_attention", "channel_pool"),
        valid_hard_module,
    ),
    "SelfAttention": ModuleSpec(
        cnn_attention.SelfAttention,
        (("channels", "size", lambda r: r.choice((1, 2, 4, 6, 8))),
         ("num_heads", "size", lambda r: r.choice((1, 1, 2))),
         ("qk_reduction", "int", lambda r: r.choice((1, 2, 8))), ("v_reduction", "int", lambda r: r.choice((1, 2))),
         ("kv_stride", "int", lambda r: r.choice((1, 1, 2))), ("gamma_init", "float", lambda r: r.choice((0.0, 0.5)))),
        ("SelfAttention", "self_attention"),
        valid_self_module,
    ),
    "CBAM": ModuleSpec(
        cnn_attention.CBAM,
        (("channels", "size", lambda r: r.randint(1, 8)), ("reduction", "int", lambda r: r.choice((1, 2, 16))),
         ("min_hidden", "size", lambda r: r.randint(1, 4)), ("kernel_size", "size", odd_kernel),
         ("spatial_dims", "int", lambda r: r.choice((1, 2, 3)))),
        ("CBAM", "ChannelAttention", "SoftAttention", "cbam", "channel_attention", "channel_pool", "soft_attention",
         "cbam_spatial"),
        valid_cbam,
    ),
}


def module_input_valid(name: str, m: torch.nn.Module, x: Any) -> Optional[bool]:
    """Whether forward(x) is valid for the constructed module `m`."""
    if not is_fm(x):
        return False
    param = next(m.parameters())
    if x.dtype != param.dtype:
        return False
    uses_conv = name in ("SpatialScores", "SoftAttention", "HardAttention", "CBAM")
    if x.device != param.device:
        # torch's convolution mixes meta and CPU tensors leniently.
        return None if uses_conv else False
    c, p = x.shape[1], positions(x)
    checks: list[Optional[bool]] = []
    if uses_conv:
        head = m if name == "SpatialScores" else m.spatial.scores if name == "CBAM" else m.scores
        checks += [x.dim() == head.spatial_dims + 2, c >= 1]
        # Same-padding convolution of an empty map: the contract says nothing.
        checks.append(None if p == 0 else True)
    if name in ("ChannelAttention", "SelfAttention", "CBAM"):
        checks.append(c == m.channels if name != "CBAM" else c == m.channel.channels)
    if name == "HardAttention" and m.mode == "topk" and m.keep_ratio is None:
        checks.append(p == 0 or m.k <= p)
    if name == "SelfAttention":
        smallest = min(x.shape[2:])
        checks.append(smallest == 0 or m.kv_stride <= smallest)
    return all3(*checks)


# ---------------------------------------------------------------------------- running


@dataclass
class Call:
    target: str
    names: tuple[str, ...]  # a message must name one of these
    text: str  # description of the call
    run: Callable[[], Any]
    valid: Optional[bool]
    check: Callable[[Any], Optional[str]]  # result check of an accepted call
    # Validity known only after the call (a module's forward depends on what was built).
    valid_after: Optional[Callable[[], Optional[bool]]] = None


def names_any(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def tensor_args(args: list[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]


def backward_problem(out: Any, inputs: list[Tensor]) -> Optional[str]:
    wanted = [t for t in inputs if t.requires_grad]
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not wanted or not isinstance(first, Tensor) or not first.requires_grad:
        return None
    try:
        torch.autograd.grad(first.float().sum(), wanted, allow_unused=True)
    except Exception as e:  # noqa: BLE001 (any failure of a valid backward is reported)
        return f"backward raised {type(e).__name__}: {first_line(str(e))}"
    return None


def layout_problem(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], out: Any) -> Optional[str]:
    """A strided input must give the values of its contiguous copy (reading out of bounds or
    with the wrong strides would not)."""
    tensors = tensor_args(args, kwargs)
    if (
        not tensors
        or any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors)
        or all(t.is_contiguous() for t in tensors)
        or not all(bool(torch.isfinite(t).all()) for t in tensors)
    ):
        return None
    def dense(v: Any) -> Any:
        return v.detach().contiguous() if isinstance(v, Tensor) else v

    with torch.no_grad():
        ref = fn(*[dense(v) for v in args], **{k: dense(v) for k, v in kwargs.items()})
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not (isinstance(o, Tensor) and o.shape == r.shape):
            continue  # same_meta reports a wrong shape
        if not torch.allclose(o.detach(), r, rtol=1e-3, atol=1e-3, equal_nan=True):
            diff = (o.detach() - r).abs().nan_to_num(INF).max().item()
            return f"output {i} differs from the contiguous-input result by up to {diff:.3g}"
    return None


def op_call(rng: random.Random, target: str, op: str, functional: bool) -> Call:
    kind = OP_KINDS.get(op) or TABLE_OP_KINDS[op]
    params = schema_params(op)
    huge = rng.random() < 0.08
    g = random_geometry(rng, huge)
    values = kind.build(rng, g)
    style = Style(positional=len(params) if rng.random() < 0.7 else rng.randint(0, len(params)))
    # Trailing defaults are sometimes left out, as a user would.
    for p in reversed(params[style.positional :]):
        if p.default is not REQUIRED and rng.random() < 0.3:
            style.omit.add(p.name)
    mutations = pick(rng, {0: 0.15, 1: 0.55, 2: 0.2, 3: 0.1})
    for _ in range(mutations):
        mutate_op(rng, params, values, style, g)
    tensors = {k: materialize_all(v, rng) for k, v in values.items()}
    args, kwargs = call_arguments(params, tensors, style)
    if huge_cpu(args, kwargs):
        bound = bind(params, tensors, style)
        if bound is not None and parses(params, bound) and kind.valid(bound):
            force_invalid(rng, params, values, style)
            tensors = {k: materialize_all(v, rng) for k, v in values.items()}
            args, kwargs = call_arguments(params, tensors, style)
    bound = bind(params, tensors, style)
    valid = bound is not None and parses(params, bound) and kind.valid(bound)
    fn = getattr(caf, op) if functional else getattr(OPS, op)
    label = f"cnn_attention.functional.{op}" if functional else f"torch.ops.cnn_attention.{op}"
    shown = [describe(v) for v in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    text = f"{label}({', '.join(shown)})"

    def check(out: Any) -> Optional[str]:
        problem = result_problem(op, bound, out)
        if problem is None and not op.startswith("_"):
            problem = layout_problem(fn, args, kwargs, out) or backward_problem(out, tensor_args(args, kwargs))
        return problem

    # Under autograd, an operator whose backward needs saved statistics runs its private
    # forward (`_cbam_forward`, `_self_attention_forward`), called as a function or through
    # torch.ops: the dispatcher's refusal of a layout (sparse) names that one.
    names = tuple({op, kind.base, f"_{op}_forward"})
    return Call(target, names, text, lambda: fn(*args, **kwargs), valid, check)


def module_call(rng: random.Random, name: str) -> Call:
    ms = MODULES[name]
    ctor = {n: make(rng) for n, _, make in ms.params}
    if rng.random() < 0.35:
        for _ in range(rng.choice((1, 1, 2))):
            pname, pkind, _ = rng.choice(ms.params)
            pool = {"int": MODULE_INT_VALUES, "size": MODULE_SIZE_VALUES, "float": MODULE_FLOAT_VALUES,
                    "float?": MODULE_FLOAT_VALUES + (None,), "str": STRINGS}[pkind]
            ctor[pname] = rng.choice(pool)
    positional = rng.random() < 0.3
    ctor_text = ", ".join(describe(v) if positional else f"{k}={describe(v)}" for k, v in ctor.items())
    ctor_valid = ms.valid(ctor)
    training = rng.random() < 0.5
    dtype = pick(rng, {torch.float32: 5, torch.float64: 2, torch.float16: 1, torch.bfloat16: 1})
    to_meta = rng.random() < 0.15
    # The input, from a geometry made for the module as its defaults would expect.
    rank = ctor["spatial_dims"] if m_int(ctor.get("spatial_dims")) and ctor.get("spatial_dims") in (1, 2, 3) else None
    channels = ctor["channels"] if m_int(ctor.get("channels")) and ctor.get("channels", 0) <= 8 else None
    huge = rng.random() < 0.08
    g = random_geometry(rng, huge, rank=rank, channels=channels, max_positions=36)
    g.dtype = dtype
    if "kv_stride" in ctor and m_int(ctor["kv_stride"]) and ctor["kv_stride"] <= 4 and not huge:
        g.spatial = tuple(max(s, ctor["kv_stride"]) if rng.random() < 0.9 else s for s in g.spatial)
    x_spec: Any = spec(rng, g, g.x_shape, grad=True)
    if to_meta:
        x_spec.device = "meta"
    for _ in range(pick(rng, {0: 0.4, 1: 0.45, 2: 0.15})):
        x_spec = mutate_tensor(rng, x_spec, g)
    if isinstance(x_spec, TSpec) and x_spec.device == "cpu" and extent(cap_view(x_spec.shape)) > MAX_REAL:
        x_spec.dtype = torch.int64  # rejected by the first operator, before it allocates
    x = materialize_all(x_spec, rng)
    text = f"{name}({ctor_text}){'.to(' + str(dtype).replace('torch.', '') + ')' if dtype != torch.float32 else ''}"
    text += f"{'.to(meta)' if to_meta else ''}{'' if training else '.eval()'}({describe(x)})"
    state: dict[str, Any] = {}

    def run() -> Any:
        m = ms.cls(*ctor.values()) if positional else ms.cls(**ctor)
        m = m.to(dtype=dtype, device="meta" if to_meta else "cpu").train(training)
        state["module"] = m
        return m(x)

    def valid_after() -> Optional[bool]:
        m = state.get("module")
        return ctor_valid if m is None else all3(ctor_valid, module_input_valid(name, m, x))

    def check(out: Any) -> Optional[str]:
        if not isinstance(x, Tensor):
            return None
        m = state["module"]
        expected = (x.shape[0], 1) + tuple(x.shape[2:]) if name == "SpatialScores" else tuple(x.shape)
        problem = same_meta(out, expected, x)
        if problem is None and name == "HardAttention" and m.last_mask is not None:
            bound = {"x": x, "mode": m.mode, "k": m.positions_kept(positions(x))}
            problem = same_meta(m.last_mask, (x.shape[0], 1) + tuple(x.shape[2:]), x) or check_mask(m.last_mask, bound)
        return problem or backward_problem(out, [x] + list(m.parameters()))

    return Call(name, ms.names, text, run, ctor_valid, check, valid_after)


def targets() -> dict[str, float]:
    """Every target and its share of the calls: public operators and modules 4, private
    operators and functional wrappers 2 (they share the public operators' checks)."""
    ops = registered_ops()
    TABLE_OP_KINDS.update({op: kind for op, kind in table_op_kinds().items() if op not in OP_KINDS})
    missing = [op for op in ops if op not in OP_KINDS and op not in TABLE_OP_KINDS]
    if missing:
        raise SystemExit(f"invalid_inputs.py: operators {missing} are neither in the operator table nor here")
    weights = {op: (2.0 if op.startswith("_") else 4.0) for op in ops}
    weights.update({f"F.{f}": 2.0 for f in caf.__all__})
    weights.update({m: 4.0 for m in MODULES})
    return weights


def make_call(seed: int, index: int, weights: dict[str, float]) -> Call:
    rng = random.Random(f"{seed}/{index}")
    torch.manual_seed(rng.getrandbits(63))
    target = pick(rng, weights)
    if target in MODULES:
        return module_call(rng, target)
    if target.startswith("F."):
        return op_call(rng, target, target[2:], functional=True)
    return op_call(rng, target, target, functional=False)


def first_line(message: str, limit: int = 300) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


@dataclass
class Outcome:
    accepted: bool
    error: str = ""  # exception type
    message: str = ""
    problem: str = ""  # failure kind, "" when fine
    allocation: bool = False
    valid: Optional[bool] = None
    seconds: float = 0.0


def run_call(call: Call, slow: float) -> Outcome:
    start = time.perf_counter()
    try:
        out = call.run()
        error: Optional[BaseException] = None
    except Exception as e:  # noqa: BLE001 (every exception is classified below)
        out, error = None, e
    seconds = time.perf_counter() - start
    valid = call.valid_after() if call.valid_after else call.valid
    if error is None:
        outcome = Outcome(True, valid=valid, seconds=seconds)
        if valid is False:
            outcome.problem = "invalid call accepted"
        elif valid:
            try:
                problem = call.check(out)
            except Exception as e:  # noqa: BLE001
                problem = f"result check raised {type(e).__name__}: {first_line(str(e))}"
            if problem:
                outcome.problem, outcome.message = "bad result", problem
    else:
        message = str(error)
        outcome = Outcome(False, type(error).__name__, first_line(message), valid=valid, seconds=seconds)
        if isinstance(error, MemoryError) or ALLOC_RE.search(message):
            outcome.allocation = True
        elif not isinstance(error, ALLOWED):
            outcome.problem = "unexpected exception type"
        elif not names_any(message, call.names):
            outcome.problem = "message does not name the operator"
        elif valid:
            outcome.problem = "valid call rejected"
    if not outcome.problem and seconds > slow:
        outcome.problem = f"slow ({seconds:.1f} s)"
    return outcome


@dataclass
class Stats:
    calls: int = 0
    valid: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: int = 0
    allocation: int = 0
    errors: Counter = field(default_factory=Counter)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trace", type=Path, help="write each call here before making it (finds a crash)")
    parser.add_argument("--replay", type=int, help="make only call REPLAY, with a traceback")
    parser.add_argument("--slow", type=float, default=10.0, help="a call slower than this fails")
    parser.add_argument("--hang", type=float, default=120.0, help="a call slower than this kills the run")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)  # the fuzzer is not a benchmark; leave the cores to others
    warnings.simplefilter("ignore")  # zero-element initialisation and the like: noise here
    faulthandler.enable()
    weights = targets()

    if opts.replay is not None:
        call = make_call(opts.seed, opts.replay, weights)
        print(f"call {opts.replay} [{call.target}]: {call.text}")
        outcome = run_call(call, opts.slow)
        print(f"valid={outcome.valid} accepted={outcome.accepted} {outcome.error}: {outcome.message}")
        print(f"problem: {outcome.problem or '-'}", flush=True)
        try:
            call.run()
        except Exception:  # noqa: BLE001 (shown, whatever it is)
            traceback.print_exc()
        return 1 if outcome.problem else 0

    stats: dict[str, Stats] = {t: Stats() for t in weights}
    failures: list[dict[str, Any]] = []
    allocations: list[dict[str, Any]] = []
    trace = opts.trace.open("w", buffering=1) if opts.trace else None
    start = time.perf_counter()
    slowest = (0.0, -1)
    for i in range(opts.calls):
        call = make_call(opts.seed, i, weights)
        if trace:
            trace.write(f"{i} {call.text}\n")
        faulthandler.dump_traceback_later(opts.hang, exit=True)
        outcome = run_call(call, opts.slow)
        faulthandler.cancel_dump_traceback_later()
        slowest = max(slowest, (outcome.seconds, i))
        s = stats[call.target]
        s.calls += 1
        s.valid += outcome.valid is True
        s.accepted += outcome.accepted
        s.rejected += not outcome.accepted
        if outcome.error:
            s.errors[outcome.error] += 1
        record = {"index": i, "target": call.target, "call": call.text, "valid": outcome.valid,
                  "error": outcome.error, "message": outcome.message}
        if outcome.problem:
            s.failures += 1
            failures.append({**record, "problem": outcome.problem})
        if outcome.allocation:
            s.allocation += 1
            allocations.append(record)
    seconds = time.perf_counter() - start
    if trace:
        trace.close()

    columns = (("calls", "calls"), ("valid", "valid"), ("accepted", "accepted"), ("rejected", "rejected"),
               ("failures", "failures"), ("allocation", "alloc"))

    def row(name: str, values: list[Any]) -> str:
        return f"{name:32}" + "".join(f" {v:>{max(6, len(title))}}" for v, (_, title) in zip(values, columns))

    header = row("target", [title for _, title in columns])
    print(header)
    print("-" * len(header))
    total = Stats()
    for t, s in stats.items():
        print(row(t, [getattr(s, name) for name, _ in columns]))
        for name, _ in columns:
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.errors.update(s.errors)
    print("-" * len(header))
    print(row("total", [getattr(total, name) for name, _ in columns]))
    print("valid: calls the oracle deems valid; alloc: huge requests that failed to allocate")
    print(f"exceptions: {dict(total.errors.most_common())}")
    print(f"{opts.calls} calls, seed {opts.seed}, {seconds:.1f} s; slowest call {slowest[1]} ({slowest[0]:.2f} s)")

    def grouped(records: list[dict[str, Any]], title: str, allocation: bool = False) -> None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            # One group per kind of message: sizes, types and quoted values vary.
            key = re.sub(r"\([^()]*\)|'[^']*'|\"[^\"]*\"|\d+", "_", r["message"])[:100]
            groups[(r["target"], r.get("problem", "") + key)].append(r)
        print(f"\n{title}: {len(records)} in {len(groups)} groups")
        for _, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            r = rs[0]
            where = ", ".join(sorted({x["target"] for x in rs}))
            what = r.get("problem") or r["error"]
            if allocation and any(x["valid"] is False for x in rs):
                what += ", some in invalid calls (allocated before rejecting)"
            print(f"  [{where}] {what} x{len(rs)}: {r['error']}: {r['message']}")
            print(f"      e.g. call {r['index']}: {r['call'][:400]}")

    if failures:
        grouped(failures, "FAILURES")
    if allocations:
        grouped(allocations, "allocation failures (huge requests)", allocation=True)

    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({
            "calls": opts.calls,
            "seed": opts.seed,
            "seconds": round(seconds, 2),
            "targets": {t: {**{k: v for k, v in vars(s).items() if k != "errors"}, "errors": dict(s.errors)}
                        for t, s in stats.items()},
            "total": {k: v for k, v in vars(total).items() if k != "errors"},
            "failures": failures,
            "allocation_failures": allocations,
        }, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
