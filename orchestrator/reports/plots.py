"""``kvorch report --plot DIR``: the density-ΔNLL frontier, density vs KL with confidence
intervals, NLL by position, for probe runs the retrieval heatmap and for question tasks the
answer score against density as PNGs, and an HTML page that shows them with the tables they are
drawn from.

matplotlib runs on its Agg backend (files only, no display), so plotting works on headless
clusters and in tests.

Every plot draws a sweep (or config) in the colour of its label (:func:`colour`): the methods of
``--methods all`` in registry order, any other label hashed into a fixed palette, so a label has
one colour in every plot of every run. Error bars are the tables' intervals as computed; an axis
whose values span a cluster and a far outlier (the window config's ΔNLL) is symlog, linear over
the cluster; the dotted density lines appear only for ``--densities``; a config a plot cannot
place (no compressible density, no KL) is named in a note on the plot and on stderr.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from orchestrator.errors import KvorchError
from orchestrator.reports.formatting import cell
from orchestrator.reports.tables import Table, left_out
from workers.contract.defaults import ALL_METHODS

# The report tables the plots are drawn from.
PLOTTED_TABLES = ("pareto", "frontier", "paired", "by_position", "retrieval", "answers")
# The record of what write_plots wrote into a directory (name -> sha256): a file of a name it is
# about to write is replaced only when that record shows kvorch wrote it and no one changed it since.
PLOTS_RECORD = ".kvorch-plots.json"
# The colours of --methods all, in registry order (baseline black, then matplotlib's tab10).
METHOD_COLOURS = dict(
    zip(
        ALL_METHODS,
        ["#000000", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"],
        strict=False,
    )
)
# Any other label (a method with other parameters, head_aware, kvzap, kvpress:...): hashed into these.
OTHER_COLOURS = (
    "#1f77b4", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
    "#9edae5", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#393b79",
)  # fmt: skip
# Line styles of the configs of one sweep in by_position.png (they share the sweep's colour).
DASHES = ("-", "--", "-.", ":")
# Markers of the context lengths in answers.png (with DASHES as their line styles).
MARKERS = ("o", "s", "^", "D", "v", "P")


def colour(label: str) -> str:
    """The colour of a sweep or config label, the same in every plot and every run: a config
    (``h2o@1``) takes its sweep's (``h2o``), a plain method its place in the registry order."""
    press = label.split("@")[0]
    if press in METHOD_COLOURS:
        return METHOD_COLOURS[press]
    digest = hashlib.sha256(press.encode()).digest()
    return OTHER_COLOURS[int.from_bytes(digest[:4], "little") % len(OTHER_COLOURS)]


