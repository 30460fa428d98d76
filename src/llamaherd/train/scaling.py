"""Compute-optimal model sizes from small runs, as the Llama 3 paper (and Chinchilla's approach 2) fits them.

For each compute budget C, models of several sizes N are trained on D = C / (6 N) tokens (an
IsoFLOP curve); the validation loss against log N is fitted by a parabola, whose minimum is that
budget's compute-optimal size N_opt(C). A straight line through (log C, log N_opt) then gives the
power law N_opt = k * C^alpha. N counts the transformer blocks (non-embedding parameters), so C is
the blocks' compute; the output projection's is left out, as Kaplan et al. leave it out.

    herd train scaling --data prepared/ --out runs/scaling      # tiny, mini, small x 3 budgets
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import HerdError
from .presets import SCALING_PRESETS, non_embedding_params, preset_args

DEFAULT_FLOPS = (3e10, 1e11, 3e11)  # minutes on a CPU with the default presets


def fit_isoflop(params, losses) -> dict | None:
    """The minimum of a parabola in log N through one budget's (N, loss) points.

    Args:
        params: the model sizes N (at least 3 distinct).
        losses: their validation losses.
    Returns:
        {"n_opt", "loss_opt", "coefficients": [a, b, c] of a x^2 + b x + c with x = ln N,
        "inside": whether N_opt lies within the sizes tried}, or None when the parabola has no
        minimum (a <= 0: the losses do not turn up on either side).
    """
    x, y = np.log(np.asarray(params, float)), np.asarray(losses, float)
    if len(set(x.tolist())) < 3:
        raise HerdError("an IsoFLOP fit needs at least 3 model sizes per compute budget")
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return None
    x_opt = -b / (2 * a)
    return {"n_opt": float(math.exp(x_opt)), "loss_opt": float(c - b * b / (4 * a)),
            "coefficients": [float(a), float(b), float(c)], "inside": bool(x.min() <= x_opt <= x.max())}


def fit_power_law(flops, n_opts) -> dict:
    """N_opt = k * C^alpha by least squares on (ln C, ln N_opt) (at least 2 budgets).

    Returns:
        {"k", "alpha"}.
    """
    if len(flops) < 2:
        raise HerdError("a power law needs the optimum of at least 2 compute budgets")
    alpha, log_k = np.polyfit(np.log(np.asarray(flops, float)), np.log(np.asarray(n_opts, float)), 1)
    return {"k": float(math.exp(log_k)), "alpha": float(alpha)}


def fit_grid(runs: list[dict]) -> dict:
    """Fits over runs ({"flops", "params", "val_loss", ...}): each budget's IsoFLOP minimum, then
    the power law over the budgets that have one.

    Returns:
        {"budgets": [{"flops", "runs", "n_opt", "loss_opt", "coefficients", "inside"}...], "law"}
        ("law" is None with fewer than 2 minima).
    """
    budgets = []
    for flops in sorted({r["flops"] for r in runs}):
        group = sorted((r for r in runs if r["flops"] == flops), key=lambda r: r["params"])
        fit = fit_isoflop([r["params"] for r in group], [r["val_loss"] for r in group])
        budgets.append({"flops": flops, "runs": group, **(fit or {"n_opt": None})})
    found = [b for b in budgets if b["n_opt"]]
    law = fit_power_law([b["flops"] for b in found], [b["n_opt"] for b in found]) if len(found) >= 2 else None
    return {"budgets": budgets, "law": law}


def run_grid(data: str, out: str, *, presets: list[str] | None = None, flops: list[float] | None = None,
             batch_size: int = 8, max_seq_len: int = 128, lr: float = 3e-3, val_split: float = 0.05,
             seed: int = 0, progress: bool = True) -> dict:
    """Pre-train every preset at every compute budget, fit, and write OUT/scaling.json (+ scaling.png).

    Args:
        data: a `herd data prepare` folder (the same held-out documents score every run).
        out: the output folder; each run in OUT/runs/PRESET-C/.
        presets: the sizes (default `SCALING_PRESETS`); flops: the budgets (default `DEFAULT_FLOPS`).
    Returns:
        `fit_grid`'s result with "outputs".
    """
    from .pretrain import load_named_tokenizer, pretrain, read_report

    presets = list(presets or SCALING_PRESETS)
    flops = list(flops or DEFAULT_FLOPS)
    report = read_report(data)
    vocab = load_named_tokenizer(report["tokenizer"]["name"]).n_words
    out = Path(out)
    per_step = batch_size * max_seq_len
    runs = []
    for budget in flops:
        for name in presets:
            n = non_embedding_params(preset_args(name, vocab))
            steps = max(1, round(budget / (6 * n) / per_step))
            summary = pretrain(preset=name, data=str(data), out=str(out / "runs" / f"{name}-{budget:.0e}"),
                               max_steps=steps, warmup_steps=max(1, steps // 10), batch_size=batch_size,
                               max_seq_len=max_seq_len, lr=lr, val_split=val_split, seed=seed, progress=progress,
                               plot=False)
            runs.append({"preset": name, "flops": budget, "params": n, "tokens": summary["tokens"],
                         "steps": steps, "val_loss": summary["val_loss"]})
    result = fit_grid(runs)
    result["outputs"] = {"json": str(out / "scaling.json")}
    png = plot(result, out / "scaling.png")
    if png is not None:
        result["outputs"]["plot"] = str(png)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    return result


def plot(result: dict, path: Path) -> Path | None:
    """The IsoFLOP curves and their fitted parabolas (left) and N_opt against C (right), if
    matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for b in result["budgets"]:
        n = np.array([r["params"] for r in b["runs"]], float)
        line = left.plot(n, [r["val_loss"] for r in b["runs"]], "o", label=f"C = {b['flops']:.1e}")[0]
        if b.get("coefficients"):
            xs = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 50)
            left.plot(np.exp(xs), np.polyval(b["coefficients"], xs), "-", color=line.get_color())
            left.plot([b["n_opt"]], [b["loss_opt"]], "*", color=line.get_color(), markersize=12)
    left.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss", title="IsoFLOP curves")
    left.legend()
    found = [b for b in result["budgets"] if b.get("n_opt")]
    if found:
        right.plot([b["flops"] for b in found], [b["n_opt"] for b in found], "*", markersize=12)
    if result.get("law"):
        cs = np.geomspace(min(b["flops"] for b in found), max(b["flops"] for b in found), 20)
        right.plot(cs, result["law"]["k"] * cs ** result["law"]["alpha"], "-",
                   label=f"N_opt = {result['law']['k']:.3g} C^{result['law']['alpha']:.2f}")
        right.legend()
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="compute-optimal size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
