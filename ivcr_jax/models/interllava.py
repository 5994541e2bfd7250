"""InterLLaVA: frames → EVA ViT-g → ln_vision → image Q-Former (+timestamp text) → sliding video
Q-Former → ``llama_proj`` → LLaMA-2 input embeddings (reference-architecture §0, §3, §8.3).

One batch (see ``ivcr_jax/data/pipeline.py``) holds the chat tokens, in which each
``<VIDEOTOKEN>`` has been expanded to as many placeholder positions as its video has tokens,
and ``video_token_index`` saying which video token goes where. Videos come in groups of equal
frame count (``f12`` retrieval candidates, ``f96`` moment videos ...), each a ``[B, V, T]`` grid of
frame slots; the frames themselves sit in the batch's frame pool (``pool.frames [P, F, H, W, 3]``
uint8, only real frames: ``data/batch.py``, "Frame packing" in docs/architecture.md), which the ViT
and the image Q-Former encode in one pass (:meth:`InterLLaVA.encode_pool`). Each group then gathers
its slots' frame tokens from the pool (``pool_index``) and runs the video Q-Former in one batched
pass; the per-sample concatenation of the groups' token blocks (sorted group names, video by video)
is gathered into the placeholder positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig
from ivcr_jax.models.layers import Dense
from ivcr_jax.models.llama import Llama, LlamaConfig
from ivcr_jax.models.lora import LoRAConfig
from ivcr_jax.models.qformer import QFormer, QFormerConfig
from ivcr_jax.models.video_qformer import VideoQFormer, VideoQFormerConfig

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def _dtype(name: str):
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class InterLLaVAConfig:
    vit: EvaViTConfig
    qformer: QFormerConfig
    video_qformer: VideoQFormerConfig
    llm: LlamaConfig
    lora: LoRAConfig | None
    keep_timestamp_text: bool = True
    frozen_dtype: str = "bfloat16"
    trainable_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"

    @classmethod
    def from_dict(cls, m: Mapping[str, Any]) -> "InterLLaVAConfig":
        m = dict(m)
        llm = dict(m["llm"])
        if "remat" in {f.name for f in dataclasses.fields(LlamaConfig)}:
            llm["remat"] = m.get("remat", "none")
        lora = m.get("lora")
        if lora:
            lora = dict(lora)
            lora["targets"] = tuple(lora["targets"])
        return cls(
            vit=EvaViTConfig(**dict(m["vit"])),
            qformer=QFormerConfig(**dict(m["qformer"])),
            video_qformer=VideoQFormerConfig(**dict(m["video_qformer"])),
            llm=LlamaConfig(**llm),
            lora=LoRAConfig(**lora) if lora else None,
            keep_timestamp_text=bool(m.get("keep_timestamp_text", True)),
            frozen_dtype=m.get("frozen_dtype", "bfloat16"),
            trainable_dtype=m.get("trainable_dtype", "float32"),
            compute_dtype=m.get("compute_dtype", "bfloat16"),
            remat=m.get("remat", "none"),
        )


class InterLLaVA(nnx.Module):
    """The full video-LLM. Frozen: ``vit``, the LLaMA base. Trainable: the rest and LoRA."""

    def __init__(self, config: InterLLaVAConfig, *, rngs: nnx.Rngs):
        self.config = config
        frozen, trainable = _dtype(config.frozen_dtype), _dtype(config.trainable_dtype)
        compute = _dtype(config.compute_dtype)
        self.vit = EvaViT(config.vit, dtype=compute, param_dtype=frozen, rngs=rngs)
        self.qformer = QFormer(config.qformer, dtype=compute, param_dtype=trainable, rngs=rngs)
        self.video_qformer = VideoQFormer(config.video_qformer, dtype=compute, param_dtype=trainable,
                                          rngs=rngs)
        self.llama_proj = Dense(config.video_qformer.hidden, config.llm.hidden, names=(None, "embed"),
                                dtype=compute, param_dtype=trainable, rngs=rngs)
        self.llama = Llama(config.llm, lora=config.lora, dtype=compute, param_dtype=frozen,
                           lora_param_dtype=trainable, rngs=rngs)

    # ------------------------------------------------------------------ video side
    def image_features(self, frames: jax.Array) -> jax.Array:
        """``frames [N, H, W, 3]`` uint8 → the frozen ViT's ``[N, 1 + patches, D_vit]`` (ln_vision
        applied): what the ViT feature cache stores."""
        x = (frames.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        img = self.vit(x, apply_post_norm=True)            # ln_vision applied
        return jax.lax.stop_gradient(img)                  # frozen tower

    def encode_frames(self, frames: jax.Array | None, ts_ids: jax.Array, ts_mask: jax.Array,
                      rng: jax.Array | None = None, *, vit_features: jax.Array | None = None) -> jax.Array:
        """Per-frame tokens: ``frames [N, H, W, 3]`` uint8 (or their ``vit_features [N, 1+P, D_vit]``)
        → ``[N, Q (+L_ts), D_qformer]``."""
        img = self.image_features(frames) if vit_features is None else jax.lax.stop_gradient(vit_features)
        img = sharding.constrain(img, ("batch", "length", "embed"))
        out = self.qformer(ts_ids, ts_mask, img, rng=rng)  # [N, Q + L_ts, D]
        if not self.config.keep_timestamp_text:
            out = out[:, : self.config.qformer.num_query_tokens]
        return out

    def encode_pool(self, pool: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
        """The batch's frame pool (``data/batch.py``: ``frames [P, F, H, W, 3]``, or ``vit_features
        [P, F, 1+N, D_vit]`` from the feature cache, with ``timestamp_ids/mask [P, F, L]``) → per-frame
        tokens ``[P, F, Q (+L_ts), D]``: the ViT and the image Q-Former see only the pool's rows."""
        ids = pool["timestamp_ids"]
        p, f = ids.shape[:2]
        feats = pool.get("vit_features")
        flat = lambda x: None if x is None else x.reshape((p * f,) + x.shape[2:])  # noqa: E731
        tok = self.encode_frames(flat(pool.get("frames")), flat(ids), flat(pool["timestamp_mask"]), rng,
                                 vit_features=flat(feats))
        return tok.reshape((p, f) + tok.shape[1:])

    def encode_videos(self, group: Mapping[str, jax.Array], pool_tokens: jax.Array, pool_ts_len: jax.Array,
                      rng: jax.Array | None = None) -> jax.Array:
        """One group of equal-length videos → LLM tokens ``[B, V * n_tok, D_llm]``: each slot's
        frame tokens gathered from the pool's (``pool_tokens [P, F, Lq, D]``, zeros where
        ``pool_index`` is -1), then the video Q-Former. ``pool_ts_len [P, F]``: each pool row's
        timestamp-text length."""
        index = group["pool_index"]                        # [B, V, T]: row in the row block's pool
        b, v, t = index.shape
        P = pool_tokens.shape[0]
        # Pool p serves the block of rows [p·b/P, (p+1)·b/P): a gather batched over p, so a pool
        # sharded like the batch never leaves its device.
        ix = index.reshape(P, (b // P) * v * t)
        ok = (ix >= 0)
        safe = jnp.maximum(ix, 0)
        tok = jnp.take_along_axis(pool_tokens, safe[:, :, None, None], axis=1)
        tok = jnp.where(ok[:, :, None, None], tok, jnp.zeros((), tok.dtype))
        tok = tok.reshape(b * v, t, tok.shape[-2], tok.shape[-1])
        q = self.config.qformer.num_query_tokens
        token_mask = None
        if self.config.keep_timestamp_text:
            # Reproduced TimeChat quirk: the reference pads each video's timestamp sentences to
            # the longest one of that video and the video Q-Former attends to all of those
            # positions, padding included, but no further.
            ts_len = jnp.where(ok, jnp.take_along_axis(pool_ts_len, safe, axis=1), 0)           # [P, r·V·T]
            lens = ts_len.reshape(b * v, t).max(-1)                                              # [BV]
            pos = jnp.arange(tok.shape[-2] - q)
            text_ok = pos[None, :] < lens[:, None]                                               # [BV, L]
            token_mask = jnp.concatenate(
                [jnp.ones((b * v, q), bool), text_ok], axis=-1)[:, None, :].repeat(t, axis=1)
        frame_mask = group["frame_mask"].reshape(b * v, t).astype(bool)
        # A padding slot has no valid frame: fully masked attention would give NaN, and NaN in
        # an unused branch still poisons gradients. Its tokens are never gathered, so let it
        # attend to its (zero) frames instead.
        frame_mask = frame_mask | ~frame_mask.any(-1, keepdims=True)
        vid = self.video_qformer(tok, frame_mask=frame_mask, token_mask=token_mask, rng=rng)
        vid = self.llama_proj(vid)                                                   # [BV, n, D]
        return vid.reshape(b, v * vid.shape[1], vid.shape[-1])

    def video_tokens(self, videos: Mapping[str, Mapping[str, jax.Array]], pool: Mapping[str, jax.Array] | None,
                     rng: jax.Array | None = None) -> jax.Array | None:
        """Concatenate every group's tokens per sample (sorted group names) → ``[B, M, D]``.

        Dropout keys: one for the pool's image Q-Former pass, one per group's video Q-Former. The
        image Q-Former's masks are drawn over the pool's shape, so a frame's mask depends on where
        the pool holds it (packed or not); the rest of the model draws the same masks either way.
        """
        if not videos:
            return None
        names = sorted(videos)
        r_pool, r_vid = (None, None) if rng is None else tuple(jax.random.split(rng))
        rngs = [None] * len(names) if r_vid is None else list(jax.random.split(r_vid, len(names)))
        pool_tokens = self.encode_pool(pool, r_pool)                                 # [P, F, Lq, D]
        ts_len = pool["timestamp_mask"].astype(jnp.int32).sum(-1)                     # [P, F]
        return jnp.concatenate([self.encode_videos(videos[n], pool_tokens, ts_len, r) for n, r in zip(names, rngs)],
                               axis=1)

    # ------------------------------------------------------------------ LLM side
    def input_embeddings(self, batch: Mapping[str, Any], rng: jax.Array | None = None) -> jax.Array:
        """Text embeddings with every video placeholder replaced by its video token."""
        text = self.llama.embed(batch["input_ids"])                                  # [B, S, D]
        vt = self.video_tokens(batch.get("videos") or {}, batch.get("pool"), rng)
        if vt is None:
            return text
        idx = batch["video_token_index"]
        gathered = jnp.take_along_axis(vt, jnp.maximum(idx, 0)[..., None], axis=1)
        emb = jnp.where((idx >= 0)[..., None], gathered.astype(text.dtype), text)
        return sharding.constrain(emb, ("batch", "length", "embed"))

    def __call__(self, batch: Mapping[str, Any], *, rng: jax.Array | None = None,
                 return_hidden: bool = False, logits_at: jax.Array | None = None,
                 compute_logits: bool = True):
        """Teacher-forced forward: returns the LLaMA output (``.logits [B, S, V]`` fp32, or
        ``[B, K, V]`` at the ``logits_at [B, K]`` positions only; with ``compute_logits=False`` no
        logits and ``.hidden [B, S, D]``, see ``Llama.__call__``)."""
        r_vid, r_llm = (None, None) if rng is None else tuple(jax.random.split(rng))
        emb = self.input_embeddings(batch, r_vid)
        return self.llama(inputs_embeds=emb, attention_mask=batch["attention_mask"], rng=r_llm,
                          return_hidden=return_hidden, logits_at=logits_at, compute_logits=compute_logits)
