"""Device, torch.distributed and precision: set up once, used by every script.

`setup_dist` picks the device and joins torchrun's process group (NCCL on CUDA, gloo on the CPU),
and on the CPU sets the memory and floating-point modes every script runs under (keep_freed_memory,
flush_denormals); `autocast` and `set_tf32` decide the numerics; `peak_flops` is the device's
data-sheet peak for MFU.
"""

import ctypes
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt_interventions.errors import UsageError


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    kept_freed_memory: bool = False  # keep_freed_memory() took effect (CPU, glibc)
    flushed_denormals: bool = False  # flush_denormals() took effect on every intra-op thread (CPU)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return device_type_of(self.device)


def device_type_of(device):
    """"cuda" for cuda or cuda:N, else "cpu": what autocast and the kernels' choices key on."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def setup_dist(device="auto"):
    """Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device={device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA device is available; use --device=cpu")
    kept = device == "cpu" and keep_freed_memory()
    flushed = device == "cpu" and flush_denormals()
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, device, kept, flushed)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device, kept, flushed)


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


def flush_denormals():
    """On the CPU: flush denormal floats to zero (x86's FTZ and DAZ) on this thread and on every
    intra-op thread, so that no CPU run crawls through them.

    A float32 below 2**-126 (1.2e-38) in magnitude is denormal, and x86 cores compute on one in
    microcode, up to 100x slower. PyTorch's default init with a tied head (the story's weight-tying
    run) gives logits of std about 28, so softmax probabilities, and the head's gradient with them,
    fall below that: the tied tiny step ran 20x slower than the untied one (BENCHMARKS.md).
    torch.set_flush_denormal sets the mode of the calling thread only. Threads started later
    inherit it, but OpenMP's pool of intra-op threads (which PyTorch, MKL, oneDNN and compiled
    kernels all share) may already be running, after any parallel op; so the same call also runs
    once on every thread of that pool, through the OpenMP runtime's GOMP_parallel (GNU's libgomp;
    LLVM's and Intel's runtimes export it too). The pool only grows from this thread afterwards.
    Numbers change only where a denormal appears: it reads and is written as zero (float32 and
    bfloat16 alike; float16 math on the CPU runs in float32 and is unaffected). CUDA kernels never
    see this mode. Returns whether every thread's probe below flushed: False where the runtime
    could not be reached (no /proc, another runtime) or the CPU has no such mode.
    """
    if not torch.set_flush_denormal(True):
        return False
    runtime = _openmp_runtime()
    if runtime is not None:
        on_each_thread = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
        runtime.GOMP_parallel(on_each_thread, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))
    return denormals_flushed()


def _openmp_runtime():
    """The OpenMP runtime loaded in this process (the one PyTorch uses), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/lib" in line})
    except OSError:
        return None
    for path in paths:
        if os.path.basename(path).startswith(("libgomp", "libomp", "libiomp5")):
            lib = ctypes.CDLL(path)  # already loaded: the same handle
            if hasattr(lib, "GOMP_parallel"):
                return lib
    return None


def denormals_flushed():
    """Whether every intra-op thread flushes denormals: a product of two normal floats that is
    denormal (1e-30 * 1e-10), computed in parallel over enough elements that each thread takes a
    share (PyTorch splits elementwise ops in grains of 32,768), comes out zero everywhere."""
    x = torch.full((2**16 * torch.get_num_threads(),), 1e-30, dtype=torch.float32)
    return not (x * 1e-10).any().item()


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


def set_deterministic(enabled, device_type, compiled):
    """--deterministic: the same run gives the same bits again, where PyTorch can promise it.

    On CUDA: deterministic algorithms (an op without one raises rather than runs), cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG, set before the first matmul), cuDNN without autotuning, and
    attention on the math backend (the fused backends' backward passes accumulate in a varying
    order). torch.compile's generated kernels carry no such promise, so it is refused. On the CPU
    PyTorch's kernels are deterministic already (on a machine under varying load, see docs/training.md).
    Speed costs on a GPU are measured in BENCHMARKS.md where a GPU was available."""
    if not enabled:
        return
    if device_type == "cuda" and compiled:
        raise UsageError("--deterministic=True cannot promise bitwise runs of compiled kernels; add --compile=False")
    if device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.use_deterministic_algorithms(True)


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
