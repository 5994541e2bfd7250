"""IVCR-200K JSON reader: turn kinds, the two GT-video spellings, languages, validation messages."""
import copy
import json

import pytest

from ivcr_jax.data.schema import RecordError, load_dialogues, parse_record, video_number

CANDS = [f"ActivityNet/v_{i}.mp4" for i in range(10)]


def human(q, tid, zh=None):
    m = {"from": "human", "value": q, "text_id": tid}
    if zh is not None:
        m["Chinese_value"] = zh
    return m


def gpt(a, se=None, video=None, cands=None, zh=None, gt=None):
    m = {"from": "gpt", "value": a}
    if se is not None:
        m["gt_se"] = se
    if video is not None:
        m["video_id"] = video
    if gt is not None:
        m["gt"] = gt
    if cands is not None:
        m["candidate_videos"] = cands
    if zh is not None:
        m["Chinese_value"] = zh
    return m


def record(i=0, split="train", types=(1, 2)):
    return {
        "id": f"dlg{i}", "type": list(types), "split": split,
        "conversations": [
            human("A man is dancing.", f"t{i}a", "一个男人在跳舞。"),
            gpt("The intent is to find a video. Video 4 matches.", [-1, -1], CANDS[3], CANDS, "视频4符合。"),
            human("When does he jump?", f"t{i}b", "他什么时候跳？"),
            gpt("In video 4 at 1.5s-3.0s.", [1.5, 3.0], CANDS[3], zh="在视频4的1.5秒到3.0秒。"),
            human("Thanks!", f"t{i}c", "谢谢！"),
            gpt("You are welcome.", zh="不客气。"),
        ],
    }


