"""cnn_attention.insert and find_stages on the torchvision and timm classification CNNs (random
weights, no download): one stage per resolution of the feature pyramid from high to low,
agreeing with timm's feature_info; "shallow" above "deep"; "all" at every stage; per_block in
every block at the place the block's design gives (an empty slot, after the residual branch's
last normalization, after the block); the changed models script, train, compile and export."""

import contextlib
import io
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

import cnn_attention
from cnn_attention import AttentionAfter, find_stages, insert

TORCHVISION = [
    "resnet50", "resnext50_32x4d", "regnet_y_400mf", "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0", "shufflenet_v2_x1_0", "densenet121", "vgg11",
    "convnext_tiny",
]
TIMM = [
    "resnet50d", "seresnext26d_32x4d", "regnety_004", "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_100",
    "mobilenetv3_small_100", "mnasnet_100", "densenet121", "vgg11", "convnext_atto", "gcresnet33ts",
]
MODELS = [("torchvision", name) for name in TORCHVISION] + [("timm", name) for name in TIMM]


def make(zoo, name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)() if zoo == "torchvision" else timm.create_model(name)
    return model.eval()


def spatial_seen(model, x, kinds):
    """The spatial sizes the modules of each kind in `kinds` see in one forward, in order, and
    the model's output."""
    seen = {kind: [] for kind in kinds}
    handles = [
        module.register_forward_pre_hook(lambda _m, inputs, kind=kind: seen[kind].append(tuple(inputs[0].shape[2:])))
        for module in model.modules() for kind in kinds if isinstance(module, kind)
    ]
    with torch.no_grad():
        y = model(x)
    for handle in handles:
        handle.remove()
    return seen, y


def positions(spatial):
    count = 1
    for size in spatial:
        count *= size
    return count


@pytest.mark.parametrize("zoo,name", MODELS, ids=[f"{z}-{n}" for z, n in MODELS])
def test_stages_shallow_deep_and_all_in_a_zoo_model(zoo, name):
    model = make(zoo, name)
    x = torch.randn(1, 3, 128, 128)
    stages = find_stages(model, x)
    assert len(stages) >= 4, stages
    assert all(positions(a.spatial) > positions(b.spatial) for a, b in zip(stages, stages[1:])), stages
    modules = dict(model.named_modules())
    for stage in stages:
        # The model's own blocks (two or more convolutions or linear layers), or, where only
        # layers reach a resolution (a stem alone at it, VGG), layers: never a mix.
        weighted = [sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in modules[b].modules()) for b in stage.blocks]
        assert all(w >= 2 for w in weighted) or all(w <= 1 for w in weighted), (stage, weighted)
    insert(model, "channel", "all", x)
    insert(model, "soft", "shallow", x)
    insert(model, "hard", "deep", x)
    kinds = (cnn_attention.ChannelAttention, cnn_attention.SoftAttention, cnn_attention.HardAttention)
    seen, y = spatial_seen(model, x, kinds)
    assert seen[cnn_attention.ChannelAttention] == [s.spatial for s in stages]
    assert seen[cnn_attention.SoftAttention] == [stages[0].spatial]
    assert seen[cnn_attention.HardAttention] == [stages[-1].spatial]
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), y)


