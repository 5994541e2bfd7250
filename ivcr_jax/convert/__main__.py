"""Weight conversion CLI.

    # the IVCR initialisation (reference-architecture §4): one checkpoint the model loads directly
    python -m ivcr_jax.convert ivcr --config configs/paper.py \
        --llama /weights/llama-2-7b-chat-hf --eva-vit /weights/eva_vit_g.pth \
        --instructblip /weights/instruct_blip_vicuna7b_trimmed.pth \
        --timechat /weights/timechat_7b.pth --videollama /weights/VL_LLaMA_2_7B_Finetuned.pth \
        --out /weights/ivcr_init

    # list the tensors of any checkpoint file or HF directory (names, shapes, dtypes)
    python -m ivcr_jax.convert inspect /weights/timechat_7b.pth

    # a trained model (a training workdir or one step directory) -> HF / peft / safetensors
    python -m ivcr_jax.convert export-hf --checkpoint runs/paper --out /weights/ivcr_hf
    #   OUT/llama/ (LoRA merged)  OUT/llama_base/ + OUT/lora_adapter/ (peft)  OUT/vision/ (+ README.md)

``export-hf`` reads the run's ``<workdir>/config.json`` (or ``--config``) and loads the model as
eval and chat do (``ivcr_jax.experiment``); the writers are ``ivcr_jax.convert.hf_export``.

A bad input (a missing or malformed file, a taken --out, a tensor of the wrong shape or dtype,
a directory that is not a checkpoint, a corrupt checkpoint) is one line on stderr naming the file
(and the tensor) and exit status 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

# The two imports below go up the layers (.importlinter ignores exactly these): this file is the
# `python -m ivcr_jax.convert` program, and export-hf reads a training run the way eval and chat do.
from ivcr_jax import checkpoints
from ivcr_jax.cli import UsageError, load_config
from ivcr_jax.convert import common
from ivcr_jax.convert.hf_export import DEFAULT_SHARD_BYTES, TOKENIZER_FILES, check_export_out, export_hf
from ivcr_jax.convert.ivcr import save_ivcr
from ivcr_jax.convert.store import check_out
from ivcr_jax.experiment import USER_ERRORS, Experiment
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


def _run_config(checkpoint: Path) -> tuple[Path | None, Path | None]:
    """``(workdir, its config.json)`` of a training workdir, its ``checkpoints/`` or a step directory
    (``(None, None)`` for a converted directory); a directory that is neither is a CheckpointError."""
    if checkpoints.is_converted(checkpoint):
        return None, None
    step = checkpoints.find_step_dir(checkpoint)
    workdir = step.parent.parent if step.parent.name == "checkpoints" else step.parent
    return workdir, workdir / "config.json"


def _export_hf(args) -> int:
    if not args.max_shard_gb > 0:
        raise UsageError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    out = check_export_out(args.out, args.overwrite)  # before anything is read
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory (--checkpoint: a training workdir "
                              "or a step directory)")
    workdir, config_file = _run_config(checkpoint)
    if args.config:
        config = load_config(args.config)
    elif config_file is None:
        raise UsageError(f"{checkpoint} is a converted directory: name its config with --config FILE.py[:ARG]")
    elif not config_file.is_file():
        raise UsageError(f"{config_file}: no such file (the run's config, written by training); "
                         "pass --config FILE.py[:ARG]")
    else:
        config = ConfigDict(common.read_json(config_file))
    exp = Experiment.resolve(config)
    dtype = None if args.dtype == "checkpoint" else np.dtype(args.dtype)
    tok_files = [workdir / f for f in TOKENIZER_FILES if workdir and (workdir / f).is_file()]
    save_tok = None
    if not tok_files:
        try:   # the run's tokenizer, with the IVCR tokens its vocabulary was extended by
            save_tok = exp.tokenizer.save_pretrained
        except (OSError, ValueError) as e:
            print(f"note: no tokenizer written ({' '.join(str(e).split())})", file=sys.stderr)
    model, what = exp.load_model(str(checkpoint))
    print(f"loaded {what}")
    export_hf(model, out, dtype=dtype, tokenizer_files=tok_files, save_tokenizer=save_tok,
              source=str(checkpoint), max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")
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
    ex = sub.add_parser("export-hf", help="a trained model -> HF LLaMA (merged), peft adapter, vision safetensors")
    ex.add_argument("--checkpoint", required=True, help="a training workdir, its checkpoints/ or one step directory "
                    "(or a converted directory, with --config)")
    ex.add_argument("--out", required=True, help="output directory (absent or empty, unless --overwrite)")
    ex.add_argument("--config", default=None, help="configs/<file>.py[:arg] (default: the run's <workdir>/config.json)")
    ex.add_argument("--dtype", default="checkpoint", choices=("checkpoint", "float32", "bfloat16", "float16"),
                    help="tensor dtype: each parameter's own (default) or one for all")
    ex.add_argument("--overwrite", action="store_true", help="replace the llama*/lora_adapter/vision of a used --out")
    ex.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                    help="largest safetensors shard of the LLaMA directories (default %(default)g)")
    for p in (iv, ins, ex):
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "inspect":
            return _inspect(args.path, args.limit)
        if args.cmd == "export-hf":
            return _export_hf(args)
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
    except (CheckpointError, UsageError, OSError, ImportError, *USER_ERRORS) as e:  # OSError: FileExistsError, ENOSPC ...
        if args.debug:
            raise
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print("error: " + " ".join(msg.split()), file=sys.stderr)  # one line (mismatch lists included)
        return 2


if __name__ == "__main__":
    sys.exit(main())
