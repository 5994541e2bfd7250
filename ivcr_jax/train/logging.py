"""Training logs: a progress bar (tqdm), TensorBoard scalars, a JSONL file, a PNG loss curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import matplotlib
from tensorboardX import SummaryWriter
from tqdm import tqdm


class Logger:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, total: int = 0, start: int = 0,
                 progress: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._bar = self._tb = self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(self.workdir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        if progress:
            self._bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")

    def info(self, msg: str):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, step: int, metrics: Mapping[str, float]):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lm=f"{metrics.get('loss/lm', 0):.4f}",
                                  tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)

    def close(self, data_report: str | None = None):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if data_report:
            self.info(data_report)
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        plot_losses(self.workdir / "metrics.jsonl", self.workdir / "loss.png")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["step"]] = r   # a resumed run may re-log steps: keep the latest
    return [rows[k] for k in sorted(rows)]


def plot_losses(jsonl: str | Path, out_png: str | Path) -> Path | None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    rows = read_jsonl(jsonl)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "loss/lm", "loss/video", "loss/moment"):
        if key in rows[0]:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
