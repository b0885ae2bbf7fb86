"""The story's run directories as presets: `python train.py PATH/runs/NAME [...] [--key=value ...]`.

The story's author kept each run as a directory holding `model.json` and `train.json`, the configs
his training code read. A directory given where a TOML preset goes is read here into our fields,
with his code's defaults for the keys a file leaves out, so it sets every field that decides what
his run computed; it then stacks as a TOML preset does (defaults < presets and directories, in the
order given < flags). Keys that change nothing we compute (checkpoint and validation intervals,
log files) are listed in IGNORED and shown by --dry_run; any other key is refused, naming it.

His code's rules (shared/story/README.md): tokens per step = GPUs x microbatch_size x
gradient_accumulation_steps x context_length, the GPUs being the run's name prefix (8x..., 1x...);
min_train_tokens rounded up to whole steps; AdamW over every parameter at PyTorch's betas and eps,
lr 0.0004 and weight decay 0.1 unless given; float16 autocast with a GradScaler and TF32 matmuls
unless use_amp is false; the scheduled lr warms up over steps x warmup_period_percent // 100 steps
from 1e-5 x lr, then follows a cosine toward lr / 10; seed 42 unless random_seed; PyTorch's default
initialisation, learned positions, LayerNorm and tanh GELU.
"""

import json
import os
import re

from gpt_interventions.errors import UsageError

FILES = ("model.json", "train.json")
NUMBER = (int, float)
# each key his code reads: its type, and None where it must be given (else his default)
MODEL_KEYS = {"vocab_size": (int, None), "context_length": (int, None), "emb_dim": (int, None),
              "n_heads": (int, None), "n_layers": (int, None), "drop_rate": (NUMBER, None),
              "qkv_bias": (bool, None), "tie_weights": (bool, False), "moe": (dict, {})}
MOE_KEYS = {"num_experts": (int, None), "num_active_experts": (int, None)}
TRAIN_KEYS = {"microbatch_size": (int, None), "gradient_accumulation_steps": (int, 1),
              "min_train_tokens": (int, None), "dataset": (str, None), "start_train_token": (int, 0),
              "learning_rate": (NUMBER, 0.0004), "weight_decay": (NUMBER, 0.1), "clipping_max_norm": (NUMBER, 0.0),
              "use_amp": (bool, True), "schedule_learning_rate": (bool, False),
              "warmup_period_percent": (NUMBER, 0), "random_seed": (int, 42)}
# keys that change nothing we compute, and why
IGNORED = {
    "checkpoint_interval": "steps between his checkpoints (ours: --checkpoint_interval)",
    "validation_interval": "steps between his in-training validations, which change no weight",
    "validation_batches": "the size of those validations",
    "start_val_token": "where those validations read (the test loss is eval.py's)",
    "log_moe_balance_file": "where his run logged the experts' routing (ours: metrics.jsonl expert_frac)",
}
STORY_DATASET = "gpjt/fineweb-gpt2-tokens"  # his token dataset: our --dataset=story
KNOWN_GPUS = {"original": 1, "test": 1}  # his runs whose names carry no GPU count: both on one GPU
# what his GPTModel and training loop fix, whatever the files say
FIXED = {"init": "torch", "position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu",
         "bias": True, "logit_softcap": 0.0, "zero_init_proj": False, "pad_vocab": False,
         "dataset": "story", "data_seed": 0, "gradient_accumulation_steps": 0, "max_iters": 0,
         "warmup_iters": 0, "decay_params": "all", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "optimizer": "adamw", "z_loss": 0.0, "moe_aux_loss": 0.0}


def gpus_of(path):
    """The GPUs the run ran on, from its name (8xa100m40-baseline: 8); None when the name does not say."""
    name = os.path.basename(os.path.normpath(path))
    prefix = re.match(r"([1-9]\d*)x", name)
    return int(prefix.group(1)) if prefix else KNOWN_GPUS.get(name)


