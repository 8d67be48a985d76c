"""The operators and modules under every runtime the contract names: TorchScript (script,
save, load in a fresh process), torch.compile(fullgraph=True), torch.export; models with every
module, and every operator of the operator table on its own."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from operators import OPS, OperatorCall
from models import TinyAllFamiliesCNN, TinyAttentionCNN, TinyInsertedCNN, TinySelfAttentionCNN, TinySpatialAttentionCNN

import cnn_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Each model and the operators it must show in an exported graph.
MODELS = {
    "channel": (TinyAttentionCNN, {"channel_attention", "channel_pool"}),
    "spatial": (TinySpatialAttentionCNN, {"cbam_spatial", "soft_attention", "hard_attention", "soft_attention_pool",
                                          "cbam", "channel_pool"}),
    "self": (TinySelfAttentionCNN, {"self_attention"}),
    "all": (TinyAllFamiliesCNN, {"channel_attention", "cbam", "hard_attention", "self_attention",
                                 "soft_attention_pool"}),
    # Attention put in by cnn_attention.insert, applied by forward hooks.
    "inserted": (TinyInsertedCNN, {"cbam", "self_attention"}),
}
models = pytest.mark.parametrize("kind", sorted(MODELS))


def _model_and_input(kind, device="cpu"):
    model = MODELS[kind][0]().to(device).eval()
    return model, torch.randn(2, 3, 16, 16, device=device)


@models
def test_torchscript_save_and_load_in_a_fresh_process(tmp_path, kind):
    model, x = _model_and_input(kind)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'python')!r})
        import cnn_attention
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        torch.testing.assert_close(m(io["x"]), io["y"])
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@models
def test_torchscript_trains(kind):
    model, x = _model_and_input(kind)
    scripted = torch.jit.script(model.train())
    scripted(x).square().sum().backward()
    attention = [(n, p) for n, p in scripted.named_parameters() if "attention" in n or "cbam" in n]
    assert len(attention) >= 8
    for name, p in attention:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_scripted_functional_api():
    fn = torch.jit.script(cnn_attention.functional.channel_attention)
    x = torch.randn(2, 4, 3, 3)
    w1, w2 = torch.randn(2, 4), torch.randn(4, 2)
    torch.testing.assert_close(fn(x, w1, None, w2, None, "max", "sigmoid"),
                               cnn_attention.functional.channel_attention(x, w1, None, w2, None, "max"))
    torch.jit.script(cnn_attention.functional.channel_pool)
    soft = torch.jit.script(cnn_attention.functional.soft_attention)
    s = torch.randn(2, 1, 3, 3)
    torch.testing.assert_close(soft(x, s, "softmax", 0.5), cnn_attention.functional.soft_attention(x, s, "softmax", 0.5))
    pool = torch.jit.script(cnn_attention.functional.soft_attention_pool)
    torch.testing.assert_close(pool(x, s, 2.0), cnn_attention.functional.soft_attention_pool(x, s, 2.0))
    hard = torch.jit.script(cnn_attention.functional.hard_attention)
    torch.testing.assert_close(hard(x, s, "topk", 0.5, 3, "identity", 1.0),
                               cnn_attention.functional.hard_attention(x, s, "topk", k=3, estimator="identity"))


@pytest.mark.slow
@models
def test_torch_compile_fullgraph_forward_and_backward(kind):
    model, x = _model_and_input(kind)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    compiled(x1).sum().backward()
    model(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


@models
def test_torch_export(tmp_path, kind):
    model, x = _model_and_input(kind)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {f"cnn_attention.{op}.default" for op in MODELS[kind][1]} <= targets
    torch.testing.assert_close(exported.module()(x), model(x))
    # Round trip through the .pt2 file format.
    path = tmp_path / "model.pt2"
    torch.export.save(exported, str(path))
    torch.testing.assert_close(torch.export.load(str(path)).module()(x), model(x))


@models
def test_torch_export_with_dynamic_batch(kind):
    model, x = _model_and_input(kind)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    x5 = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(exported.module()(x5), model(x5))


def test_build_info():
    info = cnn_attention.build_info()
    assert info["version"] == cnn_attention.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"] is not None:
        assert info["cuda_archs"], "a CUDA build names its architectures"
    assert os.path.exists(cnn_attention.library_path())


def test_the_operator_library_alone_defines_the_operators():
    # The package's libcnn_attention is the library C++ users link; loaded by itself (no
    # cnn_attention import) it registers every operator, with the package's build description.
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "assert 'cnn_attention' not in sys.modules\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "y = torch.ops.cnn_attention.soft_attention(x, torch.zeros(2, 1, 4, 4), 'sigmoid', 1.0)\n"
        "torch.testing.assert_close(y, x * 0.5)\n"
        "print(torch.ops.cnn_attention._build_info())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, cnn_attention.library_path()], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == torch.ops.cnn_attention._build_info() == cnn_attention._C.build_info


def test_optional_submodules_are_reached_from_the_package_and_imported_on_use():
    code = (
        "import sys; import cnn_attention\n"
        "assert 'cnn_attention.onnx' not in sys.modules and 'cnn_attention.viz' not in sys.modules\n"
        "assert 'matplotlib' not in sys.modules and 'onnxscript' not in sys.modules\n"
        "assert callable(cnn_attention.onnx.export) and callable(cnn_attention.onnx.translation_table)\n"
        "assert callable(cnn_attention.viz.draw_attention_maps)\n"
        "assert 'cnn_attention.onnx' in sys.modules and 'cnn_attention.viz' in sys.modules\n"
        "try:\n    cnn_attention.nothing\nexcept AttributeError as e:\n    assert 'nothing' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


@pytest.mark.cuda
@models
def test_cuda_model_matches_cpu(kind):
    model, x = _model_and_input(kind)
    expected = model(x)
    torch.testing.assert_close(model.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-5)


def _table_call(op):
    """An OperatorCall of the operator's first variant that applies to a (2, 6, 5, 7) float32 map."""
    shape = (2, 6, 5, 7)
    variant = next(v for v in op.variants if op.applies(shape, v))
    sample = op.sample(shape, variant, torch.float32, "cpu", "contiguous", torch.Generator().manual_seed(2))
    return OperatorCall(sample)


