"""The wiring floor: a config (file + ``--config.key=value`` overrides) resolved once into typed pieces.

Every program — ``train``, ``train.plan``, ``eval``, ``chat``, the demo — starts here and never
from another program::

    config, args = cli.parse(argv, parser)         # the one command-line dialect (cli.py)
    exp = Experiment.resolve(config)               # typed, validated; an unknown key is an error
    exp.model      InterLLaVAConfig                exp.train   TrainConfig     exp.eval  EvalConfig
    exp.data       DataConfig                      exp.init    InitConfig      exp.mesh_config
    exp.pipeline(batch_size)   the input-pipeline config, with the model's video-token layout
    exp.tokenizer              the LLaMA tokenizer with the IVCR tokens (loaded once)
    exp.dialogues(split)       the IVCR JSON, read by ``data/schema.py``
    exp.video_root(dialogues)  where the JSON's relative video paths live
    exp.mesh()                 the (data, fsdp, tensor) mesh
    exp.build_model(mesh)      the model with its base weights (random, or ``init.converted``)
    exp.load_model(ckpt, mesh) the same, then a converted or training checkpoint over it

Every key of a config file is a field of one of the typed sections below (or of the model's
dataclasses), so a key that nothing reads cannot sit in ``configs/`` unnoticed: resolution fails
naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

import jax
from ml_collections import ConfigDict

from ivcr_jax import checkpoints, sharding
from ivcr_jax.cli import UsageError, leaf_paths, unknown_key_message
from ivcr_jax.data import schema
from ivcr_jax.data.pipeline import PipelineConfig
from ivcr_jax.models import build
from ivcr_jax.models.interllava import InterLLaVAConfig
from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer

AUX_LOSS_MODES = ("faithful", "differentiable", "off")
FAITHFUL_SELECTS = ("videotokens", "kind")            # train/losses.py faithful_aux
LM_LOSS_REDUCTIONS = ("token_mean", "sample_mean")    # train/losses.py lm_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train``: batch size and steps, AdamW and its schedule, the aux losses, checkpoints.

    ``batch_size`` is the global batch of one step; ``grad_accum = k`` averages k such batches per
    update; ``steps``, ``warmup_steps``, ``ckpt_every`` and ``aux_start_step`` count batches.

    The losses as the reference computes them (``ivcr/models/ivcr.py : IVCR.forward``): set
    ``lm_loss_reduction="sample_mean"`` (its batch 1 × accumulation 4: each sample's token mean,
    averaged over samples), ``aux_loss_mode="faithful"`` with ``faithful_select="videotokens"``
    (L_V / L_C chosen by the sample's ``<VIDEOTOKEN>`` count), and ``aux_start_step`` = batches
    per epoch (its ``flag = 1`` from epoch 1, ``ivcr/runners/runner_base.py : RunnerBase.train``).
    """

    batch_size: int
    grad_accum: int
    steps: int
    lr: float
    min_lr: float
    warmup_init_lr: float
    warmup_steps: int
    weight_decay: float
    b1: float
    b2: float
    clip_norm: float
    lr_mults: tuple        # ((regex, multiplier), ...) over trainable parameter paths
    aux_loss_mode: str     # "faithful" (the reference: logged, no gradient) | "differentiable" | "off"
    alpha: float           # weight of the video-index loss L_V
    beta: float            # weight of the moment loss L_C
    ckpt_every: int
    keep_checkpoints: int
    log_every: int = 1     # steps per row of metrics.jsonl / TensorBoard (the mean over those steps)
    eval_every: int = 0    # steps between held-out evaluations (generation + parsing); 0 = none
    eval_samples: int = 24  # samples of the held-out slice: the first N of eval_split
    eval_split: str = "test"
    lm_head: str = "supervised"  # "supervised": logits only where the next token is a label | "all"
    # "token_mean": the mean over every supervised token of the global batch | "sample_mean": each
    # real sample's mean over its own supervised tokens, then the mean over samples (the reference)
    lm_loss_reduction: str = "token_mean"
    # faithful L_V / L_C chosen by "videotokens": the sample's video count (1 → L_C, 10 → L_V, other
    # → L_C := 1; unparseable index → 0; the reference) | "kind": the last turn's kind (index ln 10)
    faithful_select: str = "videotokens"
    # the aux terms count from this batch index on (0 = from the start; the reference: batches per
    # epoch, i.e. epoch >= 1); before it L_V = L_C = 0 and the loss is L_LM
    aux_start_step: int = 0

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "steps", "ckpt_every", "keep_checkpoints", "log_every",
                    "eval_samples")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise UsageError(f"config.train.{name} must be positive, got {getattr(self, name)}")
        if self.lm_head not in ("supervised", "all"):
            raise UsageError(f"config.train.lm_head must be 'supervised' or 'all', got {self.lm_head!r}")
        if int(self.eval_every) < 0:
            raise UsageError(f"config.train.eval_every must be >= 0 (0 = no held-out evaluation), got {self.eval_every}")
        if self.aux_loss_mode not in AUX_LOSS_MODES:
            raise UsageError(f"config.train.aux_loss_mode must be one of {', '.join(AUX_LOSS_MODES)}, "
                             f"got {self.aux_loss_mode!r}")
        if self.lm_loss_reduction not in LM_LOSS_REDUCTIONS:
            raise UsageError(f"config.train.lm_loss_reduction must be one of {', '.join(LM_LOSS_REDUCTIONS)}, "
                             f"got {self.lm_loss_reduction!r}")
        if self.faithful_select not in FAITHFUL_SELECTS:
            raise UsageError(f"config.train.faithful_select must be one of {', '.join(FAITHFUL_SELECTS)}, "
                             f"got {self.faithful_select!r}")
        if int(self.aux_start_step) < 0:
            raise UsageError(f"config.train.aux_start_step must be >= 0 (0 = from the start), got {self.aux_start_step}")
        if not 0 <= int(self.warmup_steps) <= int(self.steps):
            raise UsageError(f"config.train.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.lr > 0:
            raise UsageError(f"config.train.lr must be positive, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``config.eval``: how answers are generated for evaluation and the chat."""

    max_new_tokens: int
    batch_size: int = 1          # prompts per generation batch
    temperature: float = 0.0     # 0 = greedy (deterministic evaluation)
    top_p: float = 1.0           # nucleus mass when sampling
    video_slots: str = "bucketed"  # "bucketed": 1/2/10k video slots per prompt | "cap": the config's caps

    def __post_init__(self):
        if int(self.max_new_tokens) <= 0 or int(self.batch_size) <= 0:
            raise UsageError(f"config.eval.max_new_tokens and batch_size must be positive, got "
                             f"{self.max_new_tokens}, {self.batch_size}")
        if not 0.0 < float(self.top_p) <= 1.0 or float(self.temperature) < 0:
            raise UsageError(f"config.eval.top_p must be in (0, 1] and temperature >= 0, got "
                             f"{self.top_p}, {self.temperature}")
        if self.video_slots not in ("bucketed", "cap"):
            raise UsageError(f"config.eval.video_slots must be 'bucketed' or 'cap', got {self.video_slots!r}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """``config.init``: the base weights (``converted``: a ``python -m ivcr_jax.convert ivcr`` dir)."""

    converted: str = ""
    random_init: str = "bert"   # weights not loaded from `converted`: "bert" N(0, 0.02²) | "fan_in" N(0, 1/fan_in)

    def __post_init__(self):
        if self.random_init not in build.RANDOM_INITS:
            raise UsageError(f"config.init.random_init must be one of {', '.join(build.RANDOM_INITS)}, "
                             f"got {self.random_init!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``config.data``: the corpus, the tokenizer and how samples and batches are cut."""

    annotations: str             # IVCR-200K JSON
    video_root: str              # directory of the JSON's relative video paths ("" = the one rule)
    tokenizer: str               # tokenizer.model or HF tokenizer dir ("" = the bundled test tokenizer)
    lang: str                    # "en" | "zh"
    retrieval_frames: int
    moment_frames: int
    frame_size: int
    timestamp_len: int
    max_turns: int
    max_len: int
    text_buckets: tuple
    exclude_types: tuple
    max_retrieval_videos: int | None
    max_moment_videos: int | None
    workers: int
    cache_videos: int = 0        # videos kept decoded in memory (small corpora); 0 = decode per sample
    max_sample_turns: int | None = 7
    long_prefix: str = "drop"
    prepared: str = ""           # a dataset written by ``python -m ivcr_jax.data.prepare``
    frame_message: bool = True   # moment turns carry "The video contains N frames sampled at ... seconds"
    double_dot: bool = False     # True: "seconds..{question}"; the reference HEAD renders "seconds.{question}"

    def __post_init__(self):
        if self.lang not in ("en", "zh"):
            raise UsageError(f"config.data.lang must be 'en' or 'zh', got {self.lang!r}")
        for name in ("frame_message", "double_dot"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"config.data.{name} must be true or false, got {getattr(self, name)!r}")
        if int(self.cache_videos) < 0:
            raise UsageError(f"config.data.cache_videos must be >= 0, got {self.cache_videos}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int
    fsdp: int
    tensor: int
    num_devices: int = 0  # 0: every device


_MODEL_KEYS = {f.name for f in dataclasses.fields(InterLLaVAConfig)}


def _typed(cls, node: Any, section: str):
    """``cls(**node)`` with every key of ``node`` a field of ``cls`` (else a one-line error)."""
    d = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            raise UsageError(unknown_key_message(f"{section}.{k}", [f"{section}.{n}" for n in names])
                             .replace("--config.", "config."))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"config.{section} lacks {', '.join(missing)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def model_config(node: Any) -> InterLLaVAConfig:
    """``config.model`` → :class:`InterLLaVAConfig` (unknown keys are an error)."""
    d = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    for k in d:
        if k not in _MODEL_KEYS:
            raise UsageError(unknown_key_message(f"model.{k}", [f"model.{n}" for n in _MODEL_KEYS])
                             .replace("--config.", "config."))
    try:
        return build.model_config(d)
    except TypeError as e:  # an unknown or missing key inside a tower's node
        raise UsageError(f"config.model: {e}") from None


_TOP = ("seed", "rng_impl", "model", "data", "init", "train", "eval", "trainable", "mesh")


@dataclasses.dataclass
class Experiment:
    """A resolved experiment config. Build with :meth:`resolve`."""

    config: ConfigDict
    seed: int
    rng_impl: str | None
    model: InterLLaVAConfig
    data: DataConfig
    init: InitConfig
    train: TrainConfig
    eval: EvalConfig
    trainable: tuple[str, ...]
    mesh_config: MeshConfig

    @classmethod
    def resolve(cls, config: ConfigDict | Mapping) -> "Experiment":
        for k in config.keys():
            if k not in _TOP:
                raise UsageError(unknown_key_message(str(k), list(_TOP)).replace("--config.", "config."))
        return cls(
            config=config, seed=int(config["seed"]), rng_impl=config.get("rng_impl") or None,
            model=model_config(config["model"]), data=_typed(DataConfig, config["data"], "data"),
            init=_typed(InitConfig, config.get("init", {}), "init"),
            train=_typed(TrainConfig, config["train"], "train"),
            eval=_typed(EvalConfig, config.get("eval", {"max_new_tokens": 512}), "eval"),
            trainable=tuple(config["trainable"]), mesh_config=_typed(MeshConfig, config["mesh"], "mesh"),
        )

    def keys(self) -> list[str]:
        """Every config key this experiment was resolved from (``train.lr``, ...)."""
        return list(leaf_paths(self.config))

    # ------------------------------------------------------------------ data
    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.data.tokenizer or bundled_test_tokenizer())

    def dialogues(self, split: str | None, *, annotations: str | None = None, strict: bool = False):
        """``(dialogues, load report)`` of ``split`` (``None``: every split) of the IVCR JSON."""
        path = annotations or self.data.annotations
        if not path:
            raise UsageError("config.data.annotations is empty: give the IVCR-200K JSON path")
        if not Path(path).is_file():
            raise UsageError(f"annotations {path}: no such file")
        return schema.load_dialogues(path, split=split, lang=self.data.lang,
                                     exclude_types=tuple(tuple(t) for t in self.data.exclude_types), strict=strict)

    def video_root(self, dialogues=(), annotations: str | None = None) -> str:
        return schema.resolve_video_root(annotations or self.data.annotations, self.data.video_root, dialogues)

    def pipeline(self, batch_size: int, *, video_root: str | None = None) -> PipelineConfig:
        """The input pipeline of ``config.data`` with the video-token layout of ``config.model``.

        The placeholder positions per video must be what the model's video Q-Former produces:
        ``num_query_tokens`` per window of ``stride`` frames (one window over all frames when
        ``window <= 0``), or the splice would gather rows that do not exist.
        """
        vq = self.model.video_qformer
        frames_per_window = (vq.stride if vq.stride > 0 else vq.window) if vq.window > 0 else 1 << 30
        pc = PipelineConfig.from_config(self.data, batch_size=int(batch_size))
        sample = dataclasses.replace(pc.sample, window=int(frames_per_window),
                                     tokens_per_window=int(vq.num_query_tokens),
                                     video_root=video_root or pc.sample.video_root)
        return dataclasses.replace(pc, sample=sample)

    # ------------------------------------------------------------------ devices and model
    def mesh(self, devices=None):
        m = self.mesh_config
        n = int(m.num_devices)
        devices = devices if devices is not None else (jax.devices()[:n] if n else None)
        return sharding.make_mesh({"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}, devices)

    def build_model(self, mesh=None):
        """The model with its base weights: ``init.converted`` when set, else random (``seed``)."""
        return self.load_model(None, mesh)[0]

    def load_model(self, checkpoint: str | None, mesh=None):
        """``(model, description)``: the base weights, then ``checkpoint`` (converted dir or run)."""
        with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            model = build.build_model(self.model, mesh=mesh, seed=self.seed, random_init=self.init.random_init)
            what = checkpoints.load_weights(model, checkpoint, base=self.init.converted,
                                            trainable=self.trainable, seed=self.seed)
        return model, what
