"""A run's config from its command line and its directory: start it, continue it, or refuse.

train.py resolves presets (TOML files, or the story's run directories: story_runs.py) and flags,
then looks in the run directory: the same run is continued (a restart reruns the same command),
another one refused with what differs; and a resumed run must find the same training data it was
trained on.
"""

import dataclasses
import json
import os
from dataclasses import asdict

from gpt_interventions.branch import load_branch
from gpt_interventions.checkpoint import load_checkpoint, model_config_of
from gpt_interventions.cli import is_preset, parse_config, split_flags
from gpt_interventions.errors import UsageError
from gpt_interventions.story_runs import run_preset
from gpt_interventions.training import RUNTIME_FIELDS, TrainConfig
from model import GPTConfig


def resolve_config(argv, usage):
    """(GPTConfig, TrainConfig, checkpoint or None) from presets, flags and the run directory.

    A directory that already holds this run (the same config, runtime fields aside) is continued
    from its checkpoint, or started over if it stopped before its first one: a restart reruns the
    same command line (torchrun --max-restarts, a requeued job, a spot instance's boot script), so
    that command must go on with the run. Another config there is refused with what differs.
    --resume continues a run from its checkpoint whatever the flags given (the saved config is the
    base), and refuses a directory without one. --branch_from starts a new run from another's kept
    checkpoint (gpt_interventions/branch.py).
    """
    classes = [GPTConfig, TrainConfig]
    load_dir = story_run_loader(argv)
    (mc, tc), _, _ = parse_config(argv, classes, "train.py", usage, load_dir=load_dir)
    presets = [a for a in split_flags(argv)[0] if is_preset(a, load_dir)]
    run_name = tc.run_name or (preset_name(presets[-1]) if presets else "run")
    out_dir = tc.out_dir or os.path.join("out", run_name)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = None
    if tc.resume:
        if not os.path.exists(ckpt_path) and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            raise UsageError(f"{out_dir} has no checkpoint: the run stopped before its first one; run its "
                             "original command again (without --resume) to start it over")
        ckpt = load_checkpoint(ckpt_path)
        saved = saved_configs(ckpt)
        (mc, tc), _, _ = parse_config(argv, classes, "train.py", usage, bases=saved, load_dir=load_dir)
        changed = differences(saved, (mc, tc))
        if changed:
            raise UsageError(f"cannot resume {out_dir} with a changed config ({'; '.join(changed)}); "
                             "start a new run with another --out_dir")
    elif not tc.dry_run and os.path.exists(ckpt_path):  # the same command again: restart in place
        ckpt = load_checkpoint(ckpt_path)
        changed = differences(saved_configs(ckpt), (mc, tc))
        if changed:
            raise UsageError(f"{out_dir} holds a run with another config ({'; '.join(changed)}); continue it "
                             "with its own config (its flags, or --resume without the differing ones), or "
                             "choose another --out_dir or --run_name")
    elif not tc.dry_run and os.path.exists(os.path.join(out_dir, "config.json")):  # stopped before a checkpoint
        meta = run_config(out_dir)
        changed = differences(known_fields(meta["model"], meta["train"]), (mc, tc))
        if changed:
            raise UsageError(f"{out_dir} holds a run with another config ({'; '.join(changed)}); choose "
                             "another --out_dir or --run_name")
    elif not tc.dry_run and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        raise UsageError(f"{out_dir} holds metrics.jsonl but no config.json or checkpoint: not a run train.py "
                         "can continue; choose another --out_dir")
    tc = dataclasses.replace(tc, run_name=run_name, out_dir=out_dir)
    if tc.branch_step and not tc.branch_from:
        raise UsageError("--branch_step needs --branch_from=RUN_DIR, the run to branch from")
    if tc.branch_from and ckpt is None and not tc.dry_run:  # a branch starts; a restart goes on from its own
        ckpt = load_branch(mc, tc, saved_configs, differences)
    return mc, tc, ckpt


def story_run_loader(argv):
    """Reads a story run directory given as a preset (gpt_interventions/story_runs.py); a directory
    whose name does not say its GPUs needs --total_batch_size among the flags."""
    given = {name for name, _ in split_flags(argv)[1]}
    return lambda path: run_preset(path, total_batch_size_given="total_batch_size" in given)


def preset_name(path):
    """The default run name a preset gives: config/best.toml -> best, runs/8xa100m40/ -> 8xa100m40."""
    name = os.path.basename(os.path.normpath(path))
    return name[:-len(".toml")] if name.endswith(".toml") else name


def run_config(out_dir):
    """A run directory's config.json as train.py wrote it; UsageError for anything else there."""
    path = os.path.join(out_dir, "config.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        if isinstance(meta, dict) and isinstance(meta.get("model"), dict) and isinstance(meta.get("train"), dict):
            return meta
    except (OSError, ValueError):
        pass
    raise UsageError(f"{path} was not written by train.py (a model export?); choose another --out_dir")


def saved_configs(ckpt):
    return known_fields(ckpt["model_config"], ckpt["train_config"])


def known_fields(model, train):
    """A saved run's configs as today's dataclasses: fields added since take their defaults (init:
    GPT-2's, as those runs had), fields since removed are dropped."""
    model = model_config_of(model)
    return [cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
            for cls, d in ((GPTConfig, model), (TrainConfig, train))]


def differences(saved, new):
    """`field: old -> new` of the fields that change what a run computes (not the runtime ones)."""
    return [f"{k}: {asdict(s)[k]!r} -> {v!r}" for s, n in zip(saved, new)
            for k, v in asdict(n).items() if k not in RUNTIME_FIELDS and asdict(s)[k] != v]


def check_same_data(saved, shards, plan, tc):
    """A resumed run must go on through the same token chunks: same shards, same tokens per step."""
    found = [[os.path.basename(p), n] for p, n in shards]
    if saved["tokens_per_step"] != plan.tokens_per_step:
        raise UsageError(f"cannot resume {tc.out_dir}: it trained {saved['tokens_per_step']} tokens per step, "
                         f"these settings give {plan.tokens_per_step}; keep total_batch_size (or, with "
                         "total_batch_size=0, batch_size x ranks) as it was")
    if saved.get("order") != "stream" and len(found) > 1:  # written before the shards were one stream
        raise UsageError(f"cannot resume {tc.out_dir}: its checkpoint read each of its {len(found)} train shards "
                         "on its own (an older version's order); resume it with the version that started it")
    if saved["shards"] != found:
        raise UsageError(f"cannot resume {tc.out_dir}: the train shards in {os.path.join(tc.data_dir, tc.dataset)} "
                         f"({len(found)} files, {sum(n for _, n in found)} tokens) differ from those it trained on "
                         f"({len(saved['shards'])} files, {sum(n for _, n in saved['shards'])} tokens)")
