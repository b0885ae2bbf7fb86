"""Training curves as PNG files: one run's at the end of training, or many runs on shared axes.

matplotlib is imported inside the functions (Agg backend, no display), so importing this module,
or train.py, costs nothing until a chart is drawn.
"""

import json
import os
import textwrap

SMOOTHING = 0.9  # EMA weight of the smoothed train loss (TensorBoard's default look)
CHARTS = ("train_loss", "val_loss", "lr", "grad_norm", "tok_per_s")
ROUTING = "expert_frac"  # drawn too when a run logged its experts' routing (metrics rows' "expert_frac")
WIDTH, HEIGHT = 8, 4.5  # inches of a chart without its legend, drawn at 100 dpi
# The legend lies below the axes, never on the data: each label wrapped to fit the figure's width
# (LEGEND_CHARS characters of 8-point text), the figure made taller by LEGEND_LINE inches a line.
LEGEND_CHARS, LEGEND_LINE, LEGEND_FONT = 110, 0.19, 8


def read_run(run_dir):
    """(name, metrics rows, grad_clip) of one run directory written by train.py."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    name = config["train"].get("run_name") or os.path.basename(os.path.normpath(run_dir))
    return name, rows, config["train"].get("grad_clip", 0.0)


def smooth(values, weight=SMOOTHING):
    """Exponential moving average, bias-corrected so the first points are not pulled to 0."""
    weight = min(weight, 1 - 10 / max(len(values), 10))  # a short run: about 10 points of memory, not all lag
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _series(rows, key):
    pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw(runs):
    """One matplotlib Figure per chart in CHARTS, and ROUTING if a run has experts, for runs =
    [(name, rows, grad_clip[, group]), ...].

    Runs of one replicate group (the same configuration, other seeds) share a colour: each run a
    thin line, the group's mean a line and its min-max spread a band, so that two configurations
    that separate beyond their seeds' spread are seen to at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    routed = any(ROUTING in r for _, rows, *_ in runs for r in rows)
    for chart in CHARTS + ((ROUTING,) if routed else ()):
        fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT), dpi=100, layout="constrained")
        figs[chart] = (fig, ax)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = {}
    for name, rows, clip, *group in runs:
        groups.setdefault(group[0] if group else name, []).append((name, rows, clip))
    for i, (group, members) in enumerate(groups.items()):
        c = colors[i % len(colors)]
        if routed:
            for name, rows, _ in members:
                _draw_routing(figs[ROUTING][1], name, rows, c)
        if len(members) > 1:
            _draw_group(figs, group, members, c)
            continue
        name, rows, clip = members[0]
        x, y = _series(rows, "loss")
        ax = figs["train_loss"][1]
        ax.plot(x, y, color=c, alpha=0.3, linewidth=0.8, label=f"{name} (raw)")
        ax.plot(x, smooth(y), color=c, linewidth=1.6, label=f"{name} (smoothed)")
        x, y = _series(rows, "val_loss")
        figs["val_loss"][1].plot(x, y, color=c, marker="o", markersize=3, label=name)
        x, y = _series(rows, "lr")
        figs["lr"][1].plot(x, y, color=c, label=name)
        x, y = _series(rows, "grad_norm")
        ax = figs["grad_norm"][1]
        ax.plot(x, y, color=c, linewidth=0.9, label=f"{name} (pre-clip norm)")
        if clip > 0:
            ax.axhline(clip, color=c, linestyle="--", linewidth=1, label=f"{name} clip threshold {clip:g}")
            hits = [(r["tokens"], r["grad_norm"]) for r in rows if r.get("clipped")]
            if hits:
                ax.plot(*zip(*hits), linestyle="none", marker="x", color=c,
                        label=f"{name} clipped steps ({len(hits)} logged)")
        x, y = _series(rows, "tok_per_s")
        figs["tok_per_s"][1].plot(x, y, color=c, label=name)
    _decorate(figs)
    return {chart: fig for chart, (fig, _) in figs.items()}


