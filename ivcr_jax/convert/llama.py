"""HF LLaMA-2 and peft/TimeChat LoRA weights -> :class:`ivcr_jax.models.llama.Llama`.

Follows reference-architecture §6 (HF key names) and §7 (conversion checklist):

* HF ``LlamaForCausalLM`` directories (``config.json`` + ``model.safetensors``, sharded safetensors
  with an index, or ``pytorch_model*.bin``) are read tensor by tensor; each tensor is transposed
  where needed and cast to the target dtype at once, and handed to the model before the next is
  read, so converting 7B needs little more host memory than one copy of the converted weights.
  ``rotary_emb.inv_freq`` buffers of older checkpoints are skipped on purpose (RoPE is recomputed).
* LoRA tensors from peft state dicts (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A
  [.default].weight``) and TimeChat/IVCR checkpoints (the same under ``llama_model.``): A ``[r, in]``
  -> ``[in, r]``, B ``[out, r]`` -> ``[r, out]``.
* :func:`extend_vocab` appends IVCR's 5 added tokens (32000 -> 32005 rows). The reference draws
  random rows at every build and never saves them (reference-architecture §8.7); here the new
  rows are the mean of the existing ones, deterministic, and saved with the model.

:func:`from_hf` builds the :class:`Llama` (bf16 by default). Every mismatch raises
:class:`CheckpointMismatch` naming the source and the HF keys.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert.common import check_weight, hf_weight_files, read_any, read_hf_config, read_hf_dir
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch, flat_state, load_flat
from ivcr_jax.models.llama import Llama, LlamaConfig
from ivcr_jax.models.lora import BASE_PARAMS, LoRAConfig

PEFT_PREFIX = "base_model.model."  # peft get_peft_model(...).state_dict() / adapter_model files
TIMECHAT_PREFIX = "llama_model.base_model.model."  # TimeChat / IVCR training checkpoints

EMBED_KEY = "embed_tokens/embedding"  # [V, D]
LM_HEAD_KEY = "lm_head/kernel"  # [D, V]

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
                       r"|input_layernorm|post_attention_layernorm)\.weight")
_IGNORED_RE = re.compile(r"(.*\.)?rotary_emb\.inv_freq")
_LORA_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_(A|B)(?:\.([^.]+))?\.weight")


# ----------------------------------------------------------------------------- key mapping

def hf_to_path(name: str) -> tuple[str, bool] | None:
    """HF key -> (our parameter path, whether it is a torch Linear weight to transpose)."""
    if name == "model.embed_tokens.weight":
        return EMBED_KEY, False
    if name == "model.norm.weight":
        return "norm/scale", False
    if name == "lm_head.weight":
        return LM_HEAD_KEY, True
    m = _LAYER_RE.fullmatch(name)
    if m is None:
        return None
    i, mod = m.groups()
    if mod.endswith("layernorm"):
        return f"layers/{i}/{mod}/scale", False
    return f"layers/{i}/{mod.replace('.', '/')}/kernel", True


def path_to_hf(path: str) -> str:
    """Our parameter path -> HF key (for error messages)."""
    if path == EMBED_KEY:
        return "model.embed_tokens.weight"
    if path == LM_HEAD_KEY:
        return "lm_head.weight"
    if path == "norm/scale":
        return "model.norm.weight"
    parts = path.split("/")
    if parts[0] == "layers" and parts[-1] in ("kernel", "scale"):
        return "model." + ".".join(parts[:-1]) + ".weight"
    return path


def extend_vocab(flat: Mapping[str, np.ndarray], n_new: int) -> dict[str, np.ndarray]:
    """Append ``n_new`` vocabulary rows to the embedding (and columns to ``lm_head``).

    The new rows are the mean of the existing rows (computed in fp32), the same every time —
    unlike the reference, whose random resize rows differ between train and eval builds
    (reference quirk not reproduced, reference-architecture §8.7). Other entries pass through.
    """
    out = dict(flat)
    if n_new <= 0:
        return out
    if EMBED_KEY in out:
        e = np.asarray(out[EMBED_KEY])
        mean = e.astype(np.float32).mean(0, keepdims=True).astype(e.dtype)
        out[EMBED_KEY] = np.concatenate([e, np.repeat(mean, n_new, 0)], 0)
    if LM_HEAD_KEY in out:
        w = np.asarray(out[LM_HEAD_KEY])
        mean = w.astype(np.float32).mean(1, keepdims=True).astype(w.dtype)
        out[LM_HEAD_KEY] = np.concatenate([w, np.repeat(mean, n_new, 1)], 1)
    return out


def _convert(arr: np.ndarray, transpose: bool, dtype) -> np.ndarray:
    arr = np.asarray(arr)
    if not transpose:
        return arr.astype(dtype, copy=False)
    out = np.empty(arr.shape[::-1], dtype)  # one allocation: transpose and cast in one copy
    out[...] = arr.T
    return out


def iter_hf_llama(items: Iterable[tuple[str, np.ndarray]], expected: Mapping[str, tuple[int, ...]], *,
                  source: str, dtype=jnp.bfloat16, extra_vocab: int = 0,
                  tie_embeddings: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Convert HF ``(name, array)`` pairs to ``(our path, array)`` pairs, one at a time.

    ``expected`` maps our base-parameter paths to the model's shapes (vocab rows included
    ``extra_vocab``). Problems are collected while streaming and raised together at the end as
    :class:`CheckpointMismatch` (HF names, torch shapes).
    """
    dtype = np.dtype(dtype)
    seen: set[str] = set()
    shaped: set[str] = set()  # mis-shaped paths: reported once, as mis-shaped, not also as missing
    unexpected, mismatched = [], []
    for name, arr in items:
        if _IGNORED_RE.fullmatch(name):
            continue
        hit = hf_to_path(name)
        if hit is None or hit[0] not in expected and not (tie_embeddings and hit[0] == LM_HEAD_KEY):
            unexpected.append(name)
            continue
        path, transpose = hit
        if path == LM_HEAD_KEY and tie_embeddings:
            continue  # tied: the same tensor as the embedding
        want = list(expected[path])
        if extra_vocab and path == EMBED_KEY:
            want[0] -= extra_vocab
        if extra_vocab and path == LM_HEAD_KEY:
            want[1] -= extra_vocab
        want_torch = tuple(want[::-1] if transpose else want)
        if tuple(arr.shape) != want_torch:
            mismatched.append((name, tuple(arr.shape), want_torch))
            shaped.add(path)
            continue
        out = _convert(check_weight(source, name, arr), transpose, dtype)
        if extra_vocab and path in (EMBED_KEY, LM_HEAD_KEY):
            out = extend_vocab({path: out}, extra_vocab)[path]
        seen.add(path)
        yield path, out
    missing = [path_to_hf(p) for p in expected if p not in seen and p not in shaped]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(source, missing, unexpected, mismatched)