def write_plots(
    directory: str, run_id: str, tables: Mapping[str, Table], densities: Sequence[float] | None = None
) -> list[Path]:
    """Write frontier.png, by_position.png, kl.png (runs with agreement), retrieval.png (probe
    runs), answers.png (question tasks) and index.html into ``directory``, from ``tables`` (as
    :func:`plot_figures` takes them); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    figures = plot_figures(run_id, tables, densities)
    check_plot_dir(out, [*figures, "index.html"])  # the names this call writes, before it writes any
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvorchError(
            f"cannot create plot directory {directory} ({exc.strerror}); pass a writable --plot"
        ) from None
    paths = []
    for name, fig in figures.items():
        paths.append(out / name)
        fig.savefig(paths[-1])
        plt.close(fig)
    paired, by_position, retrieval = tables["paired"], tables["by_position"], tables["retrieval"]
    shown = [t for t in (tables.get("compare"), tables["frontier"], tables["pareto"]) if t is not None]
    if "kl.png" in figures:
        shown.append(paired)
    shown.append(by_position)
    if retrieval.rows:
        shown.append(retrieval)
    answers = tables.get("answers")
    if answers is not None and answers.rows:
        shown.append(answers)
    page = out / "index.html"
    notes = [reason for t in shown if (reason := left_out(t))]
    notes += [left_out(t) for t in (retrieval, answers) if t is not None and not t.rows]
    shown = [t for t in shown if left_out(t) is None]
    page.write_text(_html(run_id, paths, shown, notes), encoding="utf-8")
    record = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [*paths, page]}
    (out / PLOTS_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    return [*paths, page]


def check_plot_dir(out: Path, names: Sequence[str]) -> None:
    """Refuse, before anything is written, a ``--plot`` directory holding a file of a plot's name
    that kvorch did not write there (a user's own ``index.html``) or that changed since, and any
    link of such a name: a report never overwrites what it did not make."""
    try:
        record = json.loads((out / PLOTS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    for name in (*names, PLOTS_RECORD):
        path = out / name
        if not path.is_symlink() and not path.exists():
            continue
        if name == PLOTS_RECORD and not path.is_symlink() and path.is_file():
            continue
        ours = path.is_file() and not path.is_symlink() and record.get(name) == _sha256(path)
        if not ours:
            raise KvorchError(
                f"--plot {out} already holds {name}, which kvorch did not write there; pass an empty or new "
                "directory for --plot (nothing was written)"
            )


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def plot_figures(run_id: str, tables: Mapping[str, Table], densities: Sequence[float] | None = None) -> dict:
    """The plots as matplotlib figures, by file name, unsaved (the caller closes them): from
    ``tables``, each of PLOTTED_TABLES by name (``answers`` may be absent), and ``compare``, whose configs a plot that
    leaves one out names (on the plot and on stderr). ``densities``: the ``--densities`` asked
    for, drawn as dotted lines on frontier.png (None: no lines)."""
    import matplotlib

    matplotlib.use("Agg")
    pareto, paired, retrieval = tables["pareto"], tables["paired"], tables["retrieval"]
    compare = tables.get("compare")
    configs = [r["config"] for r in (compare or pareto).records()]
    figures = {"frontier.png": _frontier_figure(run_id, pareto, configs, densities)}
    if any(r["mean_kl"] is not None for r in paired.records()):
        figures["kl.png"] = _kl_figure(run_id, pareto, paired, configs)
    figures["by_position.png"] = _by_position_figure(run_id, tables["by_position"])
    if retrieval.rows:
        figures["retrieval.png"] = _retrieval_figure(run_id, retrieval)
    answers = tables.get("answers")
    if answers is not None and answers.rows:
        figures["answers.png"] = _answers_figure(run_id, answers)
    budgets = tables.get("head_budget_cells")  # sql/head_budget_cells.sql, one row per head
    if budgets is not None and budgets.rows:  # orchestrator/reports/head_budget_plot.py
        from orchestrator.reports.head_budget_plot import head_budgets_figure

        figures["head_budgets.png"] = head_budgets_figure(run_id, budgets)
    return figures


def _frontier_figure(run_id: str, pareto: Table, configs: list[str], densities: Sequence[float] | None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    sweeps: dict[str, list[dict]] = {}
    for point in pareto.records():
        sweeps.setdefault(point["press"], []).append(point)
    for press, points in sorted(sweeps.items()):
        points.sort(key=lambda p: p["density_compressible"])
        ax.plot(
            [p["density_compressible"] for p in points],
            [p["delta_nll_pct"] for p in points],
            marker="o",
            color=colour(press),
            label=press,
        )
    front = sorted((p for p in pareto.records() if p["on_frontier"]), key=lambda p: p["density_compressible"])
    if front:
        ax.step(
            [p["density_compressible"] for p in front],
            [p["delta_nll_pct"] for p in front],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            alpha=0.6,
            label="Pareto frontier",
        )
    for target in densities or ():
        ax.axvline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("compressible density (kept / keys outside every protected region)")
    _readable_y(ax, [p["delta_nll_pct"] for p in pareto.records()], "ΔNLL vs baseline (%)")
    dotted = " (dotted: --densities)" if densities else ""
    ax.set_title(f"Density-ΔNLL frontier, run {run_id}{dotted}")
    placed = {p["config"] for p in pareto.records()}
    missing = [(c, "no compressible density or ΔNLL") for c in configs if c not in placed]
    return _finish(fig, ax, "frontier.png", missing)


def _kl_figure(run_id: str, pareto: Table, paired: Table, configs: list[str]):
    """Density vs KL(baseline || config): each sweep a line, each config's per-document mean KL
    with its 95 % t interval as an error bar, as the paired table computes it (with few
    documents the t interval would reach below 0, where no KL can be: sql/paired.sql clips it at 0)."""
    import matplotlib.pyplot as plt

    kl = {r["config"]: r for r in paired.records() if r["mean_kl"] is not None}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    sweeps: dict[str, list[tuple[float, dict]]] = {}
    for point in pareto.records():
        if point["config"] in kl:
            sweeps.setdefault(point["press"], []).append((point["density_compressible"], kl[point["config"]]))
    values = []
    for press, points in sorted(sweeps.items()):
        points.sort(key=lambda p: p[0])
        means = [r["mean_kl"] for _, r in points]
        lows = [_finite(r["kl_ci95_low"], m) for m, (_, r) in zip(means, points, strict=True)]
        highs = [_finite(r["kl_ci95_high"], m) for m, (_, r) in zip(means, points, strict=True)]
        yerr = [
            [m - lo for m, lo in zip(means, lows, strict=True)],
            [hi - m for m, hi in zip(means, highs, strict=True)],
        ]
        ax.errorbar([d for d, _ in points], means, yerr=yerr, marker="o", capsize=3, color=colour(press), label=press)
        values += [*means, *lows, *highs]
    if any(v < 0 for v in values):
        ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("compressible density (kept / keys outside every protected region)")
    _readable_y(ax, values, "KL(baseline || config) per token (nats)")
    ax.set_title(f"Density vs KL(baseline || config), run {run_id}\n(bars: 95 % t interval over documents)")
    placed = {c for points in sweeps.values() for c in (r["config"] for _, r in points)}
    why = {c: "no KL" if c not in kl else "no compressible density" for c in configs}
    return _finish(fig, ax, "kl.png", [(c, why[c]) for c in configs if c not in placed])


def _readable_y(ax, values: Iterable[float | None], label: str) -> None:
    """Label the y axis, and make it symlog when a far point (the window config) would squash the
    rest into a sliver: linear up to the bulk of the values (their 75th percentile, rounded up
    to 1, 2 or 5 times a power of ten), logarithmic beyond."""
    values = list(values)
    magnitudes = sorted(abs(v) for v in values if v is not None and math.isfinite(v))
    ax.set_ylabel(label)
    if len(magnitudes) < 3:
        return
    bulk = magnitudes[int(0.75 * (len(magnitudes) - 1))]
    if bulk <= 0 or magnitudes[-1] <= 4 * bulk:
        return
    linthresh = _nice_ceiling(bulk)
    ax.set_yscale("symlog", linthresh=linthresh, linscale=1.5)
    ax.margins(y=0.03)  # margins are of the transformed axis: the default 5 % spans much of the linear part
    finite = [v for v in values if v is not None and math.isfinite(v)]
    ax.set_yticks(_symlog_ticks(linthresh, min(finite), max(finite)))
    ax.yaxis.set_major_formatter("{x:g}")
    ax.set_ylabel(f"{label}\nlinear to ±{linthresh:g}, logarithmic beyond")


def _symlog_ticks(linthresh: float, low: float, high: float) -> list[float]:
    """Ticks of a symlog axis within [low, high]: fifths of the linear part, then 1, 2 and 5
    times each power of ten beyond it (both signs)."""
    ticks = {k * linthresh / 5 for k in range(-5, 6)}
    power = 10.0 ** math.floor(math.log10(linthresh))
    while power <= max(abs(low), abs(high)):
        ticks |= {sign * m * power for m in (1, 2, 5) for sign in (1, -1) if m * power > linthresh}
        power *= 10
    return sorted(t for t in ticks if low <= t <= high)


def _nice_ceiling(value: float) -> float:
    """The least of 1, 2, 5 times a power of ten that is at least ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value * (1 - 1e-12))


