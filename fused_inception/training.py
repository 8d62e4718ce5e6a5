"""Fused training: batch-statistics BatchNorm in the stage kernels, and the block's backward.

Forward, per stage of the block's layout (see `layout.build_layout`):

    launch 1  conv_stage(TRAIN): every convolution of the stage; each writes its pre-activation
              `raw` into a shadow of its destination (`raw_out`, `raw_mid`) and, with BatchNorm,
              adds the per-channel sum and sum of squares of `raw - running_mean`, and the
              count, into `sums`; without BatchNorm the activated result goes to its slice of
              `out`/`mid` right away
    launch 2  bn_apply (only if the stage has BatchNorm): statistics -> normalise, affine, activation,
              written into the channel slices of `out`/`mid`; mean, 1/std, unbiased variance
              and count saved per channel

plus, per block and step, one `torch.cat` that packs the parameters (conv weights in their own
layout, biases, BN weights) and zeroes the `sums` (and one more that rounds the weights to the
inputs' dtype under autocast), and after the launches the running-statistics
update (`_foreach_lerp_` and `_foreach_add_` on the BN buffers, exactly nn.BatchNorm2d's rule).
With SyncBatchNorm the stage's sums are all-reduced between the two launches.

Backward (`backward`), stages in reverse: the intermediate results that later stages read are
recomputed from `raw` (one bn_apply launch per stage), then per stage the BN + activation backward in
two launches (per-channel reduction, then the gradient of `raw`), and the convolutions' input,
weight and bias gradients by `aten.convolution_backward` (the eager fallback: one call per merged
GEMM), the pools' by ATen's pool backward. Saved for backward: the block input, `raw` and per-channel statistics
(and the block output, for a block whose branches read another branch's output).
"""

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from fused_inception.kernels import batchnorm as kbn
from fused_inception.kernels import conv as kconv
from fused_inception.norms import all_reduce as _all_reduce
from fused_inception.norms import update_running_stats
from fused_inception.layout import build_layout
from fused_inception.plan import TRAINING, build_stages, input_padding, kernel_weight, padded_input


@dataclass
class Slot:
    """A piece of the packed parameter vector: what it holds and where its gradient comes from."""

    kind: str  # "weight", "bias", "gamma" or "beta"
    problem: int  # index of the problem among all the block's problems
    member: int  # which of the problem's convolutions (plan.Problem.convs / bns / couts)
    lo: int  # weight: first row of the problem's weight gradient; bias: first column within the
    hi: int  # problem; gamma/beta: global columns [lo, hi)


@dataclass
class Launches:
    """A training plan's launches for inputs of one shape and layout (kconv / kbn launchers,
    cached: after the first step they go straight to the compiled kernels)."""

    conv: tuple  # per stage: kconv.StageLaunch (training variant)
    apply: tuple  # per stage: kbn.ApplyLaunch of its BatchNorm parts (forward)
    recompute: tuple  # per stage: kbn.ApplyLaunch of its parts in `mid` (backward)
    backward: dict  # grad_out's strides -> per stage (reduce, backward) kbn.BackwardLaunch


