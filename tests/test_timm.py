"""fuse() on timm's Inception networks (timm 1.0: ConvNormAct units whose norm is BatchNormAct2d).

Whole networks at timm's real widths: what fuse() swaps, launches per block, state_dict keys and
parameter objects kept, a timm checkpoint loaded after fuse(). Numerics per block type on timm's
own block classes at 1/8 width (a conv_block that divides every channel count, as timm's
networks pass theirs): eval outputs and launches, and a train step against the unfused block in
float64. The whole timm/inception_v3 network's logits are checked by the report test
(tests/test_report.py).
"""

import copy
from functools import partial
import importlib
import sys

import pytest
import torch
from torch import nn
import torchvision

from conftest import TOL, assert_close_rel, randomize_, split_launches
from fused_inception import FusedGraphBlock, count_launches, fuse
from fused_inception.activations import RELU, activation_of_module
from test_training import check_training_parity

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, ConvNormAct  # noqa: E402
# (timm.models.inception_v3 is the model function: the modules by their full names)
v3, v4, irv2 = (importlib.import_module(f"timm.models.{m}") for m in ("inception_v3", "inception_v4",
                                                                       "inception_resnet_v2"))

WIDTH = 8


def c(n):
    return max(n // WIDTH, 1)


def narrow_conv_block(cin, cout, **kwargs):
    """timm's networks' conv_block (ConvNormAct, padding 0, BN eps 1e-3, in-place ReLU) at 1/8 width."""
    kwargs.setdefault("padding", 0)
    return ConvNormAct(c(cin), c(cout), norm_kwargs=dict(eps=1e-3), act_kwargs=dict(inplace=True), **kwargs)


def residual(cls, cin, cout, **kwargs):
    """A timm Inception-ResNet block at 1/8 width: its up-projection (an nn.Conv2d made directly,
    not by conv_block) replaced by a narrow one."""
    block = cls(conv_block=narrow_conv_block, **kwargs)
    block.conv2d = nn.Conv2d(c(cin), c(cout), 1)
    return block


# (name, builder, input channels, input size (h, w), launches = longest chain (+1 residual head))
BLOCKS = [
    ("v3.InceptionA", lambda: v3.InceptionA(192, 32, conv_block=narrow_conv_block), 192, (5, 4), 3),
    ("v3.InceptionB", lambda: v3.InceptionB(288, conv_block=narrow_conv_block), 288, (7, 8), 3),
    ("v3.InceptionC", lambda: v3.InceptionC(768, 128, conv_block=narrow_conv_block), 768, (4, 5), 5),
    ("v3.InceptionD", lambda: v3.InceptionD(768, conv_block=narrow_conv_block), 768, (7, 7), 4),
    ("v3.InceptionE", lambda: v3.InceptionE(1280, conv_block=narrow_conv_block), 1280, (3, 2), 3),
    ("v4.Mixed3a", lambda: v4.Mixed3a(narrow_conv_block), 64, (7, 8), 1),
    ("v4.Mixed4a", lambda: v4.Mixed4a(narrow_conv_block), 160, (5, 5), 4),
    ("v4.Mixed5a", lambda: v4.Mixed5a(narrow_conv_block), 192, (7, 7), 1),
    ("v4.InceptionA", lambda: v4.InceptionA(narrow_conv_block), 384, (4, 5), 3),
    ("v4.ReductionA", lambda: v4.ReductionA(narrow_conv_block), 384, (7, 7), 3),
    ("v4.InceptionB", lambda: v4.InceptionB(narrow_conv_block), 1024, (4, 3), 5),
    ("v4.ReductionB", lambda: v4.ReductionB(narrow_conv_block), 1024, (7, 7), 4),
    ("v4.InceptionC", lambda: v4.InceptionC(narrow_conv_block), 1536, (2, 3), 4),
    ("irv2.Mixed_5b", lambda: irv2.Mixed_5b(narrow_conv_block), 192, (4, 5), 3),
    ("irv2.Block35", lambda: residual(irv2.Block35, 128, 320, scale=0.17), 320, (5, 4), 3 + 1),
    ("irv2.Mixed_6a", lambda: irv2.Mixed_6a(narrow_conv_block), 320, (7, 7), 3),
    ("irv2.Block17", lambda: residual(irv2.Block17, 384, 1088, scale=0.10), 1088, (3, 4), 3 + 1),
    ("irv2.Mixed_7a", lambda: irv2.Mixed_7a(narrow_conv_block), 1088, (7, 7), 3),
    ("irv2.Block8", lambda: residual(irv2.Block8, 448, 2080, scale=0.20), 2080, (3, 2), 3 + 1),
    ("irv2.Block8-no_relu", lambda: residual(irv2.Block8, 448, 2080, no_relu=True), 2080, (2, 3), 3 + 1),
]


@pytest.mark.parametrize("name,build,cin,hw,launches", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_timm_block_eval(name, build, cin, hw, launches, device, interpreter_launches):
    """Each timm block type is swapped whole (its ConvNormAct/BatchNormAct2d units recognised) and
    runs in as many launches as its longest chain, matching the unfused block in float64."""
    block = randomize_(build(), 3).eval().to(device)
    assert any(isinstance(m, BatchNormAct2d) for m in block.modules())
    reference = copy.deepcopy(block).double()
    model, report = fuse(nn.Sequential(block))
    assert isinstance(model[0], FusedGraphBlock) and report.left_alone == [], str(report)
    assert report.swapped[0][3] == launches and report.units == set()
    x = torch.randn(2, c(cin), *hw, device=device)
    with torch.no_grad():
        model[0].plan()
        interpreter_launches.clear()
        with count_launches() as n:
            y = model(x)
        expected = reference(x.double())
    assert n.value == launches + split_launches(model) == len(interpreter_launches)
    assert_close_rel(y, expected, TOL[torch.float32], name)


@pytest.mark.parametrize("name,build,cin,hw,launches", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_timm_block_train_step(name, build, cin, hw, launches, device):
    """A train step of each fused timm block type (batch statistics in the kernels, the fused
    backward, BatchNormAct2d's running statistics updated) equals the unfused block in float64:
    outputs, input and parameter gradients, running statistics."""
    reference = nn.Sequential(randomize_(build(), 4)).to(device)
    fused, _ = fuse(copy.deepcopy(reference))
    assert isinstance(fused[0], FusedGraphBlock)
    x = torch.randn(2, c(cin), *hw, device=device)
    assert fused.train()[0].uses_kernels(x)  # the training kernels, not the eager fallback
    with count_launches() as n:
        check_training_parity(reference, fused, x, steps=1)
    assert n.value > 2 * launches  # the forward's and the backward's launches


# Per timm network at its real width: fused launches per block class (the longest chain, +1 for
# a residual block's head), the stem's conv units, and a cheap block checked after loading a checkpoint.
NETWORKS = {
    "inception_v3": ({"InceptionA": 3, "InceptionB": 3, "InceptionC": 5, "InceptionD": 4, "InceptionE": 3},
                     ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
                     ("Mixed_5b", 192, 3)),
    "inception_v4": ({"Mixed3a": 1, "Mixed4a": 4, "Mixed5a": 1, "InceptionA": 3, "ReductionA": 3, "InceptionB": 5,
                      "ReductionB": 4, "InceptionC": 4},
                     ["features.0", "features.1", "features.2"], ("features.3", 64, 5)),
    "inception_resnet_v2": ({"Mixed_5b": 3, "Block35": 4, "Mixed_6a": 3, "Block17": 4, "Mixed_7a": 3, "Block8": 4},
                            ["conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_7b"],
                            ("mixed_5b", 192, 3)),
}
BLOCK_COUNTS = {"inception_v3": 11, "inception_v4": 19, "inception_resnet_v2": 43}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_timm_network_fused_keeps_keys_and_loads_checkpoints(name, device):
    """Every block and stem conv unit of the timm network is swapped, nothing is left alone; the
    state_dict keys and parameter objects are the timm model's, so a timm checkpoint loads after
    fuse() (strict) and the fused blocks compute with it, plans built before the load included.
    (Built on the meta device: timm's weight init of 24-56M parameters would take most of the test.)"""
    launches, units, (probe, probe_cin, probe_hw) = NETWORKS[name]
    model = timm.create_model(name, pretrained=False, device="meta")
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    model, report = fuse(model.eval())
    assert report.left_alone == [] and report.units == set(units), str(report)
    blocks = [(cls, after) for block, cls, _, after in report.swapped if block not in report.units]
    assert len(blocks) == BLOCK_COUNTS[name], str(report)
    assert {cls: after for cls, after in blocks} == launches, str(report)
    assert all(after == 1 for block, _, _, after in report.swapped if block in report.units)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params

    # A checkpoint with timm's keys: every tensor set, the probed block's informative.
    model.to_empty(device=device)
    checkpoint = {k: torch.rand(v.shape, device=device) + 0.5 if v.is_floating_point() else v + 1
                  for k, v in model.state_dict().items()}
    original = copy.deepcopy(model.get_submodule(probe)._original)
    informative = randomize_(original, 1).state_dict()
    checkpoint.update({f"{probe}.{k}": v for k, v in informative.items()})
    block = model.get_submodule(probe)
    x = torch.randn(1, probe_cin, probe_hw, probe_hw, device=device)
    with torch.no_grad():
        for t in block.state_dict().values():
            t.zero_()  # (to_empty leaves memory as it was)
        block(x)  # a plan built from the weights before the load
        model.load_state_dict(checkpoint)
        assert all(torch.equal(v, checkpoint[k]) for k, v in model.state_dict().items())
        y = block(x)
        expected = original.double()(x.double())
    assert_close_rel(y, expected, TOL[torch.float32], f"{name}.{probe} after load_state_dict")


# BatchNorms that are not plain: frozen ones, a dropout between BN and ReLU, other activations.


def small_block(conv_block=narrow_conv_block):
    """timm's Inception-v4 A block (4 branches, an avg pool, chains of 1-3 convs) at 1/8 width: 48 channels in."""
    return randomize_(v4.InceptionA(conv_block), 6)


def fuse_one(block):
    model, report = fuse(nn.Sequential(block))
    return model, report


def check_eval(model, reference, x, launches, interpreter_launches, what):
    with torch.no_grad():
        model[0].plan()
        interpreter_launches.clear()
        with count_launches() as n:
            y = model(x)
        expected = copy.deepcopy(reference).double()(x.double())
    assert n.value == launches == len(interpreter_launches), what
    assert_close_rel(y, expected, TOL[torch.float32], what)
    return y


def test_frozen_batchnorm_is_folded_in_eval_and_runs_eager_in_training(device, interpreter_launches):
    """timm.layers.freeze_batch_norm_2d turns the BatchNormAct2d layers into FrozenBatchNormAct2d
    (buffers only, running statistics always): folded like an eval BatchNorm in eval; in
    training the block runs eager (the training kernels normalise with batch statistics), and
    computes what it computes in eval."""
    frozen = timm.layers.freeze_batch_norm_2d(small_block()).to(device)
    assert any(type(m).__name__ == "FrozenBatchNormAct2d" for m in frozen.modules())
    model, report = fuse_one(copy.deepcopy(frozen).eval())
    assert isinstance(model[0], FusedGraphBlock) and report.swapped[0][3] == 3, str(report)
    x = torch.randn(2, c(384), 4, 5, device=device)
    y_eval = check_eval(model, frozen, x, 3, interpreter_launches, "frozen, eval")
    model.train()
    xg = x.clone().requires_grad_()
    assert not model[0].uses_kernels(xg)
    with count_launches() as n:
        y = model(xg)
    y.sum().backward()
    assert n.value == 0
    assert_close_rel(y, y_eval, TOL[torch.float32], "frozen, train = eval")
    xr = x.clone().requires_grad_()
    frozen.train()(xr).sum().backward()
    assert_close_rel(xg.grad, xr.grad, TOL[torch.float32], "frozen, train: input grad")


class TorchvisionFrozen(nn.Module):
    """A user's block with torchvision.ops.FrozenBatchNorm2d (eps 1e-3) between conv and ReLU."""

    def __init__(self, cin=10):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, 6, 1), torchvision.ops.FrozenBatchNorm2d(6, eps=1e-3), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cin, 4, 1, bias=False), torchvision.ops.FrozenBatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 5, 3, padding=1, bias=False), torchvision.ops.FrozenBatchNorm2d(5))
        g = torch.Generator().manual_seed(8)
        for m in self.modules():
            if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_torchvision_frozen_batchnorm(device, interpreter_launches):
    block = TorchvisionFrozen().eval().to(device)
    model, report = fuse_one(copy.deepcopy(block))
    assert isinstance(model[0], FusedGraphBlock), str(report)
    x = torch.randn(2, 10, 5, 6, device=device)
    check_eval(model, block, x, 2, interpreter_launches, "torchvision frozen")
    for m in (model[0].a[1], block.a[1]):
        m.eps = 0.5  # a plain attribute of a frozen BatchNorm: seen, the plan is rebuilt
    check_eval(model, block, x, 2, interpreter_launches, "torchvision frozen, eps changed")


