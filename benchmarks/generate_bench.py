"""Generation: prefill, decode and a whole answer, ours against the PyTorch reference.

    python benchmarks/generate_bench.py --size tiny
    python benchmarks/generate_bench.py --size paper

Ours: ``ivcr_jax/models/generate.py``'s :class:`Generator` (compiled video encoding + prefill into
a KV cache, then the whole decode loop in one ``lax.while_loop``), its stage timings
(``encode_s``, ``prefill_s``, ``decode_s``: measured with ``block_until_ready``, compilation
excluded). Torch: the reference's video encoding, then HF ``generate`` with its KV cache
(greedy). Both produce exactly ``--new-tokens`` tokens (ours with no EOS id, HF with
``min_new_tokens``), so random weights cannot stop either early; ours pads the prompt to a bucket
of exactly its length (``buckets=(S,)``), so both run the same shapes.

Measured, alternating ours / torch round by round, medians:

* prefill (time to the first token's logits = video encoding + the LLM pass over the prompt) of a
  moment prompt (``--moment``, one 96-frame video) and of a retrieval prompt (``--retrieval``,
  10 candidates x 12 frames), batch 1; torch's LLM pass is one ``LlamaForCausalLM`` call with
  ``use_cache=True`` and the last position's logits, which is what ``generate`` starts with;
* decode ms/token at batch 1 (after the moment prompt) and 8 (after a text-only prompt of the same
  length: decoding reads only the LLM and its cache) (ours: ``decode_s / (new_tokens - 1)``;
  torch: ``(generate(N) - generate(1)) / (N - 1)`` from the same prompt embeddings);
* a ``--new-tokens`` answer end to end at batch 1 (wall time of one ``Generator`` call; torch:
  encoding + ``generate``).

Fraction of the hardware limit: prefill FLOPs (analytic forward) / time / peak FLOP/s; decode:
(LLaMA weight bytes + KV cache bytes per token) / time / peak memory bandwidth (§1's tables by
device kind; on a CPU a measured fp32 matmul and a measured numpy copy).
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
import torch  # noqa: E402

from ivcr_jax.models import build  # noqa: E402
from ivcr_jax.models.generate import Generator  # noqa: E402
from ivcr_jax.models.interllava import InterLLaVAConfig  # noqa: E402

DEFAULTS = {"tiny": dict(text=48), "paper": dict(text=256)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "paper", "7b"])
    p.add_argument("--moment", default="1x96", help="the moment prompt's video, VxT")
    p.add_argument("--retrieval", default="10x12", help="the retrieval prompt's candidates, VxT")
    p.add_argument("--text", type=int, help="text tokens of a prompt besides its video tokens")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    ti.add_run_args(p)
    a = p.parse_args(argv)
    if a.text is None:
        a.text = DEFAULTS["tiny" if a.size == "tiny" else "paper"]["text"]
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    m = ti.without_dropout(ti.model_dict(a.size))
    hw, device, share = ti.run_setup(a)
    cuda = device.type == "cuda"
    N = int(a.new_tokens)
    prompts = {
        "moment": ti.synthetic_batch(m, batch=1, groups=ti.parse_groups("", a.moment), text_len=a.text,
                                     answer_len=1, seed=1),
        "retrieval": ti.synthetic_batch(m, batch=1, groups=ti.parse_groups(a.retrieval, ""), text_len=a.text,
                                        answer_len=1, seed=2),
    }
    # decode at batch > 1 reads only the LLM and its cache: a text-only prompt of the moment
    # prompt's length (no second compilation of the video encoder for a batch of videos)
    S_m = int(prompts["moment"]["input_ids"].shape[1])
    prompts["moment_b"] = ti.synthetic_batch(m, batch=a.decode_batch, groups={}, text_len=S_m, answer_len=1, seed=3)
    del prompts["moment_b"]["videos"]
    seq = {k: int(b["input_ids"].shape[1]) for k, b in prompts.items()}
    print(f"generation, size {a.size}: prompts {seq} tokens, {N} new tokens, {hw['device']}, torch on {device}, "
          f"{ti.uptime()}", flush=True)

    # --- models ---
    frozen = torch.bfloat16 if cuda and m["frozen_dtype"] == "bfloat16" else torch.float32
    torch.manual_seed(a.seed)
    with torch.device(device):
        ref = ti.TorchInterLLaVA(m, frozen_dtype=frozen).eval()
    ours = build.build_model(InterLLaVAConfig.from_dict(m), seed=a.seed)
    if share:
        ti.copy_into_ours(ref, ours)
    gens = {"moment": Generator(ours, max_new_tokens=N, buckets=(seq["moment"],), eos_id=-1),
            "retrieval": Generator(ours, max_new_tokens=1, buckets=(seq["retrieval"],), eos_id=-1),
            "moment_b": Generator(ours, max_new_tokens=N, buckets=(seq["moment_b"],), eos_id=-1)}
    ours_in = {k: ti.for_ours(b) for k, b in prompts.items()}
    torch_in = {k: ti.to_torch(b, device) for k, b in prompts.items()}

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    # --- ours: compile every shape once (reported apart), keep the Generation of each timed call ---
    t0 = time.perf_counter()
    for k, g in gens.items():
        g(ours_in[k])
    t_compile = time.perf_counter() - t0
    last: dict = {}

    def ours_call(k):
        def run():
            last[k] = gens[k](ours_in[k])
        return run

    # --- torch pieces ---
    emb_cache: dict = {}

    @torch.no_grad()
    def t_encode(k):
        with autocast():
            emb_cache[k] = ref.input_embeddings(torch_in[k])
        ti.sync(device)

    @torch.no_grad()
    def t_prefill(k):
        mask = torch_in[k]["attention_mask"]
        with autocast():
            ref.llama(inputs_embeds=emb_cache[k], attention_mask=mask, position_ids=ref.positions(mask),
                      use_cache=True, logits_to_keep=1)
        ti.sync(device)

    @torch.no_grad()
    def t_generate(k, n):
        with autocast():
            out = ref.llama.generate(inputs_embeds=emb_cache[k], attention_mask=torch_in[k]["attention_mask"],
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=ti.PAD,
                                     eos_token_id=ti.EOS)
        ti.sync(device)
        return out

    for k in prompts:            # torch warm-up (kernels, allocator), untimed
        t_encode(k)
        t_prefill(k)
    t_generate("moment", N)
    t_generate("moment_b", 2)

    # --- timed, alternating rounds ---
    res_rows = {}
    for k in ("moment", "retrieval"):
        tt = {"ours": [], "ours_encode": [], "ours_llm": [], "torch": [], "torch_encode": [], "torch_llm": []}
        for _ in range(a.rounds):
            ours_call(k)()
            g = last[k]
            tt["ours_encode"].append(g.encode_s)
            tt["ours_llm"].append(g.prefill_s)
            tt["ours"].append(g.encode_s + g.prefill_s)
            e = ti._timed(lambda: t_encode(k))
            p = ti._timed(lambda: t_prefill(k))
            tt["torch_encode"].append(e)
            tt["torch_llm"].append(p)
            tt["torch"].append(e + p)
        res_rows[f"prefill_{k}"] = {x: ti.median(v) for x, v in tt.items()}

    decode = {}
    for k, b in (("moment", 1), ("moment_b", a.decode_batch)):
        tt = {"ours": [], "torch": []}
        for _ in range(a.rounds):
            ours_call(k)()
            g = last[k]
            tt["ours"].append(g.decode_s / max(g.steps - 1, 1))
            t1 = ti._timed(lambda: t_generate(k, 1))
            tn = ti._timed(lambda: t_generate(k, N))
            tt["torch"].append(max(tn - t1, 0.0) / (N - 1))
        decode[b] = {x: ti.median(v) for x, v in tt.items()}

    tt = {"ours": [], "torch": []}
    for _ in range(a.rounds):
        tt["ours"].append(ti._timed(ours_call("moment")))
        tt["torch"].append(ti._timed(lambda: (t_encode("moment"), t_generate("moment", N))))
    e2e = {x: ti.median(v) for x, v in tt.items()}

    agree = None
    if share and not cuda:   # same fp32 weights, greedy: the same tokens
        mine = last["moment"].tokens[0]
        theirs = t_generate("moment", N)[0].cpu().numpy()[-N:]
        agree = int((mine == theirs).sum())

    # --- limits ---
    ts_len = prompts["moment"]["videos"][next(iter(prompts["moment"]["videos"]))]["timestamp_ids"].shape[-1]
    pf = {k: ti.prefill_flops(m, batch=1, groups=ti.parse_groups(*(("", a.moment) if k == "moment" else (a.retrieval, ""))),
                              seq=seq[k], timestamp_len=ts_len) for k in ("moment", "retrieval")}
    llm = m["llm"]
    kv_bytes = lambda b: (2 * llm["layers"] * b * (seq["moment"] + N / 2) * llm["kv_heads"]  # noqa: E731
                          * (llm.get("head_dim") or llm["hidden"] // llm["heads"])
                          * (2 if m["compute_dtype"] == "bfloat16" else 4))
    wbytes = ti.llm_weight_bytes(m)   # the config's dtypes (ours; torch on GPU has the same)
    peak, bw = hw["peak_flops"], hw.get("peak_bw")
    frac_f = lambda f, t: f / t / peak if peak else None  # noqa: E731
    frac_b = lambda b, t: (wbytes + kv_bytes(b)) / t / bw if bw else None  # noqa: E731
    floor_e2e = (pf["moment"]["total"] / peak if peak else 0) + (N - 1) * ((wbytes + kv_bytes(1)) / bw if bw else 0)

    res = {"bench": "generate", "size": a.size, "device": hw["device"], "torch_device": str(device),
           "load": ti.uptime(), "seq": seq, "new_tokens": N, "shared_weights": share, "peak": hw,
           "prefill_flops": pf, "llm_weight_bytes": wbytes, "ours_compile_s": t_compile,
           "prefill": res_rows, "decode_s_per_token": {str(k): v for k, v in decode.items()}, "e2e_s": e2e,
           "greedy_tokens_agree": agree,
           "fraction_of_limit": {  # prefill: of peak FLOP/s; decode: of peak memory bandwidth; e2e: floor / time
               **{f"prefill_{k}": {w: frac_f(pf[k]["total"], res_rows[f"prefill_{k}"][w]) for w in ("ours", "torch")}
                  for k in ("moment", "retrieval")},
               **{f"decode_b{b}": {w: frac_b(b, d[w]) for w in ("ours", "torch")} for b, d in decode.items()},
               "e2e": {w: (floor_e2e / e2e[w] if floor_e2e else None) for w in ("ours", "torch")}}}
    rows = []
    for k in ("moment", "retrieval"):
        r = res_rows[f"prefill_{k}"]
        label = f"prefill {k} ({a.moment if k == 'moment' else a.retrieval}), b1"
        rows.append((label, r["ours"] * 1e3, r["torch"] * 1e3, " ms", False))
        rows.append(("  of which video encoding", r["ours_encode"] * 1e3, r["torch_encode"] * 1e3, " ms", False))
        rows.append(("  of which LLM pass", r["ours_llm"] * 1e3, r["torch_llm"] * 1e3, " ms", False))
        rows.append(("  fraction of peak FLOP/s", frac_f(pf[k]["total"], r["ours"]),
                     frac_f(pf[k]["total"], r["torch"]), "", True))
    for b, d in decode.items():
        rows.append((f"decode ms/token, batch {b}", d["ours"] * 1e3, d["torch"] * 1e3, " ms", False))
        rows.append(("  fraction of peak bandwidth", frac_b(b, d["ours"]), frac_b(b, d["torch"]), "", True))
    rows.append((f"{N}-token answer end to end, b1", e2e["ours"] * 1e3, e2e["torch"] * 1e3, " ms", False))
    rows.append(("  floor / time", floor_e2e / e2e["ours"] if floor_e2e else None,
                 floor_e2e / e2e["torch"] if floor_e2e else None, "", True))
    notes = [f"{a.rounds} alternating rounds, medians; ours compile (all shapes) {t_compile:.1f} s, excluded",
             f"peak {ti.fmt(peak)} FLOP/s, bandwidth {ti.fmt(bw)} B/s ({hw['peak_source']}); decode bytes/token = "
             f"LLaMA weights {wbytes:.3g} + KV cache",
             ti.uptime()]
    if agree is not None:
        notes.append(f"greedy tokens, same weights: {agree}/{N} equal")
    ti.print_table(f"generation [{a.size}] on {hw['device']}", rows, notes)
    ti.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
