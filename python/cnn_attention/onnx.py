"""ONNX export: every operator of cnn_attention written with standard ONNX operators (opset
18), for torch.onnx's exporter (``dynamo=True``, onnxscript):

    onnx_program = cnn_attention.onnx.export(model, (x,))      # torch.onnx.export + our table
    onnx_program.save("model.onnx")

or pass ``custom_translation_table=cnn_attention.onnx.translation_table()`` to
``torch.onnx.export`` yourself. The ONNX graphs compute what docs/design.md section 1 defines;
self attention is written as the plain matrix product (ONNX has no memory-efficient
attention), so its memory there is that of the P x P matrix.
"""

import math
from typing import Dict

import torch

__all__ = ["translation_table", "export"]


def _op():
    from onnxscript import opset18

    return opset18


def _ints(values):
    return _op().Constant(value_ints=list(values))


def _spatial_axes(x):
    return list(range(2, len(x.shape)))


def _position_softmax(scores, axes):
    """softmax over the positions (``axes``, the spatial axes) of each (sample, score channel),
    shaped like scores. Reductions over those axes rather than a Softmax of the map flattened
    to rows: the exporter turns each Flatten into a reshape to a shape initializer named after
    the input, and two of them on one score map (a score map that two of our operators use)
    left a node reading an initializer that was never written."""
    op = _op()
    exp = op.Exp(op.Sub(scores, op.ReduceMax(scores, axes, keepdims=1)))
    return op.Div(exp, op.ReduceSum(exp, axes, keepdims=1))


def _positions(scores):
    """P as a scalar of the dtype of scores."""
    op = _op()
    return op.CastLike(op.ReduceProd(op.Shape(scores, start=2), keepdims=0), scores)


def _linear(p, weight, bias):
    op = _op()
    out = op.MatMul(p, op.Transpose(weight, perm=[1, 0]))
    return out if bias is None else op.Add(out, bias)


def _activation(z, activation: str):
    op = _op()
    if activation == "relu":
        return op.Relu(z)
    if activation == "silu":
        return op.Mul(z, op.Sigmoid(z))
    if activation == "gelu":
        # The exact (erf) GELU: opset 18 has no Gelu operator.
        half, root2 = op.CastLike(0.5, z), op.CastLike(math.sqrt(2.0), z)
        return op.Mul(op.Mul(half, z), op.Add(op.CastLike(1.0, z), op.Erf(op.Div(z, root2))))
    return z


def channel_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool: str = "avg", gate: str = "sigmoid",
                      activation: str = "relu"):
    op = _op()
    axes = _ints(_spatial_axes(x))

    def mlp(p):
        return _linear(_activation(_linear(p, fc1_weight, fc1_bias), activation), fc2_weight, fc2_bias)

    if pool == "avg":
        z = mlp(op.ReduceMean(x, axes, keepdims=0))
    elif pool == "max":
        z = mlp(op.ReduceMax(x, axes, keepdims=0))
    else:
        z = op.Add(mlp(op.ReduceMean(x, axes, keepdims=0)), mlp(op.ReduceMax(x, axes, keepdims=0)))
    return channel_gate(x, z, gate)


def channel_gate(x, logits, gate: str = "sigmoid"):
    op = _op()
    if gate == "sigmoid":
        w = op.Sigmoid(logits)
    elif gate == "hard_sigmoid":
        # max(0, min(1, z / 6 + 1/2)) = relu6(z + 3) / 6
        w = op.HardSigmoid(logits, alpha=1.0 / 6.0, beta=0.5)
    else:
        channels = op.CastLike(op.Shape(x, start=1, end=2), x)
        w = op.Mul(op.Softmax(logits, axis=1), channels)
    return op.Mul(x, op.Unsqueeze(w, _ints(_spatial_axes(x))))


def channel_pool(x):
    op = _op()
    one = _ints([1])
    return op.Concat(op.ReduceMean(x, one, keepdims=1), op.ReduceMax(x, one, keepdims=1), axis=1)


