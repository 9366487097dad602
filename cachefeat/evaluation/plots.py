"""Resolution plots of the head against the helix fit, on the same tracks (matplotlib, Agg).

Every plot uses the matched queries the fit succeeded on, so the head and the fit are
compared track for track. Residuals are prediction - truth (phi wrapped, in mrad; pT relative).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cachefeat.head.metrics import wrap_angle

log = logging.getLogger(__name__)

METHODS = (("head", "regression head", "tab:blue"), ("fit", "helix fit", "tab:orange"))
MIN_PER_BIN = 5
LABELS = {
    "pt": r"$(p_T^{\mathrm{pred}} - p_T^{\mathrm{true}}) / p_T^{\mathrm{true}}$",
    "eta": r"$\eta^{\mathrm{pred}} - \eta^{\mathrm{true}}$",
    "phi": r"$\phi^{\mathrm{pred}} - \phi^{\mathrm{true}}$ [mrad]",
    "q": r"$q^{\mathrm{pred}} - q^{\mathrm{true}}$ [e]",
}
TITLES = {"pt": "transverse momentum", "eta": "pseudorapidity", "phi": "azimuth", "q": "charge"}


def residual(columns: dict, method: str, field: str, rows: np.ndarray) -> np.ndarray | None:
    """Residuals of `method` ("head" or "fit") for `field` on `rows`; None when not predicted."""
    name = f"{method}_{field}"
    if name not in columns:
        return None
    pred, true = columns[name][rows], columns[f"true_{field}"][rows]
    if field == "pt":
        return (pred - true) / true
    if field == "phi":
        return 1e3 * wrap_angle(pred - true)
    return pred - true


def binned(x: np.ndarray, y: np.ndarray, edges: np.ndarray, stat) -> np.ndarray:
    """stat(y) in each bin of x; NaN for bins with fewer than MIN_PER_BIN entries."""
    which = np.digitize(x, edges) - 1
    out = np.full(len(edges) - 1, np.nan)
    for b in range(len(edges) - 1):
        values = y[which == b]
        if values.size >= MIN_PER_BIN:
            out[b] = stat(values)
    return out


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(v**2)))


def _num_bins(n: int) -> int:
    """Up to 8 bins, with about 4 * MIN_PER_BIN tracks per bin on average."""
    return int(np.clip(n // (4 * MIN_PER_BIN), 1, 8))


def _pt_edges(pt: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pt, [0.5, 99.5]) if pt.size else (1.0, 10.0)
    lo, hi = max(lo, 1e-3), max(hi, lo * 1.01)
    return np.geomspace(lo, hi, _num_bins(pt.size) + 1)


def _eta_edges(eta: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(eta, [0.5, 99.5]) if eta.size else (-1.0, 1.0)
    return np.linspace(lo, max(hi, lo + 1e-3), _num_bins(eta.size) + 1)


def _empty(ax, text: str = "no fitted tracks") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _residual_plot(plt, columns, rows, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, field in zip(axes.flat, ("pt", "eta", "phi", "q")):
        res = {m: residual(columns, m, field, rows) for m, _, _ in METHODS}
        res = {m: r for m, r in res.items() if r is not None and r.size}
        if not res:
            _empty(ax)
        else:
            if field == "q":
                edges = np.linspace(-2.55, 2.55, 52)  # bins centred on the possible values -2, 0, 2
            else:
                span = max(np.percentile(np.abs(r), 99) for r in res.values()) or 1.0
                edges = np.linspace(-span, span, 61)
            for method, label, color in METHODS:
                if method in res:
                    r = res[method]
                    ax.hist(np.clip(r, edges[0], edges[-1]), bins=edges, histtype="step", lw=1.6, color=color,
                            label=f"{label}: mean {np.mean(r):.3g}, RMS {_rms(r):.3g}")
            ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xlabel(LABELS[field] + " (overflow in the edge bins)" if field != "q" else LABELS[field])
        ax.set_ylabel("tracks per bin")
        ax.set_title(f"{TITLES[field]} residual")
    fig.suptitle(f"Residuals on the same {rows.sum()} matched, fitted tracks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pull_plot(plt, columns, rows, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    pt = columns["true_pt"][rows]
    edges = _pt_edges(pt)
    which = np.clip(np.digitize(pt, edges) - 1, 0, len(edges) - 2)
    grid = np.linspace(-5, 5, 201)
    for ax, field in zip(axes, ("pt", "eta", "phi")):
        drawn = False
        for method, label, color in METHODS:
            r = residual(columns, method, field, rows)
            if r is None or not r.size:
                continue
            # Normalise by the residual RMS of the track's true-pT bin: resolution changes with pT.
            scale = np.array([_rms(r[which == b]) if (which == b).any() else np.nan for b in range(len(edges) - 1)])
            pull = r / np.where(scale[which] > 0, scale[which], np.nan)
            pull = pull[np.isfinite(pull)]
            ax.hist(np.clip(pull, -5, 5), bins=np.linspace(-5, 5, 51), histtype="step", lw=1.6, color=color,
                    density=True, label=f"{label}: std {np.std(pull):.2f}")
            drawn = True
        if drawn:
            ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
            ax.legend(fontsize=8)
        else:
            _empty(ax)
        ax.set_xlabel(f"{TITLES[field]} residual / RMS in its true-$p_T$ bin")
        ax.set_ylabel("density")
        ax.set_title(f"normalised {TITLES[field]} residual")
    fig.suptitle("Normalised residuals (a Gaussian resolution gives the dashed curve)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain_log_labels(ticker, axis) -> None:
    """Log-axis labels as plain numbers (0.02, 30), minor ones too on short axes."""
    axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1.2)))


def _vs_plot(plt, ticker, columns, rows, path: Path, panels, title: str) -> None:
    """panels: (field, x column, x edges, x label, y label, stat) per subplot."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (field, xname, edges, xlabel, ylabel, stat) in zip(np.atleast_1d(axes), panels):
        x = columns[xname][rows]
        centres = np.sqrt(edges[:-1] * edges[1:]) if xname == "true_pt" else (edges[:-1] + edges[1:]) / 2
        drawn = False
        for method, label, color in METHODS:
            r = residual(columns, method, field, rows)
            if r is None or not r.size:
                continue
            values = binned(x, r, edges, stat)
            ax.plot(centres, values, "o-", color=color, label=label)
            drawn = drawn or bool(np.isfinite(values).any())
        if drawn:
            ax.set_yscale("log")
            _plain_log_labels(ticker, ax.yaxis)
            ax.legend(fontsize=9)
        else:
            _empty(ax, f"fewer than {MIN_PER_BIN} tracks per bin")
            ax.set_xlim(edges[0], edges[-1])
        if xname == "true_pt":
            ax.set_xscale("log")
            _plain_log_labels(ticker, ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(columns: dict[str, np.ndarray], output) -> list[Path]:
    """Write the PNG plots of prediction columns (see `cachefeat.evaluation.predict.COLUMNS`).

    Returns the written paths: residuals.png, pulls.png, pt_resolution.png, angle_resolution.png.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    output = Path(output)
    rows = columns["target_valid"] & columns["fit_status"]
    pt, eta = columns["true_pt"][rows], columns["true_eta"][rows]
    pt_edges, eta_edges = _pt_edges(pt), _eta_edges(eta)
    paths = [output / n for n in ("residuals.png", "pulls.png", "pt_resolution.png", "angle_resolution.png")]
    _residual_plot(plt, columns, rows, paths[0])
    _pull_plot(plt, columns, rows, paths[1])
    rel_pt = r"relative $p_T$ resolution, std of $\Delta p_T / p_T$"
    _vs_plot(plt, ticker, columns, rows, paths[2], [
        ("pt", "true_pt", pt_edges, r"true $p_T$ [GeV]", rel_pt, np.std),
        ("pt", "true_eta", eta_edges, r"true $\eta$", rel_pt, np.std),
    ], r"Relative $p_T$ resolution")
    _vs_plot(plt, ticker, columns, rows, paths[3], [
        ("eta", "true_eta", eta_edges, r"true $\eta$", r"$\eta$ RMSE", _rms),
        ("phi", "true_eta", eta_edges, r"true $\eta$", r"$\phi$ RMSE [mrad]", _rms),
    ], r"Angular resolution vs $\eta$")
    log.info("wrote plots %s", ", ".join(p.name for p in paths))
    return paths
