"""Inference prompts: a dialogue up to a turn's ``[/INST]`` with its decoded videos, as a batch.

The prompt is built exactly as a training sample (``samples.build_prompt``, reference-architecture
§8.3) and packed into the same batch layout (``pipeline.SampleLoader.pack`` and
``pipeline.Batcher``, ``data/batch.py``), so evaluation, the chat and the browser demo show the
model what training showed it. Used by ``ivcr_jax.eval.run_model`` and ``ivcr_jax.chat``.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

from ivcr_jax.data.frames import VideoError
from ivcr_jax.data.pipeline import (
    Batcher, PipelineConfig, RawVideos, SampleLoader, batch_layout, check_span, group_frames,
)
from ivcr_jax.data.samples import Sample, build_prompt, prefix_videos, turn_videos
from ivcr_jax.data.schema import MOMENT
from ivcr_jax.tokenizer import SPECIAL_TOKENS

__all__ = ["Prompt", "PromptLoader", "clean_answer", "video_slots"]


def clean_answer(text: str, tokenizer=None) -> str:
    """A generated answer made safe to put back into a prompt as history: the strings of special
    tokens (``<s>``, ``</s>``, ``<VIDEOTOKEN>``, ``<VID>`` ...) are removed, since the tokenizer would
    read them as the special ids and the prompt would no longer parse."""
    specials = set(SPECIAL_TOKENS) | {"<s>", "</s>", "<unk>"}
    if tokenizer is not None:
        specials |= {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
    for t in sorted(specials, key=len, reverse=True):
        text = text.replace(t, " ")
    return " ".join(text.split())


@dataclasses.dataclass
class Prompt:
    """An inference prompt with its decoded videos."""

    sample: Sample  # labels all -100
    frames: dict    # (path, num_frames) -> frames.Frames


def video_slots(n: int, cap: int | None) -> int:
    """Video slots for a group needing ``n``: 1, 2, then multiples of 10, clamped to the config cap."""
    c = max(int(n), 1)
    if c > 2:
        c = 10 * math.ceil(c / 10)
    return min(c, cap) if cap is not None and cap >= n else c


class PromptLoader:
    """Inference prompts with decoded frames, packed into the pipeline's batch layout.

    ``video_slots="bucketed"`` (default) pads each video group to 1, 2 or a multiple of 10 slots
    (clamped to the config's per-sample cap): a first-turn prompt does not encode the empty slots of
    a long history, at the price of a few more compiled shapes. ``"cap"`` always pads to the cap,
    as the training pipeline does: one shape per text bucket.

    Decoded videos are kept in a small LRU cache: later turns of a dialogue show the earlier turns'
    videos again. Frames are sampled uniformly (deterministic).
    """

    def __init__(self, pcfg: PipelineConfig, tokenizer, *, videos=None, cache_videos: int = 64,
                 video_slots: str = "bucketed"):
        if video_slots not in ("bucketed", "cap"):
            raise ValueError(f"video_slots must be 'bucketed' or 'cap', got {video_slots!r}")
        self.pcfg, self.tokenizer, self.video_slots = pcfg, tokenizer, video_slots
        self.features = None
        if videos is None and pcfg.vit_features:
            # Lazy: features.py reads the TFDS array_record cache (data/features.py).
            from ivcr_jax.data.features import VitFeatures

            videos = self.features = VitFeatures(pcfg.vit_features, size=pcfg.frame_size)
        self.videos = videos or RawVideos(pcfg.frame_size, pcfg.decoder_threads())
        self.caps = pcfg.sample.group_capacity()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = int(cache_videos)
        self._loaders: dict = {}

    def _frames(self, req):
        key = (req.path, req.num_frames)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        f = self.videos.load(req, "uniform", None)
        self._cache[key] = f
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return f

    def prompt(self, dialogue, turn_idx: int, sample_id: int = 0, *, truth=None) -> Prompt:
        """The prompt of turn ``turn_idx`` of ``dialogue`` (the dialogue as shown to the model).

        ``truth``: the dialogue as annotated, when ``dialogue`` shows other videos than the
        ground truth (``rollout.shown_dialogue``); the turn's ``gt_se`` is checked against its own
        ground-truth video's decoded duration (:func:`pipeline.check_span`), taken from ``truth``,
        else from ``dialogue``. Raises ``frames.VideoError`` (a video is missing or corrupt) or a
        ``samples.SampleError``: ``SampleTooLong``, ``SpanBeyondVideo``, or text holding the
        template's special strings.
        """
        decoded = {}
        reqs = prefix_videos(dialogue, turn_idx, self.pcfg.sample)
        for r in reqs:
            decoded[(r.path, r.num_frames)] = self._frames(r)
        self._check_span(truth if truth is not None else dialogue, turn_idx, decoded)
        timestamps = {r.turn: decoded[(r.path, r.num_frames)].timestamps for r in reqs if r.role == "moment"}
        s = build_prompt(dialogue, turn_idx, self.tokenizer, self.pcfg.sample, timestamps=timestamps,
                         sample_id=sample_id)
        return Prompt(s, decoded)

    def _check_span(self, truth, turn_idx: int, decoded) -> None:
        if truth.turns[turn_idx].kind != MOMENT or truth.turns[turn_idx].gt_se is None:
            return
        for r in turn_videos(truth, turn_idx, self.pcfg.sample):
            if r.role != "moment":
                continue
            f = decoded.get((r.path, r.num_frames))
            if f is None:  # another video was shown: decode the ground truth's for its length
                try:
                    f = self._frames(r)
                except VideoError:  # cannot tell; the span is scored as annotated
                    return
            check_span(truth, turn_idx, f.duration, r.video_id)

    def capacity(self, prompts: Sequence[Prompt]) -> dict[str, int]:
        groups = sorted(group_frames(self.pcfg.sample))
        need: collections.Counter = collections.Counter()
        for p in prompts:
            for g, n in p.sample.group_counts().items():
                need[g] = max(need[g], n)
        caps = self.caps
        if self.video_slots == "cap" and all(caps.get(g) is not None for g in groups):
            return {g: max(int(caps[g]), 1) for g in groups}
        return {g: video_slots(need[g], caps.get(g)) for g in groups}

    def batch(self, prompts: Sequence[Prompt], batch_size: int | None = None) -> dict[str, Any]:
        """Numpy batch of ``batch_size`` rows (default ``len(prompts)``; extra rows are padding)."""
        B = len(prompts) if batch_size is None else int(batch_size)
        if not 0 < len(prompts) <= B:
            raise ValueError(f"{len(prompts)} prompts for a batch of {B}")
        cap = self.capacity(prompts)
        key = tuple(sorted(cap.items()))
        if key not in self._loaders:
            layout = batch_layout(self.pcfg, cap)
            if self.features is not None:   # the pool holds the cached ViT features, not frames
                layout = dataclasses.replace(layout, vit_features=self.features.feature_spec)
            self._loaders[key] = SampleLoader(self.pcfg, self.tokenizer, layout, train=False, seed=0,
                                              videos=self.videos)
        loader = self._loaders[key]
        rows = [loader.pack(p.sample, p.frames) for p in prompts]
        return Batcher(loader.layout, self.pcfg.buckets, B)(rows)