def test_dropout_between_bn_and_relu_is_identity_in_eval_eager_in_training(device, interpreter_launches):
    """ConvNormAct(drop_layer=nn.Dropout): fused in eval (dropout is the identity there); in
    training the dropout is active, so the block runs eager: the same random mask as unfused."""
    block = small_block(partial(narrow_conv_block, drop_layer=nn.Dropout)).to(device)
    assert any(isinstance(m, nn.Dropout) for m in block.modules())
    model, report = fuse_one(copy.deepcopy(block).eval())
    assert isinstance(model[0], FusedGraphBlock), str(report)
    x = torch.randn(2, c(384), 4, 5, device=device)
    check_eval(model, block.eval(), x, 3, interpreter_launches, "dropout, eval")
    model.train()
    block.train()
    torch.manual_seed(3)
    with count_launches() as n:
        y = model(x)
    torch.manual_seed(3)
    assert n.value == 0 and torch.equal(y, block(x))
    assert (y == 0).float().mean() > 0.3  # the dropout did drop


@pytest.mark.parametrize("conv_block,reason", [
    (partial(narrow_conv_block, act_layer=nn.ELU), "activation is ELU, not one the kernels compute"),
    (partial(narrow_conv_block, act_layer="mish"), "activation is Mish, not one the kernels compute"),
    (partial(narrow_conv_block, drop_layer=partial(timm.layers.DropBlock2d, drop_prob=0.1)),
     "drop layer is DropBlock2d, not nn.Identity or a dropout"),
], ids=["elu", "mish", "dropblock"])
def test_blocks_left_alone_with_the_reason(conv_block, reason):
    block = small_block(conv_block).eval()
    x = torch.randn(1, c(384), 4, 4)
    with torch.no_grad():
        before = block(x)
    model, report = fuse_one(block)
    assert model[0] is block and report.swapped == [], str(report)
    assert len(report.left_alone) == 1 and reason in report.left_alone[0][2], str(report)
    with torch.no_grad():
        assert torch.equal(model(x), before)


