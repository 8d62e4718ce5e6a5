"""Fused training: batch-statistics BatchNorm in the stage kernels, and the block's backward.

Forward, per stage of the block's layout (see `plan.build_layout`):

    launch 1  conv_stage(TRAIN): every convolution of the stage; each writes its pre-activation
              `raw` into a shadow of its destination (`raw_out`, `raw_mid`) and, with BatchNorm,
              adds the per-channel sum and sum of squares of `raw - running_mean`, and the
              count, into `sums`; without BatchNorm the ReLU'd result goes to its slice of
              `out`/`mid` right away
    launch 2  bn_apply (only if the stage has BatchNorm): statistics -> normalise, affine, ReLU,
              written into the channel slices of `out`/`mid`; mean, 1/std, unbiased variance
              and count saved per channel

plus, per block and step, one `torch.cat` that packs the parameters (conv weights in their own
layout, biases, BN weights) and zeroes the `sums`, and after the launches the running-statistics
update (`_foreach_lerp_` and `_foreach_add_` on the BN buffers, exactly nn.BatchNorm2d's rule).
With SyncBatchNorm the stage's sums are all-reduced between the two launches.

Backward (`backward`), stages in reverse: the intermediate results that later stages read are
recomputed from `raw` (one bn_apply launch per stage), then per stage the BN+ReLU backward in
two launches (per-channel reduction, then the gradient of `raw`), and the convolutions' input,
weight and bias gradients by `aten.convolution_backward` (the eager fallback: one call per merged
GEMM), the pools' by ATen's pool backward. Saved for backward: the block input, `raw` and per-channel statistics
(and the block output, for a block whose branches read another branch's output).
"""

from dataclasses import dataclass
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fused_inception.kernels import batchnorm as kbn
from fused_inception.kernels import conv as kconv
from fused_inception.plan import UnsupportedBlock, build_layout, power_of_two_dividing, problem_spec, table_row


@dataclass
class TrainStage:
    spec: tuple  # kconv.problem_spec per problem (training: `bn` set where BatchNorm follows)
    table: torch.Tensor  # int32 problem table: packed weights ([ncols, K] per problem), global columns
    problems: list  # plan.Problem, in table order
    first_problem: int  # index of problems[0] among all the block's problems
    columns: tuple  # [first, last) column of the stage
    ncols: tuple  # per problem, for conv_stage's grid
    depth: tuple  # per problem: GEMM depth (autotune key)
    splits: tuple  # per problem: (ncols, split), for the BatchNorm launches' grids
    bn_parts: tuple  # kbn.parts of the problems with BatchNorm
    gemm_parts: tuple  # kbn.parts of the convolutions
    mid_parts: tuple  # kbn.parts of the convolutions that go to `mid`


@dataclass
class Slot:
    """A piece of the packed parameter vector: what it holds and where its gradient comes from."""

    kind: str  # "weight", "bias", "gamma" or "beta"
    problem: int  # index of the problem among all the block's problems
    member: object  # node index, "head" or "shortcut" (see member_modules)
    lo: int  # weight: first row of the problem's weight gradient; bias: first column within the
    hi: int  # problem; gamma/beta: global columns [lo, hi)


