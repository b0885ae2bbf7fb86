"""Compare runs: test losses, deltas from a baseline, the run-to-run noise, and verdicts.

    python compare.py out/base-* out/gc-* [--baseline=RUN] [--split=test|val] [--markdown] [--json]
                      [--usd_per_hour=2.5] [--charts=DIR] [--noise_from=RUN | --noise_std=0.0017] [--correction=holm]
                      [--reference=gpt2 [--ledger=results.jsonl]] [--results=FILE]

A run's interventions are its config's differences from the baseline's. Runs whose configs differ
only in seed or data_seed form a replicate group (mean, std, n); each group's delta from the
baseline group gets a 95% interval, a p-value and a verdict from the test its runs allow: paired t
when the two groups hold the same seeds, else Welch's t or a bootstrap, or for a single run a t
or z with another group's std or a given one (gpt_interventions/verdicts.py, stats.py). The
verdicts of one table are corrected as a family (Holm by default), so that ten comparisons keep a
5% chance of any false "better" or "worse". --results adds runs made elsewhere (CSV or JSONL);
--reference adds models scored by eval.py (original GPT-2 weights, say) from its results ledger.
Runs of several token budgets (a WSD run and its branched cooldowns, say) are judged budget by
budget, each against the baseline's configuration at that budget, with one correction over the
whole table. Runs scored with `eval.py RUN --task=hellaswag` get a HellaSwag acc_norm column and a second
verdict table for it, judged the same way from the runs' spread (higher is better).
A run's test loss is eval.py's float32 score of its final checkpoint (gpt_interventions/
eval_results.py); a run without one is left out of the verdicts, listed, and never judged on its
validation loss beside test losses (--split=val judges every run on validation). A baseline
without a loss is refused.
"""

import dataclasses
import json
import math
from dataclasses import dataclass

from gpt_interventions.cli import field, parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.results import (SPLIT_HELP, SPLITS, by_budget, diff, find, group_runs, import_results,
                                       judged_lines, load_runs)
from gpt_interventions.stats import CORRECTIONS, TESTS, format_p, summary
from gpt_interventions.tables import table
from gpt_interventions.verdicts import judge_budgets, noise_sources

USAGE = "RUN_DIR_OR_GLOB... [--key=value ...]   (or --results=FILE)"


@dataclass
class CompareConfig:
    baseline: str = field("", "baseline run (its name or directory); default: the first run given")
    split: str = field("test", SPLIT_HELP, choices=SPLITS)
    markdown: bool = field(False, "print Markdown tables, ready to paste into interventions.md")
    json: bool = field(False, "print one JSON object (runs, groups with their tests, noise) instead of tables")
    usd_per_hour: float = field(0.0, "price of one GPU-hour: adds a cost column; 0: no cost column")
    charts: str = field("", "also draw the runs' curves on shared axes as PNG files in this directory")
    correction: str = field("holm", "family-wise correction of the table's verdicts", choices=CORRECTIONS)
    test: str = field("auto", "auto: paired t for groups with the baseline's seeds, else Welch's t; bootstrap: "
                      "a percentile bootstrap instead of Welch (its 95% intervals cover 91-94% at 10-30 runs)",
                      choices=TESTS)
    noise_from: str = field("", "a run whose replicate group's std judges groups without replicates; "
                                "default: the baseline's group")
    noise_std: float = field(0.0, "a known run-to-run std of the test loss that judges groups without "
                                  "replicates (a z test); 0: measured, as --noise_from")
    results: str = field("", "runs made elsewhere: a CSV or JSONL file with run, test_loss and config "
                             "columns (e.g. assets/story/results.csv)")
    reference: str = field("", "models scored by eval.py to list beside the runs, comma-separated, named "
                               "as eval.py was given them (e.g. gpt2): each one's latest matching test row "
                               "in --ledger")
    ledger: str = field("results.jsonl", "eval.py's results ledger, read for --reference")


ACCURACY = "hellaswag/val"  # what the accuracy verdicts judge


@dataclass
class Reference:
    name: str
    loss: float
    tokens: int
    accuracy: float | None = None  # its latest HellaSwag acc_norm in the ledger