class ActStyles(nn.Module):
    """ConvNormAct units with ReLU given as a layer name, a class, a factory with arguments, and
    with the activation off (apply_act=False)."""

    def __init__(self, cin=12):
        super().__init__()
        unit = partial(ConvNormAct, norm_kwargs=dict(eps=1e-3))
        self.a = unit(cin, 5, 1, act_layer="relu")
        self.b = nn.Sequential(unit(cin, 4, 1, act_layer=nn.ReLU), unit(4, 6, 3, padding=1, apply_act=False))
        self.c = unit(cin, 3, 1, act_layer=partial(nn.ReLU, inplace=True), bias=True)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], 1)


def test_activation_styles_and_apply_act_off(device, interpreter_launches):
    block = randomize_(ActStyles(), 2).eval().to(device)
    model, report = fuse_one(copy.deepcopy(block))
    # eager: conv, BN, ReLU in a and c; conv, BN, ReLU, conv, BN in b; the cat
    assert isinstance(model[0], FusedGraphBlock) and report.swapped[0][2:] == (3 + 5 + 3 + 1, 2), str(report)
    assert [n.act for n in model[0].graph().nodes] == [RELU, RELU, None, RELU]
    x = torch.randn(2, 12, 5, 4, device=device)
    y = check_eval(model, block, x, 2, interpreter_launches, "act styles")
    assert (y[:, 5 + 4:5 + 4 + 6] < 0).any()  # the apply_act=False branch keeps its negatives
    for m in (model[0].a.bn, block.a.bn):
        m.eps = 0.5  # BatchNormAct2d's eps is watched as BatchNorm2d's is
    check_eval(model, block, x, 2, interpreter_launches, "act styles, eps changed")


