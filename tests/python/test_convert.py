"""cnn_attention.convert on the model zoos' attention blocks: every recognised block of real
torchvision and timm models (random weights, no download) is replaced, the state dict keeps its
keys, shapes and values, and outputs and gradients equal the original's; each block and variant
on its own in every dtype and layout, in train and eval mode; what is left, and why."""

import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from timm.layers import activations as timm_activations
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.global_context import GlobalContext
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

import cnn_attention
from cnn_attention.convert import recognised_blocks
from helpers import DEVICES, in_layout

ZOO_BLOCKS = (SqueezeExcitation, SEModule, EffectiveSEModule, EcaModule, CecaModule, GlobalContext, CbamModule,
              LightCbamModule, SqueezeExcite)

# (name, builder): the models the issue names, and one of every other recognised block's home.
MODELS = [
    ("tv_efficientnet_b0", lambda: torchvision.models.efficientnet_b0()),
    ("tv_mobilenet_v3_large", lambda: torchvision.models.mobilenet_v3_large()),
    ("seresnet50", lambda: timm.create_model("seresnet50")),
    ("ecaresnet26t", lambda: timm.create_model("ecaresnet26t")),
    ("efficientnet_b0", lambda: timm.create_model("efficientnet_b0")),
    ("gcresnet33ts", lambda: timm.create_model("gcresnet33ts")),
    ("resnet26_cbam", lambda: timm.create_model("resnet26", block_args=dict(attn_layer="cbam"))),
    ("resnet26_lcbam", lambda: timm.create_model("resnet26", block_args=dict(attn_layer="lcbam"))),
    ("mobilenetv3_large_100", lambda: timm.create_model("mobilenetv3_large_100")),
    ("rexnet_100", lambda: timm.create_model("rexnet_100")),
    ("ese_vovnet19b_dw", lambda: timm.create_model("ese_vovnet19b_dw")),
]


def _zoo_blocks(model):
    return [name for name, m in model.named_modules() if type(m) in ZOO_BLOCKS]


def _build(builder, seed):
    torch.manual_seed(seed)
    model = builder()
    # Random BatchNorm statistics and affine parameters, so eval mode is not an identity and no
    # residual branch starts at zero (timm zero-initialises each ResNet block's last BatchNorm,
    # whose output is the attention block's input: the block would see zeros).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _assert_state_dicts_equal(before, after):
    assert list(before.keys()) == list(after.keys())
    for key, value in before.items():
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), key


