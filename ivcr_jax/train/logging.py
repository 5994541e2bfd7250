"""Training logs: a progress bar (tqdm), TensorBoard scalars, a JSONL file, a PNG loss curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import matplotlib
from tensorboardX import SummaryWriter
from tqdm import tqdm

from ivcr_jax.cli import leaf_paths


class Logger:
    """Progress bar every step; a metrics row (the mean over the steps since the last row) at step
    1, every ``log_every`` steps and at the last step, to ``metrics.jsonl`` and TensorBoard.
    Held-out scores (``extra``) are logged as they are, in the row of their step."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, total: int = 0, start: int = 0,
                 progress: bool = True, log_every: int = 1, title: str = ""):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.total, self.log_every, self.title = int(total), max(int(log_every), 1), title
        self._bar = self._tb = self._jsonl = None
        self._window: list[Mapping[str, float]] = []
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

    def step(self, step: int, metrics: Mapping[str, float], extra: Mapping[str, float] | None = None,
             flush: bool = False):
        """Record one step; ``flush`` writes its row now (the run stops after this step)."""
        if not self.enabled:
            return
        self._window.append(metrics)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lm=f"{metrics.get('loss/lm', 0):.4f}",
                                  tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)
        if flush or step == 1 or step % self.log_every == 0 or step == self.total or extra:
            keys = list(dict.fromkeys(k for m in self._window for k in m))
            row = {k: sum(m[k] for m in self._window if k in m) / sum(k in m for m in self._window)
                   for k in keys}
            row.update(extra or {})
            self._window = []
            self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
            self._jsonl.flush()
            for k, v in row.items():
                self._tb.add_scalar(k, v, step)
        if extra:
            self.info(f"step {step}: held-out " + ", ".join(
                f"{k.removeprefix('heldout/')} {v:.1f}" for k, v in extra.items() if not k.endswith(("samples", "seconds")))
                + f" ({extra.get('heldout/seconds', 0):.0f} s)")

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
        plot_losses(self.workdir / "metrics.jsonl", self.workdir / "loss.png", title=self.title)


def save_config(config, path: Path, *, resumed: bool, log=print) -> None:
    """Write the resolved config as JSON; on a resumed run, name the keys that changed."""
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    if resumed and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != new:
            flat_old, flat_new = leaf_paths(old), leaf_paths(new)
            changed = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
            log(f"note: resuming with a config that differs from {path} in: "
                + ", ".join(f"{k} ({flat_old.get(k)!r} -> {flat_new.get(k)!r})" for k in changed[:8])
                + (" ..." if len(changed) > 8 else ""))
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def summary(exp, n_train: int, n_frozen: int, mesh: dict, start: int, total: int, samples: int,
            heldout: int) -> str:
    """The run at a glance, printed when training starts."""
    tc, d, m = exp.train, exp.data, exp.model
    lines = [
        f"model: LLM {m.llm.layers} layers x {m.llm.hidden}, ViT {m.vit.depth} x {m.vit.width} at "
        f"{m.vit.image_size} px; trainable {n_train:,} / frozen {n_frozen:,} parameters "
        f"({', '.join(exp.trainable)})",
        f"data: {d.annotations} ({samples} training samples), frames {d.retrieval_frames} per candidate / "
        f"{d.moment_frames} per moment video at {d.frame_size} px",
        f"train: start step {start}, {total} steps, batch {tc.batch_size} x accum {tc.grad_accum}, lr {tc.lr:g} "
        f"(warmup {tc.warmup_steps}, min {tc.min_lr:g}), aux {tc.aux_loss_mode}, mesh {mesh}",
        f"logs: a row every {tc.log_every} steps, checkpoint every {tc.ckpt_every}, "
        + (f"held-out monitor every {tc.eval_every} steps on {heldout} {tc.eval_split} samples"
           if tc.eval_every else "no held-out monitor (train.eval_every=0)"),
    ]
    return "\n".join(lines)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["step"]] = r   # a resumed run may re-log steps: keep the latest
    return [rows[k] for k in sorted(rows)]


def plot_losses(jsonl: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """The training curves: the losses on a linear axis (the total dashed over the LM loss, which it
    nearly equals), the aux losses in their own panel, and the held-out scores when logged."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    rows = read_jsonl(jsonl)
    if not rows:
        return None
    steps = [r["step"] for r in rows]

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    aux = [k for k in ("loss/video", "loss/moment") if any(k in r for r in rows)]
    held = [k for k in ("heldout/retrieval/R@1", "heldout/retrieval/parsed", "heldout/moment/R@1_IoU0.5",
                        "heldout/moment/parsed") if any(k in r for r in rows)]
    panels = 1 + bool(aux) + bool(held)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for key, style in (("loss/lm", dict(lw=2)), ("loss", dict(ls="--", lw=1))):
        if any(key in r for r in rows):
            ax.plot(*series(key), label={"loss": "total (LM + weighted aux)", "loss/lm": "LM loss"}[key], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_ylim(bottom=0)
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    col = 1
    if aux:
        ax = axes[0][col]
        col += 1
        for key in aux:
            ax.plot(*series(key), label={"loss/video": "L_V (video index)", "loss/moment": "L_C (moment)"}[key])
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
        ax.set_title("aux losses (weighted by alpha / beta in the total)")
        ax.legend()
        ax.grid(alpha=0.3)
    if held:
        ax = axes[0][col]
        for key in held:
            ax.plot(*series(key), marker="o", label=key.removeprefix("heldout/"))
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        ax.set_xlim(0, max(steps) * 1.02)
        ax.set_title("held-out slice (generation)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"training curves: {Path(jsonl).parent.name}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
