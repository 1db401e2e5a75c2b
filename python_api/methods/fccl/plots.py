"""FCCL's plots (accuracy curves, per-round cross-correlation heatmaps, participant x domain matrix) and
the text table printed at the end of a run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from python_api.report import plot_curves, plot_matrix  # noqa: E402


def write_fccl_plots(plot_dir, records: list, summary: dict, correlations: list, names: list, cfg) -> list:
    """Curves and the final matrix in the scenario's headline metric (summary["headline"]: top-1 on Digits,
    top-5 on Office-Home, as the reference reports them)."""
    plot_dir = Path(plot_dir)
    written = []
    metric = summary.get("headline", "top1")
    label = f"{metric.replace('top', 'top-')} accuracy (%)"
    if records:
        rounds = [r["round"] + 1 for r in records]
        curves = {"mean intra": (rounds, [r[f"mean_intra_{metric}"] for r in records]),
                  "mean inter": (rounds, [r[f"mean_inter_{metric}"] for r in records])}
        solo = summary.get("solo")
        if solo and solo.get("metric", "top1") == metric:
            curves["SOLO intra"] = (rounds, [solo["intra"]["mean"]] * len(rounds))
            curves["SOLO inter"] = (rounds, [solo["inter"]["mean"]] * len(rounds))
        written.append(plot_curves(plot_dir / "accuracy_mean.png", curves, "round", label,
                                   f"{summary.get('algorithm', 'fccl').upper()}: intra / inter"))
        per = {}
        for i, name in enumerate(names):
            tag = f"p{i}_{cfg.participants[i].domain}".replace(" ", "_")
            per[f"{name} intra"] = (rounds, [r[f"{tag}_intra_{metric}"] for r in records])
            per[f"{name} inter"] = (rounds, [r[f"{tag}_inter_{metric}"] for r in records])
        written.append(plot_curves(plot_dir / "accuracy_participants.png", per, "round", label,
                                   "per participant"))
        domains = summary.get("test_domains", summary.get("domains", []))
        written.append(plot_matrix(plot_dir / "accuracy_matrix.png", records[-1][f"accuracy_{metric}"],
                                   f"final {metric.replace('top', 'top-')}: participant (row) x test domain (col)",
                                   "test domain " + " ".join(domains), "participant", vmin=0, vmax=100))
    for r, matrices in enumerate(correlations):
        written.append(_heatmaps(plot_dir / "cross_correlation" / f"round_{r:03d}.png", matrices, names, r))
    return written


def _heatmaps(path, matrices, names, round_idx) -> str:
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0))
    axes = [axes] if n == 1 else list(axes)
    for ax, matrix, name in zip(axes, matrices, names):
        im = ax.imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"round {round_idx}: corr(own logits, mean of others') on the last public batch", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def summary_table(summary: dict) -> str:
    """The end-of-run table: per participant intra / inter, the mean, and SOLO's when evaluated."""
    if "intra" not in summary:
        return "(no rounds completed)"
    metric = summary.get("headline", "top1")
    algo = summary.get("algorithm", "fccl").upper()
    solo = summary.get("solo")
    lines = [f"{algo} after {summary['rounds_completed']} rounds ({metric} accuracy, %)",
             f"{'participant':<28}{'intra':>8}{'inter':>8}" + (f"{'SOLO intra':>12}{'SOLO inter':>12}" if solo else "")]
    for i, name in enumerate(summary["participants"]):
        row = f"{name:<28}{summary['intra']['per_participant'][i]:>8.2f}{summary['inter']['per_participant'][i]:>8.2f}"
        if solo:
            row += f"{solo['intra']['per_participant'][i]:>12.2f}{solo['inter']['per_participant'][i]:>12.2f}"
        lines.append(row)
    row = f"{'mean':<28}{summary['intra']['mean']:>8.2f}{summary['inter']['mean']:>8.2f}"
    if solo:
        row += f"{solo['intra']['mean']:>12.2f}{solo['inter']['mean']:>12.2f}"
    lines.append(row)
    return "\n".join(lines)