def load_references(specs, ledger, runs):
    """Each spec's latest test row in eval.py's ledger scored like the runs: the same dataset,
    test token count and block size (the same windows), so that its loss compares with theirs."""
    if not specs:
        return []
    datasets = {r.config["dataset"] for r in runs}
    blocks = {r.config["block_size"] for r in runs}
    if len(datasets) > 1 or len(blocks) > 1:
        raise UsageError("--reference needs runs on one dataset and block_size; these have "
                         f"{sorted(datasets)} and {sorted(blocks)}")
    dataset, block = datasets.pop(), blocks.pop()
    budgets = {r.test_tokens for r in runs if r.source == "test" and r.test_tokens is not None}
    try:
        with open(ledger) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"--ledger={ledger} does not exist: eval.py writes it "
                         f"(python eval.py MODEL --dataset={dataset})") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--ledger={ledger} is not a readable results ledger ({e})") from None

    def scored(r):  # (tokens, window length) of a ledger row: eval.py --block_size, else the model's
        return r.get("tokens"), r.get("window") or ((r.get("config") or {}).get("model") or {}).get("block_size")

    refs = []
    for spec in specs:
        tested = [r for r in rows if isinstance(r, dict) and spec in (r.get("model"), r.get("hub_id"))
                  and r.get("dataset") == dataset and r.get("split") == "test"]
        same = [r for r in tested if scored(r)[1] == block and (not budgets or scored(r)[0] in budgets)]
        if not same:
            want = f"{'/'.join(map(str, sorted(budgets)))} tokens" if budgets else "any tokens"
            have = "; it has " + ", ".join(f"{t} tokens at block_size {b}" for t, b in sorted(
                {scored(r) for r in tested}, key=str)) if tested else ""
            flag = f" --eval_tokens={next(iter(budgets))}" if len(budgets) == 1 else ""
            raise UsageError(f"--reference={spec}: no {dataset}/test row in {ledger} with the runs' {want} at "
                             f"block_size {block}{have}; score it: python eval.py {spec} --dataset={dataset}"
                             f"{flag} --ledger={ledger}")
        task = [r for r in rows if isinstance(r, dict) and spec in (r.get("model"), r.get("hub_id"))
                and r.get("task") == "hellaswag"]
        refs.append(Reference(spec, same[-1]["loss"], same[-1]["tokens"], task[-1]["acc_norm"] if task else None))
    return refs


def hms(seconds):
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def accuracy_text(acc):
    return "n/a" if acc is None else f"{acc:.4f}"


def run_table(runs, baseline, means, cc, refs=()):
    scored = any(r.accuracy is not None for r in runs)  # the HellaSwag column only when a run has it
    headers = ["run", "interventions", "seed", f"{cc.split} loss", "delta", *(["hellaswag"] if scored else []),
               "train loss", "tokens", "wall", "tok/s"]
    headers += ["cost (USD)"] if cc.usd_per_hour else []
    rows = []
    for r in runs:
        seed = f"{r.config.get('seed')}" + (f"/d{r.config['data_seed']}" if r.config.get("data_seed") else "")
        loss = "n/a" if r.loss is None else f"{r.loss:.6f}"
        base_mean = means.get(id(r))  # its budget's baseline group's
        delta = "" if r.loss is None or base_mean is None else f"{r.loss - base_mean:+.6f}"
        train, tokens, wall = r.last("loss"), r.last("tokens") or 0, r.wall_s
        row = [r.name, diff(r.config, baseline.config) or "baseline", seed, loss, delta,
               *([accuracy_text(r.accuracy)] if scored else []), f"{train:.4f}" if train is not None else "n/a",
               f"{tokens:,}", hms(wall), f"{r.own_tokens / wall:,.0f}" if wall else "n/a"]
        row += [f"{wall / 3600 * r.world_size * cc.usd_per_hour:.2f}"] if cc.usd_per_hour else []
        rows.append(row)
    for ref in refs:
        base_mean = means.get(id(baseline))
        delta = "" if base_mean is None else f"{ref.loss - base_mean:+.6f}"
        acc = [accuracy_text(ref.accuracy)] if scored else []
        rows.append([ref.name, "reference (eval.py)", "", f"{ref.loss:.6f}", delta, *acc]
                    + [""] * (len(headers) - 5 - len(acc)))
    return table(headers, rows, cc.markdown)


