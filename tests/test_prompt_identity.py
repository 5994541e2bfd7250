"""Prompt identity: our samples against an independent transcription of the reference's rules.

The reference (ivcr200k.github.io HEAD) builds a test sample in four places, transcribed below
without using ``ivcr_jax.data.samples``:

* ``convert_dataset.ipynb`` cell 2: every dialogue prefix of <= 10 turns (split "test", type != [0]),
  questions and answers ``.strip()``-ed; cell 3: the answer's first ``video N``; cell 4: the
  messages (system, ``Candidate videos : …`` / ``Current video : <VID> k </VID> …`` + question);
  cell 5: the videos of each prefix (the 10 candidates, or the moment turn's ``video_id``).
* ``ivcr/datasets/datasets/video_instruct_dataset.py``: ``__init__`` keeps prefixes of <= 15
  messages; ``__getitem__`` / ``get_eval_data`` insert ``load_video``'s message into each moment
  turn as ``part1 + "</VIDEO>. " + msg.strip() + part2``, render with the tokenizer's chat template
  (Llama-2-chat), tokenise with ``add_special_tokens=False``; ``get_label`` masks everything up to
  and including the last ``[/INST]`` and inserts ``n_tok - 1`` extra −100 per video.
* ``ivcr/processors/video_processor.py`` ``load_video``: ``"The video contains N frames sampled at
  t1, …, tN seconds"`` (no final period), ``str(round(idx / fps, 1))``, ``sampling="uniform"``.
* ``ivcr/models/ivcr.py`` ``IVCR.forward``: each ``<VIDEOTOKEN>`` is replaced by that video's
  ``32 * ceil(frames / 32)`` query tokens, in order.

Cell 1 (the test split's first-turn filter) is not a sample-building rule; the corpus below passes it.
"""
import argparse
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from ivcr_jax import cli
from ivcr_jax.data.frames import frame_timestamps, sample_indices
from ivcr_jax.data.samples import SampleConfig, build_prompt, build_sample, enumerate_samples
from ivcr_jax.data.schema import load_dialogues, parse_record
from ivcr_jax.experiment import Experiment

# --------------------------------------------------------------------------- the corpus
SOURCES = ("TVQA/friends_s01e0{}_seg02_clip_1{}.mp4", "LSMDC/1004_Juno_00.3{}.1{}.000.mp4",
           "activitynet/v_x{}Kq{}zT.mp4", "DiDeMo/8{}@N0{}_2734.mp4", "msrvtt/video70{}{}.mp4")
POOL = [SOURCES[i % 5].format(i % 7, i % 10) for i in range(40)]
# (frames, fps) of every video; the first two are the literal fixtures' moment videos
META = {v: (450 + 61 * i, (29.97, 25.0, 30.0, 23.976)[i % 4]) for i, v in enumerate(POOL)}
META[POOL[2]] = (300, 25.0)
META[POOL[30]] = (250, 25.0)


def cands(start, first=None):
    c = POOL[start:start + 10]
    return [first] + [v for v in c if v != first][:9] if first else c


def human(q, tid):
    return {"from": "human", "value": q, "Chinese_value": "问题", "text_id": tid}


def retrieval(a, c, k):
    return {"from": "gpt", "value": a, "Chinese_value": "答案", "gt_se": [-1, -1], "video_id": c[k - 1],
            "candidate_videos": c}


def moment(a, video, se, c=None):
    g = {"from": "gpt", "value": a, "Chinese_value": "答案", "gt_se": list(se), "video_id": video}
    return {**g, "candidate_videos": c} if c else g