@dataclass
class TrainPlan:
    """Everything a training forward and backward need besides the input and the parameters."""

    layout: object  # plan.Layout
    stages: list  # plan.Stage (TRAINING packing)
    problems: list  # every plan.Problem of the block, in order
    columns: int
    slots: list  # Slot per piece of the packed vector, in packing order
    is_param: tuple  # per slot: True if a parameter fills it, False if a constant (absent bias, ...)
    constants: dict  # slot index -> constant tensor (zeros or ones)
    sections: tuple  # element offsets of (biases, gammas, betas, centres, end) in the packed vector
    consts: torch.Tensor  # [2, columns], accumulator dtype: the epilogue's scale (residual scale or 1), BN eps
    zero_sums: torch.Tensor  # zeros packed last (when every piece has the accumulator dtype)
    center_pieces: list  # per member's columns: None (its BatchNorm's running mean) or constant zeros
    bn_columns: list  # (BatchNorm, first column, last column) per BatchNorm
    reads_out: bool  # some branch reads another branch's result in the block output
    weight_pieces: int  # how many slots hold conv weights (they come first in packing order)
    tap_channels: tuple  # per problem: the channels its weights are padded to (plan.Stage), or None
    pad_to: int  # the channels the input is padded to for the kernels (plan.input_padding), or 0
    zero: torch.Tensor  # 0-d zero of the inputs' dtype (plan.padded_input)
    _by_input: dict = field(default_factory=dict)  # (x's shape and strides, memory format) -> Launches

    def refs(self):
        """Per slot, (module, attribute name) of the parameter that fills it, or None where the
        block has none (no conv for a pool, no BatchNorm)."""
        out = []
        for slot in self.slots:
            p = self.problems[slot.problem]
            if slot.kind in ("gamma", "beta"):
                module = p.bns[slot.member]
            else:
                module = p.convs[slot.member] if p.convs else None
            name = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}[slot.kind]
            out.append(None if module is None else (module, name))
        return out

    def launches(self, x, out, mid, memory_format):
        """The Launches for input x with buffers like out and mid (built on the first call)."""
        key = (x.shape, x.stride(), memory_format)
        entry = self._by_input.get(key)
        if entry is None:
            if len(self._by_input) >= 16:  # inputs of many shapes: keep the latest
                self._by_input.clear()
            cols = self.columns
            entry = self._by_input[key] = Launches(
                conv=tuple(kconv.StageLaunch(s.spec, s.table, s.ncols, s.depth, x, out, mid, training=True)
                           for s in self.stages),
                apply=tuple(kbn.ApplyLaunch(s.table, s.splits, s.bn_parts, cols, out, mid) for s in self.stages),
                recompute=tuple(kbn.ApplyLaunch(s.table, s.splits, s.mid_parts, cols, out, mid, recompute=True)
                                for s in self.stages),
                backward={})
        return entry

    def all_launches(self):
        """Every launch prepared so far (all input shapes and gradient layouts)."""
        return [launch for entry in self._by_input.values()
                for launch in (*entry.conv, *entry.apply, *entry.recompute,
                               *(one for pairs in entry.backward.values() for pair in pairs for one in pair))]

    def backward_launches(self, launches, raw_out, raw_mid, grad_out):
        """Per stage, the (reduce, backward) BatchNorm launches for a gradient of grad_out's strides."""
        entry = launches.backward.get(grad_out.stride())
        if entry is None:
            cols = self.columns
            entry = launches.backward[grad_out.stride()] = tuple(
                (kbn.BackwardLaunch(s.table, s.splits, s.bn_parts, cols, raw_out, raw_mid, grad_out, reduce=True),
                 kbn.BackwardLaunch(s.table, s.splits, s.gemm_parts, cols, raw_out, raw_mid, grad_out, reduce=False))
                for s in self.stages)
        return entry

    def pack(self, params, centers, weight_dtype):
        """The stage kernels' operands from the parameters (those filling slots, in slot order)
        with constants in place of absent ones, the BatchNorms' running means (`centers`, one per
        BatchNorm in bn_columns order) and zeroed statistics accumulators, in one torch.cat, two
        when the convolution weights are to be rounded: they are packed in `weight_dtype` (the
        inputs' dtype: eager autocast rounds fp32 weights so too), so that the kernels' K loops
        copy them to shared memory as they are, with no conversion in registers.
        Returns (weights, biases, gammas, betas, centres, sums [columns, 3])."""
        it = iter(params)
        pieces = [(kernel_weight(next(it), self.tap_channels[slot.problem]).reshape(-1) if slot.kind == "weight"
                   else next(it).reshape(-1)) if is_param
                  else self.constants[i] for i, (slot, is_param) in enumerate(zip(self.slots, self.is_param))]
        it = iter(centers)
        pieces += [next(it) if zeros is None else zeros for zeros in self.center_pieces]
        acc = self.consts.dtype
        b, g, be, c, end = self.sections
        weights = None
        if b and pieces[0].dtype != weight_dtype:
            nw = self.weight_pieces
            weights = torch.cat(pieces[:nw], out=torch.empty(b, dtype=weight_dtype, device=self.consts.device))
            pieces, b, g, be, c, end = pieces[nw:], 0, g - b, be - b, c - b, end - b
        if all(p.dtype == acc for p in pieces):
            pieces.append(self.zero_sums)  # zeroes the statistics accumulators in the same launch
            packed = torch.cat(pieces)
            sums = packed[end:].view(self.columns, 3)
        else:
            packed = torch.cat(pieces)
            sums = torch.zeros(self.columns, 3, dtype=acc, device=self.consts.device)
        if weights is None:
            weights = packed[:b]
        return weights, packed[b:g], packed[g:be], packed[be:c], packed[c:end], sums

    def backward_operands(self, params):
        """What a backward needs of the parameters, with one torch.cat: per problem its weight in
        nn.Conv2d's layout ([ncols, cin, kh, kw]: the parameter itself for a single convolution,
        its convolutions' weights stacked for a merged GEMM; None for a pool), and the gammas and
        betas per column."""
        by_problem, gamma_beta = {}, []
        it = iter(params)
        for i, (slot, is_param) in enumerate(zip(self.slots, self.is_param)):
            value = next(it) if is_param else self.constants[i]
            if slot.kind == "weight":
                by_problem.setdefault(slot.problem, []).append(value)
            elif slot.kind in ("gamma", "beta"):
                gamma_beta.append(value.reshape(-1))
        merged = [w for ws in by_problem.values() if len(ws) > 1 for w in ws]
        packed = torch.cat([w.reshape(-1) for w in merged] + gamma_beta)
        weights, offset = [None] * len(self.problems), 0
        for index, ws in by_problem.items():
            if len(ws) == 1:
                weights[index] = ws[0]
            else:
                n = sum(w.numel() for w in ws)
                weights[index] = packed[offset:offset + n].view(-1, *ws[0].shape[1:])
                offset += n
        gammas, betas = packed[offset:].view(2, self.columns)
        return weights, gammas, betas

    def param_grads(self, params, weight_grads, bias_grads, bn_sums):
        """The gradient of each parameter from the per-problem weight and bias gradients and the
        BN reduction sums ([2, columns]: sum g -> beta, sum g*zhat -> gamma)."""
        grads = []
        filled = [slot for slot, is_param in zip(self.slots, self.is_param) if is_param]
        for slot, p in zip(filled, params):
            if slot.kind == "weight":
                g = weight_grads[slot.problem][slot.lo:slot.hi]
            elif slot.kind == "bias":
                g = bias_grads[slot.problem][slot.lo:slot.hi]
            else:
                g = bn_sums[1 if slot.kind == "gamma" else 0, slot.lo:slot.hi]
            grads.append(g.reshape(p.shape).to(p.dtype))
        return grads


def accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_train_plan(graph, device, dtype, param_dtype):
    """The training plan of `graph` for inputs of `dtype` on `device` and parameters of
    `param_dtype`: the stages of plan.build_stages with the TRAINING packing, and where each
    parameter goes in the vector packed per step."""
    layout = build_layout(graph)
    stages, offsets = build_stages(layout, graph.in_channels, device, TRAINING)
    acc = accumulator_dtype(dtype)
    problems = [p for stage in stages for p in stage.problems]
    weight_slots, bias_slots, member_columns, bn_columns, scale, eps = [], [], [], [], [], []
    col = 0
    for index, p in enumerate(problems):
        lo = 0
        for j, (cout, bn) in enumerate(zip(p.couts, p.bns)):
            if p.gemm:
                weight_slots.append(Slot("weight", index, j, lo, lo + cout))
            bias_slots.append(Slot("bias", index, j, lo, lo + cout))
            member_columns.append((index, j, col + lo, col + lo + cout))
            if bn is not None:
                bn_columns.append((bn, col + lo, col + lo + cout))
            # (the stage kernel reads a problem's scale only where it adds a residual: a head's)
            assert p.scale == 1.0 or p.row["res"] != kconv.RES_NONE
            scale.append(torch.full((cout,), p.scale, dtype=torch.float64))
            eps.append(torch.full((cout,), bn.eps if bn is not None else 1.0, dtype=torch.float64))
            lo += cout
        col += p.ncols
    w_total = sum(p.ncols * w_ld for p, (_, w_ld) in zip(problems, offsets))
    # Packing order: weights (problem by problem), then biases, BN weights, BN biases per column.
    slots = weight_slots + bias_slots + [Slot(kind, index, j, lo, hi)
                                         for kind in ("gamma", "beta") for index, j, lo, hi in member_columns]
    columns = col
    plan = TrainPlan(
        layout=layout, stages=stages, problems=problems, columns=columns, slots=slots, is_param=(),
        constants={}, sections=tuple(w_total + i * columns for i in range(5)),
        consts=torch.stack([torch.cat(scale), torch.cat(eps)]).to(device=device, dtype=acc),
        zero_sums=torch.zeros(3 * columns, dtype=acc, device=device),
        center_pieces=[None if problems[index].bns[j] is not None else torch.zeros(hi - lo, dtype=param_dtype,
                                                                                   device=device)
                       for index, j, lo, hi in member_columns],
        bn_columns=bn_columns,
        reads_out=any(p.row["src"] == kconv.BUF_OUT for p in problems),
        weight_pieces=len(weight_slots),
        tap_channels=tuple(c for s in stages for c in s.tap_channels),
        pad_to=input_padding(layout, graph.in_channels),
        zero=torch.zeros((), dtype=dtype, device=device),
    )
    plan.is_param = tuple(ref is not None and getattr(*ref) is not None for ref in plan.refs())
    for i, (slot, is_param) in enumerate(zip(slots, plan.is_param)):
        if not is_param:  # an absent conv bias or BN affine parameter: a constant in its place
            value = 1.0 if slot.kind == "gamma" else 0.0
            plan.constants[i] = torch.full((slot.hi - slot.lo,), value, dtype=param_dtype, device=device)
    return plan


