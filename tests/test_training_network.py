"""Three SGD steps of a fused GoogLeNet with both auxiliary classifiers (loss = main + 0.3 x each
aux), from torchvision's state_dict, against torchvision's GoogLeNet.

A randomly initialised GoogLeNet trained on batches of 2 small images is ill-conditioned: over
three steps, eager fp32 drifts from eager float64 by 2-9% of the parameter updates (measured
for learning rates 1e-4 to 1e-2), so comparing two fp32 trajectories after three steps would
compare their rounding noise. The comparison is made twice instead:

- float64: the fused kernels, run in float64 by Triton's interpreter, take the three steps and
  must end at torchvision's float64 parameters and buffers (to 1e-7 of each tensor's max;
  measured: 2e-9);
- fp32: at each of the three steps, from the float64 trajectory's weights, the fused model's
  loss and gradients are compared with float64 next to eager fp32's. The fused statistics are
  one-pass sums centred on the running mean (eager: Welford), which at the first steps is still
  far from the batch mean: the fused gradients are 1-3x as far from float64 as eager's, spread
  over all layers. The bound is 4x eager's error.

The fp32 gradients are piecewise smooth: a ReLU input within rounding of zero, or a max-pool
window whose two largest values are within rounding of each other, is a discrete decision that
one rounding step takes either way, and a decision taken the other way moves the gradient of a
whole branch by a share that no tolerance can bound (at 64x64, one ReLU input of 4e-6 in
inception4d, where fp32 is 5e-5 off, put the fused gradients 1.8e-2 from float64 on one machine;
on the one the test was written on, eager lost a max-pool tie instead). So the comparison takes
every decision out of rounding's hands, by construction:

- ReLU: at each step the float64 trajectory shifts the bias feeding each ReLU (BatchNorm's beta,
  the aux heads' fc1 bias), layer by layer, just enough that every ReLU input is at least a margin
  from zero, the margin being 100x how far eager fp32 is from float64 at that unit at this step
  (measured: the fused units' outputs are up to 10x as far, from the one-pass statistics). The
  test then asserts that both fp32 models are nearer float64 than the margin wherever it can see
  (eager: every ReLU input; fused: every unit's output, so every ReLU whose result leaves the
  fused kernels), so those ReLUs take the float64 decision; the intermediate results inside a
  fused block come from the same kernels.
- max pool: the float64 reference gradients are computed with each fp32 model's own choice of
  winner in every window (as ATen picks it from that model's fp32 pool input). Where it differs
  from float64's, the test asserts that the float64 values are within the fp32 error of a tie
  (the only way a correct forward can pick another winner).
"""

import pytest
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

from conftest import DEVICE, least_shifts, split_launches
from fused_inception import count_launches, program
from fused_inception.models import googlenet

STEPS = 3
SIZE = 64  # the 4e block's map is 4x4, the 5b block's 2x2
RELU_MARGIN = 100  # a ReLU input's distance from zero, in units of eager fp32's error there


def models(dtype, seed=0):
    torch.manual_seed(seed)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, dropout=0.0,
                                             dropout_aux=0.0)
    fused = googlenet(aux_logits=True, dropout=0.0, dropout_aux=0.0)
    fused.load_state_dict(reference.state_dict())
    return reference.to(dtype).train(), fused.to(dtype).train()


def batches(size, dtype):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 1000, (2,), generator=g))
            for _ in range(STEPS)]


