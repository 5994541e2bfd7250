"""The frozen EVA ViT-g/14 (frames/s), ours against HF ``Blip2VisionModel``, in one process.

    python benchmarks/vit_bench.py --size tiny
    python benchmarks/vit_bench.py --size paper --frames 96

Ours: ``ivcr_jax.models.eva_vit.EvaViT`` (``apply_post_norm=True``: ln_vision included), jitted,
in the model config's compute dtype (bf16 for the paper model). Torch: ``Blip2VisionModel``
(its ``post_layernorm`` as ln_vision) under ``torch.no_grad``, bf16 autocast over bf16 weights on
GPU, fp32 on CPU. One batch of ``--frames`` CLIP-normalised frames per call (a 96-frame moment
video by default); rounds alternate ours / torch, medians. At the tiny size the weights are shared
(torch → ours through ``ivcr_jax/convert/eva_vit.py``) and the outputs compared.

FLOPs per frame: the analytic count of performance-model.md §8 (520.7 GF for ViT-g) and XLA's cost
analysis of our executable; fraction of the limit = FLOPs / time / peak (§1's table by device
kind; on a CPU a measured fp32 matmul in both frameworks).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the accelerator
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_interllava as ti  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ivcr_jax.convert import eva_vit as eva_conv  # noqa: E402
from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig  # noqa: E402
from ivcr_jax.models.params import load_flat  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "paper", "7b"])
    p.add_argument("--frames", type=int, default=96, help="frames per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls-per-round", type=int, default=3)
    ti.add_run_args(p, seed=False)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    m = ti.model_dict(a.size)
    v = m["vit"]
    hw, device, share = ti.run_setup(a)
    cuda = device.type == "cuda"
    print(f"ViT, size {a.size}: {a.frames} frames of {v['image_size']} px, {hw['device']}, torch on {device}, "
          f"{ti.uptime()}", flush=True)

    from transformers import Blip2VisionConfig, Blip2VisionModel
    torch.manual_seed(0)
    frozen_t = torch.bfloat16 if cuda and m["frozen_dtype"] == "bfloat16" else torch.float32
    with torch.device(device):
        ref = Blip2VisionModel(Blip2VisionConfig(
            hidden_size=v["width"], intermediate_size=v["mlp_dim"], num_hidden_layers=v["depth"],
            num_attention_heads=v["heads"], image_size=v["image_size"], patch_size=v["patch_size"],
            hidden_act="gelu", layer_norm_eps=v["eps"], qkv_bias=True))
        ref.post_layernorm = torch.nn.LayerNorm(v["width"], eps=v["post_eps"])   # = ln_vision
        if share:
            ti.noisy_(ref, 1)
        with torch.no_grad():
            for layer in ref.encoder.layers:
                layer.self_attn.qkv.bias[v["width"]:2 * v["width"]].zero_()        # EVA: no key bias
        ref = ref.to(frozen_t).eval()

    cfg = EvaViTConfig(**v)
    compute, frozen = jnp.dtype(m["compute_dtype"]), jnp.dtype(m["frozen_dtype"])
    make = lambda: EvaViT(cfg, dtype=compute, param_dtype=frozen, rngs=nnx.Rngs(0))  # noqa: E731
    gdef = nnx.graphdef(nnx.eval_shape(make))
    ours = nnx.merge(gdef, jax.jit(lambda: nnx.split(make())[1])())   # one compiled init
    if share:
        sd = [(k, ti._np(t)) for k, t in ref.state_dict().items()]
        load_flat(ours, eva_conv.convert_hf_tensors(sd, cfg, source="torch reference"), source="torch reference")
    gdef, state = nnx.split(ours)

    x = np.random.default_rng(0).standard_normal((a.frames, v["image_size"], v["image_size"], 3)).astype(np.float32)
    xj = jnp.asarray(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)

    fwd = jax.jit(lambda s, px: nnx.merge(gdef, s)(px, apply_post_norm=True))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, xj).compile()
    t_compile = time.perf_counter() - t0
    flops_xla = ti.xla_flops(compiled)

    def run_ours():
        return compiled(state, xj).block_until_ready()

    @torch.no_grad()
    def run_torch():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = ref(pixel_values=xt).last_hidden_state
        ti.sync(device)
        return out

    y_ours, y_torch = run_ours(), run_torch()          # warm-up (and, shared, the comparison)
    rel = None
    if share:
        yo, yt = np.asarray(y_ours, np.float32), y_torch.float().cpu().numpy()
        rel = float(np.abs(yo - yt).max() / np.abs(yt).max())
    times = ti.alternate({"ours": run_ours, "torch": run_torch}, a.rounds, a.calls_per_round)
    t_ours, t_torch = ti.median(times["ours"]), ti.median(times["torch"])
    per_frame = ti.vit_forward_flops(v, 1)
    peak = hw["peak_flops"]
    frac = lambda t: a.frames * per_frame / t / peak if peak else None  # noqa: E731
    res = {"bench": "vit", "size": a.size, "device": hw["device"], "torch_device": str(device), "load": ti.uptime(),
           "frames": a.frames, "image_size": v["image_size"], "flops_per_frame_analytic": per_frame,
           "flops_per_frame_xla": flops_xla / a.frames if flops_xla else None, "peak": hw,
           "shared_weights": share, "max_rel_diff": rel,
           "ours": {"call_s": t_ours, "frames_per_s": a.frames / t_ours, "fraction_of_peak": frac(t_ours),
                    "compile_s": t_compile, "times": times["ours"]},
           "torch": {"call_s": t_torch, "frames_per_s": a.frames / t_torch, "fraction_of_peak": frac(t_torch),
                     "times": times["torch"]},
           "ratio_torch_over_ours": t_torch / t_ours}
    notes = [f"{a.rounds} alternating rounds x {a.calls_per_round} calls of {a.frames} frames, medians; ours compile "
             f"{t_compile:.1f} s",
             f"FLOPs/frame: analytic {per_frame:.4g}, XLA (ours) {ti.fmt(res['flops_per_frame_xla'])}; peak "
             f"{ti.fmt(peak)} FLOP/s ({hw['peak_source']})", ti.uptime()]
    if rel is not None:
        notes.append(f"same weights: max |ours - torch| / max |torch| = {rel:.2e}")
    ti.print_table(f"ViT [{a.size}] on {hw['device']}", [
        ("call time (median)", t_ours * 1e3, t_torch * 1e3, " ms", False),
        ("frames/s", a.frames / t_ours, a.frames / t_torch, "", True),
        ("fraction of peak FLOP/s", frac(t_ours), frac(t_torch), "", True)], notes)
    ti.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