def test_sync_batchnorm_act_in_eval(device, interpreter_launches):
    """timm.layers.convert_sync_batchnorm gives SyncBatchNormAct layers: folded like the others."""
    block = timm.layers.convert_sync_batchnorm(small_block()).eval().to(device)
    assert any(type(m).__name__ == "SyncBatchNormAct" for m in block.modules())
    model, report = fuse_one(copy.deepcopy(block))
    assert isinstance(model[0], FusedGraphBlock), str(report)
    check_eval(model, block, torch.randn(2, c(384), 3, 4, device=device), 3, interpreter_launches, "SyncBatchNormAct")


class Untraceable(nn.Module):
    """A network torch.fx can't trace as a whole (control flow on a value), holding a timm block
    that fuses and one that can't (Mish)."""

    def __init__(self):
        super().__init__()
        self.good = small_block()
        self.mish = small_block(partial(narrow_conv_block, act_layer="mish"))
        self.squeeze = nn.Conv2d(4 * c(96), c(384), 1)

    def forward(self, x):
        x = self.good(x)
        if x.mean() > 1e6:  # data-dependent: fx raises TraceError on the whole model
            x = x * 0
        return self.mish(self.squeeze(x))


def test_untraceable_network_is_fused_block_by_block(device):
    reference = randomize_(Untraceable(), 9).eval().to(device)
    model, report = fuse(copy.deepcopy(reference))
    assert [name for name, *_ in report.swapped] == ["good"], str(report)
    assert [(name, reason) for name, _, reason in report.left_alone] == [
        ("mish", "branch0.bn: its activation is Mish, not one the kernels compute")], str(report)
    x = torch.randn(1, c(384), 4, 4, device=device)
    with torch.no_grad(), count_launches() as n:
        y = model(x)
    assert n.value == 3
    assert_close_rel(y, reference.double()(x.double()), TOL[torch.float32], "untraceable network")


