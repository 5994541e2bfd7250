"""Weight conversion for the image Q-Former and the video Q-Former (reference-architecture §2–4, §7).

Two source layouts:

* **HF** ``save_pretrained`` directories: a bare ``InstructBlipQFormerModel`` /
  ``Blip2QFormerModel``, or the Q-Former inside a full ``InstructBlipForConditionalGeneration``,
  ``Blip2ForConditionalGeneration`` / ``Blip2Model`` or ``Blip2ForImageTextRetrieval`` (``qformer.*``,
  ``query_tokens``; for the retrieval model also ``embeddings.*`` = the Q-Former's text embeddings).
* **LAVIS / TimeChat / Video-LLaMA / IVCR** ``.pth`` state dicts: ``Qformer.bert.*``,
  ``query_tokens``, ``video_Qformer.bert.*``, ``video_query_tokens``,
  ``video_frame_position_embedding.weight``.

The converters take an iterator of ``(name, array)`` (one file stream) and return flat
``{our/param/path: np.ndarray}`` dicts, so a combined loader can merge towers. Every key is routed
somewhere: to a Q-Former dict, to ``other[tower]`` (keys of towers converted elsewhere, returned
unchanged), or to ``ignored`` (keys dropped on purpose, listed in ``LAVIS_IGNORED`` /
``HF_IGNORED``). Anything else raises :class:`CheckpointMismatch` naming the file and the keys.

Entry points that build the modules: :func:`from_hf` and :func:`from_lavis` (the image
:class:`QFormer`), :func:`video_from_lavis` (the :class:`VideoQFormer`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert.common import check_weight, read_hf_config, read_hf_dir, read_torch, torch_linear
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch, load_flat
from ivcr_jax.models.qformer import QFormer, QFormerConfig
from ivcr_jax.models.video_qformer import VideoQFormer, VideoQFormerConfig, interpolate_frame_pos

Items = Iterable[tuple[str, np.ndarray]]

# Keys of LAVIS-style files that belong to towers converted elsewhere: prefix -> tower name.
LAVIS_OTHER_TOWERS = {
    "visual_encoder.": "vision",     # EVA ViT (eva_vit.py)
    "ln_vision.": "vision",          # the LayerNorm after the ViT (eva_vit.py)
    "llama_proj.": "llama_proj",     # Linear(768 -> 4096) into LLaMA (interllava.py)
    "llama_model.": "llm",           # LLaMA / its LoRA A, B (llama.py, lora.py)
}

# Keys dropped on purpose (the reference never uses them).
LAVIS_IGNORED = (
    r"Qformer\.cls\..*",                                   # BLIP-2 ITG LM head; TimeChat sets cls=None
    r"(video_)?Qformer\.bert\.embeddings\.position_ids",   # a buffer (arange), not a weight
    r"video_Qformer\.cls\..*",                             # removed by TimeChat/Video-LLaMA (cls=None)
    # the video Q-Former's text branch: TimeChat/Video-LLaMA set it to None before loading
    r"video_Qformer\.bert\.embeddings\.(word|position)_embeddings\..*",
    r"video_Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"llm_proj\..*",                                       # InstructBLIP's Vicuna projection, unused by TimeChat
)

# Keys of HF full-model directories that belong to other towers: prefix -> tower name.
HF_OTHER_TOWERS = {
    "vision_model.": "vision",
    "language_projection.": "llm",
    "language_model.": "llm",
    "vision_projection.": "retrieval",   # BLIP-2 ITC projections / ITM head: the retriever's
    "text_projection.": "retrieval",
    "itm_head.": "retrieval",
}
HF_IGNORED = (r"(qformer\.)?embeddings\.position_ids",)

# The image Q-Former's text branch (dropped when a config has has_text=False, as TimeChat does
# with qformer_text_input=False).
_TEXT_PATHS = re.compile(r"embeddings/(word|position)_embeddings/.*|layers/\d+/ffn_text/.*")

_LAYER = re.compile(
    r"encoder\.layer\.(\d+)\.(?:"
    r"(?P<att>attention|crossattention)\.(?:(?:self|attention)\.(?P<qkv>query|key|value)"
    r"|output\.(?P<ao>dense|LayerNorm))"
    r"|(?P<ffn>intermediate|intermediate_query|output|output_query)\.(?P<fo>dense|LayerNorm)"
    r")\.(?P<p>weight|bias)$")


def _param(kind: str, p: str) -> str:
    if kind == "norm":
        return "scale" if p == "weight" else "bias"
    return "kernel" if p == "weight" else "bias"


def bert_key(name: str) -> str | None:
    """Map a BERT/Q-Former key (HF or LAVIS spelling, after its prefix) to our path; None if unknown.

    ``embeddings.word_embeddings.weight``, ``embeddings.position_embeddings.weight``,
    ``embeddings.LayerNorm`` (LAVIS) / ``embeddings.layernorm`` (HF InstructBLIP) / ``layernorm``
    (HF BLIP-2), and ``encoder.layer.{i}.*`` with ``attention.self`` (LAVIS) or
    ``attention.attention`` (HF).
    """
    m = re.fullmatch(r"embeddings\.(word|position)_embeddings\.weight", name)
    if m:
        return f"embeddings/{m.group(1)}_embeddings/embedding"
    m = re.fullmatch(r"(?:embeddings\.(?:LayerNorm|layernorm)|layernorm)\.(weight|bias)", name)
    if m:
        return f"embeddings/layernorm/{_param('norm', m.group(1))}"
    m = _LAYER.fullmatch(name)
    if not m:
        return None
    i, p = m.group(1), m.group("p")
    if m.group("att"):
        block = "self_attn" if m.group("att") == "attention" else "cross_attn"
        if m.group("qkv"):
            return f"layers/{i}/{block}/{m.group('qkv')}/{_param('dense', p)}"
        if m.group("ao") == "dense":
            return f"layers/{i}/{block}/out/{_param('dense', p)}"
        return f"layers/{i}/{block}/norm/{_param('norm', p)}"
    ffn = m.group("ffn")
    block = "ffn_query" if ffn.endswith("_query") else "ffn_text"
    if ffn.startswith("intermediate"):
        return None if m.group("fo") != "dense" else f"layers/{i}/{block}/fc1/{_param('dense', p)}"
    if m.group("fo") == "dense":
        return f"layers/{i}/{block}/fc2/{_param('dense', p)}"
    return f"layers/{i}/{block}/norm/{_param('norm', p)}"


def _value(path: str, arr: np.ndarray, source: str, name: str) -> np.ndarray:
    """Torch layout -> ours: Linear weights are transposed, everything else is kept."""
    arr = check_weight(source, name, np.asarray(arr))
    if path.endswith("/kernel"):
        if arr.ndim != 2:
            raise CheckpointMismatch(source, mismatched=[(name, tuple(arr.shape), "a 2-d Linear weight")])
        return torch_linear(arr)
    return arr


def empty_model(ctor):
    """``ctor()`` without running its initialisers: shapes from ``nnx.eval_shape``, zeros put on
    the device from host memory (nothing is compiled). :func:`load_flat` then fills it."""
    model = nnx.eval_shape(ctor)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        var.set_value(jax.device_put(np.zeros(v.shape, v.dtype)))
    return model


def _route(name: str, towers: Mapping[str, str]) -> str | None:
    for prefix, tower in towers.items():
        if name.startswith(prefix):
            return tower
    return None


# ----------------------------------------------------------------------------- HF layout

@dataclasses.dataclass
class HFQFormerParts:
    qformer: dict[str, np.ndarray]                 # QFormer paths (incl. query_tokens if present)
    other: dict[str, dict[str, np.ndarray]]        # tower -> {original key: array}
    ignored: list[str]


def convert_hf_qformer(items: Items, *, prefix: str = "", source: str = "<weights>") -> HFQFormerParts:
    """Convert an HF state-dict stream to :class:`QFormer` paths.

    ``prefix=""`` for a bare ``InstructBlipQFormerModel`` / ``Blip2QFormerModel`` (every key must be a
    Q-Former key); ``prefix="qformer."`` for a full InstructBLIP / BLIP-2 model, where
    ``query_tokens`` and (``Blip2ForImageTextRetrieval``) the top-level text ``embeddings.*`` are
    Q-Former parts too and the keys in ``HF_OTHER_TOWERS`` are passed through in ``other``.
    """
    flat: dict[str, np.ndarray] = {}
    other: dict[str, dict[str, np.ndarray]] = {}
    ignored, unknown = [], []
    for name, arr in items:
        if any(re.fullmatch(p, name) for p in HF_IGNORED):
            ignored.append(name)
            continue
        path = None
        if name.startswith(prefix):
            path = bert_key(name[len(prefix):])
        if path is None and prefix:
            if name == "query_tokens":
                path = "query_tokens"
            elif re.fullmatch(r"embeddings\.(word|position)_embeddings\.weight", name):
                path = bert_key(name)   # Blip2ForImageTextRetrieval keeps them outside the Q-Former
            elif (tower := _route(name, HF_OTHER_TOWERS)) is not None:
                other.setdefault(tower, {})[name] = arr
                continue
        if path is None:
            unknown.append(name)
            continue
        if path in flat:
            raise CheckpointError(f"{source}: two keys map to {path} (second: {name})")
        flat[path] = _value(path, arr, source, name)
    if unknown:
        raise CheckpointMismatch(source, unexpected=unknown)
    return HFQFormerParts(flat, other, ignored)


def from_hf(path, *, dtype=jnp.float32, param_dtype=jnp.float32,
            config: QFormerConfig | None = None) -> QFormer:
    """Build a :class:`QFormer` from an HF directory (bare Q-Former or full InstructBLIP / BLIP-2)."""
    cfg = read_hf_config(path)
    config = config or QFormerConfig.from_hf_config(cfg)
    prefix = "qformer." if "qformer_config" in cfg else ""
    parts = convert_hf_qformer(read_hf_dir(path), prefix=prefix, source=str(path))
    model = empty_model(lambda: QFormer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    load_flat(model, parts.qformer, source=str(path))
    return model


# ----------------------------------------------------------------------------- LAVIS layout

@dataclasses.dataclass
class LavisParts:
    qformer: dict[str, np.ndarray]                 # QFormer paths (image Q-Former + query_tokens)
    video_qformer: dict[str, np.ndarray]           # VideoQFormer paths
    other: dict[str, dict[str, np.ndarray]]        # tower -> {original key: array}, see LAVIS_OTHER_TOWERS
    ignored: list[str]                             # keys dropped on purpose, see LAVIS_IGNORED
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # "qformer/<path>" or
    #   "video_qformer/<path>" -> the file's key, so shape errors name the tensor of the file


def convert_lavis(items: Items, *, source: str = "<weights>", max_frame_pos: int | None = None,
                  image_text: bool = True) -> LavisParts:
    """Route a LAVIS / TimeChat / Video-LLaMA / IVCR state-dict stream.

    * ``Qformer.bert.*`` and ``query_tokens`` -> ``qformer`` (our :class:`QFormer` paths); with
      ``image_text=False`` the image Q-Former's text branch goes to ``ignored`` (TimeChat's
      ``qformer_text_input=False`` removes it the same way).
    * ``video_Qformer.bert.*`` -> ``video_qformer`` under ``bert/``; ``video_query_tokens``;
      ``video_frame_position_embedding.weight`` -> ``frame_position_embedding``, nearest-resized
      to ``max_frame_pos`` rows when given (TimeChat's ``interpolate_frame_pos_embed``).
    * ``visual_encoder.*``, ``ln_vision.*``, ``llama_proj.*``, ``llama_model.*`` -> ``other``.
    * ``LAVIS_IGNORED`` -> ``ignored``; anything else raises :class:`CheckpointMismatch`.
    """
    qf: dict[str, np.ndarray] = {}
    vq: dict[str, np.ndarray] = {}
    other: dict[str, dict[str, np.ndarray]] = {}
    names: dict[str, str] = {}
    ignored, unknown = [], []
    for name, arr in items:
        if any(re.fullmatch(p, name) for p in LAVIS_IGNORED):
            ignored.append(name)
            continue
        target, path = None, None
        if name.startswith("Qformer.bert."):
            target, path = qf, bert_key(name[len("Qformer.bert."):])
            if path is not None and not image_text and _TEXT_PATHS.fullmatch(path):
                ignored.append(name)
                continue
        elif name == "query_tokens":
            target, path = qf, "query_tokens"
        elif name.startswith("video_Qformer.bert."):
            p = bert_key(name[len("video_Qformer.bert."):])
            target, path = vq, (None if p is None else "bert/" + p)
        elif name == "video_query_tokens":
            target, path = vq, "video_query_tokens"
        elif name == "video_frame_position_embedding.weight":
            target, path = vq, "frame_position_embedding"
            if max_frame_pos is not None and arr.ndim == 2 and arr.shape[0] != max_frame_pos:
                # (a table of another rank is left as it is: the shape check reports it)
                arr = interpolate_frame_pos(np.asarray(check_weight(source, name, arr)), max_frame_pos)
        elif (tower := _route(name, LAVIS_OTHER_TOWERS)) is not None:
            other.setdefault(tower, {})[name] = arr
            continue
        if path is None:
            unknown.append(name)
            continue
        target[path] = _value(path, arr, source, name)
        names[("qformer/" if target is qf else "video_qformer/") + path] = name
    if unknown:
        raise CheckpointMismatch(source, unexpected=unknown)
    return LavisParts(qf, vq, other, ignored, names)


def from_lavis(path, config: QFormerConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32) -> QFormer:
    """Build the image :class:`QFormer` from a LAVIS-style ``.pth`` (``{"model": sd}`` or a bare sd).

    The config defaults to TimeChat/IVCR's (BERT-base, 32 queries, text branch, vocab 30523);
    keys of other towers in the file are left alone.
    """
    config = config or QFormerConfig()
    parts = convert_lavis(read_torch(path), source=str(path), image_text=config.has_text)
    if not parts.qformer:
        raise CheckpointError(f"{path}: no image Q-Former keys (Qformer.bert.*, query_tokens) found")
    model = empty_model(lambda: QFormer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    load_flat(model, parts.qformer, source=str(path))
    return model


def video_from_lavis(path, config: VideoQFormerConfig | None = None, *, dtype=jnp.float32,
                     param_dtype=jnp.float32) -> VideoQFormer:
    """Build the :class:`VideoQFormer` from a TimeChat / Video-LLaMA / IVCR ``.pth``."""
    config = config or VideoQFormerConfig()
    parts = convert_lavis(read_torch(path), source=str(path), max_frame_pos=config.max_frame_pos)
    if not parts.video_qformer:
        raise CheckpointError(f"{path}: no video Q-Former keys (video_Qformer.bert.*, video_query_tokens, "
                              "video_frame_position_embedding.weight) found")
    model = empty_model(lambda: VideoQFormer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    load_flat(model, parts.video_qformer, source=str(path))
    return model


def video_qformer_flat(bert: Mapping[str, np.ndarray], video_query_tokens: np.ndarray,
                       frame_position_embedding: np.ndarray, *, max_frame_pos: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Assemble :class:`VideoQFormer` paths from a query-only Q-Former's flat dict (e.g.
    :func:`convert_hf_qformer` of an HF ``Blip2QFormerModel`` with ``cross_attention_frequency=1``)."""
    table = np.asarray(frame_position_embedding)
    if max_frame_pos is not None and table.shape[0] != max_frame_pos:
        table = interpolate_frame_pos(table, max_frame_pos)
    flat = {"bert/" + k: v for k, v in bert.items()}
    flat["video_query_tokens"] = np.asarray(video_query_tokens)
    flat["frame_position_embedding"] = table
    return flat
