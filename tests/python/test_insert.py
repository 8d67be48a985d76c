"""cnn_attention.insert and find_stages (DESIGN.md section 3): stages found from the model's
own feature maps, insertion at the shallow stage, the deep stage, every stage or after named
modules, on plain nn.Sequential models and on models with named stages, called again on a
changed model; the result under TorchScript, torch.compile and torch.export; bad input."""

import pytest
import torch
from torch import nn

import cnn_attention
from cnn_attention import AttentionAfter, find_stages, insert

FAMILY_MODULES = {
    "channel": cnn_attention.ChannelAttention,
    "soft": cnn_attention.SoftAttention,
    "hard": cnn_attention.HardAttention,
    "self": cnn_attention.SelfAttention,
    "cbam": cnn_attention.CBAM,
}


def sequential_cnn():
    """Stages: 16x16 with 8 channels (blocks 0, 1), 8x8 with 16 (2, 3); then a global pool (a
    map of one position: no stage) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ResNetLike(nn.Module):
    """A stem, named stages layer1..layer3 of two blocks (32, 16, 8 positions per side for a
    32x32 input), a global pool and a head, as torchvision's ResNet lays them out."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.layer3 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def attention_of(module):
    assert isinstance(module, AttentionAfter), type(module)
    return list(module)[1:]


def test_stages_of_a_sequential_model():
    stages = find_stages(sequential_cnn(), torch.randn(1, 3, 16, 16))
    assert [(s.blocks, s.channels, s.spatial) for s in stages] == [
        (("0", "1"), 8, (16, 16)),
        (("2", "3"), 16, (8, 8)),
    ]


def test_stages_of_a_model_with_named_stages_and_the_default_input():
    stages = find_stages(ResNetLike())  # default input: one 64x64 sample
    assert [(s.blocks, s.channels, s.spatial) for s in stages] == [
        (("stem", "layer1"), 8, (64, 64)),
        (("layer2",), 16, (32, 32)),
        (("layer3",), 32, (16, 16)),
    ]


@pytest.mark.parametrize("family", sorted(FAMILY_MODULES))
@pytest.mark.parametrize("where,expected", [("shallow", ["1"]), ("deep", ["3"]), ("all", ["1", "3"])])
def test_insert_into_a_sequential_model(family, where, expected):
    model = sequential_cnn()
    x = torch.randn(2, 3, 16, 16)
    assert insert(model, family, where, x) is model
    changed = [name for name, child in model.named_children() if isinstance(child, AttentionAfter)]
    assert changed == expected
    for name in changed:
        (module,) = attention_of(model.get_submodule(name))
        assert isinstance(module, FAMILY_MODULES[family])
        if hasattr(module, "channels"):
            assert module.channels == {"1": 8, "3": 16}[name]
    assert model(x).shape == (2, 10)


def test_insert_into_named_stages():
    model = ResNetLike()
    insert(model, "self", "deep", torch.randn(1, 3, 32, 32))
    (module,) = attention_of(model.layer3)
    assert isinstance(module, cnn_attention.SelfAttention) and module.channels == 32
    insert(model, "channel", "shallow", torch.randn(1, 3, 32, 32))
    (module,) = attention_of(model.layer1)
    assert isinstance(module, cnn_attention.ChannelAttention) and module.channels == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_insert_after_named_modules_with_their_channels():
    model = ResNetLike()
    made = []

    def factory(channels):
        made.append(channels)
        return cnn_attention.ChannelAttention(channels, reduction=2)

    insert(model, factory, ["layer2.0", "layer1.1.conv"], torch.randn(1, 3, 32, 32))
    assert made == [16, 8]
    assert isinstance(model.layer2[0], AttentionAfter) and isinstance(model.layer1[1].conv, AttentionAfter)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_insert_again_appends_after_the_same_block():
    model = sequential_cnn()
    x = torch.randn(1, 3, 16, 16)
    insert(model, "channel", "deep", x)
    insert(model, "soft", "deep", x)
    modules = attention_of(model[3])
    assert [type(m) for m in modules] == [cnn_attention.ChannelAttention, cnn_attention.SoftAttention]
    insert(model, "cbam", "all", x)
    assert [type(m) for m in attention_of(model[1])] == [cnn_attention.CBAM]
    assert len(attention_of(model[3])) == 3
    assert model(x).shape == (1, 10)


def test_inserted_modules_take_the_block_dtype():
    model = sequential_cnn().double()
    insert(model, "cbam", "all", torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in model.parameters())


def _changed_model():
    torch.manual_seed(0)
    model = ResNetLike()
    x = torch.randn(1, 3, 32, 32)
    insert(model, "cbam", "shallow", x)
    insert(model, "hard", ["layer2"], x)
    insert(model, "self", "deep", x)
    insert(model, "channel", "deep", x)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, cnn_attention.SelfAttention):
                module.gamma.fill_(0.5)
    return model.eval(), torch.randn(2, 3, 32, 32)


def test_the_result_scripts():
    model, x = _changed_model()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.slow
def test_the_result_compiles_fullgraph():
    model, x = _changed_model()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_result_exports():
    model, x = _changed_model()
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in ("channel_attention", "soft_attention", "hard_attention", "self_attention"):
        assert f"cnn_attention.{op}.default" in targets, op
    torch.testing.assert_close(exported.module()(x), model(x))


def _state(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


BAD = [
    ("unknown family", dict(attention="sparse"), ValueError, "attention must be one of 'channel', 'soft', 'hard', 'self', 'cbam'"),
    ("not callable", dict(attention=3), TypeError, "attention must be a family name or a callable"),
    ("returns no module", dict(attention=lambda c: c * 2), TypeError, r"attention\(32\) returned int, not an nn.Module"),
    ("unknown where", dict(where="middle"), ValueError, "where must be one of 'shallow', 'deep', 'all'"),
    ("where of wrong type", dict(where=3), TypeError, "where must be 'shallow', 'deep', 'all' or a list"),
    ("missing module", dict(where=["layer9"]), ValueError, "the model has no module named 'layer9'"),
    ("no feature map", dict(where=["fc"]), ValueError, "module 'fc' does not produce a feature map"),
    ("pooled map", dict(where=["pool"]), ValueError, "module 'pool' does not produce a feature map"),
    ("failing input", dict(example_input=torch.randn(1, 5, 32, 32)), ValueError, "the model failed on example_input: RuntimeError"),
]


@pytest.mark.parametrize("case,kwargs,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_the_model_unchanged(case, kwargs, error, message):
    model = ResNetLike()
    before_repr, before_state = _state(model)
    arguments = dict(attention="channel", where="deep", example_input=torch.randn(1, 3, 32, 32))
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        insert(model, **arguments)
    after_repr, after_state = _state(model)
    assert after_repr == before_repr
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


def test_a_model_without_feature_maps_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="has no convolution to infer an input from"):
        insert(model, "channel")
    with pytest.raises(ValueError, match="produces no feature map with more than one position"):
        insert(model, "channel", "deep", torch.randn(2, 4))
