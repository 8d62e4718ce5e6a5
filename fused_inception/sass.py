"""The K loops of a kernel compiled for Hopper (sm_90), read from its machine code (SASS), and how
many of its programs an SM holds at once; no GPU needed (the cuobjdump in Triton's wheel reads
the cubin).

A K loop is the innermost backward branch whose body holds an HGMMA (wgmma in SASS). Per loop:

    instrs      static instructions in the body, NOPs excluded
    hgmma       HGMMA instructions; `mma` their 64x128x16-equivalents (a 64xNxK HGMMA counts
                N*K / (128*16): comparable across tile shapes and operand types)
    per_mma     instrs / mma. An SM issues 4 instructions per clock (one per scheduler, i.e. per
                warp of a warpgroup) and a 64x128x16 HGMMA keeps a warpgroup's tensor cores busy
                about 32 clocks: a loop above ~100 instructions per 64x128x16 wgmma per warpgroup
                cannot feed the tensor cores even with perfect overlap, and well below that is
                what leaves room for the address arithmetic, waits and epilogue of real tiles.
    ldgsts      asynchronous global->shared copies (cp.async, LDGSTS): a pipelined loop's loads;
                `ldgsts_16` of them 16 bytes wide (.128), the rest narrower (more of them per byte)
    tma         bulk tensor copies (UTMALDG, UBLKCP)
    ldg         synchronous global loads into registers: the loop waits on memory every
                iteration (nothing hides the latency but other programs on the SM)
    full_wait   'WARPGROUP.DEPBAR.LE gsb0, 0x0': every issued wgmma waited for at once, so the
                next iteration's loads and MMAs don't overlap this one's
    bar         BAR.SYNC, CTA-wide barriers

Per kernel: `registers` per thread (from the cubin) and `programs_per_sm`, the programs an SM
holds at once: its 65536 registers (allocated per warp in units of 256, within the SM's four
quarters) against registers x threads, and its 228 KB of shared memory against each program's
(Triton's dynamic `metadata.shared` plus the cubin's static 1 KB that sm_90 reserves per
program; codegen.MAX_SHARED, 227 KB, is what one program may ask for); the smaller decides.
One program per SM leaves nothing to hide a loop's stalls behind.

`loop_defects(loops, reference)` says which loops miss the marks of a fast K loop: no LDG, no
full wait, and per_mma at most 1.3x the reference for the tile: a plain implicit-GEMM 3x3
convolution compiled by the same Triton with the same tile, warps and dtype
(fused_inception.reference.per_mma, what codegen uses; REFERENCE_PER_MMA holds the bf16 values
measured with the shared SASS tool, which that kernel reproduces within 5%).

Example:
    >>> from fused_inception import sass
    >>> code = sass.kernel_code(compiled)      # a triton CompiledKernel, or cubin bytes
    >>> for loop in code.loops:
    ...     print(loop, sass.loop_defects([loop], sass.reference_per_mma("m128n128k64w8s3")))
    >>> sass.programs_per_sm(compiled, code)
"""

import dataclasses
import os
import re
import subprocess
import tempfile

SM_REGISTERS = 65536
SM_SHARED = 233472  # 228 KB; a program may ask for 227 KB of it (the last 1 KB is reserved per program)
SM_THREADS = 2048
SM_PROGRAMS = 32
PER_MMA_SLACK = 1.3

# Instructions per 64x128x16-equivalent wgmma in the K loop of a plain implicit-GEMM 3x3
# convolution (bf16, Triton 3.8, sm_90) with the same tile and warps: what a conv loop of that
# tile can cost. Keyed by kernels/conv.py's config names; the pipeline stages don't change the
# loop body's work, so a config differing only in stages takes its tile's entry.
REFERENCE_PER_MMA = {
    "m128n128k64w8s3": 46.5,
    "m128n64k64w4s4": 70.8,
    "m64n128k64w4s4": 51.5,
    "m64n64k64w4s3": 92.0,
}


@dataclasses.dataclass(frozen=True)
class Loop:
    """One K loop of a kernel's SASS (see the module docstring for what each count means)."""
    start: int  # address of the loop's first instruction
    end: int  # address of its backward branch
    instrs: int
    hgmma: int
    mma: float  # 64x128x16-equivalents
    ldgsts: int
    ldgsts_16: int
    tma: int
    ldg: int
    full_wait: int
    bar: int

    @property
    def per_mma(self):
        return round(self.instrs / self.mma, 1)


@dataclasses.dataclass(frozen=True)
class KernelCode:
    """What the cubin says: the K loops, registers per thread, static shared memory in bytes."""
    loops: list
    registers: int
    static_shared: int


def cuobjdump():
    """The path of the cuobjdump in Triton's wheel; FileNotFoundError where it has none."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in Triton's wheel ({path})")
    return path


def dump(cubin):
    """cuobjdump's SASS and resource usage of a cubin (bytes)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump(), "-sass", "-res-usage", path], capture_output=True, text=True,
                             check=True)
    return out.stdout