# Other activations: timm's act_layer= (SiLU, GELU) through the same kernels.

ACT_LAYERS = {"silu": nn.SiLU, "gelu": timm.layers.activations.GELU}


@pytest.mark.parametrize("act", sorted(ACT_LAYERS))
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_timm_network_with_act_layer_is_fully_swapped(name, act):
    """timm.create_model(name, act_layer=act): every block and stem conv unit is swapped, none
    left alone, and every fused node computes that activation (Inception-ResNet's residual heads
    keep the ReLU timm hard-codes there). On the meta device: the structure only."""
    launches, units, _ = NETWORKS[name]
    model = timm.create_model(name, pretrained=False, device="meta", act_layer=act)
    model, report = fuse(model.eval())
    assert report.left_alone == [] and report.units == set(units), str(report)
    assert len([b for b in report.swapped if b[0] not in report.units]) == BLOCK_COUNTS[name], str(report)
    expected = activation_of_module(ACT_LAYERS[act]())
    for block in (m for m in model.modules() if isinstance(m, FusedGraphBlock)):
        graph = block.graph()
        assert {n.act for n in graph.nodes if n.conv is not None} == {expected}, type(block._original).__name__
        assert graph.head is None or graph.head.act in (RELU, None)


ACT_BLOCKS = [b for b in BLOCKS if b[0] in ("v3.InceptionA", "v4.Mixed4a", "irv2.Block35")]


@pytest.mark.parametrize("act", sorted(ACT_LAYERS))
@pytest.mark.parametrize("name,build,cin,hw,launches", ACT_BLOCKS, ids=[b[0] for b in ACT_BLOCKS])
def test_timm_block_with_act_layer(name, build, cin, hw, launches, act, device, monkeypatch):
    """timm blocks whose conv_block has act_layer=silu/gelu (BatchNormAct2d applying it): eval
    output and a train step against the unfused block in float64."""
    # (the builders read narrow_conv_block when called)
    monkeypatch.setattr(sys.modules[__name__], "narrow_conv_block", partial(narrow_conv_block, act_layer=ACT_LAYERS[act]))
    block = randomize_(build(), 5).to(device)
    assert any(isinstance(m, ACT_LAYERS[act]) for m in block.modules())
    reference = nn.Sequential(copy.deepcopy(block))
    fused, report = fuse(nn.Sequential(block))
    assert isinstance(fused[0], FusedGraphBlock) and report.left_alone == [], str(report)
    x = torch.randn(2, c(cin), *hw, device=device)
    with torch.no_grad():
        y = fused.eval()(x)
        expected = copy.deepcopy(reference).eval().double()(x.double())
    assert_close_rel(y, expected, TOL[torch.float32], f"{name} {act} eval")
    check_training_parity(reference, fused, x, steps=1)


def test_timm_inception_v3_gelu_logits(device):
    """The whole timm inception_v3 with act_layer="gelu" (75x75, the smallest input it takes),
    fused: logits within 1e-5 of the unfused network in float64, as eager fp32's are (~1e-6;
    ~1 minute in the interpreter: one network, one activation; the block tests above cover the
    other networks and SiLU, and the train steps)."""
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False, act_layer="gelu", num_classes=10).eval().to(device)
    reference = copy.deepcopy(model).double()
    model, report = fuse(model)
    assert report.left_alone == [], str(report)
    x = torch.randn(1, 3, 75, 75, device=device)
    with torch.no_grad():
        assert_close_rel(model(x), reference(x.double()), 1e-5, "inception_v3 act_layer=gelu logits")
