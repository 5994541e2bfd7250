"""The page of the browser app: a gradio ``Blocks`` over one :class:`ChatSession` per browser session.

Each question goes to :meth:`ChatSession.ask` (the terminal chat's turn, ``ivcr_jax.conversation``);
the page shows what the turn record says:

* the answer in the chat, with the turn's video and moment, and under it the latency of each stage
  (``timings`` of the record: candidate retrieval, prefill, decode, and compilation when it happened);
* a retrieval turn: the candidates shown to the model as thumbnails (the middle frame), the chosen one
  framed, and the player playing it;
* a moment turn: the player on that video, starting at the moment (an HTML5 media fragment
  ``#t=start,end``), the span shaded on a timeline bar under it;
* an uploaded clip becomes the current video (as ``/open`` in the terminal chat).

Nothing a user types or uploads ends the session: an error is one line under the chat (and on
stderr), and the conversation goes on.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import html
import inspect
import io
import sys
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import gradio as gr
from PIL import Image

from ivcr_jax import cli
from ivcr_jax.conversation import ChatSession, CurrentVideo, describe_current
from ivcr_jax.data.frames import VIDEO_EXTS, VideoError, load_frames

ACCENT = "#f97316"
THUMB = 112   # thumbnail side, pixels


def one_line(e: BaseException) -> str:
    """An error as the one line the page shows: the message of the errors that name what is wrong
    (a bad question, file or command), the type too for anything else."""
    known = isinstance(e, (ValueError, VideoError, OSError))
    msg = str(e) if known and str(e) else f"{type(e).__name__}: {e}"
    return cli.printable(" ".join(msg.split()), newlines=False)


def file_url(path: str | Path) -> str:
    """gradio's route for a file it may serve (the corpus's video root is passed as ``allowed_paths``;
    uploads are in gradio's own cache). Relative, so the page works under a proxy's root path."""
    return "gradio_api/file=" + quote(str(path))


class Media:
    """Thumbnails (a JPEG data URI of the middle frame) and durations, decoded once per video (the
    ``size`` most recently shown are kept)."""

    def __init__(self, size: int = 1024):
        self._cache: collections.OrderedDict[str, tuple[str | None, float | None]] = collections.OrderedDict()
        self._lock, self.size = threading.Lock(), size

    def get(self, path: str | Path) -> tuple[str | None, float | None]:
        key = str(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            f = load_frames(key, 1, size=THUMB)
            buf = io.BytesIO()
            Image.fromarray(f.pixels[0]).save(buf, "JPEG", quality=85)
            out = ("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), float(f.duration))
        except VideoError:
            out = (None, None)
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return out


# ------------------------------------------------------------------------------ the HTML pieces ---

def _e(text: object) -> str:
    return html.escape(cli.printable(text, newlines=False))


def player_html(media: Media, video: CurrentVideo | None, moment=None, note: str = "") -> str:
    """The player: ``video`` (starting at ``moment`` when given), its timeline with the span shaded."""
    if video is None:
        return ('<div id="ivcr-player" class="ivcr-empty" style="padding:48px 12px;text-align:center;'
                'border:1px dashed #999;border-radius:8px;color:#777">No video yet: ask for one, '
                'or upload a clip of your own.</div>')
    _, duration = media.get(video.path)
    frag = f"#t={moment[0]:.2f},{moment[1]:.2f}" if moment else ""
    bar = ""
    if duration:
        span = ""
        if moment:
            lo = max(0.0, min(1.0, moment[0] / duration))
            hi = max(lo, min(1.0, moment[1] / duration))
            span = (f'<div class="ivcr-span" title="{moment[0]:.1f} - {moment[1]:.1f} s" style="position:absolute;'
                    f'left:{100 * lo:.2f}%;width:{max(100 * (hi - lo), 0.8):.2f}%;top:0;bottom:0;'
                    f'background:{ACCENT};border-radius:6px"></div>')
        label = f"moment {moment[0]:.1f} - {moment[1]:.1f} s" if moment else ""
        bar = (f'<div class="ivcr-timeline" style="position:relative;height:12px;background:#d4d4d8;'
               f'border-radius:6px;margin-top:6px">{span}</div>'
               f'<div style="display:flex;justify-content:space-between;font-size:12px;color:#555">'
               f'<span>0.0 s</span><b style="color:{ACCENT}">{label}</b><span>{duration:.1f} s</span></div>')
    loop = "" if moment else " loop"
    caption = f"{describe_current(video)}" + (f" · {note}" if note else "")
    return (f'<div id="ivcr-player" data-video-id="{_e(video.video_id)}">'
            f'<video id="ivcr-video" src="{file_url(video.path)}{frag}" controls autoplay muted playsinline{loop} '
            f'style="width:100%;max-height:340px;background:#000;border-radius:8px"></video>{bar}'
            f'<div style="font-size:13px;margin-top:4px">{_e(caption)}</div></div>')


def candidates_html(media: Media, session: ChatSession) -> str:
    """The last candidate list shown to the model as thumbnails, the current video framed."""
    if not session.shown:
        return '<div id="ivcr-candidates" class="ivcr-empty"></div>'
    cur = session.current
    cells = []
    for i, vid in enumerate(session.shown):
        chosen = cur is not None and cur.video_id == vid and cur.number == i + 1
        thumb, _ = media.get(session.corpus.path(vid))
        img = (f'<img src="{thumb}" alt="{_e(vid)}" style="width:100%;aspect-ratio:1;object-fit:cover;'
               f'border-radius:4px;display:block">' if thumb else
               '<div style="width:100%;aspect-ratio:1;background:#ccc;border-radius:4px"></div>')
        style = f"border:3px solid {ACCENT};box-shadow:0 0 8px {ACCENT}" if chosen else "border:3px solid transparent"
        badge = f'<b style="color:{ACCENT}">▶ </b>' if chosen else ""
        cells.append(f'<figure class="ivcr-candidate{" chosen" if chosen else ""}" data-video-id="{_e(vid)}" '
                     f'style="margin:0;min-width:0;padding:2px;border-radius:6px;{style}">{img}'
                     f'<figcaption style="font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis">'
                     f'{badge}{i + 1} · {_e(vid)}</figcaption></figure>')
    return ('<div style="font-size:13px;margin:8px 0 4px">Candidates shown to the model</div>'
            '<div id="ivcr-candidates" style="display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:6px">'
            + "".join(cells) + "</div>")


def latency_line(rec: dict, wall_s: float) -> str:
    t = rec["timings"]
    parts = [f"retrieval {t['retrieval']:.3f} s", f"prefill {t['prefill']:.3f} s", f"decode {t['decode']:.3f} s"]
    if t.get("compile"):
        parts.append(f"compile {t['compile']:.1f} s")
    n = len(rec.get("passes", ()))
    return " · ".join(parts) + f" · total {wall_s:.2f} s ({n} generation{'s' if n != 1 else ''})"


def answer_markdown(rec: dict, wall_s: float) -> str:
    """The assistant's chat message: the answer (escaped: the model's text is shown, never rendered),
    what the turn chose, and the latency of each stage under it."""
    lines = [html.escape(rec["answer"]) or "*(empty answer)*"]
    facts = [f"turn kind: {rec['kind']}"]
    if rec["video_id"] is not None:
        facts.append(f"video {rec['video_index']}: {html.escape(str(rec['video_id']))}")
    elif rec["kind"] == "retrieval":
        facts.append("no video chosen (no 'video N' in the answer)")
    if rec["kind"] == "moment":
        m = rec["moment"]
        facts.append(f"moment {m[0]:.1f} - {m[1]:.1f} s" if m else "no time span in the answer")
    lines.append("<sub>" + " · ".join(facts) + "</sub>")
    lines.append(f"<sub>latency: {latency_line(rec, wall_s)}</sub>")
    return "\n\n".join(lines)


_RECORD_KEYS = ("turn", "question", "kind", "answer", "intent", "candidates", "candidate_source",
                "candidates_shown", "video_index", "video_id", "video_path", "moment", "current_video", "timings")


def public_record(rec: dict) -> dict:
    """The turn record as the page's JSON shows it: no prompts; the current video's ``path`` is named
    ``video_path`` (a ``{"path": ...}`` object reads as a file to gradio's client)."""
    out = {k: rec.get(k) for k in _RECORD_KEYS if k in rec}
    cur = out.get("current_video")
    if isinstance(cur, dict):
        out["current_video"] = {("video_path" if k == "path" else k): v for k, v in cur.items()}
    return out


# ------------------------------------------------------------------------------ the page ---

@dataclasses.dataclass
class AppState:
    """One browser session: its conversation and the chat messages shown."""

    chat: ChatSession
    messages: list = dataclasses.field(default_factory=list)
    moment: tuple | None = None   # the span of the last moment turn, while its video is current

    def __deepcopy__(self, memo):   # gradio may copy a session's state value: never the model in it
        return self


def _chatbot(**kw):
    if "type" in inspect.signature(gr.Chatbot.__init__).parameters:   # gradio 5: opt in to messages
        kw["type"] = "messages"
    return gr.Chatbot(**kw)


def build_ui(make_session: Callable[[], ChatSession], *, info: str, start_video: str | None = None,
             log=None) -> gr.Blocks:
    """The page. ``make_session()`` makes the conversation of a new browser session (the model,
    corpus and generator shared); ``start_video``: every session starts with this clip open."""
    media = Media()
    lock = threading.Lock()   # one model: one generation at a time, whoever asks
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def new_state() -> AppState:
        s = AppState(make_session())
        if start_video:
            s.chat.open(start_video, chosen_by="--video")
        return s

    def views(s: AppState, status: str = "", record=None):
        cur = s.chat.current
        moment = s.moment if cur is not None else None
        return (s.messages, s, player_html(media, cur, moment), candidates_html(media, s.chat), status,
                record if record is not None else {})

    def fail(s: AppState, what: str, e: BaseException, path: str | None = None):
        line = one_line(e)
        if path:   # an upload: its name, not gradio's cache directory
            line = line.replace(str(Path(path).resolve()), Path(path).name).replace(str(path), Path(path).name)
        log(f"error: {what}: {line}")
        return f"**error:** {html.escape(line)}"

    def ask(question, s):
        s = s if isinstance(s, AppState) else new_state()
        q = (question or "").strip()
        if not q:
            return (*views(s, "**error:** type a question first"), question)
        s.messages = s.messages + [{"role": "user", "content": html.escape(q)}]
        t0 = time.perf_counter()
        try:
            with lock:
                rec = s.chat.ask(q)
        except Exception as e:  # noqa: BLE001 - a bad question (or a bad video) must not end the session
            status = fail(s, "question", e)
            s.messages = s.messages + [{"role": "assistant", "content": status}]
            return (*views(s, status), question)
        wall = time.perf_counter() - t0
        if rec["kind"] == "moment" and rec["moment"]:
            s.moment = tuple(rec["moment"])
        elif rec["video_id"] is not None or rec["kind"] == "retrieval":
            s.moment = None
        s.messages = s.messages + [{"role": "assistant", "content": answer_markdown(rec, wall)}]
        return (*views(s, "", public_record(rec)), "")

    def upload(file, s):
        s = s if isinstance(s, AppState) else new_state()
        path = getattr(file, "name", file)
        if not path:
            return views(s)
        try:
            cur = s.chat.open(path, chosen_by="/open")
        except Exception as e:  # noqa: BLE001 - not a video, undecodable: one line, the session goes on
            return views(s, fail(s, "upload", e, str(path)))
        s.moment = None
        s.messages = s.messages + [{"role": "assistant", "content": html.escape(
            f"(your clip {Path(cur.path).name} is now the current video: ask about it)")}]
        return views(s, "", public_record({"current_video": cur.record()}))

    def reset(s):
        s = s if isinstance(s, AppState) else new_state()
        s.chat.reset()
        s.messages, s.moment = [], None
        return views(s, "(history and current video cleared)")

    initial_player = player_html(media, None)
    if start_video:   # what every new session starts with
        p = str(Path(start_video).resolve())
        initial_player = player_html(media, CurrentVideo(p, p, 1, "--video", 0))

    with gr.Blocks(title="InterLLaVA · ivcr_jax", analytics_enabled=False) as page:
        gr.Markdown("## InterLLaVA: interactive video corpus retrieval\n" + html.escape(info))
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                chatbot = _chatbot(elem_id="ivcr-chat", label="Conversation", height=460)
                with gr.Row():
                    question = gr.Textbox(elem_id="ivcr-question", show_label=False, scale=5, lines=1,
                                          placeholder="Ask for a video, then: when does it happen in it?")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="ivcr-send")
                with gr.Row():
                    clear = gr.Button("Reset conversation", elem_id="ivcr-reset")
                    clip = gr.File(label="Ask about your own clip", file_types=list(VIDEO_EXTS),
                                   elem_id="ivcr-upload")
                status = gr.Markdown(elem_id="ivcr-status")
            with gr.Column(scale=6):
                player = gr.HTML(initial_player, elem_id="ivcr-player-box")
                candidates = gr.HTML(elem_id="ivcr-candidates-box")
                with gr.Accordion("Turn record", open=False):
                    record = gr.JSON(elem_id="ivcr-record")
        outs = [chatbot, state, player, candidates, status, record]
        send.click(ask, [question, state], outs + [question], api_name="ask")
        question.submit(ask, [question, state], outs + [question], api_name="ask_submit")
        clip.upload(upload, [clip, state], outs, api_name="upload")
        clear.click(reset, [state], outs, api_name="reset")
    return page
