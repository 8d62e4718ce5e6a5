"""What each stage launch of a fused model asks of the GPU: programs, K iterations, MACs issued.

From the launches a forward records (codegen.record_launches) and the kernel's tiling rules
(kernels/conv.py: a problem's K loop runs over taps x channel chunks of BLOCK_K, half of it for
fp32, capped by the problem's own chunk (spec field tk); a padded stem's over chunks of BLOCK_K // TAP_CHANNELS taps; a few-channel convolution
flattens K in quarter chunks; a 1x1 of a strided pool loads quarter chunks too), per launch and
autotune config:

- programs at a batch: the launch's grid (sum over problems of ceil(M / BLOCK_M) x
  ceil(ncols / min(BLOCK_N, the problem's tn)), M = batch x output pixels): with 132 SMs, fewer than 66 leaves most of
  an H100 idle;
- the longest program's K iterations (the critical path of a launch with few programs);
- useful and issued MACs: M x ncols x K against the tiles' padded M, N and K;
- split K (kconv.split_counts): where a launch has few programs, its long convolutions run in
  K slices (more programs, shorter ones) and a second launch adds their partial sums ("+r").

`python -m fused_inception.codegen --model googlenet --dtype bf16 --work` prints it (nothing
compiled for it), then what the compiled kernels' K loops cost (fused_inception.sass). (Issue 20
asks for tiles that issue at most 1.15x the useful MACs, and for batch-1 launches of 66 programs
or more or of at most 16 K iterations: this is the measure.)
"""

from fused_inception.kernels import conv as kconv

_FIELD = {name: i for i, name in enumerate(kconv.TABLE_FIELDS)}


def _cdiv(a, b):
    return -(-a // b)


def is_finish(consts):
    """Whether a recorded stage launch is a split stage's second launch (tile_work counts it with
    the first: its problems are KIND_REDUCE and KIND_SKIP)."""
    return all(kconv.spec_field(p, "kind") in (kconv.KIND_REDUCE, kconv.KIND_SKIP) for p in consts["SPEC"])


def problems_of(args, consts, in_channels=None):
    """Per problem of a recorded stage launch: (kind, kh, kw, cin, ncols, output pixels per image,
    its widest N tile, its spec without split K).
    in_channels: the model input's channels, the useful ones of a padded stem (KIND_GEMM_TAPS
    reads kconv.TAP_CHANNELS); None: as the table says."""
    table, tail = args[0], args[12:]
    o_hw, m_hw = tail[7] * tail[8], tail[13] * tail[14]  # (tail: batch, x's 6, out's 6, mid's 6, ...)
    out = []
    for spec, row in zip(consts["SPEC"], table.tolist()):
        f = dict(zip(kconv.SPEC_FIELDS, spec))
        cin = row[_FIELD["cin"]]
        if f["kind"] == kconv.KIND_GEMM_TAPS and in_channels is not None:
            cin = min(cin, in_channels)
        out.append((f["kind"], f["kh"], f["kw"], cin, row[_FIELD["ncols"]],
                    o_hw if f["dst0"] == kconv.BUF_OUT else m_hw, f["tn"], kconv.with_field(spec, "ks", 1)))
    return out


def tile_work(problems, config, batch, fp32=False):
    """(programs, longest program's K iterations, useful MACs, issued MACs, split) of a launch's
    problems under a triton.Config at `batch`; split: whether the stage splits K there (then
    `programs` counts the K slices' launch, and a second launch follows)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    bk = bk // 2 if fp32 else bk
    ks = kconv.split_counts([p[7] for p in problems], [batch * p[5] for p in problems], [p[4] for p in problems],
                            [p[3] for p in problems], fp32)
    programs = longest = useful = issued = 0
    for (kind, kh, kw, cin, ncols, hw, tn, spec), slices in zip(problems, ks):
        m = batch * hw
        bn_p = min(bn, tn)  # (the problem's N tile)
        tiles_m, tiles_n = _cdiv(m, bm), _cdiv(ncols, bn_p)
        programs += tiles_m * tiles_n * slices
        if kind == kconv.KIND_POOL:
            continue
        if kind == kconv.KIND_GEMM:  # (chunks of the config's K chunk, capped by the problem's tk)
            chunk = kconv.k_chunk(spec, fp32, config.kwargs["BLOCK_K"])
            k, iters = kh * kw * cin, kh * kw * _cdiv(cin, chunk)
        elif kind == kconv.KIND_GEMM_TAPS:  # chunks of BLOCK_K // TAP_CHANNELS taps
            k, iters, chunk = kh * kw * cin, _cdiv(kh * kw * kconv.TAP_CHANNELS, bk), bk
        elif kind == kconv.KIND_GEMM_FLAT:
            k, chunk = kh * kw * cin, bk // 4
            iters = _cdiv(k, chunk)
        else:  # a 1x1 of a strided pool: quarter chunks of the channels
            k, chunk = cin, bk // 4
            iters = _cdiv(cin, chunk)
        longest = max(longest, _cdiv(iters, slices))
        useful += m * ncols * k
        issued += tiles_m * bm * tiles_n * bn_p * iters * chunk
    return programs, longest, useful, issued, max(ks) > 1


def describe(problems):
    names = {kconv.KIND_GEMM: "", kconv.KIND_GEMM_FLAT: " flat", kconv.KIND_POOLED_GEMM: " pooled",
             kconv.KIND_GEMM_TAPS: " padded"}
    return ", ".join(f"pool {cin}" if kind == kconv.KIND_POOL else f"{kh}x{kw}{names.get(kind, f' kind {kind}')} "
                     f"{cin}->{ncols}"
                     for kind, kh, kw, cin, ncols, *_ in problems)


def work_table(launches, batches=(1, 32, 256), in_channels=None):
    """Markdown rows, one per stage launch and config it may run under (recorded at batch 1;
    the counts scale with the batch)."""
    rows = ["| launch | problems | config | programs at batch " + "/".join(map(str, batches)) +
            " (+r: split K, a reduction launch follows) | longest K iterations at batch " + "/".join(map(str, batches)) +
            " | useful / issued MACs at batch " + str(batches[-1]) + " |",
            "|---|---|---|---|---|---|"]
    for i, (kernel, args, consts, configs) in enumerate(launches):
        if "SPEC" not in consts or "LAYOUT" not in consts or is_finish(consts):  # (BatchNorm launches: elementwise)
            continue
        problems = problems_of(args, consts, in_channels)
        fp32 = args[4].element_size() > 2
        for config in configs:
            per_batch = [tile_work(problems, config, b, fp32) for b in batches]
            _, _, useful, issued, _ = per_batch[-1]
            rows.append(f"| {i} | {describe(problems)} | {kconv.config_name(config)} | "
                        f"{'/'.join(str(w[0]) + ('+r' if w[4] else '') for w in per_batch)} | "
                        f"{'/'.join(str(w[1]) for w in per_batch)} | {useful / max(issued, 1):.0%} |")
    return rows
