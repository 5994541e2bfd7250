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
naming it. Every value is checked there too, before anything is built or compiled: a bad one is a
one-line :class:`~ivcr_jax.cli.UsageError` naming the key and what is allowed (cross-key rules
included: ``data.max_len`` within ``data.text_buckets``, ``data.frame_size`` in whole ViT patches);
the mesh against the devices, and ``train.batch_size`` against the data-parallel size, when the
devices are known (:meth:`Experiment.mesh_sizes`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
from ml_collections import ConfigDict

from ivcr_jax import checkpoints, sharding
from ivcr_jax.cli import UsageError, leaf_paths, unknown_key_message
from ivcr_jax.data import schema
from ivcr_jax.data.frames import VideoError
from ivcr_jax.data.pipeline import PipelineConfig
from ivcr_jax.data.samples import SampleTooLong
from ivcr_jax.models import build
from ivcr_jax.models.interllava import InterLLaVAConfig
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer

AUX_LOSS_MODES = ("faithful", "differentiable", "off")
FAITHFUL_SELECTS = ("videotokens", "kind")            # train/losses.py faithful_aux
LM_LOSS_REDUCTIONS = ("token_mean", "sample_mean")    # train/losses.py lm_loss
LONG_PREFIXES = ("drop", "truncate")                  # data/samples.py SampleConfig.long_prefix

# The errors a program reports as one line (``cli.run(body, known=USER_ERRORS)``): each names its
# file, record, key or checkpoint. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, CheckpointError, VideoError, schema.RecordError, SampleTooLong)


def _int(section: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False,
         allowed: str = "") -> int | None:
    """``value`` as an int of at least ``minimum`` (else one line naming ``config.section.name``)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum):
        return int(value)
    if not allowed:
        allowed = {None: "an integer", 0: "an integer >= 0", 1: "positive (an integer >= 1)"}.get(
            minimum, f"an integer >= {minimum}")
        allowed += " or None" if allow_none else ""
    raise UsageError(f"config.{section}.{name} must be {allowed}, got {value!r}")


def _float(section: str, name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval (else one line naming the key and the interval)."""
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if ok:
        v = float(value)
        if (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi):
            return v
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
    raise UsageError(f"config.{section}.{name} must be a number in {interval}, got {value!r}")


def _choice(section: str, name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise UsageError(f"config.{section}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _regexes(key: str, patterns) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            raise UsageError(f"config.{key}: {p!r} is not a regular expression ({e})") from None


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
    # vocabulary block of the LM loss (train/losses.py chunked_lm_loss): the CE, the faithful argmax
    # and the differentiable terms from the hidden states, never the [B, K, V] logits | 0: full logits
    lm_loss_chunk: int = 0

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "steps", "ckpt_every", "keep_checkpoints", "log_every",
                     "eval_samples"):
            _int("train", name, getattr(self, name), minimum=1)
        for name, allowed in (("eval_every", "an integer >= 0 (0 = no held-out evaluation)"),
                              ("aux_start_step", "an integer >= 0 (0 = from the start)"),
                              ("lm_loss_chunk", "an integer >= 0 (a vocabulary block; 0 = full logits)")):
            _int("train", name, getattr(self, name), minimum=0, allowed=allowed)
        _int("train", "warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.steps:
            raise UsageError(f"config.train.warmup_steps must be in [0, train.steps={self.steps}], "
                             f"got {self.warmup_steps}")
        _choice("train", "lm_head", self.lm_head, ("supervised", "all"))
        _choice("train", "aux_loss_mode", self.aux_loss_mode, AUX_LOSS_MODES)
        _choice("train", "lm_loss_reduction", self.lm_loss_reduction, LM_LOSS_REDUCTIONS)
        _choice("train", "faithful_select", self.faithful_select, FAITHFUL_SELECTS)
        _float("train", "lr", self.lr, 0, lo_open=True)
        for name in ("min_lr", "warmup_init_lr", "weight_decay", "alpha", "beta"):
            _float("train", name, getattr(self, name), 0)
        _float("train", "clip_norm", self.clip_norm, 0)   # 0 = no clipping (train/optim.py)
        for name in ("b1", "b2"):
            _float("train", name, getattr(self, name), 0, 1, hi_open=True)
        mults = tuple(self.lr_mults or ())
        if not all(isinstance(m, (tuple, list)) and len(m) == 2 for m in mults):
            raise UsageError(f"config.train.lr_mults must be ((regex, multiplier), ...), got {self.lr_mults!r}")
        _regexes("train.lr_mults", [m[0] for m in mults])
        for pattern, mult in mults:
            _float("train", f"lr_mults[{pattern!r}]", mult, 0)
        if not isinstance(self.eval_split, str) or not self.eval_split:
            raise UsageError(f"config.train.eval_split must be a split name (e.g. 'test'), got {self.eval_split!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``config.eval``: how answers are generated for evaluation and the chat."""

    max_new_tokens: int
    batch_size: int = 1          # prompts per generation batch
    temperature: float = 0.0     # 0 = greedy (deterministic evaluation)
    top_p: float = 1.0           # nucleus mass when sampling
    video_slots: str = "bucketed"  # "bucketed": 1/2/10k video slots per prompt | "cap": the config's caps

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            _int("eval", name, getattr(self, name), minimum=1)
        _float("eval", "top_p", self.top_p, 0, 1, lo_open=True)
        _float("eval", "temperature", self.temperature, 0)
        _choice("eval", "video_slots", self.video_slots, ("bucketed", "cap"))


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
    vit_features: str = ""       # a ViT feature cache (``python -m ivcr_jax.train.vit_cache``): no online ViT
    frame_message: bool = True   # moment turns carry "The video contains N frames sampled at ... seconds"
    double_dot: bool = False     # True: "seconds..{question}"; the reference HEAD renders "seconds.{question}"
    # The ViT's frame pool (data/batch.py, docs/architecture.md "Frame packing"): its capacities in
    # frames per batch row, increasing; a batch's pool is the smallest that holds its real frames;
    # () = no packing (every frame slot, padding included, goes through the ViT).
    frame_pool: tuple = ()

    def __post_init__(self):
        _choice("data", "lang", self.lang, ("en", "zh"))
        fp = self.frame_pool
        if (not isinstance(fp, (tuple, list))
                or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0 for x in fp)
                or list(fp) != sorted(set(fp))):
            raise UsageError(f"config.data.frame_pool must be an increasing tuple of positive frame counts per "
                             f"batch row, e.g. (96, 120, 144), or () for no packing, got {fp!r}")
        for name in ("prepared", "vit_features"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"config.data.{name} must be a path or \"\", got {getattr(self, name)!r}")
        if self.vit_features and "://" not in self.vit_features and not os.path.isdir(self.vit_features):
            raise UsageError(f"config.data.vit_features={self.vit_features!r}: no such directory (write a ViT "
                             f"feature cache with python -m ivcr_jax.train.vit_cache, or set it to \"\")")
        for name in ("frame_message", "double_dot"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"config.data.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("retrieval_frames", "moment_frames", "frame_size", "timestamp_len", "max_turns", "max_len"):
            _int("data", name, getattr(self, name), minimum=1)
        for name in ("workers", "cache_videos"):
            _int("data", name, getattr(self, name), minimum=0)
        for name in ("max_retrieval_videos", "max_moment_videos", "max_sample_turns"):
            _int("data", name, getattr(self, name), minimum=1, allow_none=True)
        _choice("data", "long_prefix", self.long_prefix, LONG_PREFIXES)
        b = self.text_buckets
        if (not isinstance(b, (tuple, list)) or not b
                or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0 for x in b)
                or list(b) != sorted(set(b))):
            raise UsageError(f"config.data.text_buckets must be a non-empty increasing tuple of positive "
                             f"integers, e.g. (512, 1024), got {b!r}")
        if self.max_len > b[-1]:
            raise UsageError(f"config.data.max_len {self.max_len} exceeds the largest of config.data.text_buckets "
                             f"{tuple(b)}: a sample could not be padded to a bucket; lower max_len to at most "
                             f"{b[-1]} or add a bucket of at least {self.max_len}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``config.mesh``: the (data, fsdp, tensor) axis sizes, one of them -1 ("the rest"), over the
    first ``num_devices`` devices (0: every device). The product must be the number of devices."""

    data: int
    fsdp: int
    tensor: int
    num_devices: int = 0  # 0: every device

    def __post_init__(self):
        for name in sharding.MESH_AXES:
            _int("mesh", name, getattr(self, name), minimum=-1,
                 allowed="a positive integer or -1 (the rest of the devices)")
            if getattr(self, name) == 0:
                raise UsageError(f"config.mesh.{name} must be a positive integer or -1 (the rest of the devices), got 0")
        if self.sizes().count(-1) > 1:
            raise UsageError(f"config.mesh: at most one of data, fsdp, tensor may be -1, got {self.describe()}")
        _int("mesh", "num_devices", self.num_devices, minimum=0, allowed="an integer >= 0 (0 = every device)")
        if self.num_devices:
            self.resolved(self.num_devices, from_config=True)

    def sizes(self) -> list[int]:
        return [int(getattr(self, a)) for a in sharding.MESH_AXES]

    def describe(self) -> str:
        return " x ".join(f"{a}={v}" for a, v in zip(sharding.MESH_AXES, self.sizes()))

    def resolved(self, n_devices: int, *, from_config: bool = False) -> dict[str, int]:
        """``{data, fsdp, tensor}`` for ``n_devices`` devices (``from_config``: the count is
        ``config.mesh.num_devices``), or a one-line :class:`UsageError` naming the keys."""
        have = (f"config.mesh.num_devices is {n_devices}" if from_config else f"this run has {n_devices}")
        sizes = self.sizes()
        known = math.prod(v for v in sizes if v != -1)
        if -1 in sizes:
            if n_devices % known:
                raise UsageError(f"config.mesh {self.describe()}: the fixed axes ({known} devices) do not divide "
                                 f"the devices ({have})")
            sizes[sizes.index(-1)] = n_devices // known
        elif known != n_devices:
            hint = f"; or set config.mesh.num_devices={known} to use {known} of them" if (
                known < n_devices and not from_config) else ""
            raise UsageError(f"config.mesh {self.describe()} needs {known} devices, {have} (make data x fsdp x "
                             f"tensor = {n_devices}, or set one axis to -1: the rest{hint})")
        return dict(zip(sharding.MESH_AXES, sizes))


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
    _check_model(d)
    try:
        return build.model_config(d)
    except (TypeError, ValueError) as e:  # an unknown or missing key inside a tower's node
        raise UsageError(f"config.model: {e}") from None


# The sizes of each tower that must be positive integers, and the (numerator, denominator) pairs
# that must divide: checked on the plain dict before any module sees them.
_MODEL_SIZES = {
    "vit": ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim"),
    "qformer": ("vocab_size", "hidden", "layers", "heads", "mlp_dim", "max_positions",
                "cross_attention_freq", "encoder_width", "num_query_tokens"),
    "video_qformer": ("hidden", "layers", "heads", "mlp_dim", "encoder_width", "num_query_tokens",
                      "max_frame_pos"),
    "llm": ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads", "max_positions"),
    "lora": ("rank",),
}
_MODEL_DIVIDES = (("vit", "image_size", "patch_size"), ("vit", "width", "heads"),
                  ("qformer", "hidden", "heads"), ("video_qformer", "hidden", "heads"),
                  ("llm", "hidden", "heads"), ("llm", "heads", "kv_heads"))
_MODEL_WIDTHS = ((("qformer", "encoder_width"), ("vit", "width")),
                 (("video_qformer", "encoder_width"), ("qformer", "hidden")))
_DTYPES = ("float32", "bfloat16", "float16")
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_model(d: Mapping[str, Any]) -> None:
    """Every value of ``config.model`` a module would trip over, as one line naming the key."""
    towers = {t: dict(d[t]) for t in _MODEL_SIZES if isinstance(d.get(t), Mapping)}
    for tower, names in _MODEL_SIZES.items():
        for name in names:
            if name in towers.get(tower, {}):
                _int(f"model.{tower}", name, towers[tower][name], minimum=1)
    for tower, num, den in _MODEL_DIVIDES:
        t = towers.get(tower, {})
        if num in t and den in t and t[num] % t[den]:
            raise UsageError(f"config.model.{tower}.{num} ({t[num]}) must be a multiple of "
                             f"config.model.{tower}.{den} ({t[den]})")
    for (ta, ka), (tb, kb) in _MODEL_WIDTHS:
        a, b = towers.get(ta, {}).get(ka), towers.get(tb, {}).get(kb)
        if a is not None and b is not None and a != b:
            raise UsageError(f"config.model.{ta}.{ka} ({a}) must equal config.model.{tb}.{kb} ({b}): "
                             f"the one reads the other's output")
    for tower in ("vit", "qformer", "video_qformer", "llm"):
        for name in ("eps", "post_eps", "rms_eps", "rope_theta"):
            if name in towers.get(tower, {}):
                _float(f"model.{tower}", name, towers[tower][name], 0.0, lo_open=True)
    for tower in ("qformer", "video_qformer", "lora"):
        if "dropout" in towers.get(tower, {}):
            _float(f"model.{tower}", "dropout", towers[tower]["dropout"], 0.0, 1.0, hi_open=True)
    lora = towers.get("lora", {})
    if "alpha" in lora:
        _float("model.lora", "alpha", lora["alpha"], 0.0, lo_open=True)
    bad = [t for t in lora.get("targets", ()) if t not in _LORA_TARGETS]
    if bad or ("targets" in lora and not lora["targets"]):
        raise UsageError(f"config.model.lora.targets must be a non-empty tuple of {', '.join(_LORA_TARGETS)}, "
                         f"got {tuple(lora['targets'])!r}")
    for name in ("frozen_dtype", "trainable_dtype", "compute_dtype"):
        if name in d:
            _choice("model", name, d[name], _DTYPES)
    if "remat" in d:
        _choice("model", "remat", d["remat"], ("none", "full", "dots"))


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
        for k in ("seed", "model", "data", "train", "trainable", "mesh"):
            if k not in config:
                raise UsageError(f"config lacks the {k!r} section")
        seed = config["seed"]
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise UsageError(f"config.seed must be an integer, got {seed!r}")
        trainable = config["trainable"]
        if isinstance(trainable, str) or not all(isinstance(p, str) for p in trainable):
            raise UsageError(f"config.trainable must be a tuple of regexes over parameter paths, got {trainable!r}")
        _regexes("trainable", trainable)
        exp = cls(
            config=config, seed=int(seed), rng_impl=config.get("rng_impl") or None,
            model=model_config(config["model"]), data=_typed(DataConfig, config["data"], "data"),
            init=_typed(InitConfig, config.get("init", {}), "init"),
            train=_typed(TrainConfig, config["train"], "train"),
            eval=_typed(EvalConfig, config.get("eval", {"max_new_tokens": 512}), "eval"),
            trainable=tuple(trainable), mesh_config=_typed(MeshConfig, config["mesh"], "mesh"),
        )
        patch = int(exp.model.vit.patch_size)
        if exp.data.frame_size % patch:
            raise UsageError(f"config.data.frame_size {exp.data.frame_size} is not a multiple of "
                             f"config.model.vit.patch_size {patch}: frames are cut into whole patches")
        return exp

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
        return dataclasses.replace(pc, sample=sample, pack_groups=self._local_batch_shards())

    def _local_batch_shards(self) -> int:
        """This process's data-parallel shards of the configured mesh (``data x fsdp`` over the
        processes): the frame pools of its batch, one per shard (``data/batch.py``). 1 when the
        mesh does not fit the devices (:meth:`mesh` then says why)."""
        try:
            sizes = self.mesh_sizes()
        except UsageError:
            return 1
        shards, procs = sizes["data"] * sizes["fsdp"], jax.process_count()
        return shards // procs if shards % procs == 0 else 1

    # ------------------------------------------------------------------ devices and model
    def _devices(self, devices=None) -> list:
        n = int(self.mesh_config.num_devices)
        if devices is not None:
            return list(devices)
        have = jax.devices()
        if n > len(have):
            raise UsageError(f"config.mesh.num_devices={n}, but this run has {len(have)} devices "
                             f"(0 = every device)")
        return list(have[:n] if n else have)

    def mesh_sizes(self, devices=None, *, training: bool = False) -> dict[str, int]:
        """``{data, fsdp, tensor}`` of the mesh on ``devices`` (default: ``config.mesh.num_devices`` of
        ``jax.devices()``), checked without building anything: a mesh that does not fit the devices,
        and with ``training`` a ``train.batch_size`` the batch axes (data x fsdp) or the processes
        cannot split, are one-line :class:`UsageError`\ s naming the keys. Call after
        ``distributed.initialize()``: it asks JAX for the devices."""
        sizes = self.mesh_config.resolved(len(self._devices(devices)))
        if training:
            b, rows = int(self.train.batch_size), sizes["data"] * sizes["fsdp"]
            if b % rows:
                raise UsageError(f"config.train.batch_size {b} is not divisible by the data-parallel size {rows} "
                                 f"(config.mesh data={sizes['data']} x fsdp={sizes['fsdp']}): use a multiple of {rows}")
            if b % jax.process_count():
                raise UsageError(f"config.train.batch_size {b} is not divisible by the {jax.process_count()} "
                                 f"processes: use a multiple of {jax.process_count()}")
        return sizes

    def mesh(self, devices=None, *, training: bool = False):
        """The (data, fsdp, tensor) mesh, validated first by :meth:`mesh_sizes`."""
        devices = self._devices(devices)
        return sharding.make_mesh(self.mesh_sizes(devices, training=training), devices)

    def build_model(self, mesh=None):
        """The model with its base weights: ``init.converted`` when set, else random (``seed``)."""
        return self.load_model(None, mesh)[0]

    def load_model(self, checkpoint: str | None, mesh=None):
        """``(model, description)``: the base weights, then ``checkpoint`` (converted dir or run)."""
        with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            model = build.build_model(self.model, mesh=mesh, seed=self.seed, random_init=self.init.random_init)
            try:
                what = checkpoints.load_weights(model, checkpoint, base=self.init.converted,
                                                trainable=self.trainable, seed=self.seed)
            except CheckpointMismatch as e:
                # One line; for a training workdir, the config keys that differ from the run's.
                run_config = Path(checkpoint or "") / "config.json"
                changed = [c for c in checkpoints.config_changes(run_config, self.config)
                           if c.startswith(("model.", "trainable"))]
                hint = f"; this config differs from {run_config} in: {', '.join(changed)}" if changed else ""
                raise CheckpointError(" ".join(str(e).split()) + hint) from None
        return model, what
