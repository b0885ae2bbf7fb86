"""TrainConfig, the flags of a run, and the Plan derived from it once: batch, accumulation, steps.

The defaults are the story's baseline run exactly (shared/story facts, tests/test_story.py): 8 GPUs x
12 sequences x 1024 tokens = 98,304 tokens per step for 3,260,190,720 tokens rounded up to whole steps (33,165), AdamW
at a constant 0.0004 with weight decay 0.1 on every parameter, float16 autocast with a GradScaler,
seed 42, on the story's own token dataset.
"""

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from gpt_interventions.cli import field
from gpt_interventions.errors import UsageError
from gpt_interventions.schedule import cooldown_start


@dataclass
class TrainConfig:
    run_name: str = field("", "run name; default: the last preset's file name, else 'run'")
    out_dir: str = field("", "run directory; default out/<run_name>")
    resume: bool = field(False, "continue the run in out_dir from its ckpt.pt")
    # data
    dataset: str = field("story", "dataset directory under data_dir (made by prepare_data.py)")
    data_dir: str = field("data", "root of the prepared datasets")
    data_seed: int = field(0, "0: chunks in order through the shards; N > 0: shuffled per epoch")
    # batch and length
    batch_size: int = field(12, "micro-batch size in sequences, per rank")
    auto_batch_size: bool = field(False, "use the largest micro-batch that fits on the device (trial steps at "
                                  "the start; a resumed run keeps its own); total_batch_size stays")
    total_batch_size: int = field(98304, "tokens per optimizer step; 0: one micro-batch per rank")
    gradient_accumulation_steps: int = field(0, "micro-batches per step per rank; 0: derived")
    max_iters: int = field(0, "optimizer steps; 0: from max_tokens")
    max_tokens: int = field(3_260_190_720, "training tokens, rounded up to whole steps")
    # optimizer and schedule
    learning_rate: float = field(4e-4, "peak learning rate (AdamW)")
    lr_schedule: str = field("constant", "constant or cosine: warmup from lr/warmup, then constant or cosine "
                             "to min_lr at the last step; wsd: warmup, constant, then a cooldown to min_lr over "
                             "the last cooldown_frac of the run; story: the story's torch LinearLR warmup from "
                             "1e-5 x lr, then CosineAnnealingLR toward min_lr",
                             choices=("constant", "cosine", "wsd", "story"))
    warmup_iters: int = field(0, "linear warmup steps; 0: use warmup_frac")
    warmup_frac: float = field(0.0, "linear warmup as a fraction of the run's steps (rounded; story: floored)")
    cooldown_frac: float = field(0.2, "wsd: the fraction of the run's steps its cooldown takes (rounded)")
    cooldown_shape: str = field("linear", "wsd: the cooldown's shape (1-sqrt: Hägele et al., arXiv 2405.18392)",
                                choices=("linear", "1-sqrt"))
    min_lr: float = field(4e-5, "the cosine and wsd schedules' floor (eta_min) of learning_rate; muon_lr's is the same "
                          "fraction of muon_lr")
    weight_decay: float = field(0.1, "AdamW decoupled weight decay")
    decay_params: str = field("all", "which parameters decay: all (as the story's code) or matrices",
                              choices=("all", "matrices"))
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.999, "AdamW beta2")
    eps: float = field(1e-8, "AdamW epsilon")
    optimizer: str = field("adamw", "adamw: AdamW for every parameter; muon: torch.optim.Muon for the 2-D weights "
                           "inside the blocks, AdamW (learning_rate, weight_decay, betas, eps) for embeddings, head "
                           "and vectors", choices=("adamw", "muon"))
    muon_lr: float = field(0.025, "Muon's peak learning rate (--optimizer=muon); the lr schedule scales it as it "
                           "scales learning_rate")
    muon_momentum: float = field(0.95, "Muon's Nesterov momentum")
    muon_weight_decay: float = field(0.05, "Muon's decoupled weight decay: each step multiplies its matrices by "
                                     "1 - lr x this (whatever decay_params)")
    muon_adjust_lr: str = field("original", "Muon's lr per matrix shape (rows x cols): original: x sqrt(max(1, "
                                "rows/cols)) (Keller Jordan's); match_rms_adamw: x 0.2 sqrt(max(rows, cols)) "
                                "(Moonshot's: AdamW's lr and weight decay carry over)",
                                choices=("original", "match_rms_adamw"))
    grad_clip: float = field(0.0, "clip the global gradient norm to this; 0: off (norm still logged)")
    z_loss: float = field(0.0, "add z_loss * mean(logsumexp(logits)^2) to the objective (PaLM: 1e-4); the "
                          "logged loss then includes it, validation does not; 0: off")
    moe_aux_loss: float = field(0.0, "coefficient of the experts' load-balancing loss added to the training "
                                "loss (Switch Transformer: 0.01); no effect with n_expert = 0")
    # numerics and speed
    dtype: str = field("float16", "autocast dtype; float16 adds a GradScaler",
                       choices=("float32", "bfloat16", "float16"))
    tf32: bool = field(True, "TF32 matmuls for float32 work on Ampere+ GPUs")
    compile: bool = field(True, "torch.compile the model")
    deterministic: bool = field(False, "bitwise reproducible GPU runs where PyTorch can (deterministic "
                                "algorithms, cuBLAS workspace, math attention; needs --compile=False), at a cost")
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    seed: int = field(42, "seed of the initial weights and of dropout")
    nonfinite: str = field("stop", "on a non-finite loss or gradient: stop the run, or skip the step",
                           choices=("stop", "skip"))
    # logging, evaluation, checkpoints
    log_interval: int = field(10, "steps between logged metrics rows")
    eval_interval: int = field(250, "steps between validation evaluations; 0: only at the end")
    eval_tokens: int = field(2_097_152, "validation token budget (the same tokens every time)")
    eval_batch_size: int = field(0, "sequences per evaluation batch; 0: batch_size")
    checkpoint_interval: int = field(500, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = field(0, "also keep the last N checkpoints as ckpt_STEP.pt; 0: only ckpt.pt")
    keep_steps: str = field("", "also checkpoint at these steps (e.g. 1000,2000) and keep them as ckpt_STEP.pt, "
                            "whatever keep_checkpoints: the points a cooldown can branch from")
    branch_from: str = field("", "a wsd run directory to branch from: this run starts at its ckpt_STEP.pt of "
                             "branch_step and goes on with its own length (its cooldown); config.json records it")
    branch_step: int = field(0, "the step of branch_from's kept checkpoint to branch at (see keep_steps)")
    charts: bool = field(True, "draw the run's curves as PNG files in out_dir/charts/ when it finishes")
    tracker: str = field("none", "also send metrics, config and charts to none, tensorboard (event files in "
                         "out_dir/tensorboard/), wandb, or tensorboard,wandb (rank 0; pip install the package)")
    dry_run: bool = field(False, "print the resolved config and the plan as JSON and exit: no data read, "
                          "nothing written (ranks from WORLD_SIZE)")


POSITIVE = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "log_interval",
            "checkpoint_interval", "learning_rate", "muon_lr", "mup_base_width"}
