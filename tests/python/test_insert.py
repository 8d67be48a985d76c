"""cnn_attention.insert and find_stages (docs/design.md section 5): stages found from the model's
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


def attention_after(model, name):
    """The attention modules inserted after module `name` (empty when there are none)."""
    module = model.get_submodule(name)
    if isinstance(module, AttentionAfter):
        return list(module)
    if type(module) is nn.Sequential and len(module) and isinstance(module[-1], AttentionAfter):
        return list(module[-1])
    holder = getattr(module, "inserted_attention", None)
    return list(holder) if holder is not None else []


def changed_places(model):
    return sorted(
        name for name, _ in model.named_modules() if name and not isinstance(model.get_submodule(name), AttentionAfter)
        and "inserted_attention" not in name.split(".") and attention_after(model, name)
    )


def test_stages_of_a_sequential_model():
    # Layers only: each activation ends a block.
    stages = find_stages(sequential_cnn(), torch.randn(1, 3, 16, 16))
    assert [(s.blocks, s.channels, s.spatial) for s in stages] == [
        (("1",), 8, (16, 16)),
        (("3",), 16, (8, 8)),
    ]


def test_stages_of_a_model_with_named_stages_and_the_default_input():
    # The stem shares its resolution with layer1's blocks, so it is no block of the stage.
    stages = find_stages(ResNetLike())  # default input: one 64x64 sample
    assert [(s.blocks, s.channels, s.spatial) for s in stages] == [
        (("layer1.0", "layer1.1"), 8, (64, 64)),
        (("layer2.0", "layer2.1"), 16, (32, 32)),
        (("layer3.0", "layer3.1"), 32, (16, 16)),
    ]


class Looped(nn.Module):
    """Stages in a ModuleList run by a loop, a stem alone at its resolution, a head that
    upsamples (no stage: its resolution is higher than the one before)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(Block(8, 8, 2), Block(8, 8, 1)), nn.Sequential(Block(8, 16, 2))])
        self.up = nn.Upsample(scale_factor=4.0)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.up(x)


def test_stages_descend_module_lists_and_skip_an_upsampling_head():
    stages = find_stages(Looped(), torch.randn(1, 3, 32, 32))
    assert [(s.blocks, s.channels, s.spatial) for s in stages] == [
        (("stem",), 8, (16, 16)),
        (("stages.0.0", "stages.0.1"), 8, (8, 8)),
        (("stages.1.0",), 16, (4, 4)),
    ]


class Gated(nn.Module):
    """Children that are not a chain (a gate multiplies the input): one block, not descended."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.features(x) * torch.sigmoid(self.gate(x))


def test_a_module_whose_children_are_no_chain_is_a_block():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), Gated(), Gated(), nn.MaxPool2d(2), Gated())
    stages = find_stages(model, torch.randn(1, 3, 8, 8))
    assert [(s.blocks, s.spatial) for s in stages] == [(("2", "3"), (8, 8)), (("5",), (4, 4))]


@pytest.mark.parametrize("family", sorted(FAMILY_MODULES))
@pytest.mark.parametrize("where,expected", [("shallow", ["1"]), ("deep", ["3"]), ("all", ["1", "3"])])
def test_insert_into_a_sequential_model(family, where, expected):
    model = sequential_cnn()
    x = torch.randn(2, 3, 16, 16)
    assert insert(model, family, where, x) is model
    assert changed_places(model) == expected
    for name in expected:
        (module,) = attention_after(model, name)
        assert isinstance(module, FAMILY_MODULES[family])
        if hasattr(module, "channels"):
            assert module.channels == {"1": 8, "3": 16}[name]
    assert model(x).shape == (2, 10)


def test_insert_into_named_stages():
    model = ResNetLike()
    insert(model, "self", "deep", torch.randn(1, 3, 32, 32))
    (module,) = attention_after(model, "layer3.1")
    assert isinstance(module, cnn_attention.SelfAttention) and module.channels == 32
    insert(model, "channel", "shallow", torch.randn(1, 3, 32, 32))
    (module,) = attention_after(model, "layer1.1")
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
    assert changed_places(model) == ["layer1.1.conv", "layer2.0"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_attention_runs_on_the_module_output():
    torch.manual_seed(0)
    model = ResNetLike().eval()
    x = torch.randn(2, 3, 32, 32)
    insert(model, "channel", ["layer2.1"], x[:1])
    (module,) = attention_after(model, "layer2.1")
    seen = {}
    model.layer2.register_forward_hook(lambda _m, _i, out: seen.setdefault("layer2", out))
    with torch.no_grad():
        y = model(x)
        block_output = model.layer2[1].forward(model.layer2[0](model.layer1(model.stem(x))))  # no hooks
        expected = module(block_output)
    assert not torch.equal(expected, block_output)
    torch.testing.assert_close(seen["layer2"], expected, rtol=0, atol=0)
    torch.testing.assert_close(y, model.fc(model.pool(model.layer3(expected)).flatten(1)), rtol=0, atol=0)


def test_the_state_dict_gains_only_the_new_modules_keys():
    model = ResNetLike()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    insert(model, "cbam", "all", x)
    insert(model, "channel", ["stem"], x)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    added = sorted(set(after) - set(before))
    assert added and all(".inserted_attention." in k or k.startswith("stem.2.") for k in added), added
    # A model without attention loads the state dict of the changed one, and vice versa.
    ResNetLike().load_state_dict({k: after[k] for k in before})
    model.load_state_dict(after)


def test_insert_again_appends_after_the_same_block():
    model = sequential_cnn()
    x = torch.randn(1, 3, 16, 16)
    insert(model, "channel", "deep", x)
    insert(model, "soft", "deep", x)
    modules = attention_after(model, "3")
    assert [type(m) for m in modules] == [cnn_attention.ChannelAttention, cnn_attention.SoftAttention]
    insert(model, "cbam", "all", x)
    assert [type(m) for m in attention_after(model, "1")] == [cnn_attention.CBAM]
    assert len(attention_after(model, "3")) == 3
    assert model(x).shape == (1, 10)


def test_inserted_modules_take_the_block_dtype():
    model = sequential_cnn().double()
    insert(model, "cbam", "all", torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_per_block_puts_a_module_after_every_block_of_the_chosen_stages():
    model = ResNetLike()
    x = torch.randn(1, 3, 32, 32)
    insert(model, "channel", "deep", x, per_block=True)
    assert changed_places(model) == ["layer3.0", "layer3.1"]
    insert(model, "soft", "all", x, per_block=True)
    assert changed_places(model) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert [type(m) for m in attention_after(model, "layer3.1")] == [cnn_attention.ChannelAttention, cnn_attention.SoftAttention]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class SlotBlock(nn.Module):
    """A residual block with an empty attention slot, as timm's blocks have one."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 1)
        self.attn = nn.Identity()
        self.conv2 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(self.attn(torch.relu(self.conv1(x))))