def _run(model, x):
    """Output, input gradient and every parameter's gradient (by name) of a sum of squares loss
    with a fixed random weight, so that each output element gets its own gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout and stochastic depth for both models in train mode
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype).to(out.device)
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _assert_same_function(original, converted, x, rtol, atol):
    out, grad_x, grads = _run(original, x)
    out2, grad_x2, grads2 = _run(converted, x)

    # A gradient that is zero in exact arithmetic (a bias before a BatchNorm in train mode) is
    # rounding noise of the size of the other gradients: a floor of a few rounding units of
    # the largest gradient.
    largest = max([float(g.abs().max()) for g in grads.values() if g.numel()] + [float(grad_x.abs().max())])
    floor = 64 * torch.finfo(out.dtype).eps * largest

    def close(actual, expected, what):
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + floor, msg=lambda m: f"{what}: {m}")

    close(out2, out, "output")
    assert out2.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    close(grad_x2, grad_x, "gradient of x")
    assert grads.keys() == grads2.keys()
    for name in grads:
        close(grads2[name], grads[name], f"gradient of {name}")


@pytest.mark.parametrize("name,builder", MODELS, ids=[m[0] for m in MODELS])
def test_zoo_model_converts_with_the_same_state_and_function(name, builder):
    original = _build(builder, seed=0)
    blocks = _zoo_blocks(original)
    assert blocks, f"{name} has no zoo attention block: the test would not test convert"
    converted = cnn_attention.convert(copy.deepcopy(original))
    assert _zoo_blocks(converted) == [], "eager blocks left"
    _assert_state_dicts_equal(original.state_dict(), converted.state_dict())

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # Through a whole network the rounding of each block grows: float32 rounding, amplified.
    original.train()
    converted.train()
    _assert_same_function(original, converted, x, rtol=1e-3, atol=1e-4)
    # The running statistics were updated alike in train mode.
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Eval mode on the same running statistics: batch statistics over 2 samples of a 2x2 map
    # make the train step ill-conditioned (on an AMD EPYC, eager's own gradient of x moved by
    # 0.2 at a maximum of 25 between contiguous and channels-last inputs), and the rounding
    # differences it leaves in the running statistics, within the tolerance above, moved the
    # eval gradient of seresnet50 by 3.5e-3 of its maximum where the same buffers give 1e-6.
    converted.load_state_dict(original.state_dict())
    original.eval()
    converted.eval()
    _assert_same_function(original, converted, x, rtol=1e-3, atol=1e-4)

    # A checkpoint of the eager architecture (another seed) loads into the converted model.
    other = _build(builder, seed=1).eval()
    converted.load_state_dict(other.state_dict())
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), other(x), rtol=1e-3, atol=1e-4 * float(other(x).abs().max()))

    scripted = torch.jit.script(converted)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), converted(x), rtol=1e-5, atol=1e-6 * float(converted(x).abs().max()))


# ---- each block and variant on its own ----

C = 16


def _tv_se(activation=nn.ReLU, scale_activation=nn.Sigmoid):
    return SqueezeExcitation(C, 4, activation=activation, scale_activation=scale_activation)


# (id, builder): every path of every converter.
BLOCKS = [
    ("tv_se_relu_sigmoid", lambda: _tv_se()),
    ("tv_se_silu", lambda: _tv_se(nn.SiLU)),
    ("tv_se_gelu_hardsigmoid", lambda: _tv_se(nn.GELU, nn.Hardsigmoid)),
    ("timm_se", lambda: SEModule(C, rd_ratio=0.25)),
    ("timm_se_no_bias", lambda: SEModule(C, rd_ratio=0.25, bias=False)),
    ("timm_se_batchnorm", lambda: SEModule(C, rd_ratio=0.25, norm_layer=nn.BatchNorm2d)),
    ("timm_se_maxpool", lambda: SEModule(C, rd_ratio=0.25, add_maxpool=True)),
    ("timm_se_tanh_activation", lambda: SEModule(C, rd_ratio=0.25, act_layer=nn.Tanh)),
    ("timm_se_hard_sigmoid", lambda: SEModule(C, rd_ratio=0.25, gate_layer="hard_sigmoid")),
    ("timm_se_timm_hard_sigmoid", lambda: SEModule(C, rd_ratio=0.25, gate_layer=timm_activations.HardSigmoid)),
    ("timm_se_swish", lambda: SEModule(C, rd_ratio=0.25, act_layer=timm_activations.Swish)),
    ("timm_effective_se", lambda: EffectiveSEModule(C)),
    ("timm_effective_se_maxpool", lambda: EffectiveSEModule(C, add_maxpool=True)),
    ("timm_eca", lambda: EcaModule(C)),
    ("timm_eca_mlp", lambda: EcaModule(C, use_mlp=True)),
    ("timm_ceca", lambda: CecaModule(C)),
    ("timm_squeeze_excite", lambda: SqueezeExcite(C, act_layer=nn.SiLU)),
    ("timm_squeeze_excite_hard", lambda: SqueezeExcite(C, gate_layer=nn.Hardsigmoid)),
    ("timm_gc_scale", lambda: GlobalContext(C)),
    ("timm_gc_add", lambda: GlobalContext(C, fuse_add=True, fuse_scale=False)),
    ("timm_gc_both_no_attn", lambda: GlobalContext(C, use_attn=False, fuse_add=True)),
    ("timm_cbam", lambda: CbamModule(C, rd_ratio=0.25)),
    ("timm_cbam_silu_bias", lambda: CbamModule(C, rd_ratio=0.25, act_layer=nn.SiLU, mlp_bias=True)),
    ("timm_light_cbam", lambda: LightCbamModule(C, rd_ratio=0.25)),
]

# Half-precision runs compare with the original in the same dtype: both round differently
# (the operators accumulate in float32, the eager blocks in the dtype).
BLOCK_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 2e-2)}


def _randomized(block):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return block


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,builder", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_converts_to_the_same_function(name, builder, dtype, layout, device):
    block = _randomized(builder()).to(device=device, dtype=dtype)
    holder = nn.Sequential(copy.deepcopy(block))
    cnn_attention.convert(holder)
    converted = holder[0]
    assert type(converted) not in ZOO_BLOCKS, f"{name} was not converted"
    assert type(converted).__module__ == "cnn_attention.convert"
    _assert_state_dicts_equal(block.state_dict(), converted.state_dict())
    x = in_layout(torch.randn(3, C, 9, 7, generator=torch.Generator().manual_seed(2)), layout)
    x = x.to(device=device, dtype=dtype)
    rtol, atol = BLOCK_TOLERANCE[dtype]
    if name == "timm_se_timm_hard_sigmoid" and dtype == torch.float64:
        # channel_attention's hard sigmoid has torch.nn.Hardsigmoid's gradient, whose factor
        # 1/6 ATen rounds to float32 in every dtype; timm's relu6(z + 3) / 6 divides exactly.
        rtol, atol = 1e-7, 1e-7
    for mode in (True, False):
        block.train(mode)
        converted.train(mode)
        _assert_same_function(block, converted, x, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,builder", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_converted_block_under_autocast_matches_the_original(name, builder):
    block = _randomized(builder())
    converted = cnn_attention.convert(nn.Sequential(copy.deepcopy(block)))[0]
    # As inside a network under autocast: the map arrives in autocast's dtype (a convolution's
    # output). A float32 map would give a bfloat16 result here (the operators cast their inputs
    # as a convolution does) where the eager product promotes to float32.
    x = torch.randn(2, C, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = block(x), converted(x)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=5e-2, atol=5e-2 * float(expected.abs().max()))


def test_blocks_it_cannot_reproduce_are_left_and_reported(capsys):
    model = nn.Sequential(
        SEModule(C, gate_layer=nn.Tanh),
        _tv_se(scale_activation=nn.Tanh),
        SEModule(C),
        SqueezeExcite(C, act_layer=nn.Tanh),
        CbamModule(C, gate_layer=nn.Hardsigmoid),
        nn.Conv2d(C, C, 1),
    )
    # An in-place hard sigmoid clamps, whose gradient at exactly +-3 is not Hardsigmoid's.
    model[2].gate = timm_activations.HardSigmoid(inplace=True)
    before = [type(m) for m in model]
    cnn_attention.convert(model, verbose=True)
    assert [type(m) for m in model] == before
    printed = capsys.readouterr().out
    assert "0 block(s) converted, 5 left" in printed
    assert "left 0 (SEModule): gate Tanh is not a sigmoid or an exact hard sigmoid" in printed
    assert "left 1 (SqueezeExcitation): gate Tanh" in printed
    assert "left 2 (SEModule): gate HardSigmoid" in printed
    assert "left 3 (SqueezeExcite): activation Tanh is not relu, silu, gelu or identity" in printed
    assert "left 4 (CbamModule): spatial gate Hardsigmoid is not a sigmoid" in printed


def test_verbose_names_what_each_block_became(capsys):
    model = nn.Sequential(_tv_se(nn.SiLU), SEModule(C, norm_layer=nn.BatchNorm2d), GlobalContext(C))
    assert cnn_attention.convert(model, verbose=True) is model
    printed = capsys.readouterr().out
    assert "3 block(s) converted, 0 left" in printed
    assert "converted 0 (SqueezeExcitation): channel_attention (silu, sigmoid)" in printed
    assert "converted 1 (SEModule): mean, its MLP, channel_gate (sigmoid)" in printed
    assert "converted 2 (GlobalContext): soft_attention_pool, its MLPs, channel_gate" in printed


def test_convert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="convert: model must be an nn.Module, got dict"):
        cnn_attention.convert({})


def test_converted_cbam_is_one_operator_in_eval_and_two_halves_in_training():
    torch.manual_seed(0)
    block = CbamModule(C, rd_ratio=0.25)
    block.spatial.conv.bn.running_mean.fill_(0.3)
    block.spatial.conv.bn.running_var.fill_(2.0)
    nn.init.normal_(block.spatial.conv.bn.weight)
    nn.init.normal_(block.spatial.conv.bn.bias)
    converted = cnn_attention.convert(nn.Sequential(copy.deepcopy(block)))
    assert type(converted[0]).__name__ == "ConvertedFusedCbam"
    x = torch.randn(2, C, 9, 9)
    for training, expected_op in ((False, "cbam"), (True, "soft_attention")):
        converted.train(training)
        block.train(training)
        graph = torch.export.export(converted, (x,)).graph
        targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
        assert f"cnn_attention.{expected_op}.default" in targets
        assert ("cnn_attention.cbam.default" in targets) == (not training)
        torch.testing.assert_close(converted(x), block(x), rtol=1e-4, atol=1e-5)


def test_converting_twice_changes_nothing():
    model = cnn_attention.convert(nn.Sequential(SEModule(C), CbamModule(C)))
    types = [type(m) for m in model.modules()]
    cnn_attention.convert(model)
    assert [type(m) for m in model.modules()] == types


def _every_block_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), *[builder() for _, builder in BLOCKS], nn.Conv2d(C, 4, 1))


def test_converted_blocks_compile_fullgraph_and_export():
    model = cnn_attention.convert(_every_block_model()).eval()
    assert not _zoo_blocks(model)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(actual.square().sum(), x)
    expected_grad, = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)

    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (x.detach(),), dynamic_shapes={"input": {0: batch}})
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    # timm's CbamModule (its score head's BatchNorm folded in eval mode) runs as one cbam; the light
    # one's halves run one after the other.
    assert {"cnn_attention.channel_attention.default", "cnn_attention.channel_gate.default",
            "cnn_attention.soft_attention_pool.default", "cnn_attention.soft_attention.default",
            "cnn_attention.cbam.default"} <= ops
    x6 = torch.randn(6, 3, 10, 10)
    torch.testing.assert_close(exported.module()(x6), model(x6), rtol=1e-5, atol=1e-5)


def _run_without(packages, code):
    """stdout of `code` in a fresh process where `packages` cannot be imported."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hide = "".join(f"sys.modules[{name!r}] = None; " for name in packages)
    result = subprocess.run([sys.executable, "-c", f"import sys; {hide}\n{code}"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.path.join(root, "python")))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_convert_works_without_timm():
    # torchvision's blocks still convert.
    printed = _run_without(["timm"], (
        "import torch, torchvision, cnn_attention\n"
        "model = torchvision.models.mobilenet_v3_large()\n"
        "cnn_attention.convert(model, verbose=True)\n"
        "assert not any(type(m).__name__ == 'SqueezeExcitation' for m in model.modules())\n"
    ))
    assert "8 block(s) converted, 0 left" in printed


def test_convert_works_without_either_zoo():
    # (timm itself imports torchvision.)
    printed = _run_without(["torchvision", "timm"], (
        "import torch, cnn_attention\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), cnn_attention.ChannelAttention(8))\n"
        "cnn_attention.convert(model, verbose=True)\n"
    ))
    assert "0 block(s) converted, 0 left" in printed


def test_recognised_classes_are_the_zoo_blocks():
    assert set(recognised_blocks()) == set(ZOO_BLOCKS)
