"""A small corpus of long clips in the reference's compressed form, for input-pipeline benchmarks.

    python -m ivcr_jax.data.bench_corpus --out DIR [--quick]

The demo corpus (``data/demo.py``) has 8-s clips with a key frame every second: decoding them says
nothing about the paper's videos. IVCR / TimeChat pre-compress every video with ffmpeg to the
shorter side 224, 3 fps, libx264 defaults (``crf 23``, ``preset medium``, 3 B-frames, a key frame
every 250 frames), and the clips are minutes long. This module writes, with the demo generator's
encoder (PyAV's libx264, ``demo.encode_mp4``), synthetic moving content in that form:

    videos/compressed/clip_XX.mp4   ``num_compressed`` clips, 1–3 min, 3 fps, 398x224, libx264 defaults
    videos/source/src_XX.mp4        a few at source resolution (640x360 @25 fps, 1280x720 @30 fps), defaults
    ivcr.json                       dialogues over the compressed clips (IVCR-200K schema)
    videos.json                     each video's size, fps, frame count, duration

Content: a scrolling, smoothly textured background (so P-frames carry real motion, not flat colour)
and a few moving coloured discs; one disc is the clip's "event" (its span is the moment ground truth).
The dialogue mix is the demo's templates over these clips, in the proportions
``DIALOGUE_MIX`` (moment, retrieval, retrieval+moment, retrieval+moment+similar, retrieval+analogous);
the samples are their prefixes (``samples.enumerate_samples``). With 10 clips both lists of a
two-retrieval dialogue hold the same 10 videos (a real corpus shows 20). Everything comes from one seed; not committed:
it is built on demand (a few tens of seconds) into a directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ivcr_jax.data.demo import DIALOGUES_JSON, VIDEO_DIR, VIDEOS_JSON, encode_mp4

COMPRESSED = "compressed"
SOURCE = "source"
# (types, dialogues per round): the demo corpus's templates that show videos, in counts whose prefix
# samples (samples.enumerate_samples) come close to the demo train split's sample mix
# (docs/architecture.md: 96 / 120 / 216 / 240 / 336 real frames in 31 / 35 / 21 / 8 / 4 %): here
# 7 / 9 / 4 / 2 / 1 of 23 samples per round (30 / 39 / 17 / 9 / 4 %), 149 real frames per sample.
DIALOGUE_MIX = (((2,), 7), ((1,), 3), ((1, 2), 3), ((1, 2, 4), 1), ((1, 6), 2))
# ffmpeg's libx264 defaults, spelled out (PyAV's add_stream would otherwise set a bit rate).
X264_DEFAULTS = {"crf": "23", "preset": "medium"}
# Source-resolution clips: (width, height, fps, seconds).
SOURCE_CLIPS = ((640, 360, 25, 30.0), (1280, 720, 30, 20.0))


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour texture ``uint8 [h, w, 3]``: low-frequency noise upsampled (cheap, compressible
    like natural backgrounds, unlike white noise)."""
    small = rng.integers(40, 216, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, small.shape[0] - 1.001, h)
    xs = np.linspace(0, small.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = small[y0][:, x0] * (1 - fx) + small[y0][:, x0 + 1] * fx
    b = small[y0 + 1][:, x0] * (1 - fx) + small[y0 + 1][:, x0 + 1] * fx
    t = a * (1 - fy) + b * fy
    fine = rng.integers(-25, 26, size=(h, w, 3)).astype(np.float32)  # detail: high frequencies that move with it
    return np.clip(t + fine, 0, 255).astype(np.uint8)


def render_clip(rng: np.random.Generator, width: int, height: int, num_frames: int, event: tuple[int, int]):
    """Frames (a generator of ``uint8 [height, width, 3]``): the background scrolls, three discs move;
    the third is visible only during ``event = (start_frame, end_frame)``."""
    pad = height // 2
    bg = _texture(rng, height + 2 * pad, width + 2 * pad)
    r = max(6, height // 10)
    y, x = np.mgrid[0:height, 0:width]
    noise = [rng.integers(-2, 3, size=(height, width, 1)).astype(np.int16) for _ in range(7)]
    discs = []
    for _ in range(3):
        discs.append((rng.uniform(r, width - r), rng.uniform(r, height - r), rng.uniform(-12, 12) * width / 224,
                      rng.uniform(-8, 8) * height / 224, rng.integers(0, 256, 3).astype(np.uint8)))
    for i in range(num_frames):
        # A camera pan of tens of pixels per frame at 3 fps, a third of a second apart, as real footage.
        ox, oy = (int(pad + (pad - 1) * np.sin(i / 5.0 + ph)) for ph in (0.0, 2.0))
        f = bg[oy:oy + height, ox:ox + width].copy()
        f = np.clip(f.astype(np.int16) + noise[i % len(noise)], 0, 255).astype(np.uint8)  # sensor noise
        for j, (cx, cy, vx, vy, col) in enumerate(discs):
            if j == 2 and not event[0] <= i < event[1]:
                continue
            px = (cx + vx * i) % (width - 2 * r) + r
            py = (cy + vy * i) % (height - 2 * r) + r
            f[(x - px) ** 2 + (y - py) ** 2 <= r * r] = col
        yield f


def _candidates(rng, ids, gt, n=10, gt_first=False):
    others = [v for v in ids if v != gt]
    others = [others[int(i)] for i in rng.permutation(len(others))][: n - 1]
    pos = 0 if gt_first else int(rng.integers(n))
    return others[:pos] + [gt] + others[pos:]


def _dialogues(rng: np.random.Generator, clips: list[dict], rounds: int) -> list[dict]:
    ids = [c["video_id"] for c in clips]
    tid = iter(range(10**6))

    def human(q):
        return {"from": "human", "value": q, "Chinese_value": q, "text_id": f"t{next(tid):06d}"}

    def gpt(c, span, cands, a):
        src, file = c["video_id"].split("/", 1)
        return {"from": "gpt", "gt": [file.rsplit(".", 1)[0]], "gt_se": span, "video_source": src,
                "video_id": c["video_id"], "candidate_videos": cands, "value": a, "Chinese_value": a}

    def retrieval(c):
        cands = _candidates(rng, ids, c["video_id"])
        k = cands.index(c["video_id"]) + 1
        return [human(f"Find the video where a disc crosses a {c['name']} texture."),
                gpt(c, [-1, -1], cands, f"The intent of this query is to find a complete video. Video {k} "
                                         f"matches the description.")], k

    def moment(c, k):
        s, e = c["event"]
        a = (f"The intent of this query is to further locate a moment in video {k or 1}. "
             f"The given query happens in {s:.1f} - {e:.1f} seconds.")
        return [human("When does the extra disc appear?"),
                gpt(c, [s, e], _candidates(rng, ids, c["video_id"], gt_first=True), a)]

    recs = []
    for r in range(rounds):
        for types, n in DIALOGUE_MIX:
            for _ in range(n):
                c = clips[int(rng.integers(len(clips)))]
                if types == (1,):
                    conv = retrieval(c)[0]
                elif types == (2,):
                    conv = moment(c, None)
                elif types in ((1, 2), (1, 2, 4)):
                    turns, k = retrieval(c)
                    conv = turns + moment(c, k)
                    if types == (1, 2, 4):  # a similar video after the moment
                        other = clips[(clips.index(c) + 1) % len(clips)]
                        conv += retrieval(other)[0]
                elif types == (1, 6):  # an analogous video right after the retrieval
                    other = clips[(clips.index(c) + 1) % len(clips)]
                    conv = retrieval(c)[0] + retrieval(other)[0]
                recs.append({"id": f"{c['name']}_{len(recs):05d}", "type": list(types), "split": "train",
                             "conversations": conv})
    return recs


def build_bench_corpus(out_dir, seed: int = 0, *, num_compressed: int = 10, durations=(60.0, 180.0),
                       fps: int = 3, short_side: int = 224, source_clips=SOURCE_CLIPS, rounds: int = 2,
                       log=print) -> Path:
    """Write the corpus under ``out_dir`` (see module doc) and return it. ``num_compressed >= 10``:
    the retrieval turns need 10 distinct candidates."""
    if num_compressed < 10:
        raise ValueError("num_compressed must be at least 10 (10 distinct candidates per retrieval turn)")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    width = int(round(short_side * 16 / 9 / 2)) * 2  # 16:9, even (yuv420p): 398 for 224
    clips, videos = [], []
    for i in range(num_compressed):
        dur = float(rng.uniform(*durations))
        n = int(round(dur * fps))
        s = int(rng.integers(n // 10, n // 2))
        e = s + int(rng.integers(max(fps * 4, n // 20), max(fps * 5, n // 5)))
        name = f"clip_{i:02d}"
        vid = f"{COMPRESSED}/{name}.mp4"
        encode_mp4(out / VIDEO_DIR / vid, render_clip(rng, width, short_side, n, (s, e)), fps, options=X264_DEFAULTS)
        c = {"video_id": vid, "name": name, "width": width, "height": short_side, "fps": fps, "num_frames": n,
             "duration": n / fps, "event": [round(s / fps, 1), round(e / fps, 1)]}
        clips.append(c)
        videos.append(c)
        log(f"  {vid}: {n} frames, {n / fps:.0f} s, {(out / VIDEO_DIR / vid).stat().st_size / 1e6:.2f} MB")
    for j, (w, h, f, dur) in enumerate(source_clips):
        n = int(round(dur * f))
        vid = f"{SOURCE}/src_{j:02d}_{h}p{f}.mp4"
        encode_mp4(out / VIDEO_DIR / vid, render_clip(rng, w, h, n, (n // 3, n // 2)), f, options=X264_DEFAULTS)
        videos.append({"video_id": vid, "name": f"src_{j:02d}", "width": w, "height": h, "fps": f, "num_frames": n,
                       "duration": n / f})
        log(f"  {vid}: {n} frames, {dur:.0f} s, {(out / VIDEO_DIR / vid).stat().st_size / 1e6:.2f} MB")
    recs = _dialogues(rng, clips, rounds)
    (out / DIALOGUES_JSON).write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")
    (out / VIDEOS_JSON).write_text(json.dumps(videos, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1-min clips and shorter source clips")
    a = p.parse_args(argv)
    kw = dict(durations=(60.0, 90.0), source_clips=((640, 360, 25, 12.0), (1280, 720, 30, 6.0))) if a.quick else {}
    root = build_bench_corpus(a.out, a.seed, **kw)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