@pytest.mark.parametrize("name", TIMM)
def test_stages_agree_with_timm_feature_info(name):
    model = make("timm", name)
    x = torch.randn(1, 3, 128, 128)
    stages = find_stages(model, x)
    info = model.feature_info
    assert [s.spatial for s in stages] == [(128 // f["reduction"],) * 2 for f in info]
    for stage, feature in zip(stages, info):
        last = stage.blocks[-1]
        if last == feature["module"] or last.startswith(feature["module"] + "."):
            assert stage.channels == feature["num_chs"]
        else:
            # timm ends a few pyramids with the head's layer at the same resolution (DenseNet's
            # norm5, ByobNet's final_conv, MobileNetV3's 1x1 convolution); a stage's blocks
            # stop before it.
            head = dict(model.named_modules())[feature["module"]]
            assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in head.modules()) <= 1, (last, feature)


def placements(model, *args, **kwargs):
    """insert(..., verbose=True)'s table as rows of (block, position, at, channels)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        insert(model, *args, verbose=True, **kwargs)
    rows = [line.split() for line in out.getvalue().splitlines()[1:]]
    return [(row[1], row[2] + (" " + row[3] if row[2] == "after" else ""), row[-3], int(row[-2])) for row in rows]


PER_BLOCK = [
    # zoo, model, where, blocks, position, the place in each block
    ("torchvision", "resnet50", "all", 1 + 3 + 4 + 6 + 3, "after norm", r"layer\d\.\d+\.bn3|relu"),
    ("torchvision", "efficientnet_b0", "all", 16, "after norm", r"features\.\d\.\d\.block\.[23]\.1"),
    ("torchvision", "convnext_tiny", "all", 18, "after block", r"features\.\d\.\d+"),
    ("timm", "resnet50d", "deep", 3, "after norm", r"layer4\.\d\.bn3"),
    ("timm", "efficientnet_b0", "all", 16, "after norm", r"blocks\.\d\.\d\.bn[23]"),
    ("timm", "mobilenetv3_small_100", "deep", 3, "after norm", r"blocks\.4\.\d\.bn3"),
    ("timm", "resnext26ts", "deep", 2, "slot", r"stages\.3\.\d\.attn"),
]


@pytest.mark.parametrize("zoo,name,where,count,position,place", PER_BLOCK, ids=[f"{p[0]}-{p[1]}" for p in PER_BLOCK])
def test_per_block_positions_in_zoo_blocks(zoo, name, where, count, position, place):
    model = make(zoo, name)
    x = torch.randn(1, 3, 64, 64)
    rows = placements(model, "channel", where, x, per_block=True)
    assert len(rows) == count
    for block, kind, at, channels in rows:
        if block == "relu":  # a stem alone at its resolution: after it
            assert kind == "after block"
            continue
        assert kind == position, (block, kind, at)
        assert re.fullmatch(place, at), at
        assert at == block or at.startswith(block + ".")
        module = model.get_submodule(at)
        attention = module[0] if isinstance(module, AttentionAfter) else (
            module[-1][0] if type(module) is nn.Sequential else module.inserted_attention[0]
        )
        assert attention.channels == channels


def test_per_block_in_a_residual_block_goes_before_the_addition():
    """In a ResNet bottleneck the attention sees bn3's output, and the block adds the shortcut to
    what it returns: identical to the block written out by hand."""
    model = make("torchvision", "resnet50")
    x = torch.randn(2, 3, 64, 64)
    insert(model, "cbam", "deep", x[:1], per_block=True)
    block = model.layer4[1]
    attention = block.bn3.inserted_attention
    with torch.no_grad():
        h = model.layer4[0](model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        out = block.relu(block.bn1.forward(block.conv1(h)))
        out = block.relu(block.bn2.forward(block.conv2(out)))
        expected = block.relu(attention(nn.BatchNorm2d.forward(block.bn3, block.conv3(out))) + h)
        torch.testing.assert_close(block(h), expected, rtol=0, atol=0)


@pytest.mark.parametrize("zoo,name", [("torchvision", "resnet50"), ("torchvision", "efficientnet_b0"), ("timm", "efficientnet_b0")])
def test_one_training_step_with_cbam_in_every_block(zoo, name):
    model = make(zoo, name).train()
    x = torch.randn(2, 3, 64, 64)
    insert(model, "cbam", "all", x[:1], per_block=True)
    attention = [p for n, p in model.named_parameters() if "inserted_attention" in n]
    before = [p.detach().clone() for p in attention]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attention)
    optimizer.step()
    assert sum(not torch.equal(p, b) for p, b in zip(attention, before)) > len(attention) // 2


def _resnet18_with_attention():
    model = make("torchvision", "resnet18")
    x = torch.randn(2, 3, 64, 64)
    insert(model, "cbam", "all", x[:1], per_block=True)
    insert(model, "self", "deep", x[:1])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, cnn_attention.SelfAttention):
                module.gamma.fill_(0.5)
    return model, x


@pytest.mark.slow
def test_a_zoo_model_with_attention_compiles_fullgraph():
    model, x = _resnet18_with_attention()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_zoo_model_with_attention_exports():
    model, x = _resnet18_with_attention()
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in ("cbam", "self_attention"):
        assert f"cnn_attention.{op}.default" in targets, op
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