def train(model, data):
    """STEPS steps of SGD with momentum; returns the losses and the fused launches per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses, launches = [], []
    for x, y in data:
        optimizer.zero_grad()
        with count_launches() as n:
            out = model(x)
            loss = F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y)
                                                           + F.cross_entropy(out.aux_logits2, y))
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
        launches.append(n.value)
    return losses, launches


def states(*models):
    return [{k: v.detach().double() for k, v in m.state_dict().items()} for m in models]


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 through the kernels runs in the interpreter")
def test_three_sgd_steps_float64_follow_torchvision(monkeypatch):
    monkeypatch.setattr(program, "KERNEL_DTYPES", program.KERNEL_DTYPES + (torch.float64,))
    reference, fused = models(torch.float64)
    data = batches(32, torch.float64)
    ref_losses, _ = train(reference, data)
    losses, launches = train(fused, data)
    # Per step: 3 stem conv units x (2 forward + 2 backward) + 9 blocks x (4 forward + 5 backward);
    # the aux heads' conv units are torchvision's BasicConv2d (eager), as in torchvision's GoogLeNet.
    # (+ split K's reductions: the small maps' stages have few programs)
    assert launches == [3 * 4 + 9 * 9 + split_launches(fused)] * STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    expected, actual = states(reference, fused)
    for key, value in expected.items():
        scale = value.abs().max().item() or 1.0
        assert (actual[key] - value).abs().max().item() <= 1e-7 * scale, key


def loss_and_gradients(model, x, y):
    model.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y)
                                                   + F.cross_entropy(out.aux_logits2, y))
    loss.backward()
    return loss.item(), torch.cat([p.grad.double().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# Decisions (ReLU signs, max-pool winners) for the fp32 comparison; names are torchvision's.

def relu_inputs(model):
    """name -> module whose output goes into a ReLU: every BatchNorm2d (conv -> BN -> ReLU units)
    and the aux heads' fc1. (In the fused model only the aux heads' run: the others are fused.)"""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) or n.endswith(".fc1")}


def unit_of(name):
    """The unit a ReLU input belongs to: the stem conv or Inception block, or an aux head's conv or fc1."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0].startswith("aux") else parts[0]


def max_pools(model):
    """name -> nn.MaxPool2d: the stem's four and each Inception block's pool branch."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}


def pool_input_source(name):
    """The module whose input is this pool's input: a block's pool reads the block input (in the
    fused model the pool runs inside the block)."""
    return name.split(".")[0]


class Recorder:
    """Forward hooks that keep copies (float64) of ReLU inputs, pool inputs and unit outputs."""

    def __init__(self, model, units=False, shifts=None):
        self.values, self.handles = {}, []
        names = dict(model.named_modules())
        for name, m in relu_inputs(model).items():
            self.handles.append(m.register_forward_hook(self._relu_input(name, shifts)))
        for name in max_pools(model):
            source = pool_input_source(name)
            self.handles.append(names[source].register_forward_pre_hook(self._keep(("pool", name))))
        if units:
            for name in {unit_of(n) for n in relu_inputs(model)}:
                if not name.startswith("aux"):
                    self.handles.append(names[name].register_forward_hook(
                        lambda m, args, out, name=name: self._store(("unit", name), out)))

    def _store(self, key, t):
        self.values.setdefault(key, t.detach().double().clone())  # (a block runs once per forward)

    def _keep(self, key):
        return lambda m, args: self._store(key, args[0])

    def _relu_input(self, name, shifts):
        def hook(m, args, out):
            if shifts is not None:  # the float64 trajectory: move this ReLU input off zero
                out = out + shifts.shift(name, out)
            self._store(("relu", name), out)
            return out  # (cloned: the ReLU after it is in place)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Shifts:
    """Per ReLU input, the smallest shift of each channel's values (the bias it adds) that keeps
    every value at least margins[unit] from zero."""

    def __init__(self, margins):
        self.margins, self.by_name = margins, {}

    def shift(self, name, z):
        s = least_shifts(z, self.margins[unit_of(name)])
        self.by_name[name] = s
        return s.view(1, -1, *[1] * (z.dim() - 2))

    def apply_to(self, model, state):
        """Add the shifts to the model's biases (and to `state`'s)."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, s in self.by_name.items():
                modules[name].bias += s
                state[f"{name}.bias"] = state[f"{name}.bias"] + s


def pool_winners(pool, x):
    """ATen's max-pool indices (into each H*W plane of x): the winner that gets the gradient."""
    return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                        return_indices=True)[1]


def routed(x, winners):
    """A max pool that takes (and routes the gradient to) the given winners."""
    return x.flatten(2).gather(2, winners.flatten(2)).view(winners.shape)


def check_pool_decisions(pools, exact, actual, what):
    """Per pool, the winners the fp32 model took; where they differ from float64's, the float64
    values must be a tie to within the fp32 error (|gap| <= 2 max |x32 - x64|)."""
    winners = {}
    for name, pool in pools.items():
        x64, x32 = exact[("pool", name)], actual[("pool", name)]
        w64, w32 = pool_winners(pool, x64), pool_winners(pool, x32)
        gap = (routed(x64, w64) - routed(x64, w32)).abs().max().item()
        error = (x32 - x64).abs().max().item()
        assert gap <= 2 * error + 1e-12 * x64.abs().max().item(), (what, name, gap, error)
        winners[name] = w32
    return winners