def _finish(fig, ax, name: str, missing: Sequence[tuple[str, str]] = ()):
    """The finish the line plots share: grid, legend, tight layout, and a note naming each
    config the plot could not place (also on stderr)."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # a panel with no labelled line has no legend to draw
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout(rect=(0, _note_left_out(fig, name, missing), 1, 1))
    return fig


def _note_left_out(fig, name: str, missing: Sequence[tuple[str, str]]) -> float:
    """Name each config the plot could not place, under the plot and on stderr; the margin that
    leaves at the bottom (0 when nothing is left out)."""
    if not missing:
        return 0.0
    text = "; ".join(f"{config} ({why})" for config, why in missing)
    fig.text(0.01, 0.01, f"left out: {text}", fontsize="small", ha="left", va="bottom", wrap=True)
    print(f"kvorch: {name} leaves out {text}", file=sys.stderr)
    return 0.06


def _finite(value: float | None, fallback: float) -> float:
    """An interval end, or the mean itself when there is none (one document: no interval)."""
    return fallback if value is None or not math.isfinite(value) else value


def _retrieval_figure(run_id: str, retrieval: Table):
    """The needle-in-a-haystack heatmap: insertion depth (rows) x context length (columns), one
    panel per config, each cell the share of probes answered exactly."""
    import matplotlib.pyplot as plt

    records = retrieval.records()
    if any(r.get("probe") is not None for r in records):
        return _probes_figure(run_id, records)
    configs = sorted({r["config"] for r in records})
    lengths = sorted({r["context_length"] for r in records})
    depths = sorted({r["depth"] for r in records}, key=lambda d: (d is None, d))
    cells = {(r["config"], r["context_length"], r["depth"]): r["accuracy"] for r in records}
    columns = min(4, len(configs))
    rows = -(-len(configs) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.2 * columns + 1.2, 2.6 * rows + 0.9),
        dpi=110,
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    image = None
    for ax, config in zip(axes.flat, configs, strict=False):
        grid = [[cells.get((config, n, d), math.nan) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize="x-small")
        ax.set_title(config, fontsize="small")
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize="x-small")
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths], fontsize="x-small")
    for ax in list(axes.flat)[len(configs) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("depth")
    for ax in axes[-1, :]:
        ax.set_xlabel("context length (tokens)")
    task = ", ".join(sorted({str(r["task"]) for r in records}))
    fig.suptitle(f"Retrieval ({task}): exact-match accuracy by depth and length, run {run_id}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    return fig


def _probes_figure(run_id: str, records: list[dict]):
    """Bring-your-own probes: one row per probe (its id), one column per config, each cell 1
    when that config answered that probe exactly; a depth-by-length grid could not tell them apart."""
    import matplotlib.pyplot as plt

    configs = sorted({r["config"] for r in records})
    probes = sorted({str(r["probe"]) for r in records})
    cells = {(str(r["probe"]), r["config"]): r["accuracy"] for r in records}
    grid = [[cells.get((p, c), math.nan) for c in configs] for p in probes]
    fig, ax = plt.subplots(
        figsize=(1.0 * len(configs) + 3.5, 0.35 * len(probes) + 2.2), dpi=110, layout="constrained"
    )
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(configs)), configs, rotation=45, ha="right", fontsize="x-small")
    ax.set_yticks(range(len(probes)), probes, fontsize="x-small")
    ax.set_xlabel("config")
    ax.set_ylabel("probe (id)")
    ax.set_title(f"Your probes: answered exactly (1) or not (0), run {run_id}", fontsize="small")
    fig.colorbar(image, ax=ax, shrink=0.8, label="answered")
    return fig


def _answers_figure(run_id: str, answers: Table):
    """Question tasks: one panel per task, mean answer score against mean generated density (the
    density the model answered with), a point per config and context length. A sweep's configs
    share its colour and are joined by a line per length; lengths differ by line style and
    marker. A config without a generated density is named in a note and on stderr."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    records = answers.records()
    tasks = sorted({str(r["task"]) for r in records})
    lengths = sorted({r["context_length"] for r in records}, key=lambda n: (n is None, n))
    style = {n: (DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]) for i, n in enumerate(lengths)}
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5.2 * columns + 1.0, 4.2 * rows + 0.8), dpi=110, squeeze=False, sharey=True
    )
    sweeps_drawn: set[str] = set()
    missing = []
    for ax, task in zip(axes.flat, tasks, strict=False):
        lines: dict[tuple[str, int | None], list[dict]] = {}
        for r in records:
            if str(r["task"]) != task:
                continue
            if r["generated_density"] is None or r["score"] is None:
                cell_name = f"{r['config']} at {_length_label(r['context_length'])}"
                missing.append((cell_name, f"{task}: no generated density"))
                continue
            lines.setdefault((r["config"].split("@")[0], r["context_length"]), []).append(r)
        for (sweep, length), points in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
            points.sort(key=lambda p: p["generated_density"])
            dash, marker = style[length]
            ax.plot(
                [p["generated_density"] for p in points],
                [p["score"] for p in points],
                linestyle=dash,
                marker=marker,
                color=colour(sweep),
                label=f"_{sweep} {length}",
            )
            sweeps_drawn.add(sweep)
        ax.set_title(task, fontsize="small")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_xlabel("generated density (kept / uncompressed keys)")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean answer score")
    handles = [Line2D([], [], color=colour(s), label=s) for s in sorted(sweeps_drawn)]
    if len(lengths) > 1:
        handles += [
            Line2D([], [], color="grey", linestyle=style[n][0], marker=style[n][1], label=f"{_length_label(n)} tokens")
            for n in lengths
            if n is not None
        ]
    axes.flat[0].legend(handles=handles, fontsize="small", loc="best")
    fig.suptitle(f"Answer score vs generated density per question task, run {run_id}")
    fig.tight_layout(rect=(0, _note_left_out(fig, "answers.png", missing), 1, 1))
    return fig


