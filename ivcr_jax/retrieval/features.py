"""Frame and text feature extractors for the retrieval index.

The retriever (X-Pool, ``models/xpool.py``) works on frozen per-frame features and text
features living in one embedding space. IVCR ran X-Pool "on BLIP-2 features" without releasing
which ones (reference-architecture.md §5, "IVCR variant"); this file extracts BLIP-2's
image-text-contrastive (ITC) features (stack-notes.md §8) with the model of ``models/blip2_itc.py``
(weights: ``convert/blip2_retrieval.py``):

* per frame: EVA ViT -> post LayerNorm -> Q-Former over the 32 learned queries (cross-attending to
  the frame) -> ``vision_projection`` per query -> L2 normalisation: ``[T, 32, 256]``;
* per text: Q-Former text-only pass -> [CLS] -> ``text_projection`` -> L2 normalisation: ``[256]``;
* BLIP-2's own image-text score is the max over the 32 queries of ``<query_q, text>``.

X-Pool pools frames, so the 32 query vectors of a frame are reduced before they reach the index
(``query_pool``): ``"mean"`` (default) averages the normalised query vectors and re-normalises,
giving ``[T, 256]`` — 12 frame tokens per video, X-Pool's setting; ``"none"`` keeps all of them,
flattened to ``[T*32, 256]`` tokens that X-Pool's attention pools over (32x the index size).

Any object following the :class:`FeatureExtractor` protocol can build an index; besides BLIP-2 this
file has :class:`ColourHistogramExtractor`, a cheap deterministic stand-in (colour histograms for
frames, hashed bags of words for texts) used by tests and the demo.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert.blip2_retrieval import load_hf
from ivcr_jax.data.frames import normalize
from ivcr_jax.models.blip2_itc import Blip2ITC


@runtime_checkable
class FeatureExtractor(Protocol):
    """What :func:`ivcr_jax.retrieval.index.build_index` and the retriever need from features.

    * ``num_frames`` frames of ``frame_size`` x ``frame_size`` are sampled uniformly per video;
    * ``encode_frames(pixels uint8 [N, S, S, 3]) -> float32 [N, tokens, dim]`` (``tokens`` per frame:
      1 for pooled features, 32 for BLIP-2 queries kept);
    * ``encode_text(texts) -> float32 [len(texts), dim]``, L2-normalised;
    * ``spec()`` a JSON-serialisable dict stored in the index manifest; :func:`extractor_from_spec`
      rebuilds the extractor from it (same features for the texts at search time).
    """

    num_frames: int
    frame_size: int
    dim: int
    tokens_per_frame: int

    def encode_frames(self, pixels: np.ndarray) -> np.ndarray: ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def spec(self) -> dict: ...


def l2n(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


# ----------------------------------------------------------------------------- cheap stand-in

_WORD = re.compile(r"[a-z0-9]+")


def _word_vector(word: str, dim: int, salt: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.md5(f"{salt}:{word}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@dataclasses.dataclass
class ColourHistogramExtractor:
    """Deterministic, weight-free features: joint RGB histograms per frame, hashed words per text.

    Frame feature: ``bins**3`` joint colour histogram, square-rooted (Hellinger) and L2-normalised,
    optionally mapped by a fixed random matrix to ``dim``. Text feature: the sum of fixed random
    word vectors (seeded by an md5 of the word) of the lower-cased words, L2-normalised. The two
    spaces are unrelated until X-Pool's projections learn a map between them — which is what the
    training test checks.
    """

    bins: int = 4
    num_frames: int = 12
    frame_size: int = 32
    dim: int = 64
    tokens_per_frame: int = 1

    def __post_init__(self):
        self._proj = None
        if self.dim != self.bins ** 3:
            rng = np.random.default_rng(self.bins * 1000 + self.dim)
            self._proj = (rng.standard_normal((self.bins ** 3, self.dim)) / np.sqrt(self.dim)).astype(np.float32)

    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        px = np.asarray(pixels)
        if px.ndim != 4 or px.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [N, H, W, 3], got {px.shape}")
        q = (px.astype(np.int32) * self.bins) // 256                      # [N, H, W, 3] in [0, bins)
        code = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        n = px.shape[0]
        flat = code.reshape(n, -1) + (np.arange(n)[:, None] * self.bins ** 3)
        hist = np.bincount(flat.ravel(), minlength=n * self.bins ** 3).reshape(n, self.bins ** 3)
        feat = l2n(np.sqrt(hist.astype(np.float32)))
        if self._proj is not None:
            feat = l2n(feat @ self._proj)
        return feat[:, None, :]                                            # [N, 1, dim]

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in _WORD.findall(str(t).lower()):
                out[i] += _word_vector(w, self.dim, "ivcr-text")
        return l2n(out)

    def spec(self) -> dict:
        return {"kind": "colour_hist", "bins": self.bins, "num_frames": self.num_frames,
                "frame_size": self.frame_size, "dim": self.dim}


def extractor_from_spec(spec: Mapping[str, Any], **overrides) -> FeatureExtractor:
    """Rebuild the extractor recorded in an index manifest (``overrides`` e.g. a new checkpoint path)."""
    spec = {**dict(spec), **overrides}
    kind = spec.pop("kind", None)
    if kind == "colour_hist":
        return ColourHistogramExtractor(**spec)
    if kind == "blip2":
        return Blip2Extractor.from_spec(spec)
    raise ValueError(f"unknown feature extractor kind {kind!r} in {dict(spec)}")


# ----------------------------------------------------------------------------- BLIP-2 ITC

@nnx.jit
def _image_fn(model: Blip2ITC, pixels: jax.Array) -> jax.Array:
    return model.image_embeds(pixels)


@nnx.jit
def _text_fn(model: Blip2ITC, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return model.text_embeds(input_ids, attention_mask)


QUERY_POOLS = ("mean", "none")


class Blip2Extractor:
    """BLIP-2 ITC features behind the :class:`FeatureExtractor` protocol.

    Frames: ``[T, 32, E]`` query features reduced by ``query_pool`` (module docstring). Texts: BERT
    tokenizer of the checkpoint directory, ``max_txt_len`` tokens (LAVIS ``Blip2Qformer``: 32).
    Batches are padded to fixed sizes so each jitted function compiles once.
    """

    def __init__(self, model, tokenizer, *, num_frames: int = 12, query_pool: str = "mean",
                 max_txt_len: int = 32, frame_batch: int = 48, text_batch: int = 64,
                 path: str | None = None, dtype: str = "float32"):
        if query_pool not in QUERY_POOLS:
            raise ValueError(f"query_pool must be one of {QUERY_POOLS}, got {query_pool!r}")
        self.model, self.tokenizer = model, tokenizer
        self.num_frames, self.query_pool = int(num_frames), query_pool
        self.max_txt_len = min(int(max_txt_len), int(model.config.qformer.max_positions))
        self.frame_batch, self.text_batch = int(frame_batch), int(text_batch)
        self.path, self.dtype = path, dtype
        self.frame_size = int(model.config.vision.image_size)
        self.dim = int(model.config.embed_dim)
        self.tokens_per_frame = 1 if query_pool == "mean" else int(model.config.qformer.num_query_tokens)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", **kw) -> "Blip2Extractor":
        """An HF ``Blip2ForImageTextRetrieval`` directory (weights, config, BERT tokenizer files)."""
        from transformers import AutoTokenizer  # heavy and optional: only BLIP-2 features need it
        dt = jnp.dtype(dtype)
        model = load_hf(path, dtype=dt, param_dtype=dt)
        tok = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tok, path=str(path), dtype=str(jnp.dtype(dtype)), **kw)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Blip2Extractor":
        spec = dict(spec)
        path = spec.pop("path", None)
        if not path:
            raise ValueError("a BLIP-2 extractor spec needs 'path' (a Blip2ForImageTextRetrieval directory)")
        return cls.from_pretrained(path, **spec)

    def spec(self) -> dict:
        return {"kind": "blip2", "path": self.path, "num_frames": self.num_frames,
                "query_pool": self.query_pool, "max_txt_len": self.max_txt_len, "dtype": self.dtype}

    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[N, S, S, 3]`` -> ``[N, tokens, E]`` float32."""
        px = np.asarray(pixels)
        n, fb = px.shape[0], self.frame_batch
        out = []
        for s in range(0, n, fb):
            chunk = normalize(px[s:s + fb])
            m = chunk.shape[0]
            if m < fb:
                chunk = np.concatenate([chunk, np.zeros((fb - m,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(_image_fn(self.model, chunk))[:m])
        feats = np.concatenate(out) if out else np.zeros((0, self.model.config.qformer.num_query_tokens, self.dim), np.float32)
        if self.query_pool == "mean":
            feats = l2n(feats.mean(axis=1, keepdims=True))
        return feats

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_txt_len, return_tensors="np")
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> L2-normalised ``[N, E]`` float32."""
        texts = list(texts)
        out = []
        for s in range(0, len(texts), self.text_batch):
            chunk = texts[s:s + self.text_batch]
            m = len(chunk)
            ids, mask = self.tokenize(chunk + [""] * (self.text_batch - m))
            out.append(np.asarray(_text_fn(self.model, ids, mask))[:m])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