C1, C2, C3, C4, C5 = cands(0), cands(10), cands(30, first=POOL[30]), cands(20), cands(5)
RECORDS = [
    {"id": "r-m-r-m", "split": "test", "type": [3], "conversations": [  # retrieval → moment → retrieval → moment
        human("A man in a grey suit hands a letter to the woman at the front desk.", "t1"),
        retrieval("The intent of this query is video retrieval. The most relevant video is video 3.", C1, 3),
        human("When does the woman open the letter?", "t2"),
        moment("The intent of this query is to further locate a moment in video 3. The query happens in "
               "video 3 at 12.5s-20.0s.", C1[2], (12.5, 20.0)),
        human("  Find the video where a dog chases a frisbee across a park.  ", "t3"),
        retrieval("The intent is video retrieval. video 7 matches the query best. ", C2, 7),
        human("At what time does the dog catch it?", "t4"),
        moment("The query happens in video 7 at 3.4s-8.1s.", C2[6], (3.4, 8.1))]},
    {"id": "m-r-m", "split": "test", "type": [2], "conversations": [  # moment first
        human("In the video of the chef, when does he flip the pancake?", "t5"),
        moment("The intent is temporal video grounding. The query happens in video 1 at 41.0s-47.5s.",
               C3[0], (41.0, 47.5), C3),
        human("Now show me a video of a girl playing the violin on a stage.", "t6"),
        retrieval("The intent is video retrieval. The most relevant video is video 10.", C4, 10),
        human("When does she take a bow?", "t7"),
        moment("The query happens in video 10 at 95.2s-101.0s.", C4[9], (95.2, 101.0))]},
    {"id": "r-r-m", "split": "test", "type": [5], "conversations": [  # retrieval → retrieval → moment
        human("Two men are arguing in a parked car at night.", "t8"),
        retrieval("The intent is video retrieval. The most relevant video is video 5.", C5, 5),
        human("Not that one, find the one where they are in a bright diner instead.", "t9"),
        retrieval("The intent is video retrieval. The most relevant video is video 2.", C1, 2),
        human("When does the waitress pour the coffee?", "t10"),
        moment("The intent is temporal video grounding. The query happens in video 2 at 0.0s-6.3s.",
               C1[1], (0.0, 6.3))]},
    {"id": "long", "split": "test", "type": [4], "conversations": [  # 8 turns: the 8-turn prefix is dropped
        m for j in range(4) for m in (
            human(f"Find the clip where the crowd cheers for goal number {j}.", f"l{2 * j}"),
            retrieval(f"The intent is video retrieval. The most relevant video is video {j + 4}.", cands(j), j + 4),
            human(f"When is goal {j} scored?", f"l{2 * j + 1}"),
            moment(f"The query happens in video {j + 4} at {j}.5s-{j + 9}.0s.", cands(j)[j + 3], (j + 0.5, j + 9.0)))]},
    {"id": "chat", "split": "test", "type": [0], "conversations": [  # chit-chat: excluded
        {"from": "human", "value": "Hello!", "text_id": "c0"}, {"from": "gpt", "value": "Hi, how can I help?"}]},
    {"id": "train", "split": "train", "type": [3], "conversations": [  # another split: excluded
        human("A cat sleeps on a sofa.", "x0"), retrieval("The most relevant video is video 1.", C2, 1)]},
]

# --------------------------------------------------------------------------- the reference's rules
# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template" (the test tokenizer has none)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def ref_video_number(text):  # cell 3
    m = re.search(r"(?i)\bvideo\s+(10|[0-9])\b", text)
    return int(m.group(1)) if m else None


def ref_prefixes(records):  # cell 2, then the dataset's <= 15 messages / <= 7 videos filter
    out = []
    for rec in records:
        if rec.get("split") == "test" and rec["type"] != [0]:
            sub = []
            for conv in rec["conversations"]:
                if conv["from"] == "human":
                    cur = {"user": conv["value"].strip()}
                else:
                    cur.update(assistance=conv["value"].strip(), video_id=conv.get("video_id"), gt_se=conv.get("gt_se"))
                    if conv.get("candidate_videos"):
                        cur["candidate_videos"] = conv["candidate_videos"]
                    sub.append(cur)
                    if len(sub) <= 10:
                        out.append(list(sub))
    return [p for p in out if 1 + 2 * len(p) <= 15 and len(p) <= 7]


def ref_messages(prefix):  # cell 4
    msgs = [{"role": "system", "content": "You are an excellent video retrieval AI assistant."}]
    for sub in prefix:
        q, a = sub["user"].strip(), sub["assistance"].strip()
        if sub["gt_se"] == [-1, -1]:
            head = "Candidate videos : "
            for i in range(10):
                head += f"<VID> {i + 1} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>" + ("," if i < 9 else ".")
        else:
            head = "Current video : <VID> {VID1} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>.".format(VID1=ref_video_number(a))
        msgs += [{"role": "user", "content": (head + q).strip()}, {"role": "assistant", "content": a}]
    return msgs


def ref_video_list(prefix):  # cell 5
    return [s["candidate_videos"] if s["gt_se"] == [-1, -1] else s["video_id"] for s in prefix]


def ref_load_video(video, n_frms):  # load_video(sampling="uniform", return_msg=True): (frames, msg)
    vlen, fps = META[video]
    n = min(n_frms, vlen)
    idx = np.arange(0, vlen, vlen / n).astype(int).tolist()
    sec = ", ".join(str(round(f / fps, 1)) for f in idx)
    return len(idx), f"The video contains {len(idx)} frames sampled at {sec} seconds"


