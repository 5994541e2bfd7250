"""Samples as the reference builds them: prefixes, the HEAD prompt, labels, <VIDEOTOKEN> expansion."""
import numpy as np
import pytest

from ivcr_jax.data.samples import (
    IGNORE, SampleConfig, SampleTooLong, build_prompt, build_sample, enumerate_samples, moment_number, render,
)
from ivcr_jax.data.schema import parse_record

CANDS = [f"src/v{i}.mp4" for i in range(1, 11)]
TS8 = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]


def dialogue(n_retrieval_moment=1, extra=(), index=0, moment_answer="Found in video 3 at 1.0s-2.5s.", types=(1, 2)):
    conv = []
    for j in range(n_retrieval_moment):
        conv += [
            {"from": "human", "value": f"A man dances {j}.", "Chinese_value": f"一个男人在跳舞{j}。", "text_id": f"r{j}"},
            {"from": "gpt", "value": f"The intent is retrieval. video 3 matches {j}.", "Chinese_value": f"视频3符合{j}。",
             "gt_se": [-1, -1], "video_id": CANDS[2], "candidate_videos": CANDS},
            {"from": "human", "value": f"When does he jump {j}?", "Chinese_value": f"他什么时候跳{j}？", "text_id": f"m{j}"},
            {"from": "gpt", "value": moment_answer, "Chinese_value": "在1.0到2.5秒。", "gt_se": [1.0, 2.5],
             "video_id": CANDS[2]},
        ]
    conv += list(extra)
    return {"id": f"d{index}", "type": list(types), "split": "train", "conversations": conv}


CFG = SampleConfig(retrieval_frames=4, moment_frames=8)
TS = {1: TS8, 3: TS8, 5: TS8}


def test_prompt_text_is_exact_for_a_two_turn_dialogue(tokenizer):
    d = parse_record(0, dialogue())
    s = build_sample(d, 1, tokenizer, CFG, timestamps=TS)
    cands = ",".join(f"<VID> {i} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>" for i in range(1, 11))
    expected = (
        "<s>[INST] <<SYS>>\nYou are an excellent video retrieval AI assistant.\n<</SYS>>\n\n"
        f"Candidate videos : {cands}.A man dances 0. [/INST] The intent is retrieval. video 3 matches 0. </s>"
        "<s>[INST] Current video : <VID> 3 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains 8 frames "
        "sampled at 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5 seconds.When does he jump 0? [/INST] "
        "Found in video 3 at 1.0s-2.5s. </s>"
    )
    assert s.text == expected
    # the earlier reading's double dot is an option, and the frame-time sentence can be dropped
    s1 = build_sample(d, 1, tokenizer, SampleConfig(retrieval_frames=4, moment_frames=8, double_dot=True),
                      timestamps=TS)
    assert "3.5 seconds..When does he jump 0?" in s1.text
    s2 = build_sample(d, 1, tokenizer, SampleConfig(retrieval_frames=4, moment_frames=8, frame_message=False))
    assert "<VIDEO> <VIDEOTOKEN> </VIDEO>.When does he jump 0? [/INST]" in s2.text
    # without timestamps the moment turn cannot be written
    with pytest.raises(ValueError, match="turn 1.*timestamps"):
        build_sample(d, 1, tokenizer, CFG)


def test_ids_are_the_one_call_tokenisation_of_the_template_with_video_tokens_expanded(tokenizer):
    d = parse_record(0, dialogue())
    s = build_sample(d, 1, tokenizer, CFG, timestamps=TS)
    vt = tokenizer.convert_tokens_to_ids("<VIDEOTOKEN>")
    ref = tokenizer(s.text, add_special_tokens=False)["input_ids"]  # what apply_chat_template tokenises
    assert ref[0] == 1 and ref.count(1) == 2 and ref.count(2) == 2 and ref[-1] == 2
    collapsed = [t for i, t in enumerate(s.input_ids.tolist()) if t != vt or i in s.video_starts]
    assert collapsed == ref
    # expansion: 10 candidates of 4 frames and one moment video of 8 frames -> 32 tokens each
    assert s.n_tok == {"f4": 32, "f8": 32}
    assert int((s.input_ids == vt).sum()) == 11 * 32
    for start in s.video_starts:
        assert (s.input_ids[start:start + 32] == vt).all() and (s.labels[start:start + 32] == IGNORE).all()
    assert s.input_ids.dtype == np.int32 and s.labels.dtype == np.int32