FRACTIONS = {"dropout", "beta1", "beta2", "muon_momentum"}  # in [0, 1)
MAX_KEPT_STEPS = 1000  # snapshots a run may be asked to keep; each one is a full checkpoint on disk
MAX_EXPERTS = 256  # DeepSeek-V3's routed experts per layer

# Fields that may differ when a run is resumed: they change how, not what, it computes.
RUNTIME_FIELDS = {"resume", "out_dir", "run_name", "data_dir", "batch_size", "auto_batch_size",
                  "gradient_accumulation_steps", "compile", "device", "log_interval",
                  "eval_interval", "eval_batch_size", "checkpoint_interval", "keep_checkpoints", "keep_steps",
                  "nonfinite", "charts", "tracker", "dry_run", "moe_impl"}
# deterministic is not among them: its algorithms give other numbers (a repeat's spread is only
# the hardware's among runs that agree on it)
# max_iters/max_tokens are not among them: the cosine schedule of the remaining steps depends on them.


@dataclass
class Plan:
    """Values derived once from the config and the world size."""
    accum: int
    tokens_per_step: int
    max_steps: int
    warmup_steps: int


def make_plan(mc, tc, world_size):
    for name, value in [*asdict(mc).items(), *asdict(tc).items()]:  # every number is finite and >= 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0 or (name in POSITIVE and value == 0):
            raise UsageError(f"--{name} must be {'positive' if name in POSITIVE else '0 or more'}, got {value}")
        if name in FRACTIONS and value >= 1:
            raise UsageError(f"--{name} must be in [0, 1), got {value}")
        if name in ("seed", "data_seed") and value >= 2**63:
            raise UsageError(f"--{name} must be less than 2**63, got {value}")
    if mc.n_embd % mc.n_head:
        raise UsageError(f"n_embd {mc.n_embd} is not divisible by n_head {mc.n_head}")
    if mc.position == "rope" and mc.n_embd // mc.n_head % 2:
        raise UsageError(f"--position=rope rotates pairs of dimensions: the head size n_embd/n_head = "
                         f"{mc.n_embd // mc.n_head} must be even")
    if mc.parametrization == "mup" and tc.optimizer == "muon" and tc.muon_adjust_lr != "original":
        raise UsageError("--parametrization=mup with --optimizer=muon needs --muon_adjust_lr=original (its "
                         "sqrt(rows/cols) is the width rule); match_rms_adamw's lr grows with width")
    if mc.rope_base <= 1:
        raise UsageError(f"--rope_base must be greater than 1, got {mc.rope_base}")
    if mc.n_expert > MAX_EXPERTS:
        raise UsageError(f"--n_expert {mc.n_expert} is more than {MAX_EXPERTS}: each expert is a module "
                         "of its own here (gpt_interventions/moe.py); use fewer")
    if mc.n_expert and not 1 <= mc.expert_top_k <= mc.n_expert:
        raise UsageError(f"--expert_top_k must be from 1 to n_expert ({mc.n_expert}), got {mc.expert_top_k}")
    micro = tc.batch_size * mc.block_size * world_size  # tokens in one micro-batch over all ranks
    if tc.total_batch_size:
        if tc.total_batch_size % micro:
            raise UsageError(f"total_batch_size {tc.total_batch_size} is not divisible into micro-batches "
                             f"of batch_size*block_size*ranks = {micro} tokens")
        accum = tc.total_batch_size // micro
        if tc.gradient_accumulation_steps and tc.gradient_accumulation_steps != accum:
            raise UsageError(f"gradient_accumulation_steps {tc.gradient_accumulation_steps} contradicts "
                             f"total_batch_size {tc.total_batch_size} (which gives {accum}); set one of them")
    else:
        accum = tc.gradient_accumulation_steps or 1
    tokens_per_step = micro * accum
    if tc.max_iters < 0 or tc.max_tokens < 0 or not (tc.max_iters or tc.max_tokens):
        raise UsageError("set a positive --max_iters or --max_tokens")
    max_steps = tc.max_iters or math.ceil(tc.max_tokens / tokens_per_step)
    if tc.lr_schedule == "story":  # its code: steps * warmup_period_percent // 100
        warmup = tc.warmup_iters or math.floor(Fraction(repr(tc.warmup_frac)) * max_steps)
    else:
        warmup = tc.warmup_iters or round(tc.warmup_frac * max_steps)
    if not 0 <= tc.warmup_frac <= 1 or warmup < 0 or warmup > max_steps:
        raise UsageError(f"warmup of {warmup} steps does not fit a run of {max_steps} steps")
    if tc.lr_schedule == "wsd":
        if not 0 <= tc.cooldown_frac <= 1:
            raise UsageError(f"--cooldown_frac must be in [0, 1], got {tc.cooldown_frac}")
        if warmup > cooldown_start(tc, max_steps):
            raise UsageError(f"the warmup of {warmup} steps overlaps the cooldown, which starts at step "
                             f"{cooldown_start(tc, max_steps)} of {max_steps}: lower warmup or cooldown_frac")
    bad = [s for s in kept_steps(tc) if not 0 < s <= max_steps]
    if bad:
        raise UsageError(f"--keep_steps: step {bad[0]} is not a step of this run (1 to {max_steps})")
    return Plan(accum, tokens_per_step, max_steps, warmup)


def kept_steps(tc):
    """The steps of --keep_steps as a set of ints; UsageError for anything else."""
    parts = [p.strip() for p in tc.keep_steps.split(",") if p.strip()]
    if not all(p.isdecimal() for p in parts) or len(parts) > MAX_KEPT_STEPS:
        raise UsageError(f"--keep_steps expects up to {MAX_KEPT_STEPS} comma-separated step numbers "
                         f"(e.g. 1000,2000), got {tc.keep_steps!r}")
    return {int(p) for p in parts}
