"""Training progress: per-step records in `OUT/metrics.jsonl`, a tqdm bar, a loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Metrics:
    """Appends one JSON object per step to `metrics.jsonl` (a resumed run continues the file) and
    shows a progress bar with loss, learning rate and tokens/s (tqdm adds the time left).

    Args:
        out: the output directory.
        total: the number of optimizer steps of the whole run.
        start: the step the run starts at (resume).
        show: draw the bar (rank 0 only in distributed runs).
    """

    def __init__(self, out: Path, total: int, start: int = 0, show: bool = True, write: bool = True):
        self.path = out / "metrics.jsonl"
        self.write = write
        if write and start == 0 and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh file
        elif write and self.path.exists():  # resuming: keep only the steps before the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                    "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "val_loss" in record:
                post["val"] = f"{record['val_loss']:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(out: Path) -> Path | None:
    """`OUT/loss.png` from metrics.jsonl (training and validation loss against the step), if
    matplotlib is installed; None otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(out)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
