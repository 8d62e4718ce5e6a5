"""fuse(): Inception blocks written in users' own styles are found by dataflow and fused."""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

from conftest import (TOL, Decisions, SequentialNoBN, assert_close_rel, keep_relu_inputs_off_zero_, randomize_,
                      split_launches)
from fused_inception import FusedGraphBlock, count_launches, fuse
from test_training import check_training_parity


class FunctionalStyle(nn.Module):
    """Separate attributes, activations called in forward (F.relu, torch.relu, .relu_())."""

    def __init__(self, cin):
        super().__init__()
        self.one = nn.Conv2d(cin, 7, 1, bias=False)
        self.one_bn = nn.BatchNorm2d(7)
        self.red = nn.Conv2d(cin, 5, 1)
        self.wide = nn.Conv2d(5, 9, (1, 7), padding=(0, 3))
        self.proj = nn.Conv2d(cin, 3, 1)

    def forward(self, x):
        a = F.relu(self.one_bn(self.one(x)))
        b = torch.relu(self.red(x))
        b = self.wide(b).relu_()
        c = F.relu(self.proj(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)), inplace=True)
        return torch.cat((a, b, c), 1)


class BiasBN(nn.Module):
    """conv with bias, then BatchNorm2d(eps=1e-3), then ReLU."""

    def __init__(self, cin):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(cin, 6, 1, bias=True), nn.BatchNorm2d(6, eps=1e-3)
        self.c2, self.n2 = nn.Conv2d(cin, 4, 1, bias=True), nn.BatchNorm2d(4, eps=1e-3)
        self.c3, self.n3 = nn.Conv2d(4, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8, eps=1e-3)
        self.act = nn.ReLU()

    def forward(self, x):
        y1 = self.act(self.n1(self.c1(x)))
        y2 = self.act(self.n3(self.c3(self.act(self.n2(self.c2(x))))))
        return torch.cat([y1, y2], 1)


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, k, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class WrapperStyle(nn.Module):
    """A BasicConv2d-style wrapper module; branches listed in another order than torchvision's."""

    def __init__(self, cin):
        super().__init__()
        self.pool_proj = ConvBNReLU(cin, 4, 1)
        self.b3x3 = nn.Sequential(ConvBNReLU(cin, 6, 1), ConvBNReLU(6, 8, 3, padding=1))
        self.b1x1 = ConvBNReLU(cin, 5, 1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)

    def forward(self, x):
        return torch.cat([self.pool_proj(self.pool(x)), self.b3x3(x), self.b1x1(x)], 1)


