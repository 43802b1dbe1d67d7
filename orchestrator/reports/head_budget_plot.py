"""head_budgets.png of ``kvorch report --plot``: per config, a layers x kv-heads heatmap of the
share of a document's keys each head still kept at its end (the ``head_budgets`` table).

One colour scale for every panel (0 to the largest share of the run), so a head that an
allocation gave more keys (adakv, pyramidkv, file=...) reads brighter than the same head of a
uniform config, and panels compare at a glance. Kept apart from plots.py, which draws the
sweeps' figures, so each module stays one job.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from orchestrator.lake.queries import named_relation
from orchestrator.reports.tables import Table

if TYPE_CHECKING:
    from orchestrator.reports.tables import RunReport

# Panels per row of the figure.
COLUMNS = 4


def head_budget_cells(report: RunReport) -> Table:
    """sql/head_budget_cells.sql of the report's run: one row per (config, layer, kv-head). Not a
    report table (``--table all`` would print layers x kv-heads rows per config); the table
    head_budgets sums it up per config."""
    relation = report._read(lambda: named_relation(report.con, "head_budget_cells", {"run_id": report.run_id}))
    return Table("head_budget_cells", list(relation.columns), report._read(relation.fetchall))


def head_budgets_figure(run_id: str, table: Table):
    """The figure (unsaved; the caller closes it) of ``table``: head_budgets' rows of one run."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    grids: dict[str, dict[tuple[int, int], float]] = {}
    for row in table.records():
        grids.setdefault(row["config"], {})[row["layer"], row["kv_head"]] = row["kept_share"]
    top = max((share for cells in grids.values() for share in cells.values()), default=1.0) or 1.0
    n_cols = min(COLUMNS, len(grids))
    n_rows = math.ceil(len(grids) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.2 * n_cols + 1.5, 3.2 * n_rows + 0.6), dpi=110, squeeze=False, layout="constrained"
    )
    image = None
    for ax, (config, cells) in zip(axes.flat, grids.items(), strict=False):
        layers = 1 + max(layer for layer, _ in cells)
        heads = 1 + max(head for _, head in cells)
        shares = np.full((layers, heads), np.nan)
        for (layer, head), share in cells.items():
            shares[layer, head] = share
        image = ax.imshow(shares, aspect="auto", origin="lower", vmin=0.0, vmax=top, cmap="viridis")
        ax.set_title(config, fontsize=8)
        ax.set_xlabel("kv-head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(grids) :]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, label="kept share of the document (mean over documents)")
    fig.suptitle(f"Keys each head kept at a document's end, run {run_id}")
    return fig
