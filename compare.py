"""Compare runs: test losses, deltas from a baseline, the run-to-run noise, and verdicts.

    python compare.py out/base-* out/gc-* [--baseline=RUN] [--markdown] [--usd_per_hour=2.5]
                      [--charts=DIR] [--noise_from=RUN] [--reference=gpt2 [--ledger=results.jsonl]]

A run's interventions are its config's differences from the baseline's. Runs whose configs differ
only in seed or data_seed form a replicate group (mean, std, n); each group's delta from the
baseline group gets a 95% interval and a verdict from the test its sample sizes allow (gpt_interventions/stats.py).
--reference adds models scored by eval.py (original GPT-2 weights, say) from its results ledger,
on the runs' dataset, test tokens and context length, with their delta from the baseline.
"""

import json
from dataclasses import dataclass

from gpt_interventions.cli import field, parse_config
from gpt_interventions.errors import UsageError, run_main
from gpt_interventions.results import diff, find, group_runs, load_runs
from gpt_interventions.stats import compare, summary
from gpt_interventions.tables import table

USAGE = "RUN_DIR_OR_GLOB... [--key=value ...]"


@dataclass
class CompareConfig:
    baseline: str = field("", "baseline run (its name or directory); default: the first run given")
    markdown: bool = field(False, "print Markdown tables, ready to paste into interventions.md")
    usd_per_hour: float = field(0.0, "price of one GPU-hour: adds a cost column; 0: no cost column")
    charts: str = field("", "also draw the runs' curves on shared axes as PNG files in this directory")
    noise_from: str = field("", "a run whose replicate group's std judges groups without replicates; "
                                "default: the baseline's group")
    reference: str = field("", "models scored by eval.py to list beside the runs, comma-separated, named "
                               "as eval.py was given them (e.g. gpt2): each one's latest matching test row "
                               "in --ledger")
    ledger: str = field("results.jsonl", "eval.py's results ledger, read for --reference")


@dataclass
class Reference:
    name: str
    loss: float
    tokens: int


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
    budgets = {r.test_tokens for r in runs if r.source == "test"}
    try:
        with open(ledger) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"--ledger={ledger} does not exist: eval.py writes it "
                         f"(python eval.py MODEL --dataset={dataset})") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--ledger={ledger} is not a readable results ledger ({e})") from None

    def scored(r):  # (tokens, block_size) of a ledger row
        return r.get("tokens"), ((r.get("config") or {}).get("model") or {}).get("block_size")

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
        refs.append(Reference(spec, same[-1]["loss"], same[-1]["tokens"]))
    return refs


def hms(seconds):
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_table(runs, baseline, base_mean, cc, refs=()):
    headers = ["run", "interventions", "seed", "test loss", "delta", "train loss", "tokens", "wall", "tok/s"]
    headers += ["cost (USD)"] if cc.usd_per_hour else []
    rows = []
    for r in runs:
        seed = f"{r.config.get('seed')}" + (f"/d{r.config['data_seed']}" if r.config.get("data_seed") else "")
        loss = "n/a" if r.loss is None else f"{r.loss:.6f}" + ("" if r.source == "test" else " (val)")
        delta = "" if r.loss is None or base_mean is None else f"{r.loss - base_mean:+.6f}"
        train, tokens, wall = r.last("loss"), r.last("tokens") or 0, r.wall_s
        row = [r.name, diff(r.config, baseline.config) or "baseline", seed, loss, delta,
               f"{train:.4f}" if train is not None else "n/a", f"{tokens:,}", hms(wall),
               f"{tokens / wall:,.0f}" if wall else "n/a"]
        row += [f"{wall / 3600 * r.world_size * cc.usd_per_hour:.2f}"] if cc.usd_per_hour else []
        rows.append(row)
    for ref in refs:
        delta = "" if base_mean is None else f"{ref.loss - base_mean:+.6f}"
        rows.append([ref.name, "reference (eval.py)", "", f"{ref.loss:.6f}", delta] + [""] * (len(headers) - 5))
    return table(headers, rows, cc.markdown)


def group_table(groups, noise, cc):
    headers = ["group", "interventions", "n", "mean", "std", "delta", "95% interval", "verdict", "test"]
    base = groups[0].losses
    rows = []
    for g in groups:
        if not g.losses:
            continue
        mean, std, n = summary(g.losses)
        std_s = f"{std:.6f}" if std is not None else "n/a"
        head = [g.runs[0].name + (f" +{n - 1}" if n > 1 else ""), g.label, str(n), f"{mean:.6f}", std_s]
        if g is groups[0]:
            rows.append(head + ["", "", "baseline", ""])
            continue
        c = compare(g.losses, base, noise)
        interval = f"[{c.low:+.6f}, {c.high:+.6f}]" if c.low is not None else "n/a"
        rows.append(head + [f"{c.delta:+.6f}", interval, c.verdict, c.test])
    return table(headers, rows, cc.markdown)


def notes(runs):
    out = []
    if any(r.source == "val" for r in runs):
        out.append("(val): no test evaluation in the run's eval.json; the last validation loss stands in "
                   "(run `python eval.py RUN_DIR --dataset=...` for the test loss)")
    budgets = {(r.config["dataset"], r.test_tokens) for r in runs if r.source == "test"}
    if len(budgets) > 1:
        out.append("warning: test losses come from different datasets or token budgets: "
                   + ", ".join(f"{d}/{t}" for d, t in sorted(budgets)))
    if any(r.loss is None for r in runs):
        out.append("n/a: a run with neither a test nor a validation loss")
    return out


def main(argv):
    (cc,), patterns, _ = parse_config(argv, [CompareConfig], "compare.py", USAGE, max_positionals=10 ** 6)
    if not patterns:
        raise UsageError(f"which runs? usage: compare.py {USAGE}")
    runs = load_runs(patterns)
    baseline = find(runs, cc.baseline, "baseline") if cc.baseline else runs[0]
    groups = group_runs(runs, baseline)
    noise = None
    source = find(runs, cc.noise_from, "noise_from") if cc.noise_from else baseline
    ng = next(g for g in groups if source in g.runs)
    if len(ng.losses) >= 2:
        noise = (summary(ng.losses)[1], len(ng.losses), ng.label)
    elif cc.noise_from:
        raise UsageError(f"--noise_from={cc.noise_from}: its group has {len(ng.losses)} run(s); "
                         "replicates (other seeds) are needed to measure the noise")
    refs = load_references([s.strip() for s in cc.reference.split(",") if s.strip()], cc.ledger, runs)
    base_mean = summary(groups[0].losses)[0] if groups[0].losses else None
    print(run_table(runs, baseline, base_mean, cc, refs))
    print()
    print(group_table(groups, noise, cc))
    for line in notes(runs):
        print(line)
    if cc.charts:
        from gpt_interventions.charts import save
        drawn = save([(r.name, r.rows, r.config.get("grad_clip", 0.0)) for r in runs], cc.charts)
        print(f"charts: {', '.join(drawn)}")


if __name__ == "__main__":
    run_main(main)