def cbam(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate: str = "sigmoid",
         activation: str = "relu"):
    x1 = channel_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "avgmax", gate, activation)
    return soft_attention(x1, _spatial_scores(x1, conv_weight, conv_bias))


def _spatial_scores(x, conv_weight, conv_bias):
    """conv(channel_pool(x)) with same padding: the scores of cbam and cbam_spatial."""
    op = _op()
    pooled = channel_pool(x)
    pads = [conv_weight.shape[-1] // 2] * (2 * (len(conv_weight.shape) - 2))
    if conv_bias is None:
        return op.Conv(pooled, conv_weight, pads=pads)
    return op.Conv(pooled, conv_weight, conv_bias, pads=pads)


def cbam_spatial(x, conv_weight, conv_bias, normalize: str = "sigmoid", temperature: float = 1.0):
    return soft_attention(x, _spatial_scores(x, conv_weight, conv_bias), normalize, temperature)


def _cbam_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate: str = "sigmoid",
                  activation: str = "relu"):
    """(y, channel_stats (2, N, C), channel_argmax (N, C)), as the private forward op returns them
    (what the exporter sees of cbam after autograd is traced through)."""
    op = _op()
    y = cbam(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate, activation)
    axes, first = _ints(_spatial_axes(x)), _ints([0])
    stats = op.Concat(op.Unsqueeze(op.ReduceMean(x, axes, keepdims=0), first),
                      op.Unsqueeze(op.ReduceMax(x, axes, keepdims=0), first), axis=0)
    argmax = op.ArgMax(op.Reshape(x, _ints([0, 0, -1])), axis=2, keepdims=0)
    return y, op.Cast(stats, to=1), argmax


def _scaled(scores, temperature: float):
    op = _op()
    return scores if temperature == 1.0 else op.Div(scores, op.CastLike(temperature, scores))


def soft_attention(x, scores, normalize: str = "sigmoid", temperature: float = 1.0):
    op = _op()
    s = _scaled(scores, temperature)
    if normalize == "sigmoid":
        w = op.Sigmoid(s)
    else:
        w = op.Mul(_position_softmax(s, _ints(_spatial_axes(x))), _positions(s))
    return op.Mul(x, w)


def soft_attention_pool(x, scores, temperature: float = 1.0):
    op = _op()
    axes = _ints(_spatial_axes(x))
    a = _position_softmax(_scaled(scores, temperature), axes)
    return op.ReduceSum(op.Mul(a, x), axes, keepdims=0)


def hard_attention(x, scores, mode: str = "threshold", threshold: float = 0.5, k: int = 1,
                   estimator: str = "sigmoid", temperature: float = 1.0):
    op = _op()
    if mode == "threshold":
        keep = op.Greater(op.Sigmoid(_scaled(scores, temperature)), op.CastLike(threshold, scores))
        mask = op.CastLike(keep, x)
    else:
        # (N, Cs, P) by a reshape to our own constant shape: the exporter turns a Flatten into a
        # reshape to a shape initializer named after the input, and a second one on the same
        # score map (see _position_softmax) reads an initializer that is never written.
        flat = op.Reshape(scores, _ints([0, 0, -1]))
        # NaN ranks as +inf; ONNX TopK puts the lower index first among equal values.
        flat = op.Where(op.IsNaN(flat), op.CastLike(float("inf"), flat), flat)
        _, index = op.TopK(flat, _ints([k]), axis=2, largest=1, sorted=1)
        ones = op.Expand(op.CastLike(1.0, x), op.Shape(index))
        zeros = op.Expand(op.CastLike(0.0, x), op.Shape(flat))
        mask = op.Reshape(op.ScatterElements(zeros, index, ones, axis=2), op.Shape(scores))
    return op.Mul(x, mask), mask