def test_fp32_gradients_at_each_of_three_steps_near_eager_accuracy():
    exact_model, _ = models(torch.float64)
    replay, _ = models(torch.float64)  # float64 again, routing max pools as an fp32 model did
    reference, fused = models(torch.float32)
    pools = max_pools(exact_model)
    optimizer = torch.optim.SGD(exact_model.parameters(), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(batches(SIZE, torch.float32)):
        state = {k: v.clone() for k, v in exact_model.state_dict().items()}

        # Margins: 100x eager fp32's error at each unit's ReLU inputs, from this step's weights.
        replay.load_state_dict(state)
        reference.load_state_dict(state)
        with torch.no_grad(), Recorder(replay) as r64, Recorder(reference) as r32:
            replay(x.double()), reference(x)
        errors = {}
        for key, z in r64.values.items():
            if key[0] == "relu":
                unit = unit_of(key[1])
                errors[unit] = max(errors.get(unit, 0.0), (r32.values[key] - z).abs().max().item())
        margins = {unit: RELU_MARGIN * e for unit, e in errors.items()}

        # The float64 trajectory, every ReLU input moved at least its margin off zero.
        shifts = Shifts(margins)
        with Recorder(exact_model, units=True, shifts=shifts) as r64:
            exact_loss, exact = loss_and_gradients(exact_model, x.double(), y)
        shifts.apply_to(exact_model, state)
        optimizer.step()
        for key, z in r64.values.items():
            if key[0] == "relu":  # (asserted: a shift could not be found if values were denser than the margin)
                assert z.abs().min().item() >= margins[unit_of(key[1])], (step, key)

        # fp32, from the same (shifted) weights.
        state32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        reference.load_state_dict(state32)
        fused.load_state_dict(state32)
        with Recorder(reference) as r_eager:
            eager_loss, eager = loss_and_gradients(reference, x, y)
        with Recorder(fused, units=True) as r_fused:
            fused_loss, actual = loss_and_gradients(fused, x, y)

        # Every ReLU decided as in float64: both models nearer float64 than the margin wherever seen.
        for key, z in r64.values.items():
            for what, seen in (("eager", r_eager.values), ("fused", r_fused.values)):
                if key[0] != "pool" and key in seen:  # a ReLU input, or a unit's output (after its ReLUs)
                    err, margin = (seen[key] - z).abs().max().item(), margins[unit_of(key[1])]
                    assert err < margin, (step, what, key, err, margin)
        assert {k for k in r_fused.values if k[0] == "unit"} == {k for k in r64.values if k[0] == "unit"}

        # Float64 reference gradients with each fp32 model's max-pool winners.
        def exact_with(winners):
            if all(torch.equal(w, pool_winners(pools[n], r64.values[("pool", n)])) for n, w in winners.items()):
                return exact_loss, exact
            replay.load_state_dict(state)
            handles = [dict(replay.named_modules())[n].register_forward_hook(
                lambda m, args, out, w=w: routed(args[0], w)) for n, w in winners.items()]
            try:
                return loss_and_gradients(replay, x.double(), y)
            finally:
                for h in handles:
                    h.remove()

        exact_e_loss, exact_e = exact_with(check_pool_decisions(pools, r64.values, r_eager.values, "eager"))
        exact_f_loss, exact_f = exact_with(check_pool_decisions(pools, r64.values, r_fused.values, "fused"))
        assert abs(fused_loss - exact_f_loss) <= 4 * abs(eager_loss - exact_e_loss) + 1e-6 * exact_f_loss, step
        err_eager = ((eager - exact_e).norm() / exact_e.norm()).item()
        err_fused = ((actual - exact_f).norm() / exact_f.norm()).item()
        assert err_fused <= 4 * err_eager + 1e-6, (step, err_fused, err_eager)
        buffers = dict(fused.named_buffers())
        for name, b_exact in exact_model.named_buffers():  # this step's running statistics
            if name.endswith(("running_mean", "running_var")):
                assert (buffers[name].double() - b_exact).abs().max() <= 1e-3 * b_exact.abs().max(), (step, name)
