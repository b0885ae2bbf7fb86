"""bench.py and the speed flags: MFU arithmetic, the benchmark's output, and flags that change
speed but not results (pad_vocab, compile)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import bench
import eval as eval_script
import train
from gpt_interventions import device, formats
from gpt_interventions.errors import run_main
from helpers import ROOT, curve, make_shards, tiny_flags
from model import GPT, GPTConfig

ODD_VOCAB = 250  # pads to 256: pad_vocab really adds rows


def test_peak_flops_table_and_unknown_devices(monkeypatch):
    assert device.peak_flops("cpu", "bfloat16") is None  # a CPU: no invented number
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert device.peak_flops("cuda:0", "bfloat16") == 989e12
    assert device.peak_flops("cuda:0", "float32") == 494e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert device.peak_flops("cuda:0", "bfloat16") is None


def test_mfu_of_gpt2_small_at_the_goal_rate():
    # 124M at 450k tokens/s on one H100 in bf16 is the 45% MFU goal, by the same arithmetic
    with torch.device("meta"):
        model = GPT(GPTConfig(qkv_bias=True, tie_weights=True))
    assert model.flops_per_token() * 450_000 / 989e12 == pytest.approx(0.389, abs=1e-3)
    with torch.device("meta"):
        padded = GPT(GPTConfig(qkv_bias=True, tie_weights=True, pad_vocab=True))
    assert padded.config.padded_vocab == 50304
    assert padded.num_params() - model.num_params() == 47 * 768  # the padding rows are counted


def test_bench_prints_every_field_and_writes_a_profile(tmp_path, capsys):
    run_main(bench.main, ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=256",
                          "--batch_size=4", "--total_batch_size=256", "--compile=False", "--dtype=float32",
                          "--device=cpu", "--steps=2", "--warmup=1", f"--profile={tmp_path / 'prof'}"])
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert set(lines) == {"model", "step", "tokens/s", "ms/step", "cpu", "mfu", "memory", "loader", "eval", "profile"}
    assert float(lines["tokens/s"].replace(",", "")) > 0 and float(lines["ms/step"]) > 0
    assert lines["mfu"] == "n/a (no known peak throughput for cpu)"
    assert float(lines["cpu"].split()[0]) > 0 and lines["cpu"].endswith("denormals flushed to zero: yes")
    assert lines["step"].startswith("256 tokens = 1 ranks x 2 x 4 x 32")
    assert lines["eval"].endswith("(16 windows, batch 4)")  # as many tokens as 2 timed steps of 256
    if platform.libc_ver()[0] == "glibc":
        assert lines["memory"].endswith("freed memory kept for reuse: yes")
    with open(tmp_path / "prof" / "trace.json") as f:
        assert json.load(f)["traceEvents"]


def test_bench_takes_a_story_run_directory_as_train_py_does(capsys):
    # his expert run shrunk by flags: 6 experts, 2 active, micro-batches of 3, as his files say
    run_dir = os.path.join(ROOT, "..", "shared", "story", "runs", "1xrtx3090-moe-no-balancing")
    if not os.path.isdir(run_dir):
        pytest.skip(f"{run_dir} is absent: the story's run directories come beside the clone")
    run_main(bench.main, [run_dir, "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=256",
                          "--total_batch_size=192", "--compile=False", "--dtype=float32", "--device=cpu",
                          "--steps=1", "--warmup=0"])
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["step"].startswith("192 tokens = 1 ranks x 2 x 3 x 32")
    experts = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256, n_expert=6, expert_top_k=2))
    assert lines["model"].startswith(f"{experts.num_params():,} parameters, 1 layers x 32 wide")


def test_bench_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(bench.main, ["--steps=0"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data", vocab=ODD_VOCAB)


def test_pad_vocab_changes_speed_not_results(data_dir, tmp_path):
    torch.manual_seed(0)
    plain = dict(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=ODD_VOCAB)).named_parameters())
    torch.manual_seed(0)
    padded = dict(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=ODD_VOCAB,
                                pad_vocab=True)).named_parameters())
    for name, p in plain.items():  # the same initial weights; the extra rows are zeros
        assert torch.equal(padded[name][: p.size(0)], p), name
    assert padded["lm_head.weight"].shape[0] == 256 and not padded["lm_head.weight"][ODD_VOCAB:].any()

    flags = dict(vocab_size=ODD_VOCAB, max_iters=6, tie_weights=True)
    train.main(tiny_flags(data_dir, str(tmp_path / "a"), **flags))
    train.main(tiny_flags(data_dir, str(tmp_path / "b"), pad_vocab=True, **flags))
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)

    # an exported padded model is the plain GPT-2 shape, with the same logits
    from transformers import GPT2LMHeadModel
    out = tmp_path / "hf"
    run_main(eval_script.main, [str(tmp_path / "b"), f"--export_hf={out}"])
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    model, _ = formats.load_model(str(tmp_path / "b"))
    assert hf.config.vocab_size == ODD_VOCAB and model.config.pad_vocab
    x = torch.randint(0, ODD_VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compile_changes_speed_not_results(data_dir, tmp_path):
    flags = dict(vocab_size=ODD_VOCAB, max_iters=4, eval_interval=0)
    train.main(tiny_flags(data_dir, str(tmp_path / "eager"), **flags))
    train.main(tiny_flags(data_dir, str(tmp_path / "compiled"), compile=True, **flags))
    for x, y in zip(curve(tmp_path / "eager"), curve(tmp_path / "compiled")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert os.path.exists(tmp_path / "compiled" / "ckpt.pt")


FAULTS_PER_STEP = """
import resource, sys, torch
from gpt_interventions.device import keep_freed_memory
from model import GPT, GPTConfig
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("refused")
    sys.exit()
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50257))
x = torch.randint(0, 50257, (8, 64))  # logits and their gradient: 8*64*50257 floats, 103 MB each
def step():
    model(x, x)[1].backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def transparent_hugepages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only")