def _self_attention_forward(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim: int,
                            num_heads: int = 1, kv_stride: int = 1, keep_projection: bool = False):
    """(y, attn (N, P, v_dim), lse (N, heads, P), projection (N, P, R) or an empty (0,)), as the
    private forward op returns them (what the exporter sees of self_attention after autograd
    is traced through)."""
    op = _op()
    spatial_dims = len(x.shape) - 2
    rows = qkv_weight.shape[0]
    v_dim = rows - 2 * qk_dim
    dq, dv = qk_dim // num_heads, v_dim // num_heads
    # (R, C) @ (N, C, P) -> (N, R, P)
    qkv = op.MatMul(qkv_weight, op.Reshape(x, _ints([0, 0, -1])))
    if qkv_bias is not None:
        qkv = op.Add(qkv, op.Unsqueeze(qkv_bias, _ints([1])))
    axis1 = _ints([1])
    q = op.Slice(qkv, _ints([0]), _ints([qk_dim]), axis1)
    kv = op.Slice(qkv, _ints([qk_dim]), _ints([rows]), axis1)
    if kv_stride > 1:
        maps = op.Reshape(kv, op.Concat(_ints([0, qk_dim + v_dim]), op.Shape(x, start=2), axis=0))
        pooled = op.MaxPool(maps, kernel_shape=[kv_stride] * spatial_dims, strides=[kv_stride] * spatial_dims)
        if isinstance(pooled, tuple):  # (values, indices): MaxPool's optional second output
            pooled = pooled[0]
        kv = op.Reshape(pooled, _ints([0, 0, -1]))
    k = op.Slice(kv, _ints([0]), _ints([qk_dim]), axis1)
    v = op.Slice(kv, _ints([qk_dim]), _ints([qk_dim + v_dim]), axis1)
    q = op.Transpose(op.Reshape(q, _ints([0, num_heads, dq, -1])), perm=[0, 1, 3, 2])  # (N, H, P, dq)
    k = op.Reshape(k, _ints([0, num_heads, dq, -1]))  # (N, H, dq, Pk)
    v = op.Transpose(op.Reshape(v, _ints([0, num_heads, dv, -1])), perm=[0, 1, 3, 2])  # (N, H, Pk, dv)
    logits = op.Mul(op.MatMul(q, k), op.CastLike(1.0 / math.sqrt(dq), x))
    heads = op.MatMul(op.Softmax(logits, axis=-1), v)  # (N, H, P, dv)
    heads = op.Reshape(op.Transpose(heads, perm=[0, 1, 3, 2]), _ints([0, v_dim, -1]))  # (N, v, P)
    out = op.MatMul(out_weight, heads)
    if out_bias is not None:
        out = op.Add(out, op.Unsqueeze(out_bias, _ints([1])))
    out = op.Reshape(out, op.Shape(x))
    y = op.Add(x, op.Mul(op.Reshape(gamma, _ints([])), out))
    lse = op.ReduceLogSumExp(op.Cast(logits, to=1), _ints([-1]), keepdims=0)
    projection = op.Transpose(qkv, perm=[0, 2, 1]) if keep_projection else op.Expand(op.CastLike(0.0, x), _ints([0]))
    return y, op.Transpose(heads, perm=[0, 2, 1]), lse, projection


def self_attention(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim: int, num_heads: int = 1,
                   kv_stride: int = 1):
    return _self_attention_forward(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads,
                                   kv_stride)[0]


def translation_table() -> Dict[object, object]:
    """{torch.ops.cnn_attention.<op>.default: its ONNX translation}, for
    ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``."""
    ops = torch.ops.cnn_attention
    return {
        ops.channel_attention.default: channel_attention,
        ops.channel_gate.default: channel_gate,
        ops.cbam.default: cbam,
        ops._cbam_forward.default: _cbam_forward,
        ops.cbam_spatial.default: cbam_spatial,
        ops.channel_pool.default: channel_pool,
        ops.soft_attention.default: soft_attention,
        ops.soft_attention_pool.default: soft_attention_pool,
        ops.hard_attention.default: hard_attention,
        ops.self_attention.default: self_attention,
        ops._self_attention_forward.default: _self_attention_forward,
    }


def export(model, args, **kwargs):
    """``torch.onnx.export(model, args, dynamo=True, ...)`` with our operators' translations
    added to any ``custom_translation_table`` given. Needs the onnx and onnxscript packages."""
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, dynamo=True, custom_translation_table=table, **kwargs)