def test_only_the_last_answer_is_supervised(tokenizer):
    d = parse_record(0, dialogue())
    s = build_sample(d, 1, tokenizer, CFG, timestamps=TS)
    sup = np.nonzero(s.labels != IGNORE)[0]
    assert (np.diff(sup) == 1).all() and sup[-1] == s.length - 1  # one contiguous span at the end
    assert (s.labels[sup] == s.input_ids[sup]).all() and s.labels[-1] == 2  # </s> is supervised
    text = tokenizer.decode(s.labels[sup].tolist(), skip_special_tokens=True).strip()
    assert text == "Found in video 3 at 1.0s-2.5s."
    # everything up to and including the last [/INST] is masked
    prompt = build_prompt(d, 1, tokenizer, CFG, timestamps=TS)
    assert prompt.text.endswith("When does he jump 0? [/INST]")
    assert sup[0] == prompt.length and (s.input_ids[:prompt.length] == prompt.input_ids).all()
    assert (prompt.labels == IGNORE).all()
    # first-turn sample: its own answer is supervised
    s0 = build_sample(d, 0, tokenizer, CFG, timestamps=TS)
    sup0 = s0.labels[s0.labels != IGNORE].tolist()
    assert tokenizer.decode(sup0, skip_special_tokens=True).strip() == "The intent is retrieval. video 3 matches 0."


def test_video_token_index_follows_sorted_groups(tokenizer):
    d = parse_record(0, dialogue(2))
    s = build_sample(d, 3, tokenizer, CFG, timestamps=TS)  # r0 (10), m0 (1), r1 (10), m1 (1)
    assert [v.group for v in s.videos] == ["f4"] * 10 + ["f8"] + ["f4"] * 10 + ["f8"]
    assert s.video_slots() == list(range(10)) + [0] + list(range(10, 20)) + [1]
    idx = s.video_token_index()
    assert ((idx >= 0) == (s.input_ids == tokenizer.convert_tokens_to_ids("<VIDEOTOKEN>"))).all()
    # the sample's video-token sequence: f4 block (20 videos x 32) then f8 block (2 x 32)
    assert sorted(idx[idx >= 0].tolist()) == list(range(22 * 32))
    st = s.video_starts
    assert idx[st[10]] == 20 * 32 and idx[st[11]] == 10 * 32 and idx[st[21] + 31] == 22 * 32 - 1
    # padded layout of a batch: f4 block of 25 slots, f8 block of 3
    pidx = s.video_token_index({"f4": 25, "f8": 3})
    assert pidx[st[10]] == 25 * 32 and pidx[st[21]] == 25 * 32 + 32 and pidx[st[1]] == 32
    assert (pidx[idx < 0] == -1).all()
    with pytest.raises(ValueError, match="capacity"):
        s.video_token_index({"f4": 19, "f8": 3})


@pytest.mark.parametrize("frames,n_tok", [(12, 32), (96, 96), (64, 64), (4, 32), (33, 64)])
def test_tokens_per_video(frames, n_tok):
    assert SampleConfig().n_tok(frames) == n_tok


def test_paper_and_head_frame_settings(tokenizer):
    d = parse_record(0, dialogue())
    paper, head = SampleConfig.paper(frame_message=False), SampleConfig.head(frame_message=False)
    s = build_sample(d, 1, tokenizer, paper)
    assert s.group_counts() == {"f12": 10, "f96": 1} and s.n_tok == {"f12": 32, "f96": 96}
    assert s.length - len(tokenizer(s.text, add_special_tokens=False)["input_ids"]) == 10 * 31 + 95
    h = build_sample(d, 1, tokenizer, head)
    assert h.group_counts() == {"f64": 11} and h.n_tok == {"f64": 64}
    assert head.group_capacity() == {"f64": None}
    assert SampleConfig.head(max_retrieval_videos=10, max_moment_videos=2).group_capacity() == {"f64": 12}


def test_every_prefix_is_a_sample_up_to_the_limits():
    ds = [parse_record(0, dialogue(4)), parse_record(1, dialogue(1))]  # 8 and 2 turns
    refs = enumerate_samples(ds, SampleConfig(max_turns=10, max_sample_turns=None))
    assert [(r.dialogue.index, r.turn_idx) for r in refs] == [(0, t) for t in range(8)] + [(1, 0), (1, 1)]
    assert [r.sample_id for r in refs] == list(range(10)) and refs[3].key == "d0:3"
    # the reference keeps prefixes of at most 7 turns ...
    assert len(enumerate_samples(ds, SampleConfig())) == 7 + 2
    # ... and cuts dialogues to max_turns
    assert len(enumerate_samples(ds, SampleConfig(max_turns=3, max_sample_turns=None))) == 3 + 2
    # "truncate": long prefixes keep their last max_sample_turns turns instead of being dropped
    cfg = SampleConfig(retrieval_frames=4, moment_frames=8, max_sample_turns=3, long_prefix="truncate")
    refs = enumerate_samples(ds, cfg)
    assert len(refs) == 8 + 2


def test_truncate_policy_keeps_the_last_turns(tokenizer):
    cfg = SampleConfig(retrieval_frames=4, moment_frames=8, max_sample_turns=3, long_prefix="truncate")
    s = build_sample(parse_record(0, dialogue(4)), 7, tokenizer, cfg, timestamps={5: TS8, 7: TS8})
    assert s.first_turn == 5 and s.dropped_turns == 0 and s.group_counts() == {"f4": 10, "f8": 2}
    assert "When does he jump 2?" in s.text and "A man dances 2." not in s.text


