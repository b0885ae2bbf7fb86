"""Finished runs as data: each run's config, metrics and test loss, and replicate groups.

A run's interventions are its config's differences from the baseline's; runs whose configs differ
only in seed or data_seed are replicates of one configuration (a group).
"""

import csv
import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass

from gpt_interventions import eval_results
from gpt_interventions.checkpoint import model_config_of
from gpt_interventions.cli import parse_config
from gpt_interventions.errors import UsageError
from gpt_interventions.tables import fmt
from gpt_interventions.training import RUNTIME_FIELDS, TrainConfig
from model import GPTConfig

IGNORED = RUNTIME_FIELDS | {"charts", "branch_from", "branch_step"}  # change how, not what, a run computes
# (a branched cooldown computes, bit for bit, the straight run of its length: gpt_interventions/branch.py)
REPLICATE = {"seed", "data_seed"}       # differ between replicates of one configuration
LENGTH = {"max_iters", "max_tokens"}    # differ between the budgets of one configuration
DEFAULTS = {**dataclasses.asdict(GPTConfig()), **dataclasses.asdict(TrainConfig())}


SPLITS = ("test", "val")
SPLIT_HELP = ("the loss that is judged: test, eval.py's float32 score of each run's final checkpoint (a run "
              "without one is left out, listed); val, the validation loss train.py logged at each run's final "
              "step. The two are never judged together")
JUDGED = {"test": "judged: test losses, eval.py's float32 score of each run's final checkpoint (ckpt.pt at its last step)",
          "val": "judged: validation losses, logged by train.py at each run's final step (its dtype and eval_tokens)"}


@dataclass
class FinishedRun:
    name: str
    dir: str
    config: dict         # model and train fields, flattened
    rows: list           # metrics.jsonl
    loss: float | None   # the finite loss of split `source` that is judged; None: left out (`missing` says why)
    source: str          # that split: "test" or "val"
    test_tokens: int | None
    world_size: int
    accuracy: float | None = None        # HellaSwag acc_norm of the final checkpoint, if scored
    accuracy_examples: int | None = None
    missing: str = ""                    # why loss is None
    scored: str = ""                     # which result the loss is (eval.json's key), for --json
    budget: int | None = None            # training tokens: the run's steps x tokens per step

    def last(self, key):
        return next((r[key] for r in reversed(self.rows) if r.get(key) is not None), None)

    @property
    def wall_s(self):
        """Training time: each logged row's dt_ms covers the steps since the row before it. A
        branched cooldown's own: the parent's rows up to the branch point are its parent's time."""
        total, prev = 0.0, self.config.get("branch_step") or 0
        for r in self.rows:
            if "dt_ms" in r and r["step"] > prev:
                total += r["dt_ms"] / 1000 * (r["step"] - prev)
                prev = r["step"]
        return total

    @property
    def own_tokens(self):
        """Tokens the run trained itself (a branched cooldown: those after its branch point)."""
        at = self.config.get("branch_step") or 0
        start = next((r["tokens"] for r in self.rows if r.get("step") == at and "tokens" in r), 0) if at else 0
        return (self.last("tokens") or 0) - start


