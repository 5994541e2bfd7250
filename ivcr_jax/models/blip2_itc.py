"""BLIP-2's image-text-contrastive (ITC) towers: HF ``Blip2ForImageTextRetrieval`` minus ``itm_head``.

stack-notes.md §8; the towers are reference-architecture.md §1 (EVA ViT) and §2 (Q-Former):

* image: EVA ViT -> post LayerNorm -> Q-Former over its learned queries (cross-attending to the
  image) -> ``vision_projection`` per query -> L2 normalisation: ``[B, Q, E]``;
* text: Q-Former text-only pass -> [CLS] -> ``text_projection`` -> L2 normalisation: ``[B, E]``;
* BLIP-2's own image-text score (:func:`itc_similarity`) is the max over the queries of
  ``<query_q, text>``.

The module knows nothing of checkpoint formats: HF and LAVIS weights are loaded by
``ivcr_jax.convert.blip2_retrieval``; the retrieval index uses the features through
``ivcr_jax.retrieval.features.Blip2Extractor``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig
from ivcr_jax.models.layers import Dense
from ivcr_jax.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class Blip2ITCConfig:
    """The parts of HF ``Blip2Config`` the ITC path uses (the defaults are ``blip2-itm-vit-g``)."""

    vision: EvaViTConfig = EvaViTConfig()
    qformer: QFormerConfig = QFormerConfig(vocab_size=30522)   # 32 queries, text branch on
    embed_dim: int = 256                                       # image_text_hidden_size

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Blip2ITCConfig":
        if "qformer_config" not in cfg or "vision_config" not in cfg:
            raise ValueError("expected a full Blip2Config (vision_config + qformer_config)")
        # The ITC text features need the Q-Former's text branch (blip2-itm-vit-g has it).
        return cls(EvaViTConfig.from_hf_config(cfg), QFormerConfig.from_hf_config(cfg, has_text=True),
                   int(cfg.get("image_text_hidden_size", 256)))


class Blip2ITC(nnx.Module):
    """BLIP-2's image-text-contrastive towers: HF ``Blip2ForImageTextRetrieval`` minus ``itm_head``.

    Reuses :class:`~ivcr_jax.models.eva_vit.EvaViT` and :class:`~ivcr_jax.models.qformer.QFormer`
    through their ``__call__`` and adds the two projections (``vision_projection``,
    ``text_projection``, Q-Former width -> ``embed_dim``).
    """

    def __init__(self, config: Blip2ITCConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision = EvaViT(config.vision, **kw)
        self.qformer = QFormer(config.qformer, **kw)
        d = config.qformer.hidden
        self.vision_projection = Dense(d, config.embed_dim, names=("embed", "mlp"), **kw)
        self.text_projection = Dense(d, config.embed_dim, names=("embed", "mlp"), **kw)

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """CLIP-normalised ``[B, H, W, 3]`` -> L2-normalised query features ``[B, Q, E]`` (fp32)."""
        img = self.vision(pixels, apply_post_norm=True)               # post_layernorm / ln_vision
        q = self.qformer(encoder_hidden_states=img)                   # own query tokens: [B, Q, D]
        return _l2n_jax(self.vision_projection(q))

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """BERT ids ``[B, T]`` -> L2-normalised [CLS] features ``[B, E]`` (text-only Q-Former pass)."""
        h = self.qformer(input_ids, attention_mask)                   # no queries, no cross-attention
        return _l2n_jax(self.text_projection(h[:, 0]))


def itc_similarity(image_embeds, text_embeds):
    """BLIP-2's ITC score ``[B_img, B_txt]`` from query features ``[B_img, Q, E]`` and text features
    ``[B_txt, E]`` (both normalised): the max over queries of the cosine similarity."""
    return np.einsum("bqe,te->bqt", np.asarray(image_embeds, np.float32),
                     np.asarray(text_embeds, np.float32)).max(axis=1)


def _l2n_jax(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)   # F.normalize