def _length_label(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _by_position_figure(run_id: str, by_position: Table):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    buckets = sorted({(r["bucket_start"], r["bucket"]) for r in by_position.records()})
    index = {start: i for i, (start, _) in enumerate(buckets)}
    configs: dict[str, list[dict]] = {}
    for r in by_position.records():
        configs.setdefault(r["config"], []).append(r)
    in_sweep: dict[str, int] = {}
    for config, rows in sorted(configs.items()):
        rows.sort(key=lambda r: r["bucket_start"])
        sweep = config.split("@")[0]
        dash = DASHES[in_sweep.get(sweep, 0) % len(DASHES)]
        in_sweep[sweep] = in_sweep.get(sweep, 0) + 1
        xs, ys = [index[r["bucket_start"]] for r in rows], [r["nll"] for r in rows]
        ax.plot(xs, ys, marker="o", color=colour(config), linestyle=dash, label=config)
    ax.set_xticks(range(len(buckets)), [label for _, label in buckets])
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("NLL per token (nats)")
    ax.set_title(f"NLL by position, run {run_id}")
    return _finish(fig, ax, "by_position.png")


def _html(run_id: str, images: list[Path], tables: list[Table], notes: list[str] = ()) -> str:
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>kvorch report {html.escape(run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>",
        f"</head><body><h1>kvorch report: run {html.escape(run_id)}</h1>",
    ]
    parts += [f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in images]
    if notes:  # the tables left out, and why
        parts.append("<ul>" + "".join(f"<li>left out {html.escape(n)}</li>" for n in notes) + "</ul>")
    for table in tables:
        parts.append(f"<h2>{html.escape(table.name)}</h2>")
        if table.caption:
            parts.append(f"<p>{html.escape(table.caption)}</p>")
        parts.append("<table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