@pytest.mark.skipif(transparent_hugepages_always(), reason="huge pages: too few faults to count either way")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    # Without it every 103 MB logits tensor is a fresh mmap that faults in 25k pages (~500k over 5
    # steps); with it the heap reuses the freed blocks. setup_dist calls it for --device=cpu.
    env = {k: v for k, v in os.environ.items()  # nothing that changes the allocator or page size
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        if out.stdout.strip() == "refused":
            pytest.skip("this glibc refuses an mmap threshold above 32 MiB")
        return int(out.stdout)
    default, kept = faults("default"), faults("keep")
    assert default > 100_000
    assert kept < default / 4


# In a fresh process with 2 intra-op threads whose pool already runs: the share of a parallel
# product's elements that came out as zero where the exact result (1e-40) is a float32 denormal.
FLUSHED_SHARE = """
import torch
from gpt_interventions.device import setup_dist
def flushed():
    return (torch.full((2**20,), 1e-30) * 1e-10 == 0).float().mean().item()
before = flushed()  # the first parallel op starts the pool
torch.set_flush_denormal(True)  # the calling thread only
main_only = flushed()
setup_dist("cpu")
print(before, main_only, flushed())
"""


def test_setup_dist_flushes_denormals_on_every_intra_op_thread():
    # why: the tied head's denormal gradients made the tied tiny step 20x slower (BENCHMARKS.md)
    out = subprocess.run([sys.executable, "-c", FLUSHED_SHARE], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, main_only, after = map(float, out.stdout.split())
    assert before == 0.0 and main_only == 0.5  # the main thread's half only: the pool kept its mode
    assert after == 1.0


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_its_cpu_dry_mode(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu-check.log").read_text()
    assert done.returncode == 0 and "gpu-check done" in log, log[-3000:]
    exits = {line.split(":")[0][3:]: line.split("exit ")[1].split()[0] for line in log.splitlines()
             if line.startswith("-- ") and " exit " in line}
    assert exits.pop("auto micro-batch") == "2" and "searches a GPU's memory" in log  # GPUs only
    assert set(exits.values()) == {"0"} and {"124M bf16 compiled", "163M float16+GradScaler compiled",
                                            "124M bf16 eager deterministic", "restart in place", "eval.py on the test split",
                                            "sample.py"} <= set(exits), exits
    assert "stopped by SIGTERM after step" in log and "resuming" in log  # the preemption and the restart
    assert "tokens/s" in log and "mfu         n/a" in log and "sample/test loss" in log
