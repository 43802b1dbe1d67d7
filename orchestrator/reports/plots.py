"""``kvorch report --plot DIR``: the density-ΔNLL frontier and NLL by position as PNGs, and an
HTML page that shows both with the tables they are drawn from.

matplotlib runs on its Agg backend (files only, no display), so plotting works on headless
clusters and in tests.
"""

from __future__ import annotations

import html
from pathlib import Path

from orchestrator.errors import KvorchError
from orchestrator.reports.formatting import cell
from orchestrator.reports.tables import Table


def write_plots(directory: str, run_id: str, pareto: Table, by_position: Table, frontier: Table) -> list[Path]:
    """Write frontier.png, by_position.png and index.html into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvorchError(
            f"cannot create plot directory {directory} ({exc.strerror}); pass a writable --plot"
        ) from None
    paths = [
        _frontier_png(out / "frontier.png", run_id, pareto, frontier),
        _by_position_png(out / "by_position.png", run_id, by_position),
    ]
    page = out / "index.html"
    page.write_text(_html(run_id, paths, [frontier, pareto, by_position]), encoding="utf-8")
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


def _html(run_id: str, images: list[Path], tables: list[Table]) -> str:
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>kvorch report {html.escape(run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>",
        f"</head><body><h1>kvorch report: run {html.escape(run_id)}</h1>",
    ]
    parts += [f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in images]
    for table in tables:
        parts.append(f"<h2>{html.escape(table.name)}</h2><table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