def ref_item(prefix, tokenizer, n_frm, train=True):
    """(text, expanded ids, labels, videos) as __getitem__ (train) / get_eval_data (prompt) build them."""
    sample, videos = ref_messages(prefix), ref_video_list(prefix)
    assert len(sample) - 1 == 2 * len(videos)
    n_frms, flat = [], []
    for idx, v in enumerate(videos):
        if isinstance(v, list):
            n_frms += [ref_load_video(c, n_frm["retrieval"])[0] for c in v]
            flat += v
        else:
            n, msg = ref_load_video(v, n_frm["moment"])
            n_frms.append(n)
            flat.append(v)
            part1, part2 = sample[2 * idx + 1]["content"].split("</VIDEO>")
            sample[2 * idx + 1]["content"] = part1 + "</VIDEO>. " + msg.strip() + part2
    cur_token_len = [32 * math.ceil(n / 32) for n in n_frms]  # num_video_query_token 32, stride 32
    text = tokenizer.apply_chat_template(sample if train else sample[:-1], chat_template=LLAMA2_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=not train)
    ids = list(tokenizer([text], add_special_tokens=False).input_ids[0])
    labels = None
    if train:  # get_label
        inst = tokenizer.encode("[/INST]", add_special_tokens=False)
        last = -1
        for i in range(len(ids) - len(inst) + 1):
            if ids[i:i + len(inst)] == inst:
                last = i + len(inst) - 1
        labels = [-100] * (last + 1) + [-100] * sum(n - 1 for n in cur_token_len) + ids[last + 1:]
    vt = tokenizer.convert_tokens_to_ids("<VIDEOTOKEN>")
    lens = iter(cur_token_len)
    expanded = [x for t in ids for x in ([t] * next(lens) if t == vt else [t])]  # IVCR.forward's splice
    assert next(lens, None) is None
    return text, expanded, labels, flat


# --------------------------------------------------------------------------- ours
def our_timestamps(dialogue, turn_idx, moment_frames):
    out = {}
    for t in range(turn_idx + 1):
        if dialogue.turns[t].kind == "moment":
            vlen, fps = META[dialogue.turns[t].video_id]
            out[t] = frame_timestamps(sample_indices(vlen, min(moment_frames, vlen), "timechat"), fps)
    return out


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    path = tmp_path_factory.mktemp("ivcr") / "ivcr.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    ds, report = load_dialogues(path, split="test")
    assert report.num_skipped == 0
    return ds


@pytest.mark.parametrize("cfg", [SampleConfig(), SampleConfig.head()], ids=["default", "head64"])
def test_samples_equal_the_reference_rules(dialogues, tokenizer, cfg):
    refs = enumerate_samples(dialogues, cfg)
    prefixes = ref_prefixes(RECORDS)
    assert [(r.dialogue.id, r.turn_idx) for r in refs] == [
        (d, t) for d, n in (("r-m-r-m", 4), ("m-r-m", 3), ("r-r-m", 3), ("long", 7)) for t in range(n)]
    assert len(prefixes) == len(refs) == 17
    n_frm = {"retrieval": cfg.retrieval_frames, "moment": cfg.moment_frames}
    kinds, long_ones = [], []
    for ref, prefix in zip(refs, prefixes):
        d, t = ref.dialogue, ref.turn_idx
        kinds.append("".join(x.kind[0] for x in d.turns[:t + 1]))
        ts = our_timestamps(d, t, cfg.moment_frames)
        for train in (True, False):
            text, ids, labels, videos = ref_item(prefix, tokenizer, n_frm, train=train)
            build = build_sample if train else build_prompt
            s = build(d, t, tokenizer, cfg, timestamps=ts)
            where = f"{d.id} turn {t} ({'train' if train else 'prompt'})"
            if len(ids) > cfg.max_len:  # the reference never truncates (§8.2); ours drops the oldest turns
                long_ones.append(where)
                assert s.dropped_turns > 0 and s.length <= cfg.max_len, where
                s = build(d, t, tokenizer, dataclasses.replace(cfg, max_len=len(ids)), timestamps=ts)
            assert s.text == text, where
            assert s.input_ids.tolist() == ids, where
            assert s.labels.tolist() == (labels if train else [-100] * len(ids)), where
            assert [v.video_id for v in s.videos] == videos, where
            assert s.dropped_turns == 0
    assert {"rm", "rrm", "mrm", "rmrm"} <= set(kinds)  # a moment turn after a retrieval turn, and more
    assert len(long_ones) < len(refs)  # most samples fit max_len as they are


