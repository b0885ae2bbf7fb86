"""What every script needs: errors, config CLI, distributed setup, precision, checkpoints.

Scripts stay thin: they declare a config dataclass, call `parse_config`, and wrap `main` in
`run_main` so that bad input is one line on stderr and exit status 2, never a traceback.
"""

import ctypes
import dataclasses
import difflib
import errno
import json
import os
import platform
import re
import subprocess
import sys
import tomllib
import typing
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# errors


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2, nothing written."""


class RunError(Exception):
    """A run that cannot go on (diverged): printed as one line, exit status 1."""


def run_main(main, argv=None):
    """Call main(argv); turn UsageError into one line and exit 2, RunError and a full or read-only
    disk into one line and exit 1."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UsageError, RunError) as e:
        one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")  # an argument can hold a newline
        print(f"error: {one_line}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # anything else is a bug: traceback
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where} ({e.strerror}); free space or choose another output directory, "
              "then run again", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# config dataclasses <-> command line and TOML presets


def field(default, help, choices=None):
    """A dataclass field with one line of help (shown by --help) and optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _convert(name, text, typ):
    """Parse a command-line string into the field's declared type."""
    if typ is bool:
        low = str(text).lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--{name} expects True or False, got {text!r}")
    try:
        if typ is int:
            f = float(text)  # accept 1e6 and 1_000_000 alike, but only whole numbers
            if not f.is_integer():
                raise ValueError
            return int(f)
        if typ is float:
            return float(text)
    except (ValueError, OverflowError):
        raise UsageError(f"--{name} expects {typ.__name__}, got {text!r}") from None
    return str(text)


def _check_value(name, value, typ, choices):
    """Type-check a value coming from TOML (already typed) and the allowed choices."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"{name} expects {typ.__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def config_fields(classes):
    """Map flag name -> (class, dataclasses.Field, type) over several dataclasses (names unique)."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert f.name not in out, f"flag --{f.name} defined twice"
            out[f.name] = (cls, f, hints[f.name])
    return out


def format_help(classes, prog, usage):
    lines = [f"usage: {prog} {usage}", ""]
    for cls in classes:
        lines.append(f"{cls.__name__}:")
        for f in fields(cls):
            doc = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                doc += f" ({' | '.join(map(str, choices))})"
            lines.append(f"  --{f.name}={f.default!s}".ljust(36) + f" {doc}")
        lines.append("")
    return "\n".join(lines)


def markdown_table(classes):
    """The flags as a Markdown table (README.md holds this; a test keeps the two equal)."""
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for cls in classes:
        for f in fields(cls):
            doc = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                doc += f" ({' / '.join(map(str, f.metadata['choices']))})"
            lines.append(f"| `--{f.name}` | `{f.default}` | {doc} |")
    return "\n".join(lines)


def split_flags(argv):
    """Split argv into positionals and an ordered list of (name, value-or-None) flags."""
    positionals, flags = [], []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flags.append((name, value if eq else None))
        else:
            positionals.append(arg)
    return positionals, flags


def load_preset(path):
    if not os.path.isfile(path):
        raise UsageError(f"preset {path} not found; presets live in config/ (e.g. config/tiny.toml)")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"preset {path} is not valid TOML: {e}") from None


def parse_config(argv, classes, prog, usage, bases=None, max_positionals=0):
    """Resolve config: defaults (or `bases`) < TOML presets (*.toml positionals) < --flags.

    Returns (list of config instances, other positionals, set of names set explicitly).
    Every dataclass field is a flag; flags are typed from the dataclass annotations.
    """
    table = config_fields(classes)
    positionals, flags = split_flags(argv)
    if any(name in ("help", "h") for name, _ in flags) or "-h" in positionals:
        print(format_help(classes, prog, usage))
        sys.exit(0)
    values = {}
    for base in bases or []:
        values.update(dataclasses.asdict(base))
    presets = [p for p in positionals if p.endswith(".toml")]
    others = [p for p in positionals if not p.endswith(".toml")]
    if len(others) > max_positionals:
        raise UsageError(f"unexpected argument {others[max_positionals]!r}; usage: {prog} {usage}")
    explicit = set()
    for path in presets:
        for name, value in load_preset(path).items():
            if name not in table:
                raise UsageError(f"preset {path}: unknown key {name!r}{_suggest(name, table)}")
            _, f, typ = table[name]
            values[name] = _check_value(f"preset {path}: {name}", value, typ, f.metadata.get("choices"))
            explicit.add(name)
    for name, text in flags:
        if name not in table:
            raise UsageError(f"unknown flag --{name}{_suggest(name, table)}; see --help")
        _, f, typ = table[name]
        if text is None:
            if typ is not bool:
                raise UsageError(f"--{name} needs a value: --{name}=VALUE")
            text = "True"
        value = _convert(name, text, typ)
        values[name] = _check_value(f"--{name}", value, typ, f.metadata.get("choices"))
        explicit.add(name)
    configs = []
    for cls in classes:
        kwargs = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        configs.append(cls(**kwargs))
    return configs, others, explicit


