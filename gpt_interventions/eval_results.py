"""A run's eval.json: eval.py's results, one per checkpoint and evaluation settings, and the one
rule that says which of them is the run's.

eval.py keeps one row per (dataset or task, split, checkpoint file, step, dtype, token budget):
scoring an old snapshot, re-scoring in bfloat16 or with another budget adds a row and replaces
none but the same evaluation's. A run's result (compare.py, sweep.py analyze) is the float32 row
of its final checkpoint, ckpt.pt at the run's last planned step; the model card shows the rows of
the checkpoint it exports. Both ask `of_checkpoint`.

Files written before results were kept apart (one row per dataset/split) hold the same rows: each
carries its checkpoint, step, dtype and budget and is read like a new one; the next eval.py call
files them under their own keys.
"""

import json
import os

from gpt_interventions.atomic import write_json
from gpt_interventions.errors import UsageError
from gpt_interventions.rundir import snapshot_name

FILE = "eval.json"
REFERENCE_DTYPE = "float32"  # eval.py's default: the reference numbers (no TF32, no autocast)
FINAL = "ckpt.pt"            # the run's latest checkpoint; at the last planned step, its final one


def scored(row):
    """`syn/test` or `hellaswag/val`: what a row scored."""
    return f"{row.get('task') or row.get('dataset')}/{row.get('split')}"


def key(row):
    """`syn/test ckpt.pt step 12 float32 eval_tokens=0`: what was scored, on which checkpoint, how
    (and ` window=1024` for windows shorter than the model's own: eval.py --block_size)."""
    budget = f" eval_tokens={row['eval_tokens']}" if "eval_tokens" in row else ""
    budget += f" window={row['window']}" if "window" in row else ""
    return f"{scored(row)} {os.path.basename(str(row.get('checkpoint')))} step {row.get('step')} {row.get('dtype')}{budget}"


def read(run_dir):
    """The rows of a run's eval.json, in either format; [] without one. UsageError if unreadable."""
    path = os.path.join(run_dir, FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({str(e)[:120]}); move it away and score the run "
                         f"again: python eval.py {run_dir}") from None
    if not isinstance(results, dict):
        raise UsageError(f"{path} is not eval.py's results (an object of rows); move it away and score the "
                         f"run again: python eval.py {run_dir}")
    return [r for r in results.values() if isinstance(r, dict)]


def record(run_dir, row):
    """Add `row` to the run's eval.json under its key, replacing only a row of the same key."""
    rows = {}
    for r in read(run_dir) + [row]:
        rows[key(r)] = r
    write_json(os.path.join(run_dir, FILE), rows)


def of_checkpoint(rows, names, step):
    """The rows that scored the checkpoint saved at `step` under one of the file `names`."""
    return [r for r in rows if os.path.basename(str(r.get("checkpoint"))) in names and r.get("step") == step]


def final_step(meta, metrics):
    """The run's last step: the planned one in config.json, else (a run from before the plan was
    recorded) the last logged."""
    planned = (meta.get("derived") or {}).get("max_steps")
    return planned if planned is not None else max((r.get("step", 0) for r in metrics), default=None)


def final_result(rows, step, what):
    """(the run's result or None, why not): among `rows` that scored `what` (syn/test), the
    float32 one of the final checkpoint (ckpt.pt at `step`, or its snapshot), the most tokens
    scored if several; on the model's own windows (a --block_size score is kept beside it, never
    the run's)."""
    wanted = [r for r in rows if scored(r) == what and "window" not in r]
    final = [r for r in of_checkpoint(wanted, (FINAL, snapshot_name(step)), step)
             if r.get("dtype") == REFERENCE_DTYPE]
    if final:
        return max(final, key=lambda r: (r.get("tokens") or r.get("examples") or 0, str(r.get("time")))), ""
    goal = f"no {REFERENCE_DTYPE} {what} score of its final checkpoint ({FINAL} at step {step})"
    if not wanted:
        return None, goal
    others = sorted({f"{os.path.basename(str(r.get('checkpoint')))} step {r.get('step')} {r.get('dtype')}"
                     for r in wanted})
    return None, f"{goal}, only of {', '.join(others)}"
