"""Our LLaMA + LoRA against HF transformers ``LlamaForCausalLM`` + peft LoRA on CPU, fp32.

Both models get the same random weights (HF's init, saved with ``save_pretrained`` and read by
``ivcr_jax.convert.llama.from_hf``; the peft adapters, with non-zero ``B``, copied by
``load_lora``), and the logits are checked to agree (max abs difference / max abs logit <= 1e-4)
before anything is timed. Per size it times, in the same process and in alternating rounds
(ours, torch at each thread count, ours, ...; medians reported):

* **forward**: ``input_ids [B, T]`` -> full logits ``[B, T, V]`` (no grad in torch, one
  ``jax.jit`` here);
* **LoRA train step**: next-token cross-entropy over every position (HF's ``labels=input_ids``
  loss, our ``train.losses.lm_loss``), backward, AdamW over the LoRA parameters only (frozen base),
  lr 1e-4, weight decay 0.01. Torch: ``zero_grad``/``backward``/``torch.optim.AdamW.step``. Ours:
  one ``jax.jit`` of the whole step (loss, gradients and the optax update), the LoRA parameters and
  optimizer state donated, the frozen base a plain input — the shape of ``ivcr_jax/train/step.py``.
  No rematerialisation in either (``LlamaConfig.remat == "none"``; torch keeps activations).

Torch runs at its default thread count and at 1 thread (``--torch-threads``): on a busy machine
its OpenMP threads can be several times slower than one thread, so the headline ratio is against
the fastest torch setting of each round (median over rounds of best-torch / ours; > 1: ours is
faster); the ratio against torch's default is printed too. Model GFLOP/s count the dense and
attention matmuls (a frozen base has no weight gradients, so the backward counts one input-gradient
matmul per dense layer and two per attention matmul). The last column is process CPU time, torch
at 1 thread / ours: it moves much less with the machine's load than wall time. A large fp32 matmul
timed the same way is the hardware anchor, and ``uptime`` is printed with the figures, since on a
shared machine only ratios mean anything.

    python benchmarks/llama_bench.py                       # both sizes, ivcr_jax.cpu.configure()
    python benchmarks/llama_bench.py --sizes d512/L4/B2/T256 --rounds 9
    python benchmarks/llama_bench.py --cpu-flags none      # XLA_FLAGS exactly as given
    python benchmarks/llama_bench.py --malloc reuse        # ivcr_jax.cpu.reuse_freed_memory()

XLA reads its flags once per process, so flag sets are compared by the ratios of separate runs.
docs/benchmarks.md ("LLaMA against HF transformers + peft (CPU)") has the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivcr_jax import cpu  # noqa: E402  (imports no jax: the flags must be set before jax starts)

SIZES = {"small": "d256/L2/B4/T128", "large": "d512/L4/B2/T256"}
VOCAB = 32005  # LLaMA-2's 32000 + IVCR's 5 added tokens


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    batch: int
    seq: int
    heads: int
    intermediate: int

    @property
    def name(self) -> str:
        return f"d{self.hidden}/L{self.layers}/B{self.batch}/T{self.seq}"


def parse_size(spec: str) -> Size:
    """``d512/L4/B2/T256`` (optionally ``/H8/I1376``) or a name in :data:`SIZES`."""
    spec = SIZES.get(spec, spec)
    kv = dict(re.findall(r"([dLBTHI])(\d+)", spec))
    if not {"d", "L", "B", "T"} <= kv.keys():
        raise SystemExit(f"bad size {spec!r}: want e.g. d512/L4/B2/T256[/H8/I1376]")
    d = int(kv["d"])
    heads = int(kv.get("H", max(1, d // 64)))
    inter = int(kv.get("I", int(round(2.7 * d / 16)) * 16))
    return Size(d, int(kv["L"]), int(kv["B"]), int(kv["T"]), heads, inter)


def flops(s: Size, rank: int) -> tuple[float, float]:
    """(forward, train step) matmul FLOPs of one batch (see the module docstring)."""
    n = s.batch * s.seq
    d, f = s.hidden, s.intermediate
    dense = 2 * n * (s.layers * (4 * d * d + 3 * d * f) + d * VOCAB)
    lora = 2 * n * s.layers * 4 * rank * 2 * d
    attn = s.layers * 2 * 2 * s.batch * s.seq * s.seq * d  # QK^T and PV, the full square
    fwd = dense + lora + attn
    train = fwd + (dense + 2 * lora) + 2 * attn
    return float(fwd), float(train)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def machine() -> str:
    cpu_name = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu_name}, {os.cpu_count()} cores"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def alternate(fns: dict, rounds: int, target_s: float) -> dict[str, dict]:
    """Time each ``fn`` (a ``(call, sync, setup)`` triple) in ``rounds`` rounds in which every fn
    runs in turn, with calls per round sized to about ``target_s``. Returns per fn the median wall
    seconds per call (``"wall"``), the per-round wall times (``"rounds"``, for ratios of
    neighbouring runs) and the median process CPU seconds per call (``"cpu"``)."""
    reps = {}
    for name, (fn, sync, setup) in fns.items():  # warm-up and calibration
        setup()
        sync(fn())
        t = time.perf_counter()
        sync(fn())
        reps[name] = max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))
    wall = {name: [] for name in fns}
    cpu_t = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, sync, setup) in fns.items():
            setup()
            t, c = time.perf_counter(), _cpu_s()
            for _ in range(reps[name]):
                out = fn()
            sync(out)
            wall[name].append((time.perf_counter() - t) / reps[name])
            cpu_t[name].append((_cpu_s() - c) / reps[name])
    return {name: {"wall": statistics.median(wall[name]), "rounds": wall[name],
                   "cpu": statistics.median(cpu_t[name])} for name in fns}


def _ratio(t: dict, ours: str, theirs: list[str]) -> float:
    """Median over rounds of (the best of ``theirs`` in that round) / ours in that round."""
    return statistics.median(min(t[n]["rounds"][i] for n in theirs) / o
                             for i, o in enumerate(t[ours]["rounds"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,large",
                   help="comma-separated sizes: small, large, or d512/L4/B2/T256[/H8/I1376]")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per measurement")
    p.add_argument("--round-s", type=float, default=0.6, help="seconds of calls per round (about)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--cpu-flags", default="recommended",
                   help="'recommended' (ivcr_jax.cpu.configure()), 'none', or a space-separated list of "
                        "XLA flags to add to XLA_FLAGS")
    p.add_argument("--malloc", default="default", choices=("default", "reuse"),
                   help="'reuse': ivcr_jax.cpu.reuse_freed_memory() (glibc; applies to torch too)")
    p.add_argument("--torch-threads", default="all,1",
                   help="torch intra-op thread counts to time ('all' = torch's default); the ratio "
                        "'best' is against the fastest of them in each round")
    p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--what", default="matmul,forward,train", help="which timings to run")
    p.add_argument("--matmul", type=int, default=2048, help="anchor: an N^3 fp32 matmul")
    args = p.parse_args(argv)

    if args.cpu_flags == "recommended":
        cpu.configure()
    elif args.cpu_flags != "none":
        cpu.configure(args.cpu_flags.split())
    if args.malloc == "reuse":
        cpu.reuse_freed_memory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft
    import torch
    import transformers
    from flax import nnx

    from ivcr_jax.convert import llama as convert
    from ivcr_jax.models.lora import LoRAConfig
    from ivcr_jax.train import losses

    default_threads = torch.get_num_threads()
    threads = []
    for t in args.torch_threads.split(","):
        n = default_threads if t == "all" else int(t)
        if n not in threads:
            threads.append(n)
    tnames = [f"torch{n}" for n in threads]
    what = set(args.what.split(","))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    print(f"machine: {machine()}; {uptime()}")
    print(f"jax {jax.__version__} ({jax.default_backend()}), flax {__import__('flax').__version__}; "
          f"torch {torch.__version__} (default {default_threads} threads; timed with {threads}), "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, malloc {args.malloc}\n")
    rows = []

    def jsync(x):
        jax.block_until_ready(x)

    def tsync(x):
        return x

    def nothing():
        pass

    def timed(ours_fn, torch_fn):
        fns = {"ours": (ours_fn, jsync, nothing)}
        for n, name in zip(threads, tnames):
            fns[name] = (torch_fn, tsync, lambda n=n: torch.set_num_threads(n))
        t = alternate(fns, args.rounds, args.round_s)
        torch.set_num_threads(default_threads)
        return t

    if "matmul" in what:
        n = args.matmul
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        mm = jax.jit(jnp.dot)
        rows.append((f"matmul {n}^3", "fp32", timed(lambda: mm(ja, jb), lambda: ta @ tb), 2.0 * n ** 3))
        _print_row(rows[-1], tnames)

    for s in sizes:
        torch.manual_seed(0)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
            max_position_embeddings=max(2048, s.seq), attn_implementation=args.torch_attn)
        hf = transformers.LlamaForCausalLM(hf_cfg).float()
        lcfg = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=0.0,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)  # before peft wraps the modules in place
            ours = convert.from_hf(tmp, lora=lcfg, dtype=jnp.float32, param_dtype=jnp.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                     target_modules=list(lcfg.targets)))
        with torch.no_grad():  # a non-zero B, so the adapters take part in the parity check
            for name, prm in pm.named_parameters():
                if "lora_B" in name:
                    prm.normal_(0, 0.02)
        convert.load_lora(ours, [(k, v.detach().numpy()) for k, v in pm.state_dict().items()])
        assert ours.config.remat == "none"  # torch keeps its activations too

        ids_np = np.random.default_rng(1).integers(3, VOCAB, (s.batch, s.seq))
        ids_t = torch.tensor(ids_np)
        ids_j = jnp.asarray(ids_np, jnp.int32)

        graphdef, lora_params, frozen = nnx.split(ours, nnx.LoRAParam, ...)

        @jax.jit
        def forward(lora_params, frozen, ids):
            return nnx.merge(graphdef, lora_params, frozen)(ids).logits

        pm.eval()
        with torch.inference_mode():
            ref = pm(input_ids=ids_t).logits.numpy()
        got = np.asarray(forward(lora_params, frozen, ids_j))
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        print(f"{s.name} (heads {s.heads}, intermediate {s.intermediate}, vocab {VOCAB}, LoRA r{args.rank} "
              f"q/k/v/o): logits max|ours-torch|/max|torch| = {err:.1e}")
        if err > 1e-4:
            raise SystemExit(f"logits disagree ({err:.2e} > 1e-4)")
        f_fwd, f_train = flops(s, args.rank)

        if "forward" in what:
            def t_fwd():
                with torch.inference_mode():
                    return pm(input_ids=ids_t).logits

            rows.append((s.name, "forward", timed(lambda: forward(lora_params, frozen, ids_j), t_fwd), f_fwd))
            _print_row(rows[-1], tnames)

        if "train" in what:
            tx = optax.adamw(1e-4, weight_decay=0.01)  # torch.optim.AdamW's defaults otherwise

            def step(state, frozen, ids):
                def loss_fn(params):
                    logits = nnx.merge(graphdef, params, frozen)(ids).logits
                    return losses.lm_loss(logits, ids)[0]

                loss, grads = jax.value_and_grad(loss_fn)(state["params"])
                updates, opt = tx.update(grads, state["opt"], state["params"])
                return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

            jstep = jax.jit(step, donate_argnums=(0,))
            params0 = jax.tree.map(jnp.array, lora_params)  # a copy: the state is donated
            box = [{"params": params0, "opt": tx.init(params0)}]

            pm.train()  # dropout is 0: train mode changes nothing but autograd bookkeeping
            topt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4,
                                     weight_decay=0.01)

            def t_step():
                topt.zero_grad(set_to_none=True)
                loss = pm(input_ids=ids_t, labels=ids_t).loss
                loss.backward()
                topt.step()
                return loss

            def o_step():
                box[0], loss = jstep(box[0], frozen, ids_j)
                return loss

            l_ours, l_torch = float(o_step()), float(t_step().detach())
            print(f"  first-step loss ours {l_ours:.6f} torch {l_torch:.6f} (|diff| {abs(l_ours - l_torch):.1e})")
            if abs(l_ours - l_torch) > 1e-4 * max(1.0, abs(l_torch)):
                raise SystemExit("train-step losses disagree")
            rows.append((s.name, "LoRA train step", timed(o_step, t_step), f_train))
            _print_row(rows[-1], tnames)

    print(f"\n{uptime()}")
    dflt = f"torch{default_threads}"
    print(f"\n| size | what | ours (ms) | {' | '.join(f'{n} (ms)' for n in tnames)} | {dflt}/ours | "
          f"best torch/ours | ours GFLOP/s | best torch GFLOP/s | CPU-s torch1/ours |")
    print("|---|---|---:|" + "---:|" * len(tnames) + "---:|---:|---:|---:|---:|")
    for name, kind, t, fl in rows:
        best = min(t[n]["wall"] for n in tnames)
        cpu_col = (f"{t['torch1']['cpu'] / t['ours']['cpu']:.2f}" if "torch1" in t else "–")
        print(f"| {name} | {kind} | {t['ours']['wall'] * 1e3:.1f} | "
              + " | ".join(f"{t[n]['wall'] * 1e3:.1f}" for n in tnames)
              + f" | {_ratio(t, 'ours', [dflt]):.2f} | {_ratio(t, 'ours', tnames):.2f} | "
              f"{fl / t['ours']['wall'] / 1e9:.0f} | {fl / best / 1e9:.0f} | {cpu_col} |")
    return 0


def _print_row(row, tnames):
    name, kind, t, fl = row
    o = t["ours"]["wall"]
    parts = "  ".join(f"{n} {t[n]['wall'] * 1e3:8.1f} ms" for n in tnames)
    print(f"  {name:>16} {kind:>16}: ours {o * 1e3:8.1f} ms  {parts}  best torch/ours "
          f"{_ratio(t, 'ours', tnames):5.2f}  GFLOP/s ours {fl / o / 1e9:5.0f}", flush=True)
    for n in ("ours", *tnames):  # the rounds themselves: load changes show up here
        print(f"  {'':>16} {n:>16}: " + " ".join(f"{x * 1e3:7.1f}" for x in t[n]["rounds"]))


if __name__ == "__main__":
    sys.exit(main())