def test_per_block_fills_an_empty_attention_slot():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SlotBlock(4), SlotBlock(4))
    x = torch.randn(1, 3, 8, 8)
    insert(model, "channel", "all", x, per_block=True)
    for block in (model[1], model[2]):
        assert isinstance(block.attn, AttentionAfter) and block.attn[0].channels == 8
    insert(model, "soft", "all", x, per_block=True)  # the slot is filled: appended to it
    assert [type(m) for m in model[1].attn] == [cnn_attention.ChannelAttention, cnn_attention.SoftAttention]
    assert model(x).shape == (1, 4, 8, 8)


def test_verbose_prints_where_each_module_went(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SlotBlock(4), nn.MaxPool2d(2), SlotBlock(4))
    insert(model, "channel", "all", torch.randn(1, 3, 8, 8), per_block=True, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "block", "position", "at", "channels", "spatial"]
    assert [line.split() for line in lines[1:]] == [["8x8", "1", "slot", "1.attn", "8", "8x8"], ["4x4", "3", "slot", "3.attn", "8", "4x4"]]


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
    for op in ("cbam", "channel_attention", "hard_attention", "self_attention"):
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
    ("module run twice", dict(where=["shared"]), ValueError, "module 'shared' runs 2 times in one forward"),
    ("failing factory", dict(attention=lambda c: 1 / 0, where="all"), ZeroDivisionError, "division by zero"),
    ("holder name taken", dict(where=["layer1.0.conv"], per_block=False), ValueError, "already has an attribute 'inserted_attention'"),
]


@pytest.mark.parametrize("case,kwargs,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_the_model_unchanged(case, kwargs, error, message):
    model = ResNetLike()
    model.shared = nn.Identity()  # run twice by the forward below
    model.forward = lambda x: model.fc(model.pool(model.shared(model.shared(model.layer3(model.layer2(model.layer1(model.stem(x))))))).flatten(1))
    model.layer1[0].conv.inserted_attention = 3  # taken by something else
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


class Looping(nn.ModuleDict):
    """A container whose own forward loops over its children (as DenseNet's dense block)."""

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Dense(nn.Module):
    def __init__(self, consumed_by_a_module: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Looping({"a": nn.Conv2d(4, 2, 3, padding=1), "b": nn.Conv2d(6, 2, 3, padding=1)})
        self.norm = nn.BatchNorm2d(8) if consumed_by_a_module else None

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.norm(x) if self.norm is not None else x * 2


def test_after_a_container_that_loops_over_its_children_the_consumer_applies_it():
    model = Dense(consumed_by_a_module=True).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        block_output = model.block(model.stem(x))
    insert(model, "channel", ["block"], x)
    assert list(model.block.keys()) == ["a", "b"]  # the loop is left alone
    (module,) = model.norm.inserted_attention_before
    assert isinstance(module, cnn_attention.ChannelAttention) and module.channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.norm.forward(module(block_output)), rtol=0, atol=0)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_after_a_looping_container_whose_output_no_module_takes_is_refused():
    model = Dense(consumed_by_a_module=False)
    before_repr, before_state = _state(model)
    with pytest.raises(ValueError, match="module 'block' iterates its children and no module takes its output"):
        insert(model, "channel", ["block"], torch.randn(1, 3, 8, 8))
    assert _state(model)[0] == before_repr and _state(model)[1].keys() == before_state.keys()
