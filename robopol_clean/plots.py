"""Every figure the package makes, in one place (matplotlib, Agg-safe).

Functions take data and an output path or an Axes; none reads files or runs a stage.
"""

from __future__ import annotations

import numpy as np

__all__ = ["zscale_limits", "plot_frame_diagnostic", "plot_night_report"]


def zscale_limits(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Display limits from astropy's ZScale on the finite, unmasked pixels."""
    from astropy.visualization import ZScaleInterval

    values = np.asarray(data, float)
    good = np.isfinite(values) if mask is None else np.isfinite(values) & ~np.asarray(mask, bool)
    sample = values[good][:: max(1, good.sum() // 200_000)]
    if sample.size == 0:
        return 0.0, 1.0
    return ZScaleInterval().get_limits(sample)


#: Zoom panels of the diagnostic figure (rejected spots, highest p_artifact first).
N_ZOOM = 8
#: Side of a zoom panel (pix).
ZOOM_SIZE = 96


def plot_frame_diagnostic(result, path=None, *, title: str | None = None, n_zoom: int = N_ZOOM,
                          dpi: int = 150):
    """The frame with clean quadruplets marked and rejected spots circled, plus zooms.

    The frame is drawn at about one screen pixel per detector pixel for a 2048 x 2048
    frame (``dpi`` 150), and up to ``n_zoom`` panels show the rejected spots with the
    highest ``p_artifact`` at full resolution, labelled with their score.

    Parameters
    ----------
    result : FrameResult
        A reduced frame (see `robopol_clean.pipeline.reduce_frame`).
    path : path-like, optional
        Where to save a PNG; the figure is returned either way.
    title : str, optional
        Figure title (default: frame name and counts).
    n_zoom : int
        Zoom panels (0: the frame only).
    dpi : int
        Resolution of the saved PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    data = np.asarray(result.ccd.data, float)
    spots = result.spots
    rej = np.asarray(spots["rejected"], bool) if len(spots) else np.zeros(0, bool)
    order = np.argsort(-np.asarray(spots["p_artifact"], float)[rej], kind="stable") if rej.any() else []
    zoom = np.flatnonzero(rej)[order][:max(0, int(n_zoom))] if rej.any() else np.zeros(0, int)
    cols = 2 if len(zoom) else 0
    rows = max(1, int(np.ceil(len(zoom) / 2)))
    side = 14.0  # in: ~2048 screen px at dpi 150
    fig = Figure(figsize=(side + 3.4 * cols, side), dpi=dpi)
    grid = fig.add_gridspec(max(rows, 4), 1 + cols, width_ratios=[side] + [3.4] * cols,
                            wspace=0.1, hspace=0.2)
    ax = fig.add_subplot(grid[:, 0])
    vmin, vmax = zscale_limits(data, result.ccd.mask)
    _draw_frame(ax, result, data, vmin, vmax, legend=True)
    m = result.meta
    ax.set_title(title or f"{m.get('frame', '')}: {m['n_spots']} spots, {m['n_rejected']} rejected, "
                          f"{m['n_clean']} clean quadruplets", fontsize=11)
    half = ZOOM_SIZE // 2
    for k, i in enumerate(zoom):
        z = fig.add_subplot(grid[k // 2, 1 + k % 2])
        x, y = float(spots["x"][i]), float(spots["y"][i])
        x0, y0 = max(0, int(x) - half), max(0, int(y) - half)
        _draw_frame(z, result, data, vmin, vmax, legend=False,
                    window=(slice(y0, int(y) + half), slice(x0, int(x) + half)))
        z.set_xticks([])
        z.set_yticks([])
        z.set_title(f"({x:.0f}, {y:.0f}) p={float(spots['p_artifact'][i]):.2f}", fontsize=8)
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


def _draw_frame(ax, result, data, vmin, vmax, *, legend: bool, window=None) -> None:
    """The image (or a ``window`` of it), the artifact mask, clean quadruplets (+),
    rejected (red) and uncertain (orange) spots."""
    from matplotlib.collections import EllipseCollection

    wy, wx = window or (slice(0, data.shape[0]), slice(0, data.shape[1]))
    extent = (wx.start - 0.5, wx.start + data[wy, wx].shape[1] - 0.5,
              wy.start - 0.5, wy.start + data[wy, wx].shape[0] - 0.5)
    ax.imshow(data[wy, wx], origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
              interpolation="nearest", extent=extent)
    art = result.artifact_mask
    if art is not None and art[wy, wx].any():
        overlay = np.ma.masked_where(~art[wy, wx], np.ones(art[wy, wx].shape))
        ax.imshow(overlay, origin="lower", cmap="autumn", alpha=0.35, interpolation="nearest",
                  extent=extent)
    spots, stokes = result.spots, result.stokes
    r = 2.5 * float(result.meta.get("fwhm", 4.0))

    def circles(sel, color, lw):
        if sel.any():
            x, y = np.asarray(spots["x"])[sel], np.asarray(spots["y"])[sel]
            ax.add_collection(EllipseCollection(
                np.full(len(x), 2 * r), np.full(len(x), 2 * r), np.zeros(len(x)), units="xy",
                offsets=np.column_stack([x, y]), offset_transform=ax.transData,
                facecolors="none", edgecolors=color, linewidths=lw))

    if len(stokes):
        clean = np.asarray(stokes["flags"]) == 0 if "flags" in stokes.colnames else np.ones(len(stokes), bool)
        ax.plot(stokes["x"][clean], stokes["y"][clean], "+", color="lime", ms=7, mew=1.0,
                label="clean quadruplet")
    if len(spots):
        circles(np.asarray(spots["rejected"], bool), "red", 1.3)
        circles(np.asarray(spots["uncertain"], bool), "orange", 1.0)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    if legend:
        ax.plot([], [], "o", mfc="none", mec="red", label="rejected (artifact)")
        ax.plot([], [], "o", mfc="none", mec="orange", label="uncertain")
        ax.set_xlabel("x [pix]")
        ax.set_ylabel("y [pix]")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.7)


def plot_night_report(p_artifact, snr, frames, rejection_rates, path=None):
    """Night overview: p_artifact of every source, and the rejection rate per frame.

    Parameters
    ----------
    p_artifact : ndarray
        Scores of all spots of the night.
    snr : ndarray
        Their peak signal-to-noise (sigma above the sky noise floor).
    frames : list of str
        Frame names, in order.
    rejection_rates : list of float
        Fraction of spots rejected in each frame.
    path : path-like, optional
        Where to save a PNG.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), dpi=100)
    axes = fig.subplots(1, 3)
    p = np.asarray(p_artifact, float)
    snr = np.asarray(snr, float)
    finite = np.isfinite(p) & np.isfinite(snr)  # spots measured at a predicted position have no S/N
    p, snr = p[finite], snr[finite]
    axes[0].hist(p, bins=np.linspace(0, 1, 41), color="0.3")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("p_artifact")
    axes[0].set_ylabel("spots")
    axes[0].set_title(f"{len(p)} sources in {len(frames)} frames", fontsize=10)
    bins = np.logspace(np.log10(max(snr.min(), 1.0)), np.log10(max(snr.max(), 10.0)), 40) if len(snr) else 10
    rej = p >= 0.5
    axes[1].hist([snr[~rej], snr[rej]], bins=bins, stacked=True, color=["0.5", "red"],
                 label=["kept", "rejected"])
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("peak S/N (sigma above the sky noise floor)")
    axes[1].legend(fontsize=8)
    index = np.arange(len(rejection_rates))
    axes[2].plot(index, 100 * np.asarray(rejection_rates), "o-", ms=3)
    step = max(1, int(np.ceil(len(frames) / 25)))  # at most ~25 readable names
    axes[2].set_xticks(index[::step], [str(f) for f in frames][::step], rotation=60, ha="right",
                       fontsize=7)
    axes[2].set_xlabel("frame")
    axes[2].set_ylabel("rejected spots [%]")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig


# ---------------------------------------------------------------------------------
# Training and evaluation figures of the CNN (owner: cnn). Object-oriented matplotlib
# (``Figure``, no pyplot state), so they are safe in threads and without a display.
# ---------------------------------------------------------------------------------
__all__ += [
    "save_figure",
    "plot_training_history",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_reliability",
    "plot_cutout_gallery",
    "plot_saliency_gallery",
    "plot_probability_histogram",
]


def save_figure(fig, path) -> None:
    """Write ``fig`` as a PNG through a temporary file moved into place (replacing ``path``)."""
    from .io import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)