def verdict_text(c):
    """The verdict, naming the correction it was read after."""
    if c.p is None or c.correction == "none":
        return c.verdict
    return f"{c.verdict} ({c.correction})"


def group_table(rows, cc, split):
    """The verdicts; `split`: what every row's values are (test or val loss, hellaswag/val). A
    budget column when the table holds several budgets."""
    budgets = any(r.budget is not None for r in rows)
    headers = [*(["budget (train tokens)"] if budgets else []), "group", "interventions", "split", "n", "mean", "std",
               "delta", "95% interval", "p", "p adj.", "verdict", "test"]
    out = []
    for r in rows:
        std = f"{r.std:.6f}" if r.std is not None else "n/a"
        head = [*([f"{r.budget:,}"] if budgets else []), r.group.runs[0].name + (f" +{r.n - 1}" if r.n > 1 else ""),
                r.group.label, split, str(r.n), f"{r.mean:.6f}", std]
        c = r.comparison
        if c is None:
            out.append(head + ["", "", "", "", "baseline", ""])
            continue
        interval = f"[{c.low:+.6f}, {c.high:+.6f}]" if c.low is not None else "n/a"
        out.append(head + [f"{c.delta:+.6f}", interval, format_p(c.p), format_p(c.p_adjusted), verdict_text(c), c.test])
    return table(headers, out, cc.markdown)


def noise_lines(sources, noises, rows, cc):
    """Where the run-to-run noise comes from, what judged single runs, and what the runs can see."""
    lines = []
    for kind, what in (("repeats", "identical configs and seeds: the hardware"),
                       ("seeds", "other seeds: initial weights and dropout, and the hardware"),
                       ("data order", "other data_seed")):
        if kind in sources:
            std, df = sources[kind]
            zero = " (zero: no noise estimate from these)" if std == 0 else ""
            lines.append(f"noise: {kind} ({what}) std {std:.6f}, df {df}{zero}")
    for budget, noise in noises:
        if noise is not None:
            at = f"at {budget:,} tokens, " if budget is not None else ""
            lines.append(f"{at}single runs are judged with the std {noise[0]:.6f} of {noise[2]}")
    found = [r.detectable for r in rows if r.detectable is not None]
    if found:
        lines.append(f"smallest true difference these runs detect with 80% power ({cc.correction}): "
                     f"{min(found):.6f}" + (f" to {max(found):.6f}" if max(found) > min(found) * 1.0001 else "")
                     + "; a smaller real effect may read as within noise")
    return lines


def json_rows(rows, cc, split):
    """The verdict table's rows as plain data."""
    out_rows = []
    for r in rows:
        c = r.comparison
        row = {"group": r.group.label, "run": r.group.runs[0].name, "split": split,
               "runs": [x.name for x in r.group.runs if x.loss is not None],
               "n": r.n, "mean": r.mean, "std": r.std, "delta": 0.0 if c is None else c.delta,
               "ci_low": None, "ci_high": None, "p": None, "p_adjusted": None, "test": "",
               "verdict": "baseline", "correction": cc.correction, "detectable": r.detectable,
               **({"budget": r.budget} if r.budget is not None else {})}
        if c is not None:
            row.update(ci_low=c.low, ci_high=c.high, p=c.p, p_adjusted=c.p_adjusted, test=c.test,
                       verdict=c.verdict, correction=c.correction, paired=c.test.startswith("paired"))
            if c.other:
                row["unpaired"] = {"test": c.other["unpaired_test"], "ci_low": c.other["unpaired_ci_low"],
                                   "ci_high": c.other["unpaired_ci_high"], "p": c.other["unpaired_p"]}
        out_rows.append(row)
    return out_rows


