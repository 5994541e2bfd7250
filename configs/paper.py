"""InterLLaVA as in the IVCR-200K paper: EVA ViT-g/14 → image Q-Former (+timestamps) →
sliding video Q-Former (window 32) → llama_proj → LLaMA-2-7B-chat with LoRA (r 32, α 32).

``get_config(arg)``: comma-separated variants
  ""        the paper setting: 96 frames for a moment video, 12 per retrieval candidate;
  "head64"  the later reference code: 64 frames for both;
  "tiny"    a tiny random model of the same shape (tests, the demo, CPU CI).

The base weights are a converted directory (``python -m ivcr_jax.convert ivcr ... --out DIR``):
``--config.init.converted=DIR``. Every key here is a field of ``ivcr_jax/experiment.py``'s typed
sections (or of the model dataclasses); ``--help`` with ``--config`` lists them all.
"""
import ml_collections as mlc


def model_config(tiny: bool = False) -> mlc.ConfigDict:
    m = mlc.ConfigDict()
    if not tiny:
        m.vit = dict(image_size=224, patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144,
                     eps=1e-6, post_eps=1e-5)
        m.qformer = dict(vocab_size=30523, hidden=768, layers=12, heads=12, mlp_dim=3072, eps=1e-12,
                         max_positions=512, cross_attention_freq=2, encoder_width=1408,
                         num_query_tokens=32, dropout=0.1)
        m.video_qformer = dict(hidden=768, layers=2, heads=12, mlp_dim=3072, eps=1e-12,
                               encoder_width=768, num_query_tokens=32, max_frame_pos=96,
                               window=32, stride=32, dropout=0.1)
        m.llm = dict(vocab_size=32005, hidden=4096, intermediate=11008, layers=32, heads=32,
                     kv_heads=32, rms_eps=1e-5, rope_theta=10000.0, max_positions=4096)
    else:
        m.vit = dict(image_size=28, patch_size=14, width=64, depth=2, heads=4, mlp_dim=128,
                     eps=1e-6, post_eps=1e-5)
        # The timestamp text is tokenised with the LLaMA tokenizer (a reproduced TimeChat
        # quirk), so the Q-Former's word table must cover the LLaMA vocabulary.
        m.qformer = dict(vocab_size=32005, hidden=64, layers=2, heads=4, mlp_dim=128, eps=1e-12,
                         max_positions=64, cross_attention_freq=2, encoder_width=64,
                         num_query_tokens=8, dropout=0.1)
        m.video_qformer = dict(hidden=64, layers=1, heads=4, mlp_dim=128, eps=1e-12,
                               encoder_width=64, num_query_tokens=8, max_frame_pos=96,
                               window=32, stride=32, dropout=0.1)
        m.llm = dict(vocab_size=32005, hidden=64, intermediate=128, layers=2, heads=4,
                     kv_heads=4, rms_eps=1e-5, rope_theta=10000.0, max_positions=4096)
    m.lora = dict(rank=32 if not tiny else 8, alpha=32.0 if not tiny else 8.0, dropout=0.1,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    # TimeChat keeps the timestamp-text positions of the image Q-Former output (its weights
    # expect it); False gives InstructBLIP's behaviour (queries only).
    m.keep_timestamp_text = True
    m.frozen_dtype = "bfloat16"      # EVA ViT and the LLaMA base
    m.trainable_dtype = "float32"    # Q-Formers, projections, LoRA (and their Adam state)
    m.compute_dtype = "bfloat16"
    # "none" | "full" | "dots": rematerialise LLaMA blocks in the backward pass. The gradient
    # crosses the frozen LLaMA (to reach LoRA and the projection) but never the frozen ViT, which
    # sits behind a stop_gradient and so keeps no activations for the backward pass.
    m.remat = "full"
    return m


def data_config(tiny: bool = False, head64: bool = False) -> mlc.ConfigDict:
    d = mlc.ConfigDict()
    d.annotations = ""               # IVCR-200K JSON
    d.video_root = ""                # directory the JSON's video paths are relative to
    d.tokenizer = ""                 # LLaMA tokenizer.model or HF tokenizer dir ("" = bundled test tokenizer)
    d.lang = "en"                    # "en" | "zh" (Chinese_value)
    d.retrieval_frames = 64 if head64 else 12
    d.moment_frames = 64 if head64 else 96
    d.frame_size = 28 if tiny else 224
    d.timestamp_len = 16             # timestamp sentence length (LLaMA tokens), padded
    d.max_turns = 7
    d.max_len = 4096
    d.text_buckets = (512, 1024, 2048, 4096)
    d.exclude_types = ((0,),)
    d.max_retrieval_videos = 20      # per-sample cap of retrieval-candidate videos (padded, masked)
    d.max_moment_videos = 2
    # Frame packing (docs/architecture.md): the ViT sees a pool of the batch's real frames, not its
    # 20 x 12 + 2 x 96 = 432 slots per sample; a batch takes the smallest of these pool sizes (frames
    # per batch row) that holds them, so at most this many video shapes compile. Spaced for the
    # IVCR mix (96 / 120 / 216 / 240 / 336 real frames per sample, ~152 on average): >= 90 % of the
    # pool is real frames with >= 4 rows per data shard (python -m ivcr_jax.train.plan --frames ...).
    d.frame_pool = ((64, 384, 448, 512, 576, 640, 704, 768, 832, 896, 1024, 1280, 1408) if head64 else
                    (96, 120, 136, 144, 152, 160, 168, 176, 184, 192, 200, 216, 240, 288, 336, 432))
    d.workers = 0
    d.cache_videos = 0               # videos kept decoded in memory (for corpora that fit); 0 = none
    d.vit_features = ""              # a ViT feature cache (python -m ivcr_jax.train.vit_cache); "" = online ViT
    d.frame_message = True           # moment turns: "... </VIDEO>. The video contains N frames sampled at ... seconds"
    d.double_dot = False             # True: "seconds..{question}" (an earlier reading); HEAD: "seconds.{question}"
    return d


def get_config(arg: str = "") -> mlc.ConfigDict:
    variants = {v for v in arg.split(",") if v}
    unknown = variants - {"tiny", "head64"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: tiny, head64")
    tiny = "tiny" in variants
    c = mlc.ConfigDict()
    c.seed = 42
    # PRNG for dropout: threefry (JAX's default, identical on every backend); the tiny variant
    # uses "rbg", which compiles several times faster on CPU.
    c.rng_impl = "threefry2x32"
    c.model = model_config(tiny)
    c.data = data_config(tiny, "head64" in variants)
    if "head64" in variants:
        c.model.video_qformer.max_frame_pos = 64

    c.init = mlc.ConfigDict(dict(
        converted="",        # a directory written by `python -m ivcr_jax.convert ivcr`; "" = random
        random_init="bert",  # random weights: "bert" N(0, 0.02^2) (HF's) | "fan_in" N(0, 1/fan_in)
    ))

    c.train = mlc.ConfigDict(dict(
        batch_size=32, grad_accum=1, steps=66_000,
        lr=3e-5, min_lr=1e-5, warmup_init_lr=1e-6, warmup_steps=13_200,
        weight_decay=0.05,   # the reference code; the paper states 1e-6
        b1=0.9, b2=0.999, clip_norm=1.0,
        lr_mults=(),         # ((regex, multiplier), ...) over trainable parameter paths
        aux_loss_mode="faithful",   # "faithful" (reference, no gradient) | "differentiable" | "off"
        alpha=0.01, beta=0.01,      # weights of the video-index and moment losses
        # faithful L_V / L_C chosen as the reference does, by the sample's <VIDEOTOKEN> count
        # (1 → L_C, 10 → L_V, other → L_C := 1) | "kind": by the last turn's kind
        faithful_select="videotokens",
        # the aux terms from this batch on; 0 = from the start; the reference: batches per epoch
        # (they start at epoch 1)
        aux_start_step=0,
        # "token_mean": over every supervised token of the batch | "sample_mean": each sample's
        # token mean, then the mean over samples (the reference: batch 1 × accumulation 4)
        lm_loss_reduction="token_mean",
        ckpt_every=500, keep_checkpoints=3,
        log_every=10,        # steps per metrics row (the mean over them)
        # Held-out monitor: every eval_every steps (0 = off) the first eval_samples samples of
        # eval_split are answered by generation and scored (R@1, IoU>=0.5, parse rates).
        eval_every=0, eval_samples=24, eval_split="test",
        # "supervised": the LM head (and its logits) only at positions whose next token is a label;
        # the same loss as "all", without the [B, S, vocab] logits of the whole prompt.
        lm_head="supervised",
        # The LM loss (and the faithful argmax) over vocabulary blocks of this many columns, from
        # the hidden states: no [B, K, 32005] fp32 logits in the step, about two [B*K, chunk] fp32
        # blocks instead (1/8 of the logits at 2048); 0 = the full-logits loss.
        lm_loss_chunk=2048,
    ))
    # Generation for evaluation and the chat: greedy by default (the reference sampled with
    # top-p 0.8, temperature 1); video_slots "bucketed" pads a prompt's videos to 1, 2 or 10k slots.
    c.eval = mlc.ConfigDict(dict(max_new_tokens=512, batch_size=1, temperature=0.0, top_p=1.0,
                                 video_slots="bucketed"))
    c.trainable = (r"qformer/.*", r"video_qformer/.*", r"llama_proj/.*", r".*lora_[ab]")
    c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))   # 0: all devices

    if tiny:
        c.train.update(batch_size=2, steps=50, warmup_steps=5, lr=1e-3, min_lr=1e-4,
                       warmup_init_lr=1e-5, ckpt_every=20, log_every=1)
        c.data.update(max_len=1024, text_buckets=(256, 512, 1024), timestamp_len=16)
        c.model.update(frozen_dtype="float32", compute_dtype="float32", remat="none")
        # CPU compile time: BERT dropout in every Q-Former layer more than doubles the train
        # step's compile time on CPU; the tiny variant keeps LoRA dropout only.
        c.model.qformer.dropout = 0.0
        c.model.video_qformer.dropout = 0.0
        c.rng_impl = "rbg"
        c.eval.max_new_tokens = 48
        c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    return c