class V2Style(nn.Module):
    """Inception v2: the 5x5 branch is two stacked 3x3 convs (longest chain 3)."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = ConvBNReLU(cin, 6, 1)
        self.b5 = nn.Sequential(ConvBNReLU(cin, 4, 1), ConvBNReLU(4, 6, 3, padding=1), ConvBNReLU(6, 6, 3, padding=1))
        self.b3 = nn.Sequential(ConvBNReLU(cin, 4, 1), ConvBNReLU(4, 7, 3, padding=1))
        self.bp = ConvBNReLU(cin, 3, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


STYLES = [(SequentialNoBN, 2), (FunctionalStyle, 2), (BiasBN, 2), (WrapperStyle, 2), (V2Style, 3)]


def check_fused_block(block_cls, launches, device, interpreter_launches):
    cin = 13
    original = randomize_(block_cls(cin), 1).eval().to(device)
    reference = copy.deepcopy(original)
    model = nn.Sequential(original)
    params_before = {id(p) for p in model.parameters()}
    model, report = fuse(model)
    assert isinstance(model[0], FusedGraphBlock), str(report)
    assert [row[0] for row in report.swapped] == ["0"] and report.swapped[0][3] == launches
    assert {id(p) for p in model.parameters()} == params_before
    assert list(model[0].state_dict()) == list(reference.state_dict())
    x = torch.randn(2, cin, 7, 6, device=device)
    with torch.no_grad():
        model(x)  # builds the plan
        interpreter_launches.clear()
        with count_launches() as n:
            y = model(x)
        expected = reference.double()(x.double())
    assert n.value == launches == len(interpreter_launches)
    assert_close_rel(y, expected, TOL[torch.float32], block_cls.__name__)


@pytest.mark.parametrize("block_cls,launches", STYLES, ids=[s[0].__name__ for s in STYLES])
def test_user_styles(block_cls, launches, device, interpreter_launches):
    check_fused_block(block_cls, launches, device, interpreter_launches)


class SmallInceptionNet(nn.Module):
    """A GoogLeNet-like network for 1-channel 96x96 images (FashionMNIST style), plain conv/pool stem."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                                  nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = WrapperStyle(24)  # 17 channels
        self.block2 = SequentialNoBN(17)  # 29
        self.down = nn.MaxPool2d(2)
        self.block3 = V2Style(29)  # 22
        self.head = nn.Linear(22, classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.block2(self.block1(x))
        x = self.block3(self.down(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_small_network_on_one_channel_96x96(device):
    net = randomize_(SmallInceptionNet(), 2).eval().to(device)
    reference = copy.deepcopy(net)
    net, report = fuse(net)
    assert [r[0] for r in report.swapped] == ["block1", "block2", "block3"], str(report)
    assert report.left_alone == []
    x = torch.randn(2, 1, 96, 96, device=device)
    with torch.no_grad():
        net(x)
        with count_launches() as n:
            y = net(x)
        expected = reference.double()(x.double())
    assert n.value == 2 + 2 + 3
    assert_close_rel(y, expected, TOL[torch.float32], "logits")


class Dilated(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.a = nn.Conv2d(cin, 4, 1)
        self.b = nn.Conv2d(cin, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


class Grouped(Dilated):
    def __init__(self, cin):
        super().__init__(cin)
        self.b = nn.Conv2d(cin, 4, 3, padding=1, groups=cin)


class ReusedBranch(Dilated):
    def __init__(self, cin):
        super().__init__(cin)
        self.b = nn.Conv2d(cin, 4, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        return torch.cat([a, F.relu(self.b(x)) + a], 1)


@pytest.mark.parametrize("block_cls,reason", [
    (Dilated, "dilation 2 not supported"),
    (Grouped, "groups 4 not supported"),
    (ReusedBranch, "a branch is computed by call_function add"),
])
def test_blocks_that_must_not_be_fused(block_cls, reason):
    model = nn.Sequential(randomize_(block_cls(4), 3).eval())
    original = model[0]
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
    model, report = fuse(model)
    assert model[0] is original and report.swapped == []
    assert len(report.left_alone) == 1 and reason in report.left_alone[0][2], str(report)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_fuse_is_idempotent_and_not_inplace_copies():
    model = nn.Sequential(randomize_(V2Style(5), 0).eval())
    copy_model, report = fuse(model, inplace=False)
    assert isinstance(copy_model[0], FusedGraphBlock) and isinstance(model[0], V2Style)
    again, report2 = fuse(copy_model)
    assert again is copy_model and report2.swapped == [] and report2.left_alone == []


def test_train_gradients_and_optimizer_built_before_fuse():
    torch.manual_seed(9)  # a seed whose max pools have no near-tie (asserted below)
    model = randomize_(SmallInceptionNet(), 4)
    x, target = torch.randn(4, 1, 48, 48), torch.randint(0, 10, (4,))
    # fp32 gradients against fp32: no ReLU or max pool may be within rounding of its other
    # decision, or which way it goes is luck (see conftest.Decisions). The ReLU inputs are moved
    # off zero by the biases before them; the max-pool winners lead by >= 2e-5 of the max, over
    # 10x the fp32 error (1.5e-6).
    exact = copy.deepcopy(model).double().train()
    keep_relu_inputs_off_zero_(exact, model, lambda m: m(x.double()), TOL[torch.float32])
    with Decisions() as decisions:
        exact(x.double())
    assert decisions.relu_margin >= 0.9 * TOL[torch.float32] and decisions.pool_margin >= 2e-5, \
        (decisions.relu_margin, decisions.pool_margin)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _ = fuse(model)
    for m in (model, reference):
        F.cross_entropy(m.train()(x), target).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        assert_close_rel(p.grad, q.grad, TOL[torch.float32], name)
    w = model.block1.b1x1.conv.weight
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)  # the optimizer holds the fused block's parameter objects
    model.eval()
    with torch.no_grad():
        xb = torch.randn(1, 24, 6, 6)
        assert_close_rel(model.block1(xb), model.block1.eager_forward(xb), TOL[torch.float32], "after step")


# Swapped: the Inception blocks and the stem's BasicConv2d units (conv -> BN -> ReLU: 3 kernels -> 1).
@pytest.mark.parametrize("name,builder,size,blocks,units,launches", [
    ("googlenet", lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True), 64, 9,
     {"conv1", "conv2", "conv3"}, 3 + 9 * 2),
    ("inception_v3", lambda: torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True),
     75, 11, {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"},
     5 + 3 * 3 + 3 + 4 * 5 + 4 + 2 * 3),
])
def test_fuse_torchvision_networks(name, builder, size, blocks, units, launches, device):
    reference = randomize_(builder(), 0).eval()
    model = copy.deepcopy(reference).to(device)
    model, report = fuse(model)
    assert len(report.swapped) == blocks + len(units) and report.units == units, str(report)
    assert report.left_alone == [], str(report)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        with count_launches() as n:
            y = model(x.to(device))
        expected = reference.double()(x.double())
    assert n.value == launches + split_launches(model)  # (+ split K's reductions at batch 1)
    assert_close_rel(y, expected, 5 * TOL[torch.float32], name)


class LoneConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


class DilatedUnits(nn.Module):
    """A block candidate left alone (a dilated branch) whose other branch is a fusable conv unit."""

    def __init__(self, cin):
        super().__init__()
        self.a = ConvBNReLU(cin, 4, 1)
        self.b = ConvBNReLU(cin, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class UnitsNet(nn.Module):
    """A stem of conv units in three styles (a wrapper module, an nn.Sequential, torchvision's
    Conv2dNormActivation), a lone conv, and a block left alone with a fusable unit inside."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 8, 3, stride=2, padding=1)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tv = torchvision.ops.Conv2dNormActivation(8, 12, 3)
        self.lone = LoneConv(12, 12)
        self.block = DilatedUnits(12)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(self.lone(self.tv(self.seq(self.stem(x)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_conv_units_outside_blocks_are_swapped():
    """fuse() swaps every conv -> BN -> ReLU unit that is not inside a fused block (one launch
    instead of three), also inside a block left alone; a lone conv stays (nothing to save).
    Eval logits and a train step (gradients, running statistics) match the unfused network."""
    reference = randomize_(UnitsNet(), 5)
    model, report = fuse(copy.deepcopy(reference).eval())
    assert report.units == {"stem", "seq", "tv", "block.a"} and len(report.swapped) == 4, str(report)
    assert [(name, reason) for name, _, reason in report.left_alone] == [("block", "node 1: dilation 2 not supported")]
    assert isinstance(model.lone, LoneConv) and isinstance(model.block.b, ConvBNReLU)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert "swapped     stem (ConvBNReLU, conv unit): 3 -> 1 launches" in str(report)
    x = torch.randn(2, 3, 12, 11)
    with torch.no_grad():
        with count_launches() as n:
            y = model(x)
        expected = copy.deepcopy(reference).eval().double()(x.double())
    assert n.value == 4
    assert_close_rel(y, expected, TOL[torch.float32], "logits")
    with count_launches() as n:
        check_training_parity(reference, model, x, steps=2, zero_grads=("seq.0.bias",))  # (a bias before BN)
    assert n.value > 2 * 4  # the units trained through the kernels