# --------------------------------------------------------------------------- literal fixtures
CANDIDATES_TEXT = (
    "Candidate videos : <VID> 1 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 2 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,"
    "<VID> 3 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 4 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,"
    "<VID> 5 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 6 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,"
    "<VID> 7 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 8 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,"
    "<VID> 9 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 10 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>."
)
SYS = "<s>[INST] <<SYS>>\nYou are an excellent video retrieval AI assistant.\n<</SYS>>\n\n"
LITERALS = {
    # (dialogue, turn, train?): the whole rendered text, 4 frames per moment video
    ("r-m-r-m", 1, True): (
        SYS + CANDIDATES_TEXT + "A man in a grey suit hands a letter to the woman at the front desk. [/INST] "
        "The intent of this query is video retrieval. The most relevant video is video 3. </s>"
        "<s>[INST] Current video : <VID> 3 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains 4 frames "
        "sampled at 0.0, 3.0, 6.0, 9.0 seconds.When does the woman open the letter? [/INST] The intent of this "
        "query is to further locate a moment in video 3. The query happens in video 3 at 12.5s-20.0s. </s>"),
    ("m-r-m", 0, True): (
        SYS + "Current video : <VID> 1 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains 4 frames sampled "
        "at 0.0, 2.5, 5.0, 7.5 seconds.In the video of the chef, when does he flip the pancake? [/INST] "
        "The intent is temporal video grounding. The query happens in video 1 at 41.0s-47.5s. </s>"),
    ("r-r-m", 1, False): (
        SYS + CANDIDATES_TEXT + "Two men are arguing in a parked car at night. [/INST] The intent is video "
        "retrieval. The most relevant video is video 5. </s><s>[INST] " + CANDIDATES_TEXT
        + "Not that one, find the one where they are in a bright diner instead. [/INST]"),
}


@pytest.mark.parametrize("key", list(LITERALS), ids=["-".join(map(str, k)) for k in LITERALS])
def test_literal_fixtures(dialogues, tokenizer, key):
    did, t, train = key
    d = next(x for x in dialogues if x.id == did)
    ts = our_timestamps(d, t, 4)
    s = (build_sample if train else build_prompt)(d, t, tokenizer, SampleConfig(), timestamps=ts)
    prefix = next(p for p in ref_prefixes(RECORDS) if p[0]["user"] == d.turns[0].question and len(p) == t + 1)
    assert s.text == LITERALS[key]
    assert ref_item(prefix, tokenizer, {"retrieval": 12, "moment": 4}, train=train)[0] == LITERALS[key]
    if train:  # supervised: exactly the last answer and </s>
        sup = s.labels[s.labels != -100].tolist()
        assert sup == tokenizer(LITERALS[key], add_special_tokens=False).input_ids[-len(sup):] and sup[-1] == 2
        assert tokenizer.decode(sup, skip_special_tokens=True).strip() == d.turns[t].answer.strip()


# --------------------------------------------------------------------------- double_dot
MOMENT_FIRST = next(r for r in RECORDS if r["id"] == "m-r-m")
Q = "In the video of the chef, when does he flip the pancake? [/INST]"


def test_double_dot_is_an_option_and_off_by_default(tokenizer):
    d = parse_record(0, MOMENT_FIRST)
    ts = {0: [0.0, 2.5, 5.0, 7.5]}
    assert SampleConfig().double_dot is False
    default = build_prompt(d, 0, tokenizer, SampleConfig(), timestamps=ts).text
    assert default.endswith("7.5 seconds." + Q) and "seconds.." not in default
    dd = build_prompt(d, 0, tokenizer, SampleConfig(double_dot=True), timestamps=ts).text
    assert dd.endswith("7.5 seconds.." + Q)
    assert dd.replace("seconds..", "seconds.") == default


@pytest.mark.parametrize("spec", ["configs/demo.py", "configs/paper.py:tiny"])
@pytest.mark.parametrize("flag,dots", [(None, "seconds." + Q), ("true", "seconds.." + Q), ("false", "seconds." + Q)])
def test_double_dot_is_reachable_from_the_command_line(tokenizer, spec, flag, dots):
    argv = ["--config", spec] + ([f"--config.data.double_dot={flag}"] if flag else [])
    config, _ = cli.parse(argv, argparse.ArgumentParser())
    exp = Experiment.resolve(config)
    assert exp.data.double_dot is (flag == "true")
    scfg = exp.pipeline(1).sample
    assert scfg.double_dot is (flag == "true") and scfg.frame_message
    text = build_prompt(parse_record(0, MOMENT_FIRST), 0, tokenizer, scfg, timestamps={0: [0.0, 2.5]}).text
    assert text.endswith("2.5 " + dots)


def test_frame_message_is_reachable_from_the_command_line(tokenizer):
    argv = ["--config", "configs/demo.py", "--config.data.frame_message=false"]
    config, _ = cli.parse(argv, argparse.ArgumentParser())
    scfg = Experiment.resolve(config).pipeline(1).sample
    assert scfg.frame_message is False
    text = build_prompt(parse_record(0, MOMENT_FIRST), 0, tokenizer, scfg).text
    assert text.endswith("<VIDEO> <VIDEOTOKEN> </VIDEO>." + Q)
