"""The training report of ``kvorch kvzap train``: held-out R² per layer as markdown and a PNG."""

from __future__ import annotations

from pathlib import Path

from orchestrator.kvzap.extraction import FittedKind

REPORT_FILE = "report.md"
PLOT_FILE = "r2_per_layer.png"


def r2_table(fitted: list[FittedKind]) -> str:
    """A markdown table: one row per layer, one R² column per surrogate kind."""
    header = "| layer | " + " | ".join(f"R² {f.kind}" for f in fitted) + " |"
    rule = "|---:|" + "---:|" * len(fitted)
    rows = [
        f"| {layer} | " + " | ".join(f"{f.r2[layer]:.3f}" for f in fitted) + " |" for layer in range(len(fitted[0].r2))
    ]
    return "\n".join([header, rule, *rows])


def thresholds_text(fitted: list[FittedKind]) -> str:
    lines = []
    for f in fitted:
        pairs = ", ".join(f"{t} (~{d:.0%} kept)" for d, t in f.thresholds.items())
        values = ",".join(str(t) for t in f.thresholds.values())
        lines.append(
            f"- {f.kind}: {pairs}  \n  `kvorch submit --methods kvzap:path={f.path} --thresholds kvzap={values}`"
        )
    return "\n".join(lines)


def write_report(fitted: list[FittedKind], out: Path, header: str) -> tuple[Path, Path]:
    """``report.md`` (R² table, suggested thresholds) and ``r2_per_layer.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT_FILE
    report.write_text(
        f"# KVzap training report\n\n{header}\n\n## Held-out R² per layer\n\n{r2_table(fitted)}\n\n"
        f"## Suggested thresholds (quantiles of held-out predicted scores)\n\n{thresholds_text(fitted)}\n"
    )
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for f in fitted:
        axis.plot(range(len(f.r2)), f.r2, marker="o", label=f.kind)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set(xlabel="layer", ylabel="held-out R²", title="KVzap surrogate fit per layer")
    axis.legend()
    figure.tight_layout()
    plot = out / PLOT_FILE
    figure.savefig(plot, dpi=120)
    plt.close(figure)
    return report, plot
