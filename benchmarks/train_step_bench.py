"""The whole InterLLaVA train step, ours against the PyTorch reference, in one process.

    python benchmarks/train_step_bench.py --size tiny
    python benchmarks/train_step_bench.py --size paper --batch 2 --retrieval 10x12 --moment 1x96 --text 512

Ours: the project's real step — ``train/step.py`` ``make_train_step`` + ``jit_train_step`` over
``nnx.split(model, trainable, ...)`` exactly as ``train/loop.py`` builds it (the paper's optimizer
from ``train/optim.py``, the LM loss only (aux mode ``off``), the LM head at the supervised
positions, ``train.lm_loss_chunk`` when this checkout has it), compiled ahead of time once.
Torch: ``benchmarks/torch_interllava.py``'s HF/peft model, AdamW over the same trainable set
(Q-Formers, their queries, the frame table, ``llama_proj``, LoRA; no decay on biases, norms and
1-D tensors, clipping at 1.0), HF's causal-LM loss over the full logits (``--torch-head
supervised``: only at the supervised positions, as ours), gradient checkpointing of LLaMA when the
model's ``remat`` is on; bf16 autocast on GPU, fp32 on CPU. Frozen ViT and LLaMA base in both.

Rounds alternate (ours, torch, ours, torch ...) and medians are reported, so load on a shared
machine falls on both alike. Random weights: shared (torch → ours through ``ivcr_jax/convert``)
at the tiny size, drawn independently above it (times do not depend on the values).

FLOPs: XLA's cost analysis of our compiled step (what the executable runs: LLaMA remat and the
supervised-only LM head included), and the analytic model FLOPs of performance-model.md §8 for
both (frozen ViT forward only; trainable Q-Formers 3x forward; LLM + LoRA 4·N·S, attention
included; the LM head at the supervised positions; no remat). MFU = analytic FLOPs / step time /
peak, with the peak from §1's table by device kind, or, on a CPU, a measured fp32 matmul.

``--features``: the "cached ViT features" variant: the frame pool carries ``vit_features`` (ours:
``InterLLaVA.encode_pool``; torch: the same features from its own ViT), computed once before the
timed steps, so neither step runs the ViT.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the accelerator
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_interllava as ti  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ivcr_jax import sharding  # noqa: E402
from ivcr_jax.models import build  # noqa: E402
from ivcr_jax.models.interllava import InterLLaVAConfig  # noqa: E402
from ivcr_jax.models.params import count, trainable_filter  # noqa: E402
from ivcr_jax.train import losses, optim, step as step_lib  # noqa: E402
from ivcr_jax.train.aux import make_aux_mode  # noqa: E402

DEFAULTS = {  # per size: batch, retrieval group, moment group, text tokens, answer tokens
    "tiny": dict(batch=2, retrieval="10x12", moment="1x96", text=128, answer=16),
    "paper": dict(batch=2, retrieval="10x12", moment="1x96", text=512, answer=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "paper", "7b"])
    p.add_argument("--batch", type=int)
    p.add_argument("--retrieval", help="retrieval group VxT (videos x frames), e.g. 10x12; 0 = none")
    p.add_argument("--moment", help="moment group VxT, e.g. 1x96; 0 = none")
    p.add_argument("--text", type=int, help="text tokens per row (besides the video tokens)")
    p.add_argument("--answer", type=int, help="supervised answer tokens per row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--torch-head", default="full", choices=["full", "supervised"])
    p.add_argument("--lm-chunk", type=int, default=8192, help="train.lm_loss_chunk (the paper config's)")
    p.add_argument("--features", action="store_true", help="cached ViT features instead of frames")
    ti.add_run_args(p)
    a = p.parse_args(argv)
    d = DEFAULTS["tiny" if a.size == "tiny" else "paper"]
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


# ----------------------------------------------------------------------------- ours

def build_ours(m, a, ref=None):
    """Model → (graphdef, params, frozen) → optimizer → state → compiled step, as train/loop.py."""
    cfg = InterLLaVAConfig.from_dict(m)
    rng_impl = "rbg" if a.size == "tiny" else "threefry2x32"      # configs/paper.py's rng_impl
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    with sharding.use_mesh(mesh):
        model = build.build_model(cfg, mesh=mesh, seed=a.seed)
    if ref is not None:
        ti.copy_into_ours(ref, model)
    graphdef, params, frozen = nnx.split(model, trainable_filter(ti.TRAINABLE), ...)
    del model
    tx, schedule = optim.make_optimizer(types.SimpleNamespace(**ti.TRAIN), params)
    state_sh = step_lib.state_shardings(params, tx, a.seed, mesh, rng_impl)
    n_train, n_frozen = count(params), count(frozen)
    state = jax.jit(lambda p: step_lib.init_state(p, tx, a.seed, rng_impl), out_shardings=state_sh)(params)
    kw = {"lm_chunk": a.lm_chunk} if "lm_chunk" in inspect.signature(make_aux_mode).parameters else {}
    aux = make_aux_mode("off", None, **kw)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, aux, rng_impl=rng_impl))
    return dict(mesh=mesh, graphdef=graphdef, frozen=frozen, state=state, step=step, n_train=n_train,
                n_frozen=n_frozen, lm_chunk=kw.get("lm_chunk", 0))


def ours_batch(o, host, features: bool):
    host = ti.for_ours(host)
    host["loss_index"] = losses.loss_index(host["labels"], host["weight"])
    if features:
        if "pool" not in host:
            raise SystemExit("--features needs the frame-pool batch layout (InterLLaVA.encode_pool)")
        pool = host["pool"]
        p, f = pool["frames"].shape[:2]
        model = nnx.merge(o["graphdef"], o["state"]["params"], o["frozen"])
        feats = jax.jit(lambda m, x: m.image_features(x))(model, pool["frames"].reshape((p * f,) + pool["frames"].shape[2:]))
        host["pool"] = {"vit_features": np.asarray(feats).reshape((p, f) + feats.shape[1:]),
                        "timestamp_ids": pool["timestamp_ids"], "timestamp_mask": pool["timestamp_mask"]}
    return sharding.to_device(host, o["mesh"])


# ----------------------------------------------------------------------------- torch

def build_torch(m, device):
    cuda = device.type == "cuda"
    frozen = torch.bfloat16 if cuda and m["frozen_dtype"] == "bfloat16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        ref = ti.TorchInterLLaVA(m, frozen_dtype=frozen, trainable_dtype=torch.float32)
    if m.get("remat", "none") != "none":
        ref.llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.train()
    decay, no_decay = [], []
    for name, p in ref.trainable_parameters():
        norm = any(s in name.lower() for s in ("layernorm", "norm.", "ln_"))
        (decay if p.ndim >= 2 and not norm else no_decay).append(p)
    t = ti.TRAIN
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["lr"], betas=(t["b1"], t["b2"]), eps=1e-8, **({"fused": True} if cuda else {}))
    return ref, opt, decay + no_decay


def torch_step_fn(ref, opt, params, tb, device, head: str, clip: float):
    cuda = device.type == "cuda"
    labels = tb["labels"]
    sup = None
    if head == "supervised":   # positions whose next token is supervised (the same in every row here)
        nxt = (labels[:, 1:] != -100).any(0).nonzero()[:, 0]
        sup = nxt                                   # position t predicts t + 1
        targets = labels[:, sup + 1]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if sup is None:
                loss = ref(tb, labels=labels).loss
            else:
                logits = ref(tb, logits_to_keep=sup).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                         ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        ti.sync(device)
        return loss.item()
    return step


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    a = parse_args(argv)
    m = ti.model_dict(a.size)
    groups = ti.parse_groups(a.retrieval, a.moment)
    host = ti.synthetic_batch(m, batch=a.batch, groups=groups, text_len=a.text, answer_len=a.answer, seed=a.seed)
    S = host["input_ids"].shape[1]
    ts_len = host["videos"][next(iter(groups))]["timestamp_ids"].shape[-1]
    hw, device, share = ti.run_setup(a)
    print(f"train step, size {a.size}: batch {a.batch}, groups {groups}, {S} tokens/row ({a.answer} supervised), "
          f"{hw['device']}, torch on {device}, {ti.uptime()}", flush=True)

    t0 = time.perf_counter()
    ref, opt, tparams = build_torch(m, device)
    t_torch_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    o = build_ours(m, a, ref if share else None)
    t_ours_build = time.perf_counter() - t0
    dev_batch = ours_batch(o, host, a.features)

    # torch inputs (features from its own ViT, once, when asked)
    tb = ti.to_torch(host, device)
    if a.features:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for grp in tb["videos"].values():
                frames = grp.pop("frames")
                b, v, t = frames.shape[:3]
                f = ref.image_features(frames.reshape((b * v * t,) + tuple(frames.shape[3:])))
                grp["vit_features"] = f.reshape((b, v, t) + tuple(f.shape[1:]))

    # compile ours once, ahead of time (the executable's cost analysis is read from it)
    t0 = time.perf_counter()
    with sharding.use_mesh(o["mesh"]):
        compiled = o["step"].lower(o["state"], o["frozen"], dev_batch).compile()
    t_compile = time.perf_counter() - t0
    flops_xla = ti.xla_flops(compiled)
    box = {"state": o["state"]}

    def ours():
        with sharding.use_mesh(o["mesh"]):
            box["state"], metrics, _ = compiled(box["state"], o["frozen"], dev_batch)
        return float(metrics["loss"])

    theirs = torch_step_fn(ref, opt, tparams, tb, device, a.torch_head, ti.TRAIN["clip_norm"])
    t0 = time.perf_counter()
    first_ours = ours()
    t_first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_torch = theirs()
    t_first_torch = time.perf_counter() - t0
    if share:
        print(f"first-step loss: ours {first_ours:.5f}, torch {first_torch:.5f} (same weights; dropout masks differ)")
    times = ti.alternate({"ours": ours, "torch": theirs}, a.rounds, a.steps_per_round)
    t_ours, t_torch = ti.median(times["ours"]), ti.median(times["torch"])

    frames = sum(a.batch * v * t for v, t in groups.values())
    an = ti.train_flops(m, batch=a.batch, groups=groups, seq=S, supervised=a.answer, timestamp_len=ts_len)
    if a.features:
        an["total"] -= an["vit"]
        an["vit"] = 0.0
    peak = hw["peak_flops"]
    mfu = lambda f, t: (f / t / peak) if (f and peak) else None  # noqa: E731
    tokens = a.batch * S
    res = {
        "bench": "train_step", "size": a.size, "features": a.features, "device": hw["device"],
        "torch_device": str(device), "load": ti.uptime(), "batch": a.batch, "groups": groups, "seq": S,
        "frames": frames, "answer": a.answer, "torch_head": a.torch_head, "lm_chunk": o["lm_chunk"],
        "shared_weights": share, "trainable_params": o["n_train"], "frozen_params": o["n_frozen"],
        "peak": hw, "flops_analytic": an, "flops_xla_ours": flops_xla,
        "ours": {"step_s": t_ours, "times": times["ours"], "tokens_per_s": tokens / t_ours,
                 "frames_per_s": frames / t_ours, "mfu_analytic": mfu(an["total"], t_ours),
                 "mfu_xla": mfu(flops_xla, t_ours), "compile_s": t_compile, "first_step_s": t_first_ours,
                 "build_s": t_ours_build, "first_loss": first_ours},
        "torch": {"step_s": t_torch, "times": times["torch"], "tokens_per_s": tokens / t_torch,
                  "frames_per_s": frames / t_torch, "mfu_analytic": mfu(an["total"], t_torch),
                  "first_step_s": t_first_torch, "build_s": t_torch_build, "first_loss": first_torch},
        "ratio_torch_over_ours": t_torch / t_ours,
    }
    rows = [("step time (median)", t_ours * 1e3, t_torch * 1e3, " ms", False),
            ("LLM tokens/s", tokens / t_ours, tokens / t_torch, "", True),
            ("frames/s", frames / t_ours, frames / t_torch, "", True),
            ("MFU (analytic §8 FLOPs)", res["ours"]["mfu_analytic"], res["torch"]["mfu_analytic"], "", True),
            ("MFU (XLA cost analysis, ours)", res["ours"]["mfu_xla"], None, "", True)]
    ti.print_table(f"train step [{a.size}{', cached ViT features' if a.features else ''}] on {hw['device']}", rows, [
        f"torch/ours step-time ratio {t_torch / t_ours:.3f} (> 1: ours is faster); {a.rounds} alternating rounds "
        f"x {a.steps_per_round} steps, medians",
        f"FLOPs/step: analytic {an['total']:.4g} (vit {an['vit']:.3g}, qformer {an['qformer']:.3g}, "
        f"video_qformer {an['video_qformer']:.3g}, llm {an['llm']:.3g}); XLA (ours) "
        f"{ti.fmt(flops_xla)}",
        f"peak {ti.fmt(peak)} FLOP/s ({hw['peak_source']})",
        f"ours compile {t_compile:.1f} s; first steps: ours {t_first_ours:.2f} s, torch {t_first_torch:.2f} s; "
        f"trainable {o['n_train']:,} / frozen {o['n_frozen']:,} params; torch head: {a.torch_head}; "
        f"ours lm_loss_chunk {o['lm_chunk']}; {ti.uptime()}"])
    ti.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