def write(tmp_path, records, name="ivcr.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return p


def test_turn_kinds_targets_and_spans():
    d = parse_record(5, record())
    assert (d.index, d.id, d.split, d.types) == (5, "dlg0", "train", (1, 2))
    r, m, c = d.turns
    assert (r.kind, r.gt_se, r.target_index, r.video_id, r.candidate_videos) == (
        "retrieval", None, 4, CANDS[3], tuple(CANDS))
    assert (m.kind, m.gt_se, m.video_id, m.answer_video) == ("moment", (1.5, 3.0), CANDS[3], 4)
    assert (c.kind, c.video_id, c.candidate_videos, c.gt_se) == ("chat", None, (), None)
    assert [t.text_id for t in d.turns] == ["t0a", "t0b", "t0c"]
    assert [t.kind_code for t in d.turns] == [1, 2, 0]


def test_gt_of_the_paper_figure_is_accepted_and_figure8_parses():
    # Appendix C.1, Figure 8 (gt instead of video_id; no candidate lists in the figure).
    fig8 = {
        "id": "v_n9eNF1WqFu", "type": [1, 2, 4], "split": "train",
        "conversations": [
            human("Person in white clothes are dancing.", "247775f9", "穿白色衣服的人在跳舞。"),
            {"from": "gpt", "gt": ["s234d9"], "gt_se": [-1, -1], "video_source": "ActivityNet",
             "value": "The intent of this query is to find a complete video.",
             "Chinese_value": "这个查询的意图是找到一个完整的视频。"},
            human("Locate a video moment of the person spinning in circles.", "0c1dce9c", "定位视频中该人转圈的瞬间。"),
            {"from": "gpt", "gt": ["s234d9"], "gt_se": [1.3, 5.6], "video_source": "ActivityNet",
             "value": "The intent of this query is to further locate a spinning moment.",
             "Chinese_value": "这个查询的意图是进一步定位转圈的瞬间。"},
            human("Is there any similar moment?", "5553fa8a", "有没有类似的瞬间?"),
            {"from": "gpt", "gt": ["45866g"], "gt_se": [-1, -1], "video_source": "MSR-VTT",
             "value": "The 'similar' in the query may refer to videos of dancing in circles.",
             "Chinese_value": "查询中的类似可能指的是在圆圈中跳舞的视频。"},
        ],
    }
    d = parse_record(0, fig8, num_candidates=None)
    assert [t.kind for t in d.turns] == ["retrieval", "moment", "retrieval"]
    assert [t.video_id for t in d.turns] == ["s234d9", "s234d9", "45866g"]
    assert d.turns[1].gt_se == (1.3, 5.6) and d.turns[2].video_source == "MSR-VTT"
    assert d.turns[0].target_index is None  # no candidate list to find it in
    with pytest.raises(RecordError, match=r"record 0 .*conversations\[1\]\.candidate_videos.*needs 10"):
        parse_record(0, fig8)
    # video_id (released code) wins over gt when both are present
    rec = record()
    rec["conversations"][1]["gt"] = ["other"]
    assert parse_record(0, rec).turns[0].video_id == CANDS[3]


def test_chinese_switch_reads_chinese_value_and_requires_it():
    d = parse_record(0, record(), lang="zh")
    assert d.turns[0].question == "一个男人在跳舞。" and d.turns[1].answer == "在视频4的1.5秒到3.0秒。"
    # the "video N" of the English answer is still available for the moment prompt
    assert d.turns[1].answer_video == 4
    rec = record()
    del rec["conversations"][2]["Chinese_value"]
    with pytest.raises(RecordError) as e:
        parse_record(3, rec, lang="zh")
    assert e.value.index == 3 and e.value.field == "conversations[2].Chinese_value"
    assert "record 3 (id 'dlg0')" in str(e.value) and "Chinese_value" in str(e.value)
    assert parse_record(3, rec, lang="en").turns[1].question == "When does he jump?"


def _corrupt(fn):
    rec = record()
    fn(rec)
    return rec


BAD = [
    # (corruption, field named in the error, words of the problem)
    (lambda r: r.pop("type"), "type", "non-empty list"),
    (lambda r: r.update(type=["1"]), "type", "integers"),
    (lambda r: r.update(split=None), "split", "non-empty string"),
    (lambda r: r.update(conversations=[]), "conversations", "non-empty"),
    (lambda r: r["conversations"].pop(), "conversations", "human/gpt pairs"),
    (lambda r: r["conversations"][2].update({"from": "gpt"}), "conversations[2].from", "alternate"),
    (lambda r: r["conversations"][0].update(value="  "), "conversations[0].value", "non-empty"),
    (lambda r: r["conversations"][3].pop("value"), "conversations[3].value", "missing"),
    (lambda r: r["conversations"][2].pop("text_id"), "conversations[2].text_id", "missing"),
    (lambda r: r["conversations"][1].update(candidate_videos=CANDS[:9]), "conversations[1].candidate_videos",
     "needs 10"),
    (lambda r: r["conversations"][3].update(gt_se=[3.0, 1.5]), "conversations[3].gt_se", "start 3.0 > end 1.5"),
    (lambda r: r["conversations"][3].update(gt_se=[-2.0, 1.5]), "conversations[3].gt_se", "non-negative"),
    (lambda r: r["conversations"][3].update(gt_se=[1.0]), "conversations[3].gt_se", "[start, end]"),
    (lambda r: r["conversations"][3].pop("video_id"), "conversations[3].video_id", "without a ground-truth video"),
    (lambda r: r["conversations"][5].update(video_id="x.mp4"), "conversations[5].gt_se", "missing"),
    (lambda r: r["conversations"].__setitem__(4, "hello"), "conversations[4]", "object"),
]


@pytest.mark.parametrize("corrupt,field,words", BAD)
def test_malformed_record_names_index_and_field(corrupt, field, words):
    with pytest.raises(RecordError) as e:
        parse_record(7, _corrupt(corrupt))
    assert e.value.index == 7 and e.value.field == field
    assert str(e.value).startswith("record 7") and f"'{field}'" in str(e.value) and words in str(e.value)


def test_load_skips_and_counts_bad_records_or_raises_when_strict(tmp_path):
    recs = [record(0), _corrupt(BAD[10][0]), record(2, split="test"), record(3, types=(0,)),
            _corrupt(BAD[8][0]), _corrupt(BAD[11][0]), "not a record", record(7)]
    recs[3]["conversations"][1] = {"from": "gpt", "value": "chit-chat"}  # type [0]: not validated
    p = write(tmp_path, recs)
    ds, rep = load_dialogues(p)
    assert [d.index for d in ds] == [0, 2, 7]
    assert (rep.total, rep.loaded, rep.num_skipped, rep.excluded_type) == (8, 3, 4, 1)
    assert rep.skipped == {"conversations[].gt_se": 2, "conversations[].text_id": 1, "<record>": 1}
    s = rep.summary()
    assert "8 records, 3 loaded, 4 skipped" in s and "record 1 (id 'dlg0'): field 'conversations[3].gt_se'" in s
    # split filter: other-split records are counted, not validated
    ds, rep = load_dialogues(p, split="test")
    assert [d.index for d in ds] == [2] and rep.other_split == 6 and rep.num_skipped == 1  # "not a record"
    # keep type [0] when asked (its chat turn is valid)
    ds, _ = load_dialogues(p, exclude_types=())
    assert 3 in [d.index for d in ds]
    with pytest.raises(RecordError, match=r"record 1 \(id 'dlg0'\): field 'conversations\[3\]\.gt_se'.*ivcr\.json"):
        load_dialogues(p, strict=True)


def test_file_level_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_dialogues(p)
    p.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="bad.json: expected a JSON list"):
        load_dialogues(p)


def test_video_number_parser_matches_the_reference_regex():
    assert video_number("The intent ... Video 10 matches") == 10
    assert video_number("video 3 and video 5") == 3
    assert video_number("video 0 is not a candidate; video 11 neither") is None
    assert video_number("videos 4") is None
    rec = copy.deepcopy(record())
    rec["conversations"][3]["value"] = "The moment is at 1.5 - 3.0 seconds."
    assert parse_record(0, rec).turns[1].answer_video is None
