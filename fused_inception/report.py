"""The fusion report: per block of an Inception network, eager vs fused launches, bytes moved, error, time.

`python -m fused_inception --help` runs it; `--model timm/<name>` reports on a timm model fused by
fuse() (timm is an optional dependency). The fused model and its reference share one state_dict
and one input; each reference block is run on the input the fused block received, so its error
is its own (the whole-network row compares logits end to end).

Bytes moved is a model, not a measurement: every tensor an operator reads or writes crosses DRAM
once (eager: conv reads input and weights and writes its output, BN and activation read and write it
again, a pool reads and writes, cat reads every branch and writes the block; fused: each stage
reads each source slice and weight once and writes each result once). Caches make both smaller
on a real GPU; the ratio is the point.
"""

import argparse
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from fused_inception.blocks import FusedBlock, build_plans
from fused_inception.kernels import conv as kconv
from fused_inception.launches import count_launches, count_torch_kernels

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def informative_init_(model, seed=0):
    """Random He-normal weights and random BN statistics (in place; returns model).

    torchvision's GoogLeNet init (std 0.01) makes deep activations vanish, so the logits are
    nearly the fc bias and any kernel error would hide; this keeps activations O(1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def stage_traffic(layout, x_shape, elem_size):
    """Per stage of a plan's layout (`plan.layout`), (FLOPs, bytes) of one fused forward on an
    input of x_shape: 2 * M * ncols * K per GEMM (M = output pixels); each problem reads its
    source slice and its weights once and writes its result once, and a residual head also reads
    what it adds (the block input or the shortcut's result). The fused half of `traffic`, per
    stage: what bench/quick.py's stage profile sets each stage's time against.

    Example:
        >>> [(flops, nbytes)] = stage_traffic(block.plan().layout, (1, 192, 28, 28), 2)[:1]
    """
    n, _, h, w = x_shape
    (oh, ow), (mh, mw) = layout.sizes(h, w)
    sizes = {kconv.BUF_X: (h, w), kconv.BUF_OUT: (oh, ow), kconv.BUF_MID: (mh, mw)}  # per buffer (row src, dst0)
    work = []
    for problems in layout.stages:
        flops = elems = 0
        for p in problems:
            row = p.row
            ih, iw = sizes[row["src"]]
            m = n * sizes[row["dst0"]][0] * sizes[row["dst0"]][1]
            elems += n * row["cin"] * ih * iw + m * p.ncols
            if p.gemm:
                flops += 2 * m * p.ncols * p.k
                elems += p.k * p.ncols
            if row["res"] != kconv.RES_NONE:
                elems += m * p.ncols
        work.append((flops, elems * elem_size))
    return work


def traffic(block, x_shape, elem_size):
    """(eager bytes, fused bytes) moved by one forward of a FusedBlock on an input of x_shape
    (the fused bytes: `stage_traffic` summed over the stages)."""
    graph, plan = block.graph(), block.plan()
    n, _, h, w = x_shape
    (oh, ow), _ = plan.sizes(h, w)
    eager = 0
    hw = plan.node_sizes(h, w)
    couts = graph.channels()
    for i, node in enumerate(graph.nodes):
        cin = graph.in_channels if node.src is None else couts[node.src]
        ih, iw = (h, w) if node.src is None else hw[node.src]
        inp, out = n * cin * ih * iw, n * couts[i] * hw[i][0] * hw[i][1]
        if node.pool is not None:  # read the input, write the pooled map (its size, for a 1x1 after it)
            pooled = n * cin * hw[i][0] * hw[i][1]
            eager += inp + pooled
            inp = pooled
        if node.conv is not None:
            eager += inp + node.conv.weight.numel() + out
        eager += 2 * out * ((node.bn is not None) + (node.act is not None))  # BN, activation: read and write
    cat_h, cat_w = hw[graph.outputs[0]]
    cat_elems = n * sum(couts[i] for i in graph.outputs) * cat_h * cat_w
    if len(graph.outputs) > 1:
        eager += 2 * cat_elems  # cat: read the branches, write the block
    if graph.head is not None:  # conv reads the cat; mul; add reads x (or the shortcut's) too; BN?; activation?
        head = graph.head
        n_out = n * head.out_channels * oh * ow
        eager += cat_elems + head.conv.weight.numel() + n_out + 2 * n_out + 3 * n_out
        eager += 2 * n_out * ((head.bn is not None) + (head.act is not None))
        if head.shortcut is not None:  # the projection reads x, writes its result
            eager += n * graph.in_channels * h * w + head.shortcut.weight.numel() + n_out
    fused = sum(nbytes for _, nbytes in stage_traffic(plan.layout, x_shape, elem_size))
    return eager * elem_size, fused


def gpu_ms(fn):
    """Median milliseconds of fn() on the GPU (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


@dataclass
class Row:
    name: str
    eager_launches: int
    fused_launches: int
    eager_mb: float
    fused_mb: float
    max_abs_err: float
    max_abs_ref: float
    eager_ms: float = float("nan")
    fused_ms: float = float("nan")


MODELS = {
    # name: (reference, default CPU batch, default CPU size, default CUDA size)
    "googlenet": ("torchvision", 2, 64, 224),
    "inception_v3": ("torchvision", 1, 75, 299),
    "inception_resnet_v2": ("the unfused model (timm's architecture and keys)", 1, 75, 299),
}
TIMM_PREFIX = "timm/"  # --model timm/<any timm model name>: timm's model, fused by fuse()
TIMM_CPU_SIZE = 75  # the smallest input of timm's Inception networks (the interpreter is slow)


def model_name(name):
    """argparse type of --model: a name of MODELS, or timm/<name>."""
    if name in MODELS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return name
    raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(sorted(MODELS))}, "
                                     f"or timm/<name> for any timm model, e.g. timm/inception_v4)")


