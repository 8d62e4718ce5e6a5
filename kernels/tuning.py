"""The autotuner's picks, remembered across processes: a small JSON file per GPU model, Triton
version and kernel source.

Triton's disk cache keeps compiled kernels, not which config the autotuner chose: every new
process would benchmark every stage again. A tuned launch (kconv.CachedLaunch) asks `lookup`
before tuning and tells `remember` what it picked. The file for a (GPU name, Triton version,
kernel source hash) lives in Triton's cache directory (`triton.knobs.cache.dir`, which follows
TRITON_CACHE_DIR), under `fused_inception/`, named by a hash of the three and holding them too:
a pick is never reused on another GPU model, another Triton or a changed kernel. Plain data
(JSON, no pickle). A file that can't be read or doesn't say what it should (corrupt, truncated,
another format) is ignored with a warning and rewritten; writes go to a temporary file renamed
over the old one (atomic: a concurrent reader sees the old file or the new one). Two processes
tuning at once each merge what is on disk before they write; a pick written between that read and
the rename is lost and tuned again later.

FUSED_INCEPTION_CONFIG (kconv.pin_config) still pins: pinned launches neither read nor write.
FUSED_INCEPTION_TUNING=0 turns the file off (every process tunes again).

Example: `python -m fused_inception.warmup ...` in one process, then any process with the same
GPU, Triton and library finds every pick and benchmarks nothing.
"""

import hashlib
import json
import os
import tempfile
import threading
import warnings

import torch
import triton

FORMAT = 1
_lock = threading.Lock()
_loaded = {}  # path -> picks (dict), read once per process


def enabled():
    return os.environ.get("FUSED_INCEPTION_TUNING", "1") != "0"


def device_name(device):
    """What a pick is kept for: the GPU's name ("NVIDIA H100 80GB HBM3"), "cpu" otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cache_dir():
    """Triton's cache directory (TRITON_CACHE_DIR or its default), where the picks live."""
    knobs = getattr(triton, "knobs", None)
    directory = getattr(getattr(knobs, "cache", None), "dir", None) if knobs is not None else None
    return directory or os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def _identity(device, kernel):
    # (JITFunction.cache_key: a hash of the kernel's source and of the functions it calls)
    source = getattr(kernel, "cache_key", None) or getattr(kernel, "__name__", "kernel")
    return {"format": FORMAT, "gpu": device_name(device), "triton": triton.__version__, "source": source}


def path_for(device, kernel):
    ident = _identity(device, kernel)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), "fused_inception", f"tuning-{digest}.json"), ident


def _read(path, ident, warn=True):
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if warn:
            warnings.warn(f"fused_inception: ignoring the autotuning picks in {path} ({e}); they will be rewritten")
        return {}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in ident.items()) or not isinstance(
            data.get("picks"), dict) or not all(isinstance(v, str) for v in data["picks"].values()):
        if warn:
            warnings.warn(f"fused_inception: ignoring the autotuning picks in {path} (not for this GPU, Triton "
                          "and kernel source, or not this format); they will be rewritten")
        return {}
    return data["picks"]


def _picks(path, ident):
    if path not in _loaded:
        _loaded[path] = _read(path, ident)
    return _loaded[path]


def lookup(device, kernel, key):
    """The config name picked before for this tuning key (a string) on this GPU, Triton and
    kernel source, or None."""
    if not enabled():
        return None
    path, ident = path_for(device, kernel)
    with _lock:
        return _picks(path, ident).get(key)


def remember(device, kernel, key, name):
    """Keep `name` as the pick for `key` (written to disk at once, atomically)."""
    if not enabled():
        return
    path, ident = path_for(device, kernel)
    with _lock:
        picks = _picks(path, ident)
        picks[key] = name
        picks.update({k: v for k, v in _read(path, ident, warn=False).items() if k not in picks})  # (others')
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(dict(ident, picks=picks), f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:  # (a read-only cache: tune again next time)
            warnings.warn(f"fused_inception: could not write the autotuning picks to {path} ({e})")


def forget():
    """Drop what this process read (tests; another cache directory)."""
    with _lock:
        _loaded.clear()
