"""X-Pool retriever over cached frame features (reference-architecture.md §5).

``get_config(arg)``, comma-separated variants:
  ""      X-Pool's hyper-parameters over BLIP-2 ITC features (256-d, 12 uniform frames):
          batch 32, 5 epochs, AdamW wd 0.2, lr 1e-5 (X-Pool's ``noclip_lr``), the logit scale at
          1e-6 (it belongs to CLIP upstream, so it gets ``clip_lr``), cosine schedule, 10 % warmup,
          clip 1.0, dropout 0.3, one attention head; re-ranking the first-stage top-100.
  "tiny"  CPU tests and the demo: colour-histogram frame features and hashed-word text features
          (``retrieval/features.py``), 64-d, small batches, a larger learning rate.

Commands::

  python -m ivcr_jax.retrieval.index --corpus DIR --out INDEX --config configs/xpool.py --blip2 BLIP2_ITM_DIR
  python -m ivcr_jax.retrieval.train --config configs/xpool.py --index INDEX --annotations IVCR.json --workdir W
"""
import ml_collections as mlc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variants = {v for v in (arg or "").split(",") if v}
    unknown = variants - {"tiny"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: tiny")
    tiny = "tiny" in variants
    c = mlc.ConfigDict()
    c.seed = 0

    # --- features and the index ---
    c.index = mlc.ConfigDict()
    c.index.num_frames = 12                     # X-Pool num_frames, uniform sampling
    c.index.query_pool = "mean"                 # BLIP-2: "mean" of the 32 query vectors | "none" (keep all)
    c.index.shard_size = 256
    c.index.dtype = "float16"                   # stored frame tokens; first-stage means are float32
    # BLIP-2 parameters and compute: bfloat16 on GPU/TPU (the reference runs the ViT in fp16);
    # float32 on CPU, whose XLA backend has no fast bf16 matmul.
    c.index.compute_dtype = "float32"
    if tiny:
        c.index.extractor = dict(kind="colour_hist", bins=4, num_frames=12, frame_size=32, dim=64)
    else:
        c.index.extractor = dict(kind="blip2", path="", num_frames=12, query_pool="mean")

    # --- model ---
    c.model = mlc.ConfigDict()
    c.model.embed_dim = 64 if tiny else 256     # must equal the index's feature dim
    c.model.num_heads = 1
    c.model.dropout = 0.3
    c.model.layer_norm_eps = 1e-5

    # --- training ---
    c.train = mlc.ConfigDict()
    c.train.batch_size = 16 if tiny else 32
    c.train.epochs = 10 if tiny else 5
    c.train.steps = 0                           # > 0 overrides epochs
    c.train.lr = 3e-3 if tiny else 1e-5
    c.train.lr_logit_scale = 3e-3 if tiny else 1e-6
    c.train.weight_decay = 0.2
    c.train.warmup_frac = 0.1
    c.train.grad_clip = 1.0
    # Upstream counts a second caption of the same video in the batch as a negative; True masks
    # those false negatives (a deviation; off = the reference).
    c.train.mask_same_video = False
    c.train.split = "train"
    c.train.eval_split = "test"
    c.train.log_every = 10
    c.train.eval_every = 0                      # 0 = at the end only
    c.train.ckpt_every = 200
    c.train.keep_ckpts = 2
    # Dropout keys: threefry compiles slowly on small CPUs; rbg keys are as good for dropout.
    c.train.prng_impl = "rbg" if tiny else "threefry2x32"

    # --- search ---
    c.search = mlc.ConfigDict()
    c.search.rerank_k = 100                     # first-stage candidates re-ranked by X-Pool
    c.search.top_k = 10                         # candidate_videos written for the LLM stage
    c.search.eval_text_chunk = 256
    c.search.eval_video_chunk = 256
    return c