def _new_figure(ncols: int = 1, nrows: int = 1, *, size=(5.0, 4.0), dpi: int = 100):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_training_history(history: dict, path=None):
    """Loss and accuracy (and AUC when recorded) per epoch, training vs validation.

    Parameters
    ----------
    history : dict
        ``keras.callbacks.History.history``: lists keyed ``loss``, ``val_loss``,
        ``accuracy``, ``val_accuracy``, optionally ``auc``, ``val_auc``.
    path : path-like, optional
        PNG to write. The figure is returned either way.
    """
    panels = [k for k in ("loss", "accuracy", "auc") if k in history]
    fig, axes = _new_figure(max(1, len(panels)), size=(4.2, 3.4))
    for ax, key in zip(axes[0], panels):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], "o-", ms=3, label="training")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "s-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("binary cross-entropy" if key == "loss" else key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Training history")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_confusion_matrix(cm, path=None, *, labels=("star", "artifact"), threshold: float | None = None):
    """2 x 2 confusion matrix with counts and row-normalised fractions in brackets.

    Parameters
    ----------
    cm : array-like, shape (2, 2)
        ``cm[true, predicted]`` counts (0 = star, 1 = artifact).
    """
    cm = np.asarray(cm, float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, axes = _new_figure(size=(4.2, 3.8))
    ax = axes[0, 0]
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(cm[i, j])}\n({frac[i, j]:.3f})", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], [f"predicted {s}" for s in labels])
    ax.set_yticks([0, 1], [f"true {s}" for s in labels])
    ax.set_title("Confusion matrix" + ("" if threshold is None else f" (threshold {threshold:.2f})"))
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_roc(labels, p, path=None):
    """ROC curve with its AUC, and TPR / FPR against the decision threshold."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels, int)
    p = np.asarray(p, float)
    fig, axes = _new_figure(2, size=(4.2, 3.8))
    ax, ax2 = axes[0]
    if len(np.unique(labels)) == 2:
        fpr, tpr, thr = roc_curve(labels, p)
        auc = roc_auc_score(labels, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f}")
        ok = np.isfinite(thr) & (thr <= 1)
        ax2.plot(thr[ok], tpr[ok], label="true-positive rate (artifacts caught)")
        ax2.plot(thr[ok], fpr[ok], label="false-positive rate (stars rejected)")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax2.set_xlabel("threshold on p_artifact")
    ax2.set_ylabel("rate")
    ax2.set_xlim(0, 1)
    ax2.set_title("Rates vs threshold")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_reliability(labels, p, path=None, *, n_bins: int = 10):
    """Reliability diagram: observed artifact fraction against predicted probability."""
    labels = np.asarray(labels, float)
    p = np.asarray(p, float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    mean_p = np.bincount(idx, weights=p, minlength=n_bins) / np.maximum(count, 1)
    frac = np.bincount(idx, weights=labels, minlength=n_bins) / np.maximum(count, 1)
    fig, axes = _new_figure(size=(4.5, 4.2))
    ax = axes[0, 0]
    ok = count > 0
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    ax.plot(mean_p[ok], frac[ok], "o-", label="model")
    for xm, fr, c in zip(mean_p[ok], frac[ok], count[ok]):
        ax.annotate(str(int(c)), (xm, fr), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("mean predicted p_artifact")
    ax.set_ylabel("fraction that are artifacts")
    ax.set_title("Reliability (numbers: cutouts per bin)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_cutout_gallery(cutouts, p, labels=None, path=None, *, title: str = "", ncols: int = 8,
                        captions=None):
    """A grid of cutouts, each captioned with its p_artifact (and true label).

    Parameters
    ----------
    cutouts : ndarray, shape (n, size, size)
        Normalised cutouts (shown with origin at the bottom, FITS orientation).
    p : ndarray, shape (n,)
        Artifact probabilities.
    labels : ndarray, optional
        True labels (0 star, 1 artifact); a wrong decision is captioned in red.
    captions : list of str, optional
        Extra text per cutout (e.g. kind and SNR).
    """
    cutouts, n, ncols, nrows = _gallery_layout(cutouts, ncols)
    fig, axes = _new_figure(ncols, nrows, size=(1.5, 1.65))
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(cutouts[k], origin="lower", cmap="gray", interpolation="nearest")
        text = f"p={p[k]:.2f}"
        color = "black"
        if labels is not None:
            text += " A" if labels[k] else " S"
            color = "red" if (p[k] >= 0.5) != bool(labels[k]) else "black"
        if captions is not None:
            text += f"\n{captions[k]}"
        ax.set_title(text, fontsize=7, color=color)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def _gallery_layout(cutouts, ncols: int):
    """Cutouts as (n, size, size) floats, and the grid (n, ncols, nrows) to show them on."""
    cutouts = np.asarray(cutouts, float)
    if cutouts.ndim == 4:
        cutouts = cutouts[..., 0]
    n = len(cutouts)
    ncols = max(1, min(ncols, n))
    return cutouts, n, ncols, max(1, int(np.ceil(n / ncols)))


def plot_saliency_gallery(cutouts, saliency, p, path=None, *, title: str = "Saliency", ncols: int = 6):
    """Pairs of (cutout, saliency map) with p_artifact captions."""
    cutouts, n, ncols, nrows = _gallery_layout(cutouts, ncols)
    fig, axes = _new_figure(2 * ncols, nrows, size=(1.4, 1.55))
    for k in range(nrows * ncols):
        a_img, a_sal = axes[k // ncols, 2 * (k % ncols)], axes[k // ncols, 2 * (k % ncols) + 1]
        a_img.set_axis_off()
        a_sal.set_axis_off()
        if k >= n:
            continue
        a_img.imshow(cutouts[k], origin="lower", cmap="gray", interpolation="nearest")
        a_sal.imshow(saliency[k], origin="lower", cmap="inferno", interpolation="nearest")
        a_img.set_title(f"p={p[k]:.2f}", fontsize=7)
        a_sal.set_title("|dp/dx|", fontsize=7)
    fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_probability_histogram(p, labels=None, path=None, *, threshold: float | None = 0.5):
    """Histogram of p_artifact (per true class when labels are given; log counts)."""
    p = np.asarray(p, float)
    bins = np.linspace(0, 1, 41)
    fig, axes = _new_figure(size=(5.5, 3.8))
    ax = axes[0, 0]
    if labels is None:
        ax.hist(p, bins=bins, color="gray")
    else:
        labels = np.asarray(labels, int)
        ax.hist(p[labels == 0], bins=bins, alpha=0.6, label=f"stars ({np.sum(labels == 0)})")
        ax.hist(p[labels == 1], bins=bins, alpha=0.6, label=f"artifacts ({np.sum(labels == 1)})")
        ax.legend()
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("p_artifact")
    ax.set_ylabel("cutouts")
    ax.set_title("Predicted artifact probability")
    if path is not None:
        save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------------
# Calibration from standard stars
# ---------------------------------------------------------------------------------
__all__ += ["plot_calibration_residuals"]


def plot_calibration_residuals(fit, path=None):
    """Residuals of a calibration fit, per standard and frame.

    Top: measured minus model q and u (in units of 1e-3) with their 1-sigma errors, the
    frames grouped by standard; bottom: the same in units of the errors. The title gives
    the fitted values and the chi-square.

    Parameters
    ----------
    fit : CalibrationFit
        A fit from :func:`robopol_clean.calibration.fit_calibration`.
    path : path-like, optional
        Where to save a PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    m = fit.measurements
    names = [str(n) for n in fit.standards["name"]]
    order = sorted(range(len(m)), key=lambda i: (names.index(str(m["standard"][i])), i))
    xpos = np.arange(len(order), dtype=float)
    fig = Figure(figsize=(max(6.0, 0.55 * len(order) + 3.0), 6.0), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, scale, cols, label in (
            (top, 1e3, ("q_residual", "u_residual"), "measured - model [1e-3]"),
            (bottom, 1.0, ("z_q", "z_u"), "residual / error")):
        for k, (col, err, colour, text) in enumerate(
                ((cols[0], "q_err", "tab:blue", "q"), (cols[1], "u_err", "tab:orange", "u"))):
            values = np.asarray(m[col], float)[order] * scale
            errors = np.asarray(m[err], float)[order] * scale if ax is top else None
            ax.errorbar(xpos + (k - 0.5) * 0.18, values, yerr=errors, fmt="o", ms=4, capsize=2,
                        color=colour, label=text)
        ax.axhline(0.0, color="0.4", lw=0.8)
        ax.set_ylabel(label)
    bottom.axhspan(-1, 1, color="0.9", zorder=0)  # within 1 sigma
    start = 0
    centres = []
    for name in names:
        n = int(np.sum(np.asarray(m["standard"]).astype(str) == name))
        centres.append(start + (n - 1) / 2.0)
        if start:
            for ax in (top, bottom):
                ax.axvline(start - 0.5, color="0.6", lw=0.8, ls=":")
        start += n
    kinds = {str(r["name"]): ("polarized" if r["polarized"] else "unpolarized") for r in fit.standards}
    bottom.set_xticks(centres, [f"{n}\n({kinds[n]})" for n in names], fontsize=8)
    top.legend(fontsize=8, loc="upper right")
    parts = []
    for name in fit.parameters:
        v, e = fit.value(name)
        parts.append(f"{name} = {v:.3f} ± {e:.3f} deg" if name == "angle_zero"
                     else f"{name} = {1e3 * v:.2f} ± {1e3 * e:.2f} e-3")
    red = fit.chi2 / fit.dof if fit.dof > 0 else float("nan")
    lines = [parts[i:i + 2] for i in range(0, len(parts), 2)]
    top.set_title("\n".join("; ".join(line) for line in lines)
                  + f"\nchi2 = {fit.chi2:.1f} for {fit.dof} dof (reduced {red:.2f}), {len(m)} frames",
                  fontsize=9)
    if path is not None:
        fig.savefig(path, format="png")
    return fig