def _instructions(sass):
    """[(address, instruction without its predicate)]"""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())))
    return out


def _backward_branches(ins):
    """(target, address) of every branch to an earlier address."""
    for addr, text in ins:
        m = re.match(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            yield int(m.group(1), 16), addr


def _mma_equivalents(text):
    m = re.match(r"HGMMA\.64x(\d+)x(\d+)", text)
    return int(m.group(1)) * int(m.group(2)) / (128 * 16) if m else 1.0


def _count(body, pattern):
    return sum(bool(re.match(pattern, t)) for t in body)


def _loop(start, end, body):
    real = [t for t in body if not t.startswith("NOP")]
    mma = [t for t in real if t.startswith("HGMMA")]
    return Loop(start=start, end=end, instrs=len(real), hgmma=len(mma), mma=sum(map(_mma_equivalents, mma)),
                ldgsts=_count(real, r"LDGSTS\b"), ldgsts_16=_count(real, r"LDGSTS\S*\.128\b"),
                tma=_count(real, r"(UTMALDG|UBLKCP)\b"), ldg=_count(real, r"LDG(\.|\s|$)"),
                full_wait=_count(real, r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b"), bar=_count(real, r"BAR\.SYNC\b"))


def parse_loops(sass):
    """The innermost loops holding an HGMMA in SASS text, in address order."""
    ins = _instructions(sass)
    spans = [(lo, hi) for lo, hi in _backward_branches(ins)
             if any(lo <= a <= hi and t.startswith("HGMMA") for a, t in ins)]
    inner = sorted(s for s in set(spans) if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans))
    return [_loop(lo, hi, [t for a, t in ins if lo <= a <= hi]) for lo, hi in inner]


def _resource(sass, name):
    m = re.search(rf"\b{name}:(\d+)", sass)
    if not m:
        raise ValueError(f"cuobjdump reported no {name} usage")
    return int(m.group(1))


def kernel_code(compiled):
    """KernelCode of a Triton CompiledKernel (its asm["cubin"]) or of cubin bytes."""
    cubin = compiled if isinstance(compiled, (bytes, bytearray)) else compiled.asm["cubin"]
    sass = dump(cubin)
    return KernelCode(parse_loops(sass), _resource(sass, "REG"), _resource(sass, "SHARED"))


def kernel_loops(compiled):
    """The K loops (Loop) of a Triton CompiledKernel or of cubin bytes.

    Example:
        >>> [loop.per_mma for loop in kernel_loops(compiled)]
        [20.0]
    """
    return kernel_code(compiled).loops


def occupancy(compiled, code=None):
    """{limit: programs per SM} for a CompiledKernel: by "registers", "shared", "threads"."""
    code = code or kernel_code(compiled)
    warps = compiled.metadata.num_warps
    per_warp = -(-code.registers * 32 // 256) * 256
    shared = compiled.metadata.shared + code.static_shared
    return {"registers": 4 * (SM_REGISTERS // 4 // per_warp) // warps,
            "shared": SM_SHARED // shared if shared else SM_PROGRAMS,
            "threads": min(SM_THREADS // (32 * warps), SM_PROGRAMS)}


def programs_per_sm(compiled, code=None):
    """How many programs of this CompiledKernel an SM runs at once (the tightest limit of
    `occupancy`). `code`: its kernel_code, if already read."""
    return min(occupancy(compiled, code).values())


def reference_per_mma(config_name):
    """REFERENCE_PER_MMA of a config name ("m64n64k64w4s3"), matched without the stages when
    only those differ; None for a tile it has no reference for."""
    if config_name in REFERENCE_PER_MMA:
        return REFERENCE_PER_MMA[config_name]
    tile = re.sub(r"s\d+$", "", config_name or "")
    return next((v for k, v in REFERENCE_PER_MMA.items() if re.sub(r"s\d+$", "", k) == tile), None)


def loop_defects(loops, reference=None):
    """What each loop misses of a fast K loop, as strings naming the loop: LDG in it, a full
    wait, more than PER_MMA_SLACK x `reference` instructions per 64x128x16 wgmma (unchecked
    when `reference` is None). Empty when every loop meets them."""
    out = []
    for loop in loops:
        where = f"loop {loop.start:#x}"
        if loop.ldg:
            out.append(f"{where}: {loop.ldg} LDG (waits on memory)")
        if loop.full_wait:
            out.append(f"{where}: {loop.full_wait} full wgmma wait (no MMA overlap)")
        if reference is not None and loop.per_mma > PER_MMA_SLACK * reference:
            out.append(f"{where}: {loop.per_mma} instrs/wgmma > {PER_MMA_SLACK} x {reference}")
    return out