def report(runs, baseline, t, refs, base_mean, cc, accuracy=None):
    """The --json object of the loss verdicts `t`; accuracy: the HellaSwag verdicts when runs have them."""
    rows = t.rows
    group_of = {id(run): r.group.label for r in rows for run in r.group.runs}
    out = {"baseline": baseline.name, "split": cc.split, "correction": cc.correction,
            "rows": json_rows(rows, cc, cc.split),
            "runs": [{"run": x.name, "dir": x.dir, "group": group_of.get(id(x)), "seed": x.config.get("seed"),
                      "data_seed": x.config.get("data_seed"), "loss": x.loss, "source": x.source,
                      "scored": x.scored or None, "left_out": x.missing or None, "budget": x.budget} for x in runs],
            "references": [{"name": f.name, "loss": f.loss, "delta": f.loss - base_mean}
                           for f in refs],
            **noise_json(t)}
    if accuracy is not None:
        out["runs"] = [{**r, "hellaswag": x.accuracy} for r, x in zip(out["runs"], runs)]
        out["references"] = [{**r, "hellaswag": f.accuracy} for r, f in zip(out["references"], refs)]
        out["hellaswag"] = {"metric": "acc_norm", "rows": json_rows(accuracy.rows, cc, ACCURACY), **noise_json(accuracy)}
    return out


def noise_json(t):
    used = [None if n is None else {"std": n[0], "n": n[1], "from": n[2]} for _, n in t.noises]
    out = {"noise": {k: {"std": s, "df": df} for k, (s, df) in t.sources.items()},
           "noise_used": used[0] if used else None}
    if len(t.noises) > 1:
        out["noise_used_by_budget"] = {str(b): u for (b, _), u in zip(t.noises, used)}
    return out


def notes(runs, split):
    out = judged_lines(runs, split)
    budgets = {(r.config["dataset"], r.test_tokens) for r in runs if r.source == "test" and r.test_tokens}
    if len(budgets) > 1:
        out.append("warning: test losses come from different datasets or token budgets: "
                   + ", ".join(f"{d}/{t}" for d, t in sorted(budgets)))
    counts = {r.accuracy_examples for r in runs if r.accuracy is not None}
    if len(counts) > 1:
        out.append("warning: HellaSwag accuracies come from different numbers of examples: "
                   + ", ".join(map(str, sorted(counts))))
    return out


def pick_noise(cc, runs, groups, loss=True):
    """(std, n or None, name) that judges a group with a single run: --noise_std (known), the
    group of --noise_from, else the baseline's group when it has replicates. loss=False (HellaSwag
    accuracies): --noise_std, a std of the loss, does not apply; no replicates is no estimate."""
    if loss and cc.noise_std and cc.noise_from:
        raise UsageError("--noise_std and --noise_from: give one")
    if loss and not (math.isfinite(cc.noise_std) and cc.noise_std >= 0):
        raise UsageError(f"--noise_std must be a finite std (0: measure it), got {cc.noise_std}")
    if loss and cc.noise_std:
        return cc.noise_std, None, f"--noise_std={cc.noise_std:g} (given)"
    source = find(runs, cc.noise_from, "noise_from") if cc.noise_from else None
    group = next(g for g in groups if source in g.runs) if source else groups[0]
    if len(group.losses) >= 2:
        return summary(group.losses)[1], len(group.losses), group.label
    if cc.noise_from and loss:
        raise UsageError(f"--noise_from={cc.noise_from}: its group has {len(group.losses)} run(s); "
                         "replicates (other seeds) are needed to measure the noise")
    return None


@dataclass
class Verdicts:
    """A verdict table over every token budget of the runs, and what judged it."""
    rows: list      # verdicts.Verdict of every budget, each against its budget's baseline group
    groups: list    # the replicate groups of every budget
    sources: dict   # noise_sources of the groups
    noises: list    # [(budget, the noise that judged its single runs, or None)]
    means: dict     # id(run) -> its budget's baseline mean, for the deltas
    unjudged: list  # budgets without a run of the baseline's configuration


def judge_runs(runs, baseline, cc, loss=True):
    """Each budget's groups against the baseline's configuration at that budget (one part of
    budget None when the runs have one), corrected as one family. loss=False: HellaSwag accuracies,
    higher is better, and a budget whose baseline has none is left out."""
    source = find(runs, cc.noise_from, "noise_from") if cc.noise_from else None
    parts, groups, noises, means, unjudged = [], [], [], {}, []
    for budget, these, base in by_budget(runs, baseline):
        if base is None:
            unjudged.append(budget)
            continue
        gs = group_runs(these, base)
        if not gs[0].losses:  # its baseline has no value (not yet evaluated, diverged): nothing to judge against
            unjudged.append(budget)
            continue
        here = cc if source is None or source in these else dataclasses.replace(cc, noise_from="")  # its budget's
        noise = pick_noise(here, these, gs, loss)
        parts.append((budget, gs, noise))
        groups += gs
        noises.append((budget, noise))
        mean = summary(gs[0].losses)[0] if gs[0].losses else None
        means.update({id(r): mean for r in these})
    rows = judge_budgets(parts, cc.correction, test=cc.test, higher_is_better=not loss)
    return Verdicts(rows, groups, noise_sources(groups), noises, means, unjudged)