def _suggest(name, table):
    close = difflib.get_close_matches(name, list(table), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# distributed and device


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    kept_freed_memory: bool = False  # keep_freed_memory() took effect (CPU, glibc)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"


def setup_dist(device="auto"):
    """Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device={device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA device is available; use --device=cpu")
    kept = device == "cpu" and keep_freed_memory()
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, device, kept)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device, kept)


def keep_freed_memory():
    """On the CPU: have glibc keep freed memory for reuse rather than hand it back to the kernel.

    A CPU step allocates and frees tensors of tens to hundreds of MB (the (B, T, vocab) logits and
    their gradient). Above glibc's mmap threshold (32 MiB at most by default) every one is a fresh
    mmap whose pages the kernel zeroes on first touch: over half of the tiny model's step was that
    system time (BENCHMARKS.md). Raising the mmap and trim thresholds to their maximum lets the
    heap reuse the blocks. Numbers are unchanged; the process keeps its peak memory instead of
    returning it, and fragmentation can take it past that peak when tensor sizes vary.
    Returns whether both settings took: False without glibc's mallopt (macOS, musl), and where
    an older glibc refuses an mmap threshold above 32 MiB; then nothing else changes.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    most = ctypes.c_int(2**31 - 1)  # mallopt takes an int
    trim = mallopt(M_TRIM_THRESHOLD, most)  # set even if the next one is refused: harmless alone
    return bool(mallopt(M_MMAP_THRESHOLD, most)) and bool(trim)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def teardown_dist():
    """After a clean finish: wait until every rank is done, then destroy the process group.

    The barrier means no rank tears gloo down while a peer still talks to it (a rank could die
    with SIGABRT at exit). Call it only on success: after an error on one rank the others may sit
    in a collective, and a barrier or destroy would hang; the process exit cleans up instead.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device_type, dtype):
    """Mixed-precision context: autocast for bf16/fp16, nothing for fp32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=PTDTYPE[dtype])


def set_tf32(enabled):
    """TF32 matmuls on Ampere+ GPUs; no effect on CPU."""
    torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"


# peak dense tensor throughput in FLOP/s, from the vendors' data sheets (no sparsity)
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12, ("H100", "bfloat16"): 989e12, ("A100", "bfloat16"): 312e12,
    ("A10", "bfloat16"): 125e12, ("L4", "bfloat16"): 121e12, ("4090", "bfloat16"): 165e12,
    ("3090", "bfloat16"): 71e12,
    ("H200", "float32"): 494e12, ("H100", "float32"): 494e12, ("A100", "float32"): 156e12,  # TF32
    ("A10", "float32"): 62.5e12, ("L4", "float32"): 60e12, ("4090", "float32"): 82.6e12,
    ("3090", "float32"): 35.6e12,
}
PEAK_FLOPS.update({(gpu, "float16"): v for (gpu, dt), v in list(PEAK_FLOPS.items()) if dt == "bfloat16"})


def peak_flops(device, dtype):
    """Peak FLOP/s of this device at this dtype, or None when unknown (a CPU, an unlisted GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for (gpu, dt), value in PEAK_FLOPS.items():
        if gpu in name and dt == dtype:
            return value
    return None


# ----------------------------------------------------------------------------------------------
# checkpoints: plain data, atomic writes


def atomic_write(path, write_fn):
    """Write through a temp file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact and at worst a stray .tmp file, which is
    never read as a checkpoint.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, ckpt):
    def write(f):
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # torch reports a failed write (ENOSPC, EIO) as a RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    atomic_write(path, write)


def load_checkpoint(path, map_location="cpu"):
    """Load one of our checkpoints with weights_only=True; UsageError naming the file if not."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found")
    try:
        with zipfile.ZipFile(path) as z:  # torch.load does not check the CRCs torch.save writes
            bad = z.testzip()
        if bad is not None:
            raise ValueError(f"CRC mismatch in {bad}")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, corrupted bytes, foreign pickles all land here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path} is unreadable ({msg[:120]}); "
                         "restore it from a backup or start a new run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "gpt-interventions":
        raise UsageError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint version {ckpt.get('version')}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    return ckpt


# ----------------------------------------------------------------------------------------------
# run metadata


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    """Library versions, code version and hardware, recorded beside every result."""
    import numpy
    info = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }
    return info


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
