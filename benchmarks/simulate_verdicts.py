"""What compare.py's verdicts promise, measured on many simulated tables (tests/test_verdicts.py runs
the same checks with fewer tables).

    python benchmarks/simulate_verdicts.py [--tables=20000] [--seed=0]

Each table is a baseline and 5 arms, through gpt_interventions.verdicts.judge (the code path of
compare.py). Reported, with their simulation standard errors:
  - family-wise error: the share of tables with any false "better" or "worse" when no arm has an
    effect (Holm; and uncorrected, for scale), for unpaired arms (Welch) and arms paired by seed;
  - coverage: the share of 95% intervals that hold the true effect (effects of 0 to 0.004);
  - power: sweep.py plan's promise for one-at-a-time designs against the share of tables in which
    the one real arm is found "better".
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_interventions import stats  # noqa: E402
from gpt_interventions.cli import field, parse_config  # noqa: E402
from gpt_interventions.errors import UsageError, run_main  # noqa: E402
from gpt_interventions.verdicts import simulate  # noqa: E402


@dataclass
class SimulateVerdicts:
    tables: int = field(20000, "simulated tables per null scenario (a tenth of it for the others)")
    seed: int = field(0, "seed of the simulation")


def share(flags):
    p = float(np.mean(flags))
    return f"{p:.4f} +- {math.sqrt(p * (1 - p) / len(flags)):.4f}"


def main(argv):
    (cfg,), _, _ = parse_config(argv, [SimulateVerdicts], "simulate_verdicts.py", "[--key=value ...]")
    if cfg.tables < 10:
        raise UsageError("--tables must be at least 10")
    t0 = time.time()
    print(f"{'scenario':52} {'measured':>18}  promise")
    for paired in (False, True):
        tables = simulate(cfg.tables, 5, 3, [0.0] * 5, 0.002, 0.003, paired, seed=cfg.seed)
        name = "paired by seed" if paired else "unpaired (Welch)"
        print(f"{'no effects, 5 arms x 3 runs, ' + name + ', Holm':52} "
              f"{share([any(c.verdict in ('better', 'worse') for c in t) for t in tables]):>18}  <= 0.05")
        print(f"{'  same tables, uncorrected':52} {share([any(c.p < 0.05 for c in t) for t in tables]):>18}")
    effects = [-0.004, -0.002, 0.0, 0.001, 0.003]
    for paired in (False, True):
        tables = simulate(cfg.tables // 10, 5, 4, effects, 0.002, 0.002, paired, seed=cfg.seed + 1)
        covered = [c.low <= e <= c.high for t in tables for c, e in zip(t, effects)]
        print(f"{'95% intervals, 5 arms x 4 runs, ' + ('paired' if paired else 'unpaired'):52} {share(covered):>18}  >= 0.94")
    for n in (10, 20, 30):  # compare.py --test=bootstrap: why it is not the default
        tables = simulate(max(cfg.tables // 100, 10), 5, n, effects, 0.002, 0.002, False, seed=cfg.seed + 3,
                          test="bootstrap")
        covered = [c.low <= e <= c.high for t in tables for c, e in zip(t, effects)]
        print(f"{f'95% bootstrap intervals, 5 arms x {n} runs, unpaired':52} {share(covered):>18}  >= 0.94")
    for effect, sigma, arms in ((0.004, 0.0017, 4), (0.01, 0.0017, 5), (0.002, 0.0017, 2)):
        family = arms
        n, promised = next((n, p) for n in range(2, 1000) if (p := stats.paired_power(effect, sigma, n, family))
                           >= stats.POWER)
        tables = simulate(cfg.tables // 10, arms, n, [-effect] + [0.0] * (arms - 1), sigma, 0.0, True,
                          seed=cfg.seed + 2)
        found = [t[0].verdict == "better" for t in tables]
        print(f"{f'power: effect {effect} at std {sigma}, {arms} arms, {n} seeds':52} {share(found):>18}  "
              f"{promised:.4f} (planned)")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_main(main)