def _has_mid_columns(row):
    return row["dst0"] == kconv.BUF_MID or (row["dst1"] == kconv.BUF_MID and row["split"] < row["ncols"])


# ---------------------------------------------------------------------------------------------
# Forward and backward


def forward(plan, x, params, centers, group, memory_format):
    """Run the block in training mode. Returns (out, raw_out, raw_mid, saved, launches);
    `raw_mid` is `raw_out` when the block has no intermediate results; `launches` the plan's
    Launches for x (the backward's too). `centers`: the BatchNorms' running means (read, not
    updated)."""
    weights, biases, gammas, betas, centers, sums = plan.pack(params, centers, x.dtype)
    out, mid = plan.layout.buffers(x, x.dtype, memory_format)
    raw_out = torch.empty_like(out)
    raw_mid = torch.empty_like(mid) if mid is not out else raw_out
    if group is None:
        for buf, dst in ((out, kconv.BUF_OUT), (mid, kconv.BUF_MID)):
            values = buf.shape[0] * buf.shape[2] * buf.shape[3]
            if values == 1 and any(p.row["bn"] and p.row["dst0"] == dst for p in plan.problems):
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{list(x.shape)} (a BatchNorm of this block sees {values} value per channel)")
    saved = torch.empty(4, plan.columns, dtype=plan.consts.dtype, device=x.device)
    xk = padded_input(x, plan.pad_to, plan.zero)  # (a stem's input: see plan.input_padding)
    launches = plan.launches(xk, out, mid, memory_format)
    if x.shape[0] == 0:
        return out, raw_out, raw_mid, saved, launches
    scale, eps = plan.consts
    for stage, conv, apply in zip(plan.stages, launches.conv, launches.apply):
        conv(weights, scale, biases, xk, out, mid, raw_out, raw_mid, sums, centers)
        if stage.bn_parts:
            if group is not None:
                lo, hi = stage.columns
                _all_reduce(sums[lo:hi], group)
            apply(gammas, betas, centers, eps, sums, saved, raw_out, raw_mid, out, mid)
    return out, raw_out, raw_mid, saved, launches


