"""Where training metrics go: RUN_DIR/metrics.jsonl always, TensorBoard and W&B when asked for,
and the loss-curve PNG drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl (and mirrors it to TensorBoard / W&B).

    truncate_after_step: on resume, lines of steps after the checkpoint are dropped first, so the
    file reads as if the run had never been interrupted.
    """

    def __init__(self, run_dir: Path, config, *, enabled: bool = True, truncate_after_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(run_dir) if r["step"] <= truncate_after_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        trainer = config.trainer
        if trainer.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(
                    "trainer.tensorboard is true but TensorBoard is not installed: `pip install tensorboard`, "
                    "or set trainer.tensorboard=false"
                ) from None
            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if trainer.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    f"trainer.wandb_project is {trainer.wandb_project!r} but wandb is not installed: "
                    "`pip install wandb`, or remove trainer.wandb_project"
                ) from None
            self._wandb = wandb.init(project=trainer.wandb_project, dir=str(run_dir), config=config.to_dict(),
                                     name=Path(run_dir).name, resume="allow")

    def log(self, *, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """Draw train and val loss against tokens into RUN_DIR/loss_curve.png; None if nothing is logged."""
    records = read_metrics(run_dir)
    train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        axis.plot(*zip(*val), "o-", label="val loss", linewidth=1.5, markersize=4)
    axis.set_xlabel("tokens")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.set_title(Path(run_dir).name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = Path(run_dir) / LOSS_CURVE_FILE
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(out)
    return out