def import_timm():
    """timm, or a SystemExit that says how to install it (the library itself doesn't need it)."""
    try:
        import timm
    except ImportError:
        raise SystemExit('--model timm/...: timm is not installed; pip install "fused-inception[timm]" '
                         "(or pip install timm)") from None
    return timm


def create_timm_model(name, **kwargs):
    """timm.create_model(name) without pretrained weights, or a SystemExit naming the problem."""
    timm = import_timm()
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise SystemExit(f"--model timm/{name}: {e} (timm.list_models('*inception*') lists the Inceptions)") \
            from None


def defaults(model):
    """(reference, default CPU batch, default CPU size, default CUDA size) of --model."""
    if not model.startswith(TIMM_PREFIX):
        return MODELS[model]
    cfg = create_timm_model(model[len(TIMM_PREFIX):], device="meta").pretrained_cfg
    cuda_size = cfg.get("input_size", (3, 224, 224))[-1]
    return "timm's model, unfused", 1, cuda_size if cfg.get("fixed_input_size") else TIMM_CPU_SIZE, cuda_size


def build_models(model, seed, dtype, device, memory_format, width=1):
    """(reference, fused model, fuse()'s FuseReport or None) with one random state_dict, in eval
    mode, without aux heads.

    GoogLeNet and Inception v3: torchvision's model and ours. Inception-ResNet-v2 (channels divided
    by `width`): the plain PyTorch model and fuse() of a copy of it. `timm/<name>`: timm's model
    and fuse() of a copy of it.
    """
    import copy

    import torchvision

    from fused_inception import models
    from fused_inception.fuse import fuse
    from fused_inception.models.inception_resnet_v2 import InceptionResnetV2

    torch.manual_seed(seed)
    report = None
    if model.startswith(TIMM_PREFIX):
        ref = informative_init_(create_timm_model(model[len(TIMM_PREFIX):]), seed)
        fused, report = fuse(copy.deepcopy(ref))
    elif model == "inception_resnet_v2":
        ref = informative_init_(InceptionResnetV2(width=width), seed)
        fused, report = fuse(copy.deepcopy(ref))
    else:
        ref = getattr(torchvision.models, model)(weights=None, aux_logits=False, init_weights=True)
        ref = informative_init_(ref, seed)
        fused = getattr(models, model)(aux_logits=False)
        fused.load_state_dict(ref.state_dict())
    ref = ref.eval().to(device=device, dtype=dtype, memory_format=memory_format)
    fused = fused.eval().to(device=device, dtype=dtype, memory_format=memory_format)
    return ref, fused, report


def fused_blocks(model):
    """(qualified name, block) of the outermost FusedBlocks of a model, in order."""
    found = []

    def visit(module, prefix):
        for name, child in module.named_children():
            qual = f"{prefix}{name}"
            if isinstance(child, FusedBlock):
                found.append((qual, child))
            else:
                visit(child, qual + ".")

    visit(model, "")
    return found