def main(argv):
    (cc,), patterns, _ = parse_config(argv, [CompareConfig], "compare.py", USAGE, max_positionals=10 ** 6)
    if not patterns and not cc.results:
        raise UsageError(f"which runs? usage: compare.py {USAGE}")
    if (cc.results or cc.reference) and cc.split != "test":
        raise UsageError(f"--results and --reference give test losses and --split={cc.split} judges another "
                         "split: give one or the other")
    runs = load_runs(patterns, cc.split) if patterns else []
    imported_refs = []
    if cc.results:
        imported, imported_refs = import_results(cc.results)
        runs += imported
    baseline = find(runs, cc.baseline, "baseline") if cc.baseline else runs[0]
    if not group_runs(runs, baseline)[0].losses:  # nothing could be judged: refuse rather than print a table of "baseline"
        others = [r.name for r in runs if r.loss is not None]
        instead = (f"name another with --baseline=RUN (runs with one: {', '.join(others)})" if others else
                   "no run has one" + (" (judge validation losses: --split=val)" if cc.split == "test" else ""))
        raise UsageError(f"baseline {baseline.name} has no {cc.split} loss to judge against ({baseline.missing}); "
                         f"{instead}")
    t = judge_runs(runs, baseline, cc)
    refs = load_references([s.strip() for s in cc.reference.split(",") if s.strip()], cc.ledger, runs)
    refs += [Reference(name, loss, None) for name, loss in imported_refs]
    accuracy = judge_accuracy(runs, baseline, cc)
    if cc.json:
        print(json.dumps(report(runs, baseline, t, refs, t.means.get(id(baseline)), cc, accuracy), indent=2))
    else:
        print(run_table(runs, baseline, t.means, cc, refs))
        print()
        print(group_table(t.rows, cc, cc.split))
        for line in noise_lines(t.sources, t.noises, t.rows, cc) + notes(runs, cc.split) + unjudged_lines(t, baseline):
            print(line)
        if accuracy is not None:
            print()
            print("HellaSwag acc_norm (higher is better):")
            print(group_table(accuracy.rows, cc, ACCURACY) if accuracy.rows else "no verdicts: the baseline has no HellaSwag "
                  f"accuracy (python eval.py {baseline.dir} --task=hellaswag)")
            for line in noise_lines(accuracy.sources, accuracy.noises, accuracy.rows, cc):
                print(f"hellaswag {line}")
    if cc.charts:
        from gpt_interventions.charts import save
        label = {id(run): g.label for g in t.groups for run in g.runs}
        drawn = save([(r.name, r.rows, r.config.get("grad_clip", 0.0), label.get(id(r), diff(r.config, baseline.config)))
                      for r in runs if r.rows], cc.charts)
        if not cc.json:
            print(f"charts: {', '.join(drawn)}")


def unjudged_lines(t, baseline):
    return [f"not judged at {b:,} tokens: no run there in the baseline's configuration ({baseline.name}'s) has a "
            "loss; train and evaluate one, e.g. as a branched cooldown" for b in t.unjudged if b is not None]


def judge_accuracy(runs, baseline, cc):
    """The verdicts of the runs' HellaSwag acc_norm, by the code path of the losses: the same
    groups, tests and correction; None when no run has an accuracy. Rows are empty when the
    baseline's group has none."""
    if all(r.accuracy is None for r in runs):
        return None
    scored = [dataclasses.replace(r, loss=r.accuracy, source="hellaswag") for r in runs]
    return judge_runs(scored, next(s for s, r in zip(scored, runs) if r is baseline), cc, loss=False)


if __name__ == "__main__":
    run_main(main)