def read_run(path):
    """(model.json, train.json) of a run directory as dicts, every key known and typed; UsageError else."""
    out = []
    for name, keys in zip(FILES, (MODEL_KEYS, TRAIN_KEYS)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UsageError(f"{path} is a directory without {name}: a run directory of the story holds model.json "
                             "and train.json; presets are config/*.toml files")
        try:
            with open(file) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{file} is not readable JSON ({str(e)[:100]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{file} holds {type(data).__name__}, not a JSON object")
        out.append(_checked(file, data, keys))
    model, train = out
    if model["moe"]:
        model["moe"] = _checked(f"{path}/model.json: moe", model["moe"], MOE_KEYS)
    return model, train


def _checked(where, data, keys):
    """`data` with every key of `keys` (defaults filled in) and its ignored keys; refuses others."""
    out = {}
    for key, value in data.items():
        if key in IGNORED:
            continue
        if key not in keys:
            raise UsageError(f"{where}: unknown key {key!r}; train.py reads "
                             f"{', '.join(keys)} and ignores {', '.join(IGNORED)}")
        typ = keys[key][0]
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise UsageError(f"{where}: {key} must be {_type_name(typ)}, got {value!r}")
        out[key] = value
    for key, (_, default) in keys.items():
        if key not in out:
            if default is None:
                raise UsageError(f"{where}: {key} is missing (his code needs it)")
            out[key] = default
    return out


def _type_name(typ):
    return "a number" if typ is NUMBER else {int: "a whole number", bool: "true or false", str: "a string",
                                             dict: "an object"}[typ]


def run_preset(path, total_batch_size_given=False):
    """Our fields for the story's run in directory `path`, as a TOML preset's dict.

    Tokens per step need the run's GPUs, which its name says (gpus_of); for a directory whose name
    does not, --total_batch_size must be given as a flag, else this refuses."""
    m, t = read_run(path)
    gpus = gpus_of(path)
    micro, accum = t["microbatch_size"], t["gradient_accumulation_steps"]
    for key, value in (("microbatch_size", micro), ("gradient_accumulation_steps", accum)):
        if value < 1:
            raise UsageError(f"{path}/train.json: {key} must be at least 1, got {value}")
    if t["dataset"] != STORY_DATASET:
        raise UsageError(f"{path}/train.json: dataset {t['dataset']!r} is not the story's {STORY_DATASET} "
                         "(--dataset=story); give another dataset with --dataset after the directory")
    if t["start_train_token"] != 0:
        raise UsageError(f"{path}/train.json: start_train_token {t['start_train_token']} is not 0: train.py "
                         "reads the train split from its first token")
    values = dict(FIXED)
    values.update(vocab_size=m["vocab_size"], block_size=m["context_length"], n_embd=m["emb_dim"],
                  n_head=m["n_heads"], n_layer=m["n_layers"], dropout=float(m["drop_rate"]),
                  qkv_bias=m["qkv_bias"], tie_weights=m["tie_weights"],
                  n_expert=m["moe"].get("num_experts", 0), expert_top_k=m["moe"].get("num_active_experts", 1))
    if m["moe"]:  # his model draws each block's router and experts where its MLP was: his initial weights
        values["moe_draws"] = "story"
    if gpus is not None:
        values["total_batch_size"] = gpus * micro * accum * m["context_length"]
    elif not total_batch_size_given:
        name = os.path.basename(os.path.normpath(path))
        raise UsageError(f"{path}: how many GPUs ran it? The story's run names say it (8x..., 1x...) and {name!r} "
                         f"does not: give --total_batch_size=GPUS*{micro * accum * m['context_length']} (GPUs x "
                         f"microbatch_size x gradient_accumulation_steps x context_length)")
    scheduled, lr = t["schedule_learning_rate"], float(t["learning_rate"])
    values.update(batch_size=micro, max_tokens=t["min_train_tokens"], learning_rate=lr,
                  lr_schedule="story" if scheduled else "constant",
                  warmup_frac=t["warmup_period_percent"] / 100 if scheduled else 0.0,
                  weight_decay=float(t["weight_decay"]), grad_clip=float(t["clipping_max_norm"]),
                  dtype="float16" if t["use_amp"] else "float32", tf32=t["use_amp"], seed=t["random_seed"])
    if scheduled:
        values["min_lr"] = lr / 10  # his CosineAnnealingLR's eta_min
    return values


def describe(path):
    """For --dry_run: the directory, its GPUs (None: not known from its name) and its ignored keys."""
    ignored = {}
    for name in FILES:
        with open(os.path.join(path, name)) as f:
            data = json.load(f)
        ignored.update({k: v for k, v in {**data, **data.get("moe", {})}.items() if k in IGNORED})
    return {"dir": path, "gpus": gpus_of(path), "ignored": ignored}