def _draw_group(figs, group, members, c):
    """Thin lines for the runs, the mean as a line and the min-max band, in one colour."""
    n = len(members)
    for chart, key in (("train_loss", "loss"), ("val_loss", "val_loss"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                       ("tok_per_s", "tok_per_s")):
        ax = figs[chart][1]
        series = [_series(rows, key) for _, rows, _ in members]
        if key == "loss":
            series = [(x, smooth(y)) for x, y in series]
        xs = series[0][0]
        band = bool(xs) and all(x == xs for x, _ in series)  # the same logged steps: a band is meaningful
        dots = {"marker": "o", "markersize": 3} if key == "val_loss" else {}  # a few points: a line alone may not show
        for i, ((name, _, _), (x, y)) in enumerate(zip(members, series)):
            label = f"_{name}" if band or i else f"{group} ({n} runs)"  # _: not in the legend
            ax.plot(x, y, color=c, alpha=0.35, linewidth=0.7, label=label, **dots)
        if band:
            ys = [y for _, y in series]
            ax.fill_between(xs, [min(v) for v in zip(*ys)], [max(v) for v in zip(*ys)], color=c, alpha=0.15)
            ax.plot(xs, [sum(v) / n for v in zip(*ys)], color=c, linewidth=1.6,
                    label=f"{group} (mean of {n} runs, band: min-max)", **dots)
    clip = members[0][2]
    if clip > 0:
        figs["grad_norm"][1].axhline(clip, color=c, linestyle="--", linewidth=1, label=f"{group} clip threshold {clip:g}")


def _draw_routing(ax, name, rows, c):
    """The largest and the smallest expert's share of the token assignments, one line each per
    layer, against the share of balanced routing (1 / experts): a gap that opens is imbalance,
    a smallest share at 0 is an expert that no token uses."""
    pts = [(r["tokens"], r[ROUTING]) for r in rows if r.get(ROUTING)]
    if not pts:
        return
    x = [p[0] for p in pts]
    for layer in range(len(pts[0][1])):
        first = layer == 0  # one legend entry per run and kind of line
        ax.plot(x, [max(f[layer]) for _, f in pts], color=c, linewidth=1.1,
                label=f"{name} largest share (a line per layer)" if first else "_")
        ax.plot(x, [min(f[layer]) for _, f in pts], color=c, linewidth=1.1, linestyle="--",
                label=f"{name} smallest share" if first else "_")
    ax.axhline(1 / len(pts[0][1][0]), color=c, linestyle=":", linewidth=1,
               label=f"{name} balanced: 1/{len(pts[0][1][0])}")


def _decorate(figs):
    labels = {
        "train_loss": ("Train loss", "cross-entropy (nats/token)"),
        "val_loss": ("Validation loss (fixed tokens)", "cross-entropy (nats/token)"),
        "lr": ("Learning rate", "learning rate (per step)"),
        "grad_norm": ("Gradient norm before clipping", "global L2 norm"),
        "tok_per_s": ("Training throughput", "tokens/s"),
        ROUTING: ("Expert routing on fixed validation tokens", "share of the token assignments"),
    }
    for chart, (fig, ax) in figs.items():
        title, ylabel = labels[chart]
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if handles:
            names = [textwrap.fill(name, LEGEND_CHARS) for name in names]
            fig.set_figheight(HEIGHT + LEGEND_LINE * (sum(n.count("\n") + 1 for n in names) + 1))
            fig.legend(handles, names, loc="outside lower center", fontsize=LEGEND_FONT)


def save(runs, out_dir):
    """Write CHARTS (and ROUTING) as out_dir/NAME.png; returns {path: [series labels]} of what was drawn."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    drawn = {}
    for chart, fig in draw(runs).items():
        path = os.path.join(out_dir, f"{chart}.png")
        fig.savefig(path)
        drawn[path] = [line.get_label() for line in fig.axes[0].get_lines()]
        plt.close(fig)
    return drawn


def plot_run(run_dir):
    """A finished run's own charts, in run_dir/charts/; returns the paths written."""
    return list(save([read_run(run_dir)], os.path.join(run_dir, "charts")))
