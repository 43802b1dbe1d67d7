"""``kvorch report --plot DIR``: the density-ΔNLL frontier, density vs KL with confidence
intervals, NLL by position and, for probe runs, the retrieval heatmap as PNGs, and an HTML page
that shows them with the tables they are drawn from.

matplotlib runs on its Agg backend (files only, no display), so plotting works on headless
clusters and in tests.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

from orchestrator.errors import KvorchError
from orchestrator.reports.formatting import cell
from orchestrator.reports.tables import Table, left_out

# The report tables the plots are drawn from.
PLOTTED_TABLES = ("pareto", "frontier", "paired", "by_position", "retrieval")


def write_plots(directory: str, run_id: str, tables: Mapping[str, Table]) -> list[Path]:
    """Write frontier.png, by_position.png, kl.png (runs with agreement), retrieval.png (probe
    runs) and index.html into ``directory``, from ``tables`` (each of PLOTTED_TABLES by name);
    returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvorchError(
            f"cannot create plot directory {directory} ({exc.strerror}); pass a writable --plot"
        ) from None
    pareto, frontier, paired = tables["pareto"], tables["frontier"], tables["paired"]
    by_position, retrieval = tables["by_position"], tables["retrieval"]
    paths = [_frontier_png(out / "frontier.png", run_id, pareto, frontier)]
    shown = [t for t in (tables.get("compare"), frontier, pareto) if t is not None]
    if any(r["mean_kl"] is not None for r in paired.records()):
        paths.append(_kl_png(out / "kl.png", run_id, pareto, paired))
        shown.append(paired)
    paths.append(_by_position_png(out / "by_position.png", run_id, by_position))
    shown.append(by_position)
    if retrieval.rows:
        paths.append(_retrieval_png(out / "retrieval.png", run_id, retrieval))
        shown.append(retrieval)
    page = out / "index.html"
    notes = [reason for t in shown if (reason := left_out(t))]
    if not retrieval.rows:
        notes.append(left_out(retrieval))
    shown = [t for t in shown if left_out(t) is None]
    page.write_text(_html(run_id, paths, shown, notes), encoding="utf-8")
    return [*paths, page]


def _frontier_png(path: Path, run_id: str, pareto: Table, frontier: Table) -> Path:
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
            label="Pareto frontier",
        )
    for target in sorted({r["density"] for r in frontier.records()}):
        ax.axvline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("compressible density (kept / keys outside every protected region)")
    ax.set_ylabel("ΔNLL vs baseline (%)")
    ax.set_title(f"Density-ΔNLL frontier, run {run_id} (dotted: --densities)")
    return _save(fig, ax, path)


def _kl_png(path: Path, run_id: str, pareto: Table, paired: Table) -> Path:
    """Density vs KL(baseline || config): each sweep a line, each config's per-document mean KL
    with its 95 % t interval as an error bar (clipped at 0, where a KL cannot go)."""
    import matplotlib.pyplot as plt

    kl = {r["config"]: r for r in paired.records() if r["mean_kl"] is not None}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    sweeps: dict[str, list[tuple[float, dict]]] = {}
    for point in pareto.records():
        if point["config"] in kl:
            sweeps.setdefault(point["press"], []).append((point["density_compressible"], kl[point["config"]]))
    for press, points in sorted(sweeps.items()):
        points.sort(key=lambda p: p[0])
        means = [r["mean_kl"] for _, r in points]
        low = [m - _finite(r["kl_ci95_low"], m) for m, (_, r) in zip(means, points, strict=True)]
        high = [_finite(r["kl_ci95_high"], m) - m for m, (_, r) in zip(means, points, strict=True)]
        low = [min(d, m) for d, m in zip(low, means, strict=True)]  # the interval stops at KL = 0
        ax.errorbar([d for d, _ in points], means, yerr=[low, high], marker="o", capsize=3, label=press)
    ax.set_xlabel("compressible density (kept / keys outside every protected region)")
    ax.set_ylabel("KL(baseline || config) per token (nats)")
    ax.set_title(f"Density vs KL(baseline || config), run {run_id}\n(bars: 95 % t interval over documents)")
    return _save(fig, ax, path)


def _finite(value: float | None, fallback: float) -> float:
    """An interval end, or the mean itself when there is none (one document: no interval)."""
    return fallback if value is None or not math.isfinite(value) else value


def _retrieval_png(path: Path, run_id: str, retrieval: Table) -> Path:
    """The needle-in-a-haystack heatmap: insertion depth (rows) x context length (columns), one
    panel per config, each cell the share of probes answered exactly."""
    import matplotlib.pyplot as plt

    records = retrieval.records()
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
    fig.savefig(path)
    plt.close(fig)
    return path


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _by_position_png(path: Path, run_id: str, by_position: Table) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    buckets = sorted({(r["bucket_start"], r["bucket"]) for r in by_position.records()})
    index = {start: i for i, (start, _) in enumerate(buckets)}
    configs: dict[str, list[dict]] = {}
    for r in by_position.records():
        configs.setdefault(r["config"], []).append(r)
    for config, rows in sorted(configs.items()):
        rows.sort(key=lambda r: r["bucket_start"])
        ax.plot([index[r["bucket_start"]] for r in rows], [r["nll"] for r in rows], marker="o", label=config)
    ax.set_xticks(range(len(buckets)), [label for _, label in buckets])
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("NLL per token (nats)")
    ax.set_title(f"NLL by position, run {run_id}")
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    """The finish both plots share: grid, legend, tight layout, PNG."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
        parts.append(f"<h2>{html.escape(table.name)}</h2><table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
