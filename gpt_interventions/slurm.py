"""Planned runs as a Slurm job array: one task trains and evaluates one run, for the many short
runs of a sweep (sweep.py plan --launcher=slurm). Submit with `sbatch DIR/sweep.sbatch`."""

import os
import shlex


def write_array(out_dir, jobs, commands, python, gpus, argv):
    """Write out_dir/sweep.sbatch: task i runs commands[i] (with $LAUNCH, torchrun by default, or
    $SWEEP_LAUNCH) for jobs[i], skips a run with a test result as run.sh does, and first waits for
    a branched cooldown's parent checkpoint (its parent is an earlier task). Returns its path."""
    q = shlex.quote
    path = os.path.join(out_dir, "sweep.sbatch")
    prefix = os.path.basename(os.path.normpath(out_dir))
    lines = ["#!/bin/sh", f"#SBATCH --job-name={prefix}", f"#SBATCH --array=0-{len(jobs) - 1}", "#SBATCH --nodes=1",
             "#SBATCH --ntasks=1", *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
             f"#SBATCH --output={out_dir}/slurm-%A_%a.out",
             "# written by: python sweep.py " + " ".join(map(q, argv)),
             "# Task SLURM_ARRAY_TASK_ID trains and evaluates one planned run; a run with a test result already",
             "# is skipped, so the array can be submitted again after a failure. A branched cooldown waits for",
             "# its parent's kept checkpoint (SWEEP_POLL seconds between looks) and then runs beside it: give the",
             "# array room for its long runs first (they have the lower task ids). SWEEP_LAUNCH replaces the",
             "# launcher, e.g. SWEEP_LAUNCH=python for one process.",
             "set -eu", f"cd {q(os.getcwd())}",
             f'LAUNCH="${{SWEEP_LAUNCH:-{python} -m torch.distributed.run --standalone --nproc_per_node={max(gpus, 1)}}}"',
             "",
             "start() {  # $1: the run directory; $2: the checkpoint it branches from, or empty",
             '    if [ -f "$1/eval.json" ]; then echo "$1 has a test result: skipped"; exit 0; fi',
             '    while [ -n "$2" ] && [ ! -f "$2" ]; do echo "waiting for $2"; sleep "${SWEEP_POLL:-60}"; done',
             "}", "",
             'case "${SLURM_ARRAY_TASK_ID:?set by sbatch --array}" in']
    for i, (job, command) in enumerate(zip(jobs, commands)):
        lines.append(f"{i}) start {q(job.run_dir)} {q(job.waits_for)}; {command} ;;")
    lines += [f'*) echo "no task $SLURM_ARRAY_TASK_ID in this array (0-{len(jobs) - 1})" >&2; exit 2 ;;', "esac"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path
