"""ONNX export (cnn_attention.onnx): models with every operator and option, and every variant of
every operator of the operator table, exported with standard ONNX operators; onnxruntime's
outputs match PyTorch's."""

import pytest
import torch
from models import TinyAllFamiliesCNN, TinyAttentionCNN, TinyInsertedCNN, TinySelfAttentionCNN, TinySpatialAttentionCNN
from operators import OPS, OperatorCall
from torch import nn

import cnn_attention

# Dev requirements (requirements-dev.txt): a missing one fails the run rather than skipping.
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402,F401
import cnn_attention.onnx  # noqa: E402


def _run_onnx(model, x, tmp_path):
    """`x`: the model's input, or a tuple of its inputs."""
    inputs = x if isinstance(x, tuple) else (x,)
    program = cnn_attention.onnx.export(model, inputs, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    return [torch.from_numpy(o) for o in outputs]


@pytest.mark.parametrize(
    "model_class", [TinyAttentionCNN, TinySpatialAttentionCNN, TinySelfAttentionCNN, TinyAllFamiliesCNN, TinyInsertedCNN]
)
def test_models_match_onnxruntime(tmp_path, model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    x = torch.randn(2, 3, 16, 16)
    (out,) = _run_onnx(model, x, tmp_path)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


class Options(nn.Module):
    """The options the tiny models leave out: max and avg pooling, the softmax gate, softmax
    spatial weights with a temperature, threshold masks, top-k over tied scores (ONNX TopK
    and the operator both keep the lower index), 1-D maps with self attention pooled by 3."""

    def __init__(self):
        super().__init__()
        self.max_softmax = cnn_attention.ChannelAttention(6, reduction=2, pool="max", gate="softmax")
        self.avg = cnn_attention.ChannelAttention(6, reduction=2, pool="avg")
        self.soft = cnn_attention.SoftAttention(kernel_size=3, normalize="softmax", temperature=0.7, spatial_dims=1)
        self.threshold = cnn_attention.HardAttention(kernel_size=3, mode="threshold", threshold=0.4, spatial_dims=1)
        self.self_attention = cnn_attention.SelfAttention(6, num_heads=3, qk_reduction=2, kv_stride=3, gamma_init=0.7)

    def forward(self, x):
        x = self.threshold(self.soft(self.avg(self.max_softmax(x))))
        tied = torch.zeros_like(x[:, :1])  # every score equal: top-k keeps the first positions
        y, mask = torch.ops.cnn_attention.hard_attention(x, tied, "topk", 0.5, 5, "sigmoid", 1.0)
        pooled = torch.ops.cnn_attention.soft_attention_pool(x, x[:, :1] * 2.0, 0.5)
        return self.self_attention(y + mask) + pooled[:, :, None]


def test_every_option_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = Options().eval()
    x = torch.randn(2, 6, 20)
    (out,) = _run_onnx(model, x, tmp_path)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


class SharedScores(nn.Module):
    """One score map read by every operator that takes scores: two top-k masks, softmax and
    sigmoid soft attention and the attention pooling."""

    def __init__(self):
        super().__init__()
        self.scores = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        s = self.scores(x)
        y, _ = torch.ops.cnn_attention.hard_attention(x, s, "topk", 0.5, 5, "sigmoid", 1.0)
        y, _ = torch.ops.cnn_attention.hard_attention(y, s, "topk", 0.5, 3, "identity", 1.0)
        y = torch.ops.cnn_attention.soft_attention(y, s, "softmax", 1.0)
        y = torch.ops.cnn_attention.soft_attention(y, s, "sigmoid", 1.0)
        return torch.ops.cnn_attention.soft_attention_pool(y, s, 1.0)


def test_one_score_map_for_several_operators_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = SharedScores().eval()
    x = torch.randn(2, 4, 5, 6)
    (out,) = _run_onnx(model, x, tmp_path)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


# Every variant, 2-D and 1-D maps in turn.
TABLE_CASES = [(op, variant, shape) for op in OPS for i, variant in enumerate(op.variants)
               for shape in [[(2, 6, 5, 7), (2, 6, 11)][i % 2]] if op.applies(shape, variant)]


@pytest.mark.parametrize("op,variant,shape", TABLE_CASES,
                         ids=[f"{op.name}-{variant['id']}-{len(shape) - 2}d" for op, variant, shape in TABLE_CASES])
def test_every_operator_of_the_table_matches_onnxruntime(tmp_path, op, variant, shape):
    sample = op.sample(shape, variant, torch.float32, "cpu", "contiguous", torch.Generator().manual_seed(1))
    model = OperatorCall(sample).eval()
    outputs = _run_onnx(model, model.inputs, tmp_path)
    expected = model(*model.inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    assert len(outputs) == len(expected)
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


class PrivateSelfAttentionForward(nn.Module):
    """The private forward's results (what the exporter sees of self_attention where autograd is
    traced through), with and without the kept projection."""

    def __init__(self):
        super().__init__()
        self.block = cnn_attention.SelfAttention(16, num_heads=2, kv_stride=2, gamma_init=0.5)

    def forward(self, x):
        b = self.block
        args = (x, b.qkv_weight, b.qkv_bias, b.out_weight, b.out_bias, b.gamma, b.qk_dim, b.num_heads, b.kv_stride)
        y, attn, lse, projection = torch.ops.cnn_attention._self_attention_forward(*args, True)
        empty = torch.ops.cnn_attention._self_attention_forward(*args)[3]
        return y, attn, lse, projection, empty


def test_private_self_attention_forward_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = PrivateSelfAttentionForward().eval()
    x = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        expected = model(x)
    got = _run_onnx(model, x, tmp_path)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    for out, want in zip(got, expected):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
