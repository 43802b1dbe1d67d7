"""The report plots (issue 29 "The first hour", point 8), checked on the matplotlib figures that
``kvorch report --plot`` saves: one colour per label in every plot and run, error bars as the
paired table computes them, a frontier whose 0-5 % cluster stays readable beside the window
config, dotted density lines only for --densities, and a note naming a config a plot leaves out."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from orchestrator.reports.plots import colour, plot_figures, write_plots  # noqa: E402
from orchestrator.reports.tables import Table  # noqa: E402
from workers.contract.defaults import ALL_METHODS  # noqa: E402

# The default run's README table: config -> (compressible density, ΔNLL %, KL).
DEFAULT_RUN = {
    "baseline": (1.0, 0.0, 0.0),
    "h2o@1": (0.2137, 0.1108, 0.002837),
    "random@0.5": (0.4995, 1.674, 0.03418),
    "observed_attention@0.003": (0.3692, 2.517, 0.05513),
    "knorm@-16": (0.3152, 3.098, 0.0741),
    "expected_attention@0.01": (0.3085, 2.439, 0.05305),
    "snapkv@0.001": (0.2468, 2.479, 0.05524),
    "tova@0.0005": (0.2386, 2.995, 0.06788),
    "streaming_llm": (0.0, 5.467, 0.1274),
    "window": (0.0, 28.33, 0.7131),
}
# 95 % t intervals of the mean KL over 4 documents: h2o's reaches below 0, as the table shows.
KL_LOW = {"h2o@1": -0.0012, "baseline": 0.0}


def tables(run: dict[str, tuple], no_density: tuple[str, ...] = ()) -> dict[str, Table]:
    """The report tables plot_figures reads, for configs ``run``; ``no_density``: configs whose
    compressible density is null (a probe run shorter than H2O's local window)."""
    press = {c: c.split("@")[0] for c in run}
    compare = Table("compare", ["method", "config", "density_compressible", "delta_nll_pct"], [
        (press[c].split(":")[0], c, None if c in no_density else d, nll) for c, (d, nll, _) in run.items()
    ])  # fmt: skip
    placed = [c for c in run if c not in no_density]
    pareto = Table("pareto", ["method", "press", "config", "density_compressible", "delta_nll_pct", "on_frontier"], [
        (press[c], press[c], c, run[c][0], run[c][1], c in ("baseline", "h2o@1", "window")) for c in placed
    ])  # fmt: skip
    paired = Table("paired", ["config", "mean_kl", "kl_ci95_low", "kl_ci95_high"], [
        (c, kl, KL_LOW.get(c, 0.5 * kl), 1.5 * kl + 0.001) for c, (_, _, kl) in run.items()
    ])  # fmt: skip
    by_position = Table("by_position", ["config", "bucket_start", "bucket", "nll"], [
        (c, start, label, 2.5 + nll / 100 + start / 1e4) for c, (_, nll, _) in run.items()
        for start, label in ((0, "0-512"), (512, "512-1k"))
    ])  # fmt: skip
    frontier = Table("frontier", ["press", "density", "delta_nll_pct", "sweep_points"], [])
    retrieval = Table("retrieval", ["config", "task", "context_length", "depth", "accuracy"], [])
    return {"compare": compare, "pareto": pareto, "paired": paired, "by_position": by_position,
            "frontier": frontier, "retrieval": retrieval}  # fmt: skip


@pytest.fixture
def figures():
    made = []

    def draw(*args, **kwargs):
        out = plot_figures("r", *args, **kwargs)
        made.extend(out.values())
        return out

    yield draw
    for fig in made:
        plt.close(fig)


def line_colours(fig) -> dict[str, str]:
    """Label -> colour of every labelled line and error-bar series of a figure's axes."""
    ax = fig.axes[0]
    found = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
    for container in ax.containers:
        found[container.get_label()] = to_hex(container.lines[0].get_color())
    return {label: c for label, c in found.items() if not label.startswith("_")}


def test_a_label_has_one_colour_in_every_plot_and_every_run(figures):
    everything = figures(tables(DEFAULT_RUN))
    subset = figures(tables({c: DEFAULT_RUN[c] for c in ("window", "knorm@-16", "h2o@1")}))
    frontier, kl = line_colours(everything["frontier.png"]), line_colours(everything["kl.png"])
    by_position = line_colours(everything["by_position.png"])
    for config in DEFAULT_RUN:
        sweep = config.split("@")[0]
        assert frontier[sweep] == kl[sweep] == by_position[config] == colour(config), config
    for config in ("window", "knorm@-16", "h2o@1"):  # another run, other configs, other order
        sweep = config.split("@")[0]
        assert line_colours(subset["frontier.png"])[sweep] == frontier[sweep]
        assert line_colours(subset["by_position.png"])[config] == by_position[config]
    methods = [colour(m) for m in ALL_METHODS]
    assert len(set(methods)) == len(methods)  # --methods all: every method its own colour
    assert colour("expected_attention:n_future_positions=256") not in methods


def test_kl_bars_are_the_tables_intervals_and_the_axis_holds_a_negative_bound(figures):
    fig = figures(tables(DEFAULT_RUN))["kl.png"]
    ax = fig.axes[0]
    h2o = next(c for c in ax.containers if c.get_label() == "h2o")
    segments = h2o.lines[2][0].get_segments()  # one vertical bar per point: [(x, low), (x, high)]
    assert min(y for segment in segments for _, y in segment) == pytest.approx(KL_LOW["h2o@1"])
    low, high = ax.get_ylim()
    assert low < KL_LOW["h2o@1"] < high


def axes_fraction(ax, low: float, high: float) -> float:
    """The share of the axes' height between data values ``low`` and ``high``."""
    to_axes = ax.transData + ax.transAxes.inverted()
    return to_axes.transform((0, high))[1] - to_axes.transform((0, low))[1]


def test_the_window_point_does_not_squash_the_frontiers_cluster(figures):
    fig = figures(tables(DEFAULT_RUN))["frontier.png"]
    ax = fig.axes[0]
    fig.canvas.draw()
    cluster = [nll for c, (_, nll, _) in DEFAULT_RUN.items() if c != "window"]  # 0 to 5.5 %
    assert axes_fraction(ax, min(cluster), max(cluster)) > 0.3  # on a linear axis: 17 %
    low, high = ax.get_ylim()
    assert low <= 0 and high >= DEFAULT_RUN["window"][1]  # the window point is still on the plot


def test_density_lines_only_when_densities_were_asked_for(figures, tmp_path):
    def dotted(fig) -> int:
        return sum(line.get_linestyle() == ":" for line in fig.axes[0].get_lines())

    assert dotted(figures(tables(DEFAULT_RUN))["frontier.png"]) == 0
    assert "dotted" not in figures(tables(DEFAULT_RUN))["frontier.png"].axes[0].get_title()
    assert dotted(figures(tables(DEFAULT_RUN), densities=(0.1, 0.25, 0.5))["frontier.png"]) == 3


def test_a_config_a_plot_leaves_out_is_named_on_it_and_on_stderr(figures, capsys, tmp_path):
    probe = {c: DEFAULT_RUN[c] for c in ("baseline", "h2o@1", "knorm@-16", "window")}
    drawn = figures(tables(probe, no_density=("h2o@1",)))
    notes = [t.get_text() for t in drawn["frontier.png"].texts]
    assert len(notes) == 1 and "h2o@1" in notes[0] and "knorm" not in notes[0]
    assert "h2o" not in line_colours(drawn["frontier.png"])
    assert "h2o@1" in " ".join(t.get_text() for t in drawn["kl.png"].texts)
    err = capsys.readouterr().err
    assert "kvorch: frontier.png leaves out h2o@1" in err and "kvorch: kl.png leaves out h2o@1" in err
    # Nothing left out: no note, nothing on stderr.
    assert figures(tables(probe))["frontier.png"].texts == [] and capsys.readouterr().err == ""
    # write_plots saves the same figures as PNGs.
    written = write_plots(str(tmp_path / "plots"), "r", tables(probe))
    assert [p.name for p in written] == ["frontier.png", "kl.png", "by_position.png", "index.html"]
