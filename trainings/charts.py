"""PNG charts of a training's metrics (matplotlib, Agg backend: no display needed).

The chart is drawn from the metric series of :func:`trainings.selectors.training_metrics_series`
(``{name: [{"round": r, "value": v}, ...]}``), so it shows exactly what the dashboard and the REST API
show. Series that a training did not record (no central evaluation, say) are left out, never invented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ACCURACY_SERIES: dict[str, str] = {
    "accuracy": "central accuracy (test split)",
    "federated_accuracy": "federated accuracy (agents' held-out data, start of round)",
}
LOSS_SERIES: dict[str, str] = {
    "loss": "central loss (test split)",
    "federated_loss": "federated loss (agents' held-out data, start of round)",
    "train_loss": "local training loss",
}

MetricSeries = Mapping[str, Sequence[Mapping[str, float]]]


def training_chart_png(
    *,
    series: MetricSeries,
    path: Path,
    title: str,
    target_accuracy: float | None = None,
) -> Path:
    """Draw accuracy and loss per round in two panels and write them to ``path`` as a PNG.

    Parameters
    ----------
    series : mapping
        Metric name to ``[{"round": r, "value": v}, ...]`` in round order.
    path : Path
        Where to write the PNG; parent directories are created.
    title : str
        Figure title, e.g. ``"digits: fedavg, 10 agents"``.
    target_accuracy : float, optional
        Drawn as a dashed horizontal line on the accuracy panel.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported anywhere in this process
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    try:
        _plot_panel(accuracy_axes, series, ACCURACY_SERIES, ylabel="accuracy")
        if target_accuracy is not None:
            accuracy_axes.axhline(
                target_accuracy,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"target {target_accuracy:g}",
            )
        _plot_panel(loss_axes, series, LOSS_SERIES, ylabel="cross-entropy loss")
        for axes in (accuracy_axes, loss_axes):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel("round")
            axes.grid(True, alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize="small")
        accuracy_axes.set_title("accuracy per round")
        loss_axes.set_title("loss per round")
        figure.suptitle(title)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path


def _plot_panel(axes: Axes, series: MetricSeries, names: Mapping[str, str], *, ylabel: str) -> None:
    plotted = False
    for name, label in names.items():
        points = series.get(name) or []
        if not points:
            continue
        rounds = [point["round"] for point in points]
        values = [point["value"] for point in points]
        axes.plot(rounds, values, marker="o", markersize=3, linewidth=1.5, label=label)
        plotted = True
    axes.set_ylabel(ylabel)
    if not plotted:
        axes.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=axes.transAxes)
