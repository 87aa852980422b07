"""PNG plots of a training run, a comparison, an analysis and bench's sweep (matplotlib, Agg backend, written
atomically)."""

from __future__ import annotations

import pathlib
from typing import Optional

from spectral_peft.adapter_files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _write(plt, fig, path: pathlib.Path, layout: bool = True) -> None:
    """Lays the figure out (unless ``layout`` is False), writes it to ``path`` atomically and closes it."""
    if layout:
        fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(path: pathlib.Path, losses: list[float], validation: list[dict], metric: str,
                  title: str = "", phases: Optional[list] = None) -> None:
    """Training loss per optimizer step (raw and smoothed) and the validation ``metric`` curve, side by side."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 20)
    left.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=0.8, label="loss")
    if window > 1:
        left.plot(steps, _smooth(losses, window), color="tab:blue", linewidth=1.6, label=f"mean of {window}")
    if phases and any(p == "locations" for p in phases):
        for i, phase in enumerate(phases):
            if phase == "locations":
                left.axvspan(i + 0.5, i + 1.5, color="tab:orange", alpha=0.12, linewidth=0)
        left.plot([], [], color="tab:orange", alpha=0.3, linewidth=6, label="LoCA location steps")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss")
    left.legend(loc="upper right", fontsize=8)
    left.grid(alpha=0.3)
    points = [(v["step"], v[metric]) for v in validation if metric in v]
    if points:
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:green")
    right.set_xlabel("optimizer step")
    right.set_ylabel(f"validation {metric.replace('_', ' ')}")
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    _write(plt, fig, path)


def plot_comparison(path: pathlib.Path, rows: list[dict], metric: str, title: str = "",
                    base: Optional[dict] = None) -> None:
    """Test ``metric`` (mean, with the std over seeds as error bars) against trained parameters (the weights, as
    :func:`~spectral_peft.tools.training.count_parameters` counts them: LoCA's locations apart), log x; ``base``:
    the base model's row (compare's ``base_row``), a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if base is not None and base.get(f"{metric}_mean") is not None:
        ax.axhline(base[f"{metric}_mean"], color="grey", linestyle="--", linewidth=1, label=base["method"])
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for index, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method and r.get(f"{metric}_mean") is not None),
                      key=lambda r: r["trainable_params"])
        if not mine:
            continue
        xs = [r["trainable_params"] for r in mine]
        ys = [r[f"{metric}_mean"] for r in mine]
        errors = [r.get(f"{metric}_std") or 0.0 for r in mine]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method, color=f"C{index}")
        for r, x, y in zip(mine, xs, ys):
            ax.annotate(r["budget"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters, head included; LoCA's locations not counted (log scale)")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _write(plt, fig, path)


def _panels(plt, count: int, width: float = 4.2, height: float = 3.4):
    columns = min(3, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _label_panel(ax, title: str, xlabel: str, ylabel: str, top: float, base: float = 10) -> None:
    """A log-x panel of shares in [0, top]."""
    ax.set_xscale("log", base=base)
    ax.set_ylim(0, top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")


def _write_panels(plt, fig, axes, path: pathlib.Path, legend_loc: str) -> None:
    axes[0].legend(fontsize=7, loc=legend_loc)
    _write(plt, fig, path)


def plot_energy_curves(path: pathlib.Path, result: dict) -> None:
    """Mean energy share in the top-k coefficients against k (share of entries, log x), one panel per layer type:
    DCT in each ordering (solid), DFT in the original order (dashed), white noise of the first shape (dotted)."""
    plt = _pyplot()
    groups = list(result["summary"])
    fig, axes = _panels(plt, len(groups))
    xs = [100 * f for f in result["fractions"]]
    noise = next(iter(result["white_noise"].values()), None)
    for ax, group in zip(axes, groups):
        data = result["summary"][group]
        for index, (ordering, values) in enumerate(data["energy"]["dct"].items()):
            if values[0] is not None:
                ax.plot(xs, values, marker="o", markersize=3, color=f"C{index}", label=f"DCT {ordering}")
        ax.plot(xs, data["energy"]["dft"]["original"], linestyle="--", color="C0", label="DFT original")
        if noise is not None:
            ax.plot(xs, noise["dct"]["original"]["energy"], linestyle=":", color="gray", label="white noise (DCT)")
            ax.plot(xs, noise["dct"]["self"]["energy"], linestyle="-.", color="gray", label="white noise, self")
        _label_panel(ax, f"{group} ({data['matrices']} matrices)", "top-k coefficients (% of entries)",
                     "share of ||dW||² (mean)", top=1)
    _write_panels(plt, fig, axes, path, legend_loc="upper left")


def plot_errors(path: pathlib.Path, result: dict) -> None:
    """Mean relative Frobenius error against the parameter budget (in rank units r, P = r(M+N)), one panel per
    layer type, one line per approximation."""
    plt = _pyplot()
    groups = list(result["summary"])
    fig, axes = _panels(plt, len(groups))
    styles = {"svd": ("black", "-"), "dct_top": ("C0", "-"), "dct_top_3n": ("C0", ":"), "dct_random": ("C1", "-"),
              "dct_s2ft_self": ("C2", "-"), "dct_s2ft_prior": ("C3", "-"), "dft_top": ("C4", "--")}
    for ax, group in zip(axes, groups):
        rows = result["summary"][group]["errors"]
        ranks = [row["rank"] for row in rows]
        for key, (color, style) in styles.items():
            values = [row.get(key) for row in rows]
            if values and all(v is not None for v in values):
                ax.plot(ranks, values, marker="o", markersize=3, color=color, linestyle=style, label=key)
        _label_panel(ax, f"{group} ({result['summary'][group]['matrices']} matrices)",
                     "budget P = r(M+N), in units of rank r", "||dW - A||_F / ||dW||_F (mean)", top=1.02, base=2)
    _write_panels(plt, fig, axes, path, legend_loc="lower left")


def plot_sweep(path: pathlib.Path, sweep: list, labels: dict) -> None:
    """Bench's linear sweep: each method's overhead per step against n_frequency, one panel per width (log-log);
    ``labels``: method -> its name in the legend."""
    plt = _pyplot()
    widths = sorted({row["width"] for row in sweep})
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False)
    for ax, width in zip(axes[0], widths):
        rows = [r for r in sweep if r["width"] == width]
        for method in sorted({r["method"] for r in rows}):
            # an overhead within the noise can come out at or below zero: drawn at the floor of the plot
            pts = sorted((r["n"], max(r["overhead_s"] * 1e3, 0.01)) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(method, method))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{width} x {width}, 1024 tokens")
        ax.set_xlabel("n_frequency (LoRA: fixed rank)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("adapter overhead per step, ms")
    axes[0][0].legend(fontsize=7)
    _write(plt, fig, path, layout=False)