def load_run(run_dir, split="test"):
    """A run directory with the loss of `split` at its final step: test, eval.py's float32 score
    of the final checkpoint (gpt_interventions/eval_results.py); val, the validation loss
    train.py logged at the final step. Without one the run's loss is None and `missing` says why."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            meta = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir} is not a readable run directory ({e})") from None
    # a field the run's version did not have yet takes its default: the switch it adds was off
    # (model_config_of: where the behaviour before the field was not today's default)
    config = {**DEFAULTS, **model_config_of(meta["model"]), **meta["train"]}
    name = config.get("run_name") or os.path.basename(os.path.normpath(run_dir))
    run = FinishedRun(name, run_dir, config, rows, None, split, None, meta.get("env", {}).get("world_size", 1),
                      budget=budget_of(meta, config, rows))
    final, results, dataset = eval_results.final_step(meta, rows), eval_results.read(run_dir), config["dataset"]
    if split == "test":
        row, why = eval_results.final_result(results, final, f"{dataset}/test")
        if row:
            run.loss, run.test_tokens, run.scored = row["loss"], row["tokens"], eval_results.key(row)
        else:
            run.missing = f"{why}; score it: python eval.py {run_dir} --dataset={dataset}"
    else:
        val = [r["val_loss"] for r in rows if r.get("step") == final and r.get("val_loss") is not None]
        run.loss = val[-1] if val else None
        reached = max((r.get("step", 0) for r in rows), default=0)
        run.missing = "" if val else f"no validation loss at its final step {final} in metrics.jsonl" + (
            f" (it stopped at step {reached})" if final is not None and reached < final else "")
    task, _ = eval_results.final_result(results, final, "hellaswag/val")
    if task:
        run.accuracy, run.accuracy_examples = task["acc_norm"], task["examples"]
    if run.loss is not None and not math.isfinite(run.loss):  # a diverged run: no loss to compare
        run.loss, run.missing = None, f"its {split} loss is {run.loss} (diverged)"
    return run


def budget_of(meta, config, rows):
    """A run's training tokens: from its plan in config.json, else max_tokens (rounded up to whole
    steps by train.py), else the tokens of its last metrics row."""
    derived = meta.get("derived") or {}
    if derived.get("max_steps") and derived.get("tokens_per_step"):
        return derived["max_steps"] * derived["tokens_per_step"]
    if not config.get("max_iters"):
        return config.get("max_tokens")
    return next((r["tokens"] for r in reversed(rows) if "tokens" in r), None)


def judged_lines(runs, split):
    """What the verdicts judged, and one line per run they leave out, with why."""
    return [JUDGED[split]] + [f"left out of the verdicts: {r.name}: {r.missing}" for r in runs if r.loss is None]


def load_runs(patterns, split="test"):
    """Runs from directories and globs (a glob skips what is not a run; a named directory must be one)."""
    dirs = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        matches = [m for m in matches if not glob.has_magic(p) or os.path.isfile(os.path.join(m, "config.json"))]
        if not matches:
            raise UsageError(f"no run directories match {p!r}")
        dirs += [m for m in matches if os.path.normpath(m) not in map(os.path.normpath, dirs)]
    return [load_run(d, split) for d in dirs]


def diff(config, base, ignore=frozenset()):
    """`k=v, ...` of the fields that change what a run computes (not seeds), in field order."""
    keys = [k for k in {**base, **config} if k not in IGNORED | REPLICATE | ignore]
    return ", ".join(f"{k}={fmt(config.get(k))}" for k in keys if config.get(k) != base.get(k))


def group_key(config, ignore=frozenset()):
    return tuple(sorted((k, v) for k, v in config.items() if k not in IGNORED | REPLICATE | ignore))


def by_budget(runs, baseline):
    """[(budget, its runs, the run of the baseline's configuration at that budget or None)] in
    order of budget; runs that all have one budget are one part of budget None, as before budgets."""
    budgets = sorted({r.budget for r in runs}, key=lambda b: (b is None, b or 0))
    if len(budgets) == 1:
        return [(None, runs, baseline)]
    parts = []
    for b in budgets:
        these = [r for r in runs if r.budget == b]
        base = baseline if baseline in these else next(
            (r for r in these if group_key(r.config, LENGTH) == group_key(baseline.config, LENGTH)), None)
        parts.append((b, these, base))
    return parts


def find(runs, spec, flag):
    for r in runs:
        if spec in (r.name, r.dir) or os.path.normpath(spec) == os.path.normpath(r.dir):
            return r
    raise UsageError(f"--{flag}={spec}: no such run among {', '.join(r.name for r in runs)}")


@dataclass
class Group:
    label: str
    runs: list

    @property
    def losses(self):
        return [r.loss for r in self.runs if r.loss is not None]


def group_runs(runs, baseline):
    """Replicate groups, the baseline's first, then in the order their runs were given. Runs of one
    known token budget are one configuration however their length was given (max_iters or max_tokens)."""
    budgets = {r.budget for r in runs}
    ignore = LENGTH if len(budgets) == 1 and None not in budgets else frozenset()
    groups = {}
    for r in sorted(runs, key=lambda r: group_key(r.config, ignore) != group_key(baseline.config, ignore)):
        label = diff(r.config, baseline.config, ignore) or "baseline"
        groups.setdefault(group_key(r.config, ignore), Group(label, [])).runs.append(r)
    return list(groups.values())


def import_results(path):
    """(runs, references) from a CSV or JSONL file of results made elsewhere: one row per run with
    `run` (its name) and `test_loss`; every other column is a config field (seed, grad_clip, ...),
    typed and checked as train.py's flags when it is one of ours, kept as it is otherwise. Our
    fields a row leaves out take train.py's defaults (the story's baseline), so a row that names
    only `grad_clip=3.5` differs from the baseline by exactly that. A true `reference` column marks
    a model to list beside the runs (original GPT-2, say) rather than a run."""
    rows = _read_rows(path)
    defaults = DEFAULTS
    ours = set(defaults)
    runs, refs = [], []
    for i, row in enumerate(rows, start=1):
        where = f"{path} row {i}"
        name, loss = row.pop("run", None), row.pop("test_loss", None)
        if name in (None, "") or loss in (None, ""):
            found = ", ".join(str(k) for k in [*(["run"] if name else []), *row]) or "none"
            raise UsageError(f"{where}: every row needs a run name and a test_loss (its columns: {found}; give "
                             "a comma-separated file with a header row, or JSON lines)")
        try:
            if isinstance(loss, bool):
                raise ValueError
            loss = float(loss)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: test_loss {loss!r} is not a number") from None
        if not math.isfinite(loss):
            raise UsageError(f"{where}: test_loss {loss} is not finite; leave a diverged run out of the file")
        if None in row or any(isinstance(v, (list, dict)) for v in row.values()):
            raise UsageError(f"{where}: a row with more cells than the header, or a value that is a list or "
                             "an object; give one plain value per column")
        if _truthy(row.pop("reference", False)):
            refs.append((str(name), loss))
            continue
        known = {k: v for k, v in row.items() if k in ours and v not in (None, "")}
        try:
            (mc, tc), _, _ = parse_config([f"--{k}={v}" for k, v in known.items()], [GPTConfig, TrainConfig],
                                          "compare.py", "")
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        config = {**dataclasses.asdict(mc), **dataclasses.asdict(tc), "run_name": str(name)}
        config.update({k: _number(v) for k, v in row.items() if k not in ours and v not in (None, "")})
        runs.append(FinishedRun(str(name), f"{path}#{name}", config, [], loss, "test", None, 1,
                                budget=budget_of({}, config, [])))
    if not runs:
        raise UsageError(f"{path} holds no runs (rows with a run and a test_loss)")
    return runs, refs


def _read_rows(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            if path.endswith((".jsonl", ".json")):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UsageError(f"--results={path} does not exist") from None
    except (OSError, ValueError, csv.Error) as e:
        raise UsageError(f"--results={path} is not readable CSV or JSONL ({str(e)[:120]})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"--results={path}: every JSONL line must be an object")
    return rows


def _truthy(value):
    return str(value).strip().lower() in ("1", "true", "yes")


def _number(value):
    """A column that is not one of our fields: a number where it reads as one."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value