def test_over_long_history_is_dropped_oldest_first_and_counted(tokenizer):
    d = parse_record(0, dialogue(3))
    full = build_sample(d, 5, tokenizer, CFG, timestamps=TS)
    assert full.dropped_turns == 0 and full.first_turn == 0
    one = build_sample(d, 5, tokenizer,
                       SampleConfig(retrieval_frames=4, moment_frames=8, max_len=full.length - 1), timestamps=TS)
    assert one.dropped_turns == 1 and one.first_turn == 1 and one.length <= full.length - 1
    assert one.text.startswith("<s>[INST] <<SYS>>\nYou are an excellent video retrieval AI assistant.\n<</SYS>>\n\n"
                               "Current video : <VID> 3 </VID>")
    # the supervised answer is intact
    sup = one.labels[one.labels != IGNORE].tolist()
    assert tokenizer.decode(sup, skip_special_tokens=True).strip() == "Found in video 3 at 1.0s-2.5s."
    # a budget only the last turn fits
    only = build_sample(d, 5, tokenizer, SampleConfig(retrieval_frames=4, moment_frames=8, max_len=200),
                        timestamps=TS)
    assert only.dropped_turns == 5 and only.first_turn == 5 and only.length <= 200
    with pytest.raises(SampleTooLong, match="dialogue 0 .*turn 5.*tokens > max_len 50"):
        build_sample(d, 5, tokenizer, SampleConfig(retrieval_frames=4, moment_frames=8, max_len=50), timestamps=TS)
    # video caps work the same way: at most 10 candidates and 2 moment videos -> turns 3..5 stay
    capped = SampleConfig(retrieval_frames=4, moment_frames=8, max_retrieval_videos=10, max_moment_videos=2)
    s = build_sample(d, 5, tokenizer, capped, timestamps=TS)
    assert s.first_turn == 3 and s.dropped_turns == 3 and s.group_counts() == {"f4": 10, "f8": 2}
    with pytest.raises(SampleTooLong, match="10 videos in f4 > cap 5"):
        build_sample(d, 4, tokenizer, SampleConfig(retrieval_frames=4, moment_frames=8, max_retrieval_videos=5),
                     timestamps=TS)


def test_chinese_switch_uses_chinese_text_with_the_same_template(tokenizer):
    d = parse_record(0, dialogue(), lang="zh")
    s = build_sample(d, 1, tokenizer, CFG, timestamps=TS)
    assert "</VIDEO>.一个男人在跳舞0。 [/INST] 视频3符合0。 </s>" in s.text
    assert "Current video : <VID> 3 </VID>" in s.text and "seconds.他什么时候跳0？ [/INST] 在1.0到2.5秒。 </s>" in s.text
    sup = s.labels[s.labels != IGNORE].tolist()
    assert tokenizer.decode(sup, skip_special_tokens=True).strip() == "在1.0到2.5秒。"


def test_moment_number_fallbacks(tokenizer):
    no_video = "The moment is at 1.0s-2.5s."
    d = parse_record(0, dialogue(moment_answer=no_video))
    assert moment_number(d, 1) == 3  # the previous retrieval turn's target (CANDS[2])
    moment_first = dialogue(moment_answer=no_video)
    moment_first["conversations"] = moment_first["conversations"][2:]
    assert moment_number(parse_record(0, moment_first), 0) == 1
    s = build_sample(parse_record(0, moment_first), 0, tokenizer, CFG, timestamps={0: TS8})
    assert "Current video : <VID> 1 </VID>" in s.text and s.kind == "moment" and s.gt_span == (1.0, 2.5)


def test_chat_turn_and_sample_metadata(tokenizer):
    chat = [{"from": "human", "value": "Thanks!", "text_id": "c0"}, {"from": "gpt", "value": "You are welcome."}]
    d = parse_record(0, dialogue(extra=chat))
    s = build_sample(d, 2, tokenizer, CFG, timestamps=TS)
    assert s.text.endswith("<s>[INST] Thanks! [/INST] You are welcome. </s>")
    assert (s.kind, s.target_index, s.gt_span, s.text_id) == ("chat", None, None, "c0")
    r = build_sample(d, 0, tokenizer, CFG)
    assert (r.kind, r.target_index, r.gt_span, r.text_id) == ("retrieval", 3, None, "r0")


def test_special_token_text_in_a_question_is_rejected(tokenizer):
    bad = dialogue()
    bad["conversations"][0]["value"] = "Show me <VIDEOTOKEN> please"
    with pytest.raises(ValueError, match="dialogue 0 .*<VIDEOTOKEN>"):
        build_sample(parse_record(0, bad), 0, tokenizer, CFG)
    bad["conversations"][0]["value"] = "a </s> b"
    with pytest.raises(ValueError, match="</s>"):
        build_sample(parse_record(0, bad), 0, tokenizer, CFG)


def test_render_matches_the_llama2_chat_template():
    assert render("SYS", ["u1", " u2 "], ["a1 ", None]) == (
        "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]")
    assert render("", ["u"], ["a"]) == "<s>[INST] u [/INST] a </s>"