def run_report(model="googlenet", batch=2, size=64, dtype=torch.float32, device="cpu", seed=0, channels_last=False,
               width=1, fuse_report=None):
    """Compare the fused model against its reference per fused block; returns the rows (last: whole net).

    The fused network runs once: each fused block's input and output are kept (hooks) with the
    launches made inside it, and the reference block is run on that same input, so a block's
    error is its own. `fuse_report`: a list that receives fuse()'s FuseReport when the fused
    model was made by fuse() (Inception-ResNet-v2, timm models)."""
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ref, fused, report = build_models(model, seed, dtype, device, memory_format, width)
    if fuse_report is not None and report is not None:
        fuse_report.append(report)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    timed = device.type == "cuda"
    blocks = fused_blocks(fused)
    build_plans(fused, example=x)  # built (and on a GPU autotuned) outside the counts

    seen = {}  # name -> [input, output, Triton launches, torch kernels] in the whole fused forward

    def before(name, args):
        fused_kernels.paused = True  # (the copies are the report's, not the model's)
        seen[name] = [args[0].clone(), None, kconv.launch_count(), len(fused_kernels.names)]
        fused_kernels.paused = False

    def after(name, output):
        record = seen[name]
        launches, kernels = kconv.launch_count() - record[2], len(fused_kernels.names) - record[3]
        fused_kernels.paused = True
        record[1:] = [output.clone(), launches, kernels]
        fused_kernels.paused = False

    hooks = [h for name, f in blocks
             for h in (f.register_forward_pre_hook(lambda m, a, name=name: before(name, a)),
                       f.register_forward_hook(lambda m, a, out, name=name: after(name, out)))]
    rows = []
    try:
        with torch.no_grad():
            with count_launches() as launches, count_torch_kernels() as fused_kernels:
                logits = fused(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        with count_torch_kernels() as eager_total:
            logits_ref = ref(x)
        for name, f in blocks:
            r = ref.get_submodule(name)
            xin, y, block_launches, block_kernels = seen[name]
            with count_torch_kernels() as eager_k:
                expected = r(xin)
            eager_b, fused_b = traffic(f, xin.shape, xin.element_size())
            row = Row(name, eager_k.value, block_launches + block_kernels, eager_b / 1e6, fused_b / 1e6,
                      (y.float() - expected.float()).abs().max().item(), expected.float().abs().max().item())
            if timed:
                row.eager_ms, row.fused_ms = gpu_ms(lambda: r(xin)), gpu_ms(lambda: f(xin))
            rows.append(row)
        total = Row(f"{model} (whole; MB: blocks only)", eager_total.value, launches.value + fused_kernels.value,
                    sum(r.eager_mb for r in rows), sum(r.fused_mb for r in rows),
                    (logits.float() - logits_ref.float()).abs().max().item(), logits_ref.float().abs().max().item())
        if timed:
            total.eager_ms, total.fused_ms = gpu_ms(lambda: ref(x)), gpu_ms(lambda: fused(x))
        rows.append(total)
    return rows


def format_table(rows, timed):
    head = ["block", "eager launches", "fused launches", "eager MB", "fused MB", "max abs err", "max |ref|"]
    if timed:
        head += ["eager ms", "fused ms", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, str(r.eager_launches), str(r.fused_launches), f"{r.eager_mb:.2f}", f"{r.fused_mb:.2f}",
                 f"{r.max_abs_err:.2e}", f"{r.max_abs_ref:.2e}"]
        if timed:
            cells += [f"{r.eager_ms:.3f}", f"{r.fused_ms:.3f}", f"{r.eager_ms / r.fused_ms:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(
        prog="python -m fused_inception",
        description="Fusion report for GoogLeNet, Inception v3, Inception-ResNet-v2 or any timm model: per fused "
                    "block, eager vs fused kernel launches, modelled bytes moved, max abs error against the "
                    "reference, and time per block on a GPU. Without a GPU the kernels run in Triton's CPU "
                    "interpreter (slow: keep the input small).")
    p.add_argument("--model", default="googlenet", type=model_name,
                   help=f"network to report on: {', '.join(sorted(MODELS))}, or timm/<name> for a timm model "
                        "(e.g. timm/inception_v4; needs timm: pip install \"fused-inception[timm]\"), "
                        "fused by fuse()")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default on CPU: 2 for googlenet, 1 for the others; on CUDA: 32)")
    p.add_argument("--size", type=int, default=None,
                   help="input height and width (default on CPU: 64 for googlenet, 75 for the others; on CUDA: "
                        "224 for googlenet, 299 for the others, a timm model's input size)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model and input dtype")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cuda: Triton on the GPU, timed; cpu: Triton's interpreter; auto: cuda if available")
    p.add_argument("--channels-last", action="store_true", help="run both models and the input in channels_last")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and input")
    p.add_argument("--width", type=int, default=None,
                   help="inception_resnet_v2 only: divide every channel count by this (default: 8 on CPU, 1 on CUDA)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from fused_inception.kernels import conv as kconv

    if device == "cpu" and not kconv.INTERPRETING:
        raise SystemExit("the kernels run on CPU only in Triton's interpreter: "
                         "run with TRITON_INTERPRET=1 (python -m fused_inception does this itself)")
    reference, cpu_batch, cpu_size, cuda_size = defaults(args.model)
    batch = args.batch or (32 if device == "cuda" else cpu_batch)
    size = args.size or (cuda_size if device == "cuda" else cpu_size)
    width = args.width or (1 if device == "cuda" else 8)
    start = time.perf_counter()
    fuse_report = []
    rows = run_report(args.model, batch, size, DTYPES[args.dtype], device, args.seed, args.channels_last, width,
                      fuse_report)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (no timings)"
    shape = f", width 1/{width}" if args.model == "inception_resnet_v2" else ""
    print(f"{args.model} fusion report{shape} (reference: {reference}): input {batch}x3x{size}x{size} {args.dtype}"
          f"{' channels_last' if args.channels_last else ''}, {where}")
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}; launches = Triton launches + "
          "torch kernels (eager: ATen operators that launch a kernel)")
    if fuse_report:
        print(fuse_report[0].summary())
    print(format_table(rows, device == "cuda"))
    print(f"({time.perf_counter() - start:.1f} s)")
    return rows