@dataclass
class TrainPlan:
    """Everything a training forward and backward need besides the input and the parameters."""

    layout: object  # plan.Layout
    stages: list
    problems: list  # every plan.Problem of the block, in order
    columns: int
    slots: list  # Slot per piece of the packed vector, in packing order
    is_param: tuple  # per slot: True if a parameter fills it, False if a constant (absent bias, ...)
    constants: dict  # slot index -> constant tensor (zeros or ones)
    sections: tuple  # element offsets of (biases, gammas, betas, centres, end) in the packed vector
    consts: torch.Tensor  # [2, columns], accumulator dtype: the epilogue's scale (residual scale or 1), BN eps
    zero_sums: torch.Tensor  # zeros packed last (when every piece has the accumulator dtype)
    center_pieces: list  # per member's columns: None (its BatchNorm's running mean) or constant zeros
    bn_columns: list  # (node index, first column, last column) per BatchNorm
    reads_out: bool  # some branch reads another branch's result in the block output

    def refs(self, graph):
        """Per slot, (module, attribute name) of the parameter that fills it, or None where the
        block has none (no conv for a pool, no BatchNorm)."""
        out = []
        for slot in self.slots:
            conv, bn = member_modules(graph, slot.member)
            module = bn if slot.kind in ("gamma", "beta") else conv
            name = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}[slot.kind]
            out.append(None if module is None else (module, name))
        return out

    def pack(self, params, centers=None):
        """The packed vector (one torch.cat): the parameters (those filling slots, in slot order)
        with constants in place of absent ones; for a forward (`centers`: the running means, one
        per BatchNorm in bn_columns order) also the centres per column and zeroed statistics
        accumulators. Returns (packed, sums [columns, 3] or None)."""
        it = iter(params)
        pieces = [(_kernel_layout(next(it)) if slot.kind == "weight" else next(it).reshape(-1)) if is_param
                  else self.constants[i] for i, (slot, is_param) in enumerate(zip(self.slots, self.is_param))]
        if centers is None:
            return torch.cat(pieces), None
        it = iter(centers)
        pieces += [next(it) if zeros is None else zeros for zeros in self.center_pieces]
        acc = self.consts.dtype
        if all(p.dtype == acc for p in pieces):
            pieces.append(self.zero_sums)  # zeroes the statistics accumulators in the same launch
            packed = torch.cat(pieces)
            return packed, packed[-3 * self.columns:].view(self.columns, 3)
        return torch.cat(pieces), torch.zeros(self.columns, 3, dtype=acc, device=self.consts.device)

    def backward_operands(self, params):
        """What a backward needs of the parameters, with one torch.cat: per problem its weight in
        nn.Conv2d's layout ([ncols, cin, kh, kw]: the parameter itself for a single convolution,
        its convolutions' weights stacked for a merged GEMM; None for a pool), and the gammas and
        betas per column."""
        by_problem, pieces, gamma_beta = {}, [], []
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

    def sections_of(self, packed):
        """(weights, biases, gammas, betas, centres) views of a packed vector (centres only in a
        forward's)."""
        b, g, be, c, end = self.sections
        return packed[:b], packed[b:g], packed[g:be], packed[be:c], packed[c:end]

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


def member_modules(graph, member):
    """(conv, BatchNorm) of a problem member: a node index, "head" (the residual head's
    up-projection and the BatchNorm after its add) or "shortcut" (its projection shortcut)."""
    if member == "head":
        return graph.head.conv, graph.head.bn
    if member == "shortcut":
        return graph.head.shortcut, None
    node = graph.nodes[member]
    return node.conv, node.bn


def _kernel_layout(weight):
    """A conv weight [cout, cin, kh, kw] flattened as [cout, kh, kw, cin], the stage kernel's
    K-major order (a view for 1x1 convs and channels_last weights, else a copy)."""
    return weight.permute(0, 2, 3, 1).reshape(-1)


def accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_train_plan(graph, device, dtype, param_dtype):
    """The training plan of `graph` for inputs of `dtype` on `device` and parameters of `param_dtype`."""
    layout = build_layout(graph)
    channels = layout.buffer_channels(graph.in_channels)
    acc = accumulator_dtype(dtype)
    stages, problems, weight_slots, bias_slots, member_columns, bn_columns = [], [], [], [], [], []
    w_offsets = []
    scale, eps = [], []
    w_off = col = 0
    for stage_problems in layout.stages:
        rows, first, first_col = [], len(problems), col
        for p in stage_problems:
            index = len(problems)
            problems.append(p)
            rows.append(table_row(p.row, w_off, p.k if p.gemm else 0, col))
            if p.gemm:
                w_offsets += [w_off, p.k]
                w_off += p.ncols * p.k
            lo = 0
            for member, cout, bn in zip(p.members, p.couts, p.bns):
                if p.gemm:
                    weight_slots.append(Slot("weight", index, member, lo, lo + cout))
                bias_slots.append(Slot("bias", index, member, lo, lo + cout))
                member_columns.append((member, col + lo, col + lo + cout))
                if bn is not None:
                    bn_columns.append((member, col + lo, col + lo + cout))
                scale.append(torch.full((cout,), p.scale, dtype=torch.float64))
                eps.append(torch.full((cout,), bn.eps if bn is not None else 1.0, dtype=torch.float64))
                lo += cout
            col += p.ncols
        stages.append(TrainStage(
            spec=(), table=torch.tensor(rows, dtype=torch.int32, device=device), problems=list(stage_problems),
            first_problem=first, columns=(first_col, col), ncols=tuple(p.ncols for p in stage_problems),
            depth=tuple(p.k for p in stage_problems),
            splits=tuple((p.ncols, p.row["split"]) for p in stage_problems), bn_parts=(), gemm_parts=(),
            mid_parts=(),
        ))
    # What divides every weight offset and row pitch (multiples of 8 in Inception blocks).
    walign = power_of_two_dividing(*w_offsets)
    for stage in stages:
        stage.spec = tuple(problem_spec(p.row, channels, walign) for p in stage.problems)
        stage.bn_parts = kbn.parts(stage.spec, lambda s, dst: kconv.spec_field(s, "bn"))
        stage.gemm_parts = kbn.parts(stage.spec, lambda s, dst: kconv.spec_field(s, "kind") != kconv.KIND_POOL)
        stage.mid_parts = kbn.parts(stage.spec, lambda s, dst: kconv.spec_field(s, "kind") != kconv.KIND_POOL
                                    and dst == kconv.BUF_MID)
    # Packing order: weights (problem by problem), then biases, BN weights, BN biases per column.
    slots = weight_slots + bias_slots + [Slot(kind, -1, member, lo, hi)
                                         for kind in ("gamma", "beta") for member, lo, hi in member_columns]
    columns = col
    plan = TrainPlan(
        layout=layout, stages=stages, problems=problems, columns=columns, slots=slots, is_param=(),
        constants={}, sections=tuple(w_off + i * columns for i in range(5)),
        consts=torch.stack([torch.cat(scale), torch.cat(eps)]).to(device=device, dtype=acc),
        zero_sums=torch.zeros(3 * columns, dtype=acc, device=device),
        center_pieces=[None if (member, lo, hi) in bn_columns else torch.zeros(hi - lo, dtype=param_dtype,
                                                                              device=device)
                       for member, lo, hi in member_columns],
        bn_columns=bn_columns,
        reads_out=any(p.row["src"] == kconv.BUF_OUT for p in problems),
    )
    plan.is_param = tuple(ref is not None and getattr(*ref) is not None for ref in plan.refs(graph))
    for i, (slot, is_param) in enumerate(zip(slots, plan.is_param)):
        if not is_param:  # an absent conv bias or BN affine parameter: a constant in its place
            value = 1.0 if slot.kind == "gamma" else 0.0
            plan.constants[i] = torch.full((slot.hi - slot.lo,), value, dtype=param_dtype, device=device)
    return plan


def _has_mid_columns(row):
    return row["dst0"] == kconv.BUF_MID or (row["dst1"] == kconv.BUF_MID and row["split"] < row["ncols"])


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm and the running statistics


def sync_group(bns):
    """The process group whose statistics a block's BatchNorms share (SyncBatchNorm in a
    distributed run of more than one process), or None."""
    kinds = {isinstance(bn, nn.SyncBatchNorm) for bn in bns}  # (timm's SyncBatchNormAct is one)
    if True not in kinds:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None  # SyncBatchNorm computes as BatchNorm2d
    if len(kinds) > 1:
        raise UnsupportedBlock("the block mixes SyncBatchNorm and BatchNorm2d: convert all of its BatchNorms "
                               "(nn.SyncBatchNorm.convert_sync_batchnorm) or none")
    groups = {id(bn.process_group): bn.process_group for bn in bns}
    if len(groups) > 1:
        raise UnsupportedBlock("the block's SyncBatchNorms use different process groups")
    group = next(iter(groups.values())) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _all_reduce(t, group):
    import torch.distributed as dist

    dist.all_reduce(t, group=group)


