#!/usr/bin/env bash
# The InterLLaVA benchmarks against the PyTorch reference, one after the other, on one GPU.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # paper / 7B sizes, random weights, GPU
#   bash benchmarks/gpu_suite.sh --dry-run                # the same at tiny sizes on the CPU
#
# Runs vit_bench.py (ViT-g frames/s), train_step_bench.py (the whole train step) and
# generate_bench.py (prefill, decode, a 50-token answer); each writes $OUT/<name>.json and
# $OUT/<name>.log, and the end prints one table. Each run has its own time budget (timeout), so
# the whole suite stays under 8 minutes on an H200 even if one compiles slowly; a run over its
# budget is marked "timed out" and the next one starts. The scripts import only ivcr_jax modules
# free of ml_collections / grain / decord (the GPU machine has none of them); --dry-run checks that
# by running them with those imports blocked.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$(mktemp -d /tmp/ivcr_gpu_suite.XXXXXX)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
# a rerun on the same (warm) machine reuses the compiled executables
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/ivcr_gpu_suite_jax_cache}"
PY=${PYTHON:-python3}

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  SIZE=tiny; ROUNDS=2
  BUDGET_VIT=120; BUDGET_TRAIN=300; BUDGET_GEN=300
else
  SIZE=paper; ROUNDS=3
  BUDGET_VIT=60; BUDGET_TRAIN=240; BUDGET_GEN=150
fi
echo "gpu_suite: size $SIZE, results in $OUT, $(uptime | sed 's/.*load/load/')"
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices()[0].device_kind, '| torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')" 2>&1 | grep -v -i warn

# Run a benchmark script as the GPU machine would: in dry runs ml_collections, grain and decord
# are made unimportable first.
run() {
  local name=$1 budget=$2; shift 2
  local start=$SECONDS
  echo; echo "--- $name ($*) budget ${budget}s"
  timeout --kill-after=10 "$budget" $PY - "$name" "$DRY" "$@" --json "$OUT/$name.json" <<'PYEOF' 2>&1 \
      | grep -v -E "Warning|warnings.warn|^\s*$" | tee "$OUT/$name.log"
import importlib.abc, runpy, sys
name, dry, args = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
if dry:
    class _Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in ("ml_collections", "grain", "decord"):
                raise ModuleNotFoundError(f"No module named {fullname!r} (absent on the GPU machine)")
            return None
    sys.meta_path.insert(0, _Absent())
sys.argv = [f"benchmarks/{name}.py", *args]
runpy.run_path(f"benchmarks/{name}.py", run_name="__main__")
PYEOF
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "{\"bench\": \"$name\", \"timed_out\": true, \"budget_s\": $budget}" > "$OUT/$name.json"
    echo "$name: timed out after ${budget}s"
  elif [ "$rc" != 0 ]; then
    echo "{\"bench\": \"$name\", \"failed\": true, \"rc\": $rc}" > "$OUT/$name.json"
    echo "$name: failed (rc $rc)"
  fi
  echo "$name: $((SECONDS - start)) s"
}

run vit_bench "$BUDGET_VIT" --size "$SIZE" --frames 96 --rounds "$ROUNDS"
run train_step_bench "$BUDGET_TRAIN" --size "$SIZE" --rounds "$ROUNDS"
run generate_bench "$BUDGET_GEN" --size "$SIZE" --rounds "$ROUNDS"

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
def add(bench, what, ours, torch, higher, frac_o=None, frac_t=None, unit=""):
    ahead = None
    if ours and torch:
        ahead = ours / torch if higher else torch / ours
    rows.append((bench, what, ours, torch, ahead, frac_o, frac_t, unit))
def g(d, *ks):
    for k in ks:
        d = (d or {}).get(k)
    return d
failed = []
for name in ("vit_bench", "train_step_bench", "generate_bench"):
    p = out / f"{name}.json"
    r = json.loads(p.read_text()) if p.exists() else {"failed": True}
    if r.get("timed_out") or r.get("failed"):
        failed.append(f"{name}: {'timed out' if r.get('timed_out') else 'failed'}")
        continue
    if name == "vit_bench":
        add("vit", f"{r['frames']} frames, frames/s", g(r, "ours", "frames_per_s"), g(r, "torch", "frames_per_s"), True,
            g(r, "ours", "fraction_of_peak"), g(r, "torch", "fraction_of_peak"))
    elif name == "train_step_bench":
        add("train", "step time", 1e3 * r["ours"]["step_s"], 1e3 * r["torch"]["step_s"], False,
            r["ours"]["mfu_analytic"], r["torch"]["mfu_analytic"], " ms")
        add("train", "LLM tokens/s", r["ours"]["tokens_per_s"], r["torch"]["tokens_per_s"], True)
    else:
        fr = r.get("fraction_of_limit", {})
        for k, v in r["prefill"].items():
            add("generate", k.replace("_", " "), 1e3 * v["ours"], 1e3 * v["torch"], False,
                g(fr, k, "ours"), g(fr, k, "torch"), " ms")
        for b, v in r["decode_s_per_token"].items():
            add("generate", f"decode/token b{b}", 1e3 * v["ours"], 1e3 * v["torch"], False,
                g(fr, f"decode_b{b}", "ours"), g(fr, f"decode_b{b}", "torch"), " ms")
        add("generate", f"{r['new_tokens']}-token answer", 1e3 * r["e2e_s"]["ours"], 1e3 * r["e2e_s"]["torch"], False,
            g(fr, "e2e", "ours"), g(fr, "e2e", "torch"), " ms")
f = lambda x, u="": "n/a" if x is None else f"{x:.4g}{u}"
print("\nours ahead: how many times ours is faster (or higher); limit: fraction of the hardware limit (MFU of\n"
      "peak FLOP/s; decode: of peak memory bandwidth; answer: the floor's time / the time)")
print(f"{'bench':9s} {'what':28s} {'ours':>12s} {'torch':>12s} {'ours ahead':>11s} {'limit ours':>10s} {'limit torch':>11s}")
for b, w, o, t, a, fo, ft, u in rows:
    print(f"{b:9s} {w:28s} {f(o, u):>12s} {f(t, u):>12s} {f(a):>11s} {f(fo):>10s} {f(ft):>11s}")
for x in failed:
    print(x)
(out / "summary.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=1))
sys.exit(1 if failed else 0)
PYEOF
rc=$?
echo "gpu_suite: results in $OUT ($SECONDS s)"
exit $rc