def _columns(buffers, row, lo, hi, value=None):
    """The slice of the problem's columns [lo, hi) in buffers[dst] (dst0 below split, dst1 after);
    with `value` ([N, hi - lo, H, W]), written into those slices instead."""
    split = row["split"]
    parts = []
    if lo < split:
        parts.append(buffers[row["dst0"]][:, row["dst0_c"] + lo:row["dst0_c"] + min(hi, split)])
    if hi > split:
        parts.append(buffers[row["dst1"]][:, row["dst1_c"] + max(lo, split) - split:row["dst1_c"] + hi - split])
    if value is not None:
        for part, piece in zip(parts, value.split([t.shape[1] for t in parts], 1)):
            part.copy_(piece)
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _pooled(pool, x):
    """(pool(x), the max pool's indices or None): what the pool's backward needs."""
    if pool.kind == "max":
        return torch.ops.aten.max_pool2d_with_indices(x, list(pool.kernel), list(pool.stride), list(pool.padding),
                                                      [1, 1], pool.ceil_mode)
    return pool.apply(x), None


def _pool_backward(pool, x, indices, grad):
    """The gradient of pool(x) w.r.t. x (explicit ATen ops: autograd is off inside custom ops)."""
    if pool.kind == "max":
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, list(pool.kernel), list(pool.stride),
                                                               list(pool.padding), [1, 1], pool.ceil_mode, indices)
    return torch.ops.aten.avg_pool2d_backward(grad, x, list(pool.kernel), list(pool.stride), list(pool.padding),
                                              pool.ceil_mode, pool.count_include_pad, None)


def _accumulate(total, grad):
    return grad if total is None else total.add_(grad)