# ----------------------------------------------------------------------------- loading

def _source(path: str | os.PathLike, config: LlamaConfig | None, overrides):
    """``(config, tensor stream, source name)``; errors name the weight file, or the directory when
    the tensors are spread over shards."""
    path = Path(path)
    if path.is_dir():
        if config is None:
            try:
                config = LlamaConfig.from_hf_config(read_hf_config(path), **overrides)
            except CheckpointError:
                raise
            except (KeyError, TypeError, ValueError, NotImplementedError) as e:
                raise CheckpointError(f"{path / 'config.json'}: not a usable LLaMA config "
                                      f"({type(e).__name__}: {e})") from None
        files = hf_weight_files(path)
        return config, read_hf_dir(path), str(files[0] if len(files) == 1 else path)
    if path.is_file():
        if config is None:
            raise CheckpointError(f"{path}: a bare state-dict file needs an explicit LlamaConfig")
        return config, read_any(path), str(path)
    raise CheckpointError(f"{path}: no such checkpoint file or directory")


def _expected(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return {k: tuple(v.get_value().shape) for k, v in flat_state(model).items()}


def convert_hf(path: str | os.PathLike, *, config: LlamaConfig | None = None, dtype=jnp.bfloat16,
               extra_vocab: int = 0, **config_overrides) -> tuple[dict[str, np.ndarray], LlamaConfig]:
    """``({path: host array}, config)`` of the base weights (the same ``(flat, config)`` order as
    the other converters), for callers that store them or place them on a mesh themselves.
    ``config.vocab_size`` includes ``extra_vocab``."""
    config, items, source = _source(path, config, config_overrides)
    config = dataclasses.replace(config, vocab_size=config.vocab_size + extra_vocab)
    flat = dict(iter_hf_llama(items, _expected(config), source=source, dtype=dtype,
                              extra_vocab=extra_vocab, tie_embeddings=config.tie_embeddings))
    return flat, config


def from_hf(path: str | os.PathLike, *, config: LlamaConfig | None = None,
            lora: LoRAConfig | None = None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
            lora_param_dtype=jnp.float32, extra_vocab: int = 0, seed: int = 0,
            **config_overrides) -> Llama:
    """Build a :class:`Llama` from an HF ``LlamaForCausalLM`` directory (or a bare state-dict file
    with ``config``).

    The model is created abstractly; each converted tensor is placed into it as it is read.
    LoRA adapters (if ``lora``) get peft's fresh init (``B = 0``) from ``seed``: only they are
    materialised by a jitted init (the base initialisers are dead code there). ``config_overrides``
    (e.g. ``remat="full"``) apply on top of ``config.json``.
    """
    config, items, source = _source(path, config, config_overrides)
    config = dataclasses.replace(config, vocab_size=config.vocab_size + extra_vocab)

    def make():
        return Llama(config, lora=lora, dtype=dtype, param_dtype=param_dtype,
                     lora_param_dtype=lora_param_dtype, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(make)
    if lora is not None:
        nnx.update(model, _lora_init(config, lora, dtype, param_dtype, lora_param_dtype, seed))
    targets = flat_state(model, BASE_PARAMS)
    expected = {k: tuple(v.get_value().shape) for k, v in targets.items()}
    for p, arr in iter_hf_llama(items, expected, source=source, dtype=param_dtype,
                                extra_vocab=extra_vocab, tie_embeddings=config.tie_embeddings):
        var = targets[p]
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
    return model


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _lora_init(config, lora, dtype, param_dtype, lora_param_dtype, seed):
    # Only the adapters are outputs: XLA drops the base initialisers as dead code. Static
    # arguments make repeated loads of one configuration reuse the compiled init.
    model = Llama(config, lora=lora, dtype=dtype, param_dtype=param_dtype,
                  lora_param_dtype=lora_param_dtype, rngs=nnx.Rngs(seed))
    return nnx.state(model, nnx.LoRAParam)


# ----------------------------------------------------------------------------- LoRA

def lora_flat(items: Iterable[tuple[str, np.ndarray]], prefix: str = PEFT_PREFIX, *,
              adapter: str | None = None, source: str = "<lora weights>",
              dtype=np.float32) -> dict[str, np.ndarray]:
    """Our flat LoRA dict from peft-style ``(name, array)`` pairs under ``prefix``.

    Keys ``{prefix}model.layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}[.{adapter}].weight`` map to
    ``layers/{i}/{self_attn|mlp}/{x}_proj/lora_{a|b}`` (transposed). Other keys under ``prefix``
    (a full peft state dict's base weights) and keys outside it (TimeChat's Q-Formers) are
    skipped; LoRA variants we do not implement (``lora_embedding_*``, DoRA magnitudes, LoRA
    biases) raise :class:`CheckpointError`. With several adapters present, pick one by name.
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name, arr in items:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        m = _LORA_RE.fullmatch(rest)
        if m is None:
            if ".lora_" in rest:
                raise CheckpointError(f"{source}: unsupported LoRA tensor {name}")
            continue
        i, group, mod, ab, name_adapter = m.groups()
        if adapter is not None and name_adapter is not None and name_adapter != adapter:
            continue
        key = f"layers/{i}/{group}/{mod}/lora_{ab.lower()}"
        if key in out:
            raise CheckpointError(f"{source}: both {origin[key]} and {name} map to {key}; "
                                  "several adapters are stored, pass adapter=<name>")
        arr = check_weight(source, name, np.asarray(arr))
        out[key], origin[key] = np.ascontiguousarray(arr.T).astype(dtype, copy=False), name
    if not out:
        raise CheckpointError(f"{source}: no LoRA tensors under prefix {prefix!r}")
    return out


def load_lora(model: nnx.Module, weights: str | os.PathLike | Iterable[tuple[str, np.ndarray]],
              prefix: str = PEFT_PREFIX, *, adapter: str | None = None) -> nnx.Module:
    """Assign LoRA tensors to ``model``'s adapters in place; every adapter must be covered.

    ``weights`` is a file (``.safetensors``/``.bin``/``.pth``, e.g. ``timechat_7b.pth`` with
    ``prefix=TIMECHAT_PREFIX``), a peft adapter directory (``adapter_model.safetensors``/``.bin``),
    or an iterable of ``(name, array)``.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = Path(weights)
        if source.is_dir():
            for f in ("adapter_model.safetensors", "adapter_model.bin"):
                if (source / f).is_file():
                    source = source / f
                    break
            else:
                raise CheckpointError(f"{weights}: no adapter_model.safetensors or adapter_model.bin found")
        items, source = read_any(source), str(source)
    else:
        items, source = weights, "<lora weights>"
    flat = lora_flat(items, prefix, adapter=adapter, source=source)
    return load_flat(model, flat, source, filter=nnx.LoRAParam)
