"""Weight conversion CLI.

    # the IVCR initialisation (reference-architecture §4): one checkpoint the model loads directly
    python -m ivcr_jax.convert ivcr --config configs/paper.py \
        --llama /weights/llama-2-7b-chat-hf --eva-vit /weights/eva_vit_g.pth \
        --instructblip /weights/instruct_blip_vicuna7b_trimmed.pth \
        --timechat /weights/timechat_7b.pth --videollama /weights/VL_LLaMA_2_7B_Finetuned.pth \
        --out /weights/ivcr_init

    # list the tensors of any checkpoint file or HF directory (names, shapes, dtypes)
    python -m ivcr_jax.convert inspect /weights/timechat_7b.pth

A bad input (a missing or malformed file, a taken --out, a tensor of the wrong shape or dtype)
is one line on stderr naming the file (and the tensor) and exit status 2; --debug shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ivcr_jax.cli import UsageError, load_config
from ivcr_jax.convert import common
from ivcr_jax.convert.ivcr import save_ivcr
from ivcr_jax.convert.store import check_out
from ivcr_jax.models.build import model_config
from ivcr_jax.models.params import CheckpointError


def _inspect(path: str, limit: int) -> int:
    p = Path(path)
    items = common.read_hf_dir(p) if p.is_dir() else common.read_any(p)
    n = total = 0
    for name, arr in items:
        if n < limit:
            print(f"{name:90s} {str(tuple(arr.shape)):22s} {arr.dtype}")
        n += 1
        total += int(arr.size)
    print(f"{n} tensors, {total:,} values")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivcr_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    iv = sub.add_parser("ivcr", help="released PyTorch weights -> one InterLLaVA checkpoint")
    iv.add_argument("--config", default="configs/paper.py", help="configs/<file>.py[:arg] (its model node)")
    iv.add_argument("--llama", required=True, help="HF LlamaForCausalLM directory (llama-2-7b-chat-hf)")
    iv.add_argument("--eva-vit", required=True, help="LAVIS eva_vit_g.pth")
    iv.add_argument("--instructblip", required=True, help="LAVIS instruct_blip_vicuna7b_trimmed.pth")
    iv.add_argument("--timechat", required=True, help="timechat_7b.pth")
    iv.add_argument("--videollama", default=None, help="VL_LLaMA_2_7B_Finetuned.pth (video_Qformer.* only)")
    iv.add_argument("--out", required=True, help="output directory (must not hold a checkpoint)")
    ins = sub.add_parser("inspect", help="list the tensors of a checkpoint file or HF directory")
    ins.add_argument("path")
    ins.add_argument("--limit", type=int, default=100000)
    for p in (iv, ins):
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "inspect":
            return _inspect(args.path, args.limit)
        # Everything that can be checked without reading weights, before reading any.
        check_out(args.out)
        sources = dict(llama=args.llama, eva_vit=args.eva_vit, instructblip=args.instructblip,
                       timechat=args.timechat, videollama=args.videollama)
        for flag, path in sources.items():
            if path and not Path(path).exists():
                raise CheckpointError(f"{path}: no such file or directory (--{flag.replace('_', '-')})")
        cfg = model_config(load_config(args.config).model)
        out = save_ivcr(cfg, args.out, **sources)
        print(f"wrote {out}; train or evaluate with --config.init.converted={out}")
        return 0
    except (CheckpointError, UsageError, OSError, ImportError) as e:  # OSError: FileExistsError, ENOSPC ...
        if args.debug:
            raise
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print("error: " + " ".join(msg.split()), file=sys.stderr)  # one line (mismatch lists included)
        return 2


if __name__ == "__main__":
    sys.exit(main())