def backward(plan, launches, x, raw_out, raw_mid, saved, out, params, grad_out, group, need_x):
    """Gradients of a training forward (`launches`: its Launches): (dx or None, weight gradient
    per problem ([ncols, cin, kh, kw], None for pools), bias gradient per problem ([ncols]), BN
    sums [2, columns])."""
    layout, dtype = plan.layout, raw_out.dtype
    eps = plan.consts[1]
    weights, gammas, betas = plan.backward_operands(params)
    acc = plan.consts.dtype

    # The intermediate results, recomputed: the convolutions' from their pre-activations, the
    # pools' (a pool-only branch feeding a residual block's up-projection) from the input.
    mid, pooled = raw_mid, {}
    if layout.mid_channels:
        mid = torch.empty_like(raw_mid)
        for stage, recompute in zip(plan.stages, launches.recompute):
            if stage.mid_parts:
                recompute(gammas, betas, gammas, eps, saved, saved, raw_out, raw_mid, raw_out, mid)
        for index, p in enumerate(plan.problems):
            if not p.gemm and _has_mid_columns(p.row):
                pooled[index] = _pooled(p.pool, x)
                spare = out if out is not None else torch.empty_like(raw_out)  # (columns in `out` aren't needed)
                _columns({kconv.BUF_OUT: spare, kconv.BUF_MID: mid}, p.row, 0, p.ncols, pooled[index][0])
    d_mid = torch.zeros_like(mid) if layout.mid_channels else grad_out
    if plan.reads_out:  # an output branch also feeds a later branch: its gradient gathers both
        grad_out = grad_out.clone()
    dz_out = torch.empty_like(raw_out)
    dz_mid = torch.empty_like(raw_mid) if layout.mid_channels else dz_out
    sums = torch.zeros(2, plan.columns, dtype=acc, device=raw_out.device)
    sources = {kconv.BUF_OUT: out, kconv.BUF_MID: mid}
    grads_of = {kconv.BUF_OUT: grad_out, kconv.BUF_MID: d_mid}
    dz = {kconv.BUF_OUT: dz_out, kconv.BUF_MID: dz_mid}
    dx, weight_grads, bias_grads = None, [None] * len(plan.problems), [None] * len(plan.problems)
    bn_launches = plan.backward_launches(launches, raw_out, raw_mid, grad_out) if x.shape[0] else ()
    for stage, (reduce, bn_backward) in reversed(list(zip(plan.stages, bn_launches))):
        reduced = sums
        if stage.bn_parts:
            reduce(gammas, betas, saved, sums, raw_out, raw_mid, grad_out, d_mid, raw_out, raw_mid)
            if group is not None:  # synchronised BN: the input gradient needs the global sums
                reduced = sums.clone()  # (the parameter gradients keep the local ones, as SyncBatchNorm's)
                _all_reduce(reduced, group)  # this stage's columns are read; the others are small
        if stage.gemm_parts:
            bn_backward(gammas, betas, saved, reduced, raw_out, raw_mid, grad_out, d_mid, dz_out, dz_mid)
        for j in reversed(range(len(stage.problems))):
            p, index = stage.problems[j], stage.first_problem + j
            row = p.row
            pool = p.pool
            if not p.gemm:  # a pool alone: its gradient goes straight to the input
                if need_x:
                    grad = _columns(grads_of, row, 0, p.ncols)
                    if index in pooled or pool.kind == "max":  # (an average pool's backward needs no indices)
                        indices = (pooled[index] if index in pooled else _pooled(pool, x))[1]
                    else:
                        indices = None
                    dx = _accumulate(dx, _pool_backward(pool, x, indices, grad))
                continue
            gz = _columns(dz, row, 0, p.ncols)
            if row["res"] == kconv.RES_X:  # relu?(bn?(x + scale * (conv + bias))): x gets the gradient itself
                if need_x:
                    dx = _accumulate(dx, gz.clone())
                gz = gz * p.scale
            elif row["res"] == kconv.RES_MID:  # a projection shortcut's result in `mid`: its problem (an
                # earlier stage) takes the gradient from d_mid
                d_mid[:, row["res_c"]:row["res_c"] + p.ncols].add_(gz)
                gz = gz * p.scale
            src = row["src"]
            if src == kconv.BUF_X:
                inp, indices = (x, None) if pool is None else _pooled(pool, x)
            else:
                inp = sources[src][:, row["src_c"]:row["src_c"] + row["cin"]]
            need_input = src != kconv.BUF_X or need_x
            weight = weights[index].to(dtype)  # as eager autocast computes the convolutions
            d_inp, d_weight, bias_grads[index] = torch.ops.aten.convolution_backward(
                gz, inp, weight, [p.ncols], [row["sh"], row["sw"]], [row["ph"], row["pw"]], [1, 1], False, [0, 0],
                1, [need_input, True, True])
            weight_grads[index] = d_weight.contiguous()  # the parameters' layout (channels_last inputs give
            # channels_last weight gradients)
            if src == kconv.BUF_X:
                if need_x:
                    dx = _accumulate(dx, d_inp if pool is None else _pool_backward(pool, x, indices, d_inp))
            else:
                grads_of[src][:, row["src_c"]:row["src_c"] + row["cin"]].add_(d_inp)
    if need_x and dx is None:
        dx = torch.zeros_like(x)
    return dx, weight_grads, bias_grads, sums


class TrainFunction(torch.autograd.Function):
    """A block's training forward (fused) and backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, plan, group, memory_format, bns, centers, x, *params):
        out, raw_out, raw_mid, saved, launches = forward(plan, x, params, centers, group, memory_format)
        # The running statistics are updated here, inside the function, as a BatchNorm's own op
        # does: a non-reentrant checkpoint's recompute, which stops once the block's tensors are
        # saved again, updates them a second time, as it does eager BatchNorms'.
        update_running_stats(bns, saved)
        ctx.plan, ctx.group, ctx.launches = plan, group, launches
        ctx.save_for_backward(x, raw_out, raw_mid, saved, out if plan.reads_out else None, *params)
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # no zeros for `saved`'s gradient
        return out, saved

    @staticmethod
    @once_differentiable  # double backward raises instead of treating the kernels' results as constants
    def backward(ctx, grad_out, _):
        x, raw_out, raw_mid, saved, out, *params = ctx.saved_tensors
        plan = ctx.plan
        if grad_out is None:
            grad_out = torch.zeros_like(raw_out)
        dx, weight_grads, bias_grads, sums = backward(plan, ctx.launches, x, raw_out, raw_mid, saved, out, params,
                                                      grad_out, ctx.group, ctx.needs_input_grad[5])
        return (None, None, None, None, None, dx, *plan.param_grads(params, weight_grads, bias_grads, sums))