def _as_list(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_every_operator_of_the_table_under_export_and_compile(op):
    """torch.export (with a dynamic batch) shows the operator in its graph and gives its result;
    torch.compile(fullgraph=True) gives its result and the gradient of every input."""
    model = _table_call(op)
    inputs = model.inputs
    expected = _as_list(model(*inputs))
    batch = torch.export.Dim("batch", min=1, max=64)
    # forward(*maps): one dynamic-shape spec for the variadic argument, a dict per map.
    exported = torch.export.export(model, inputs, dynamic_shapes=(tuple({0: batch} for _ in inputs),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any(f"cnn_attention.{op.name}." in t for t in targets), targets
    for got, want in zip(_as_list(exported.module()(*inputs)), expected):
        torch.testing.assert_close(got, want)
    bigger = tuple(torch.cat([t, t, t]) for t in inputs)
    for got, want in zip(_as_list(exported.module()(*bigger)), _as_list(model(*bigger))):
        torch.testing.assert_close(got, want)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    got, want = _as_list(compiled(*leaves)), _as_list(model(*eager_leaves))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    grads = torch.autograd.grad(got[0].sum(), leaves)
    eager_grads = torch.autograd.grad(want[0].sum(), eager_leaves)
    for g, w in zip(grads, eager_grads):
        torch.testing.assert_close(g, w)


def test_every_operator_of_the_table_traced_saved_and_loaded_in_a_fresh_process(tmp_path):
    """TorchScript: each operator's call traced, saved, loaded by a fresh process that imports
    cnn_attention, with the same results."""
    for op in OPS:
        model = _table_call(op)
        traced = torch.jit.trace(model, model.inputs, check_trace=False)
        traced.save(str(tmp_path / f"{op.name}.pt"))
        torch.save({"inputs": model.inputs, "outputs": _as_list(model(*model.inputs))}, tmp_path / f"{op.name}_io.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'python')!r})
        import cnn_attention
        for name in {[op.name for op in OPS]!r}:
            m = torch.jit.load({str(tmp_path)!r} + f"/{{name}}.pt")
            io = torch.load({str(tmp_path)!r} + f"/{{name}}_io.pt")
            out = m(*io["inputs"])
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            assert len(out) == len(io["outputs"])
            for got, want in zip(out, io["outputs"]):
                torch.testing.assert_close(got, want)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