def update_running_stats(bns, saved):
    """nn.BatchNorm2d's update of running_mean / running_var / num_batches_tracked from a training
    forward's `saved` statistics (mean, 1/std, unbiased variance, count per column).

    bns: (BatchNorm module, first column, last column) per BatchNorm of the block."""
    with torch.no_grad():
        counters = [bn.num_batches_tracked for bn, _, _ in bns if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        by_momentum = {}
        for bn, lo, hi in bns:
            mean, var = saved[0, lo:hi].to(bn.running_mean.dtype), saved[2, lo:hi].to(bn.running_var.dtype)
            if bn.momentum is None:  # cumulative moving average: weight 1 / num_batches_tracked
                weight = torch.reciprocal(bn.num_batches_tracked.to(bn.running_mean.dtype))
                bn.running_mean.lerp_(mean, weight)
                bn.running_var.lerp_(var, weight)
            else:
                selves, ends = by_momentum.setdefault(bn.momentum, ([], []))
                selves += [bn.running_mean, bn.running_var]
                ends += [mean, var]
        for momentum, (selves, ends) in by_momentum.items():
            torch._foreach_lerp_(selves, ends, momentum)


# ---------------------------------------------------------------------------------------------
# Forward and backward


def forward(plan, x, params, centers, group, memory_format):
    """Run the block in training mode. Returns (out, raw_out, raw_mid, saved); `raw_mid` is
    `raw_out` when the block has no intermediate results. `centers`: the BatchNorms' running
    means (read, not updated)."""
    packed, sums = plan.pack(params, centers)
    weights, biases, gammas, betas, centers = plan.sections_of(packed)
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
    for stage in plan.stages:
        kconv.conv_stage(stage.spec, stage.table, stage.ncols, stage.depth, weights, plan.consts[0], biases, x, out,
                         mid, raw_out, raw_mid, sums, centers)
        if stage.bn_parts:
            if group is not None:
                lo, hi = stage.columns
                _all_reduce(sums[lo:hi], group)
            kbn.bn_apply(stage.table, stage.splits, stage.bn_parts, gammas, betas, centers, plan.consts[1], sums, saved,
                         raw_out, raw_mid, out, mid)
    return out, raw_out, raw_mid, saved


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


def backward(plan, x, raw_out, raw_mid, saved, out, params, grad_out, group, need_x):
    """Gradients of a training forward: (dx or None, weight gradient per problem ([ncols, cin,
    kh, kw], None for pools), bias gradient per problem ([ncols]), BN sums [2, columns])."""
    layout, dtype = plan.layout, raw_out.dtype
    weights, gammas, betas = plan.backward_operands(params)
    acc = plan.consts.dtype

    # The intermediate results, recomputed: the convolutions' from their pre-activations, the
    # pools' (a pool-only branch feeding a residual block's up-projection) from the input.
    mid, pooled = raw_mid, {}
    if layout.mid_channels:
        mid = torch.empty_like(raw_mid)
        for stage in plan.stages:
            if stage.mid_parts:
                kbn.bn_apply(stage.table, stage.splits, stage.mid_parts, gammas, betas, gammas, plan.consts[1], saved, saved,
                             raw_out, raw_mid, raw_out, mid, recompute=True)
        for index, p in enumerate(plan.problems):
            if not p.gemm and _has_mid_columns(p.row):
                pooled[index] = _pooled(layout.geometry[p.members[0]][1], x)
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
    for stage in reversed(plan.stages):
        reduced = sums
        if stage.bn_parts:
            kbn.bn_backward_reduce(stage.table, stage.splits, stage.bn_parts, gammas, betas, saved, sums, raw_out, raw_mid,
                                   grad_out, d_mid)
            if group is not None:  # synchronised BN: the input gradient needs the global sums
                reduced = sums.clone()  # (the parameter gradients keep the local ones, as SyncBatchNorm's)
                _all_reduce(reduced, group)  # this stage's columns are read; the others are small
        if stage.gemm_parts:
            kbn.bn_backward(stage.table, stage.splits, stage.gemm_parts, gammas, betas, saved, reduced, raw_out, raw_mid,
                            grad_out, d_mid, dz_out, dz_mid)
        for j in reversed(range(len(stage.problems))):
            p, index = stage.problems[j], stage.first_problem + j
            row = p.row
            pool = None if p.members in (("head",), ("shortcut",)) else layout.geometry[p.members[0]][1]
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
        out, raw_out, raw_mid, saved = forward(plan, x, params, centers, group, memory_format)
        # The running statistics are updated here, inside the function, as a BatchNorm's own op
        # does: a non-reentrant checkpoint's recompute, which stops once the block's tensors are
        # saved again, updates them a second time, as it does eager BatchNorms'.
        update_running_stats(bns, saved)
        ctx.plan, ctx.group = plan, group
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
        dx, weight_grads, bias_grads, sums = backward(plan, x, raw_out, raw_mid, saved, out, params, grad_out,
                                                      ctx.group, ctx.needs_input_grad[5])
        return (None, None, None, None, None, dx, *plan.param_grads(params, weight_grads, bias_grads, sums))
