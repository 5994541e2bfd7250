"""Answer parsers on the answer strings of the paper, its appendix and the reference code (§8.4)."""
import pytest

from ivcr_jax.data.answers import parse_intent, parse_moment, parse_video_index

# Appendix H (Figures 22–25), InterLLaVA outputs, verbatim openings.
APPENDIX_RETRIEVAL = [
    ("The intent is video retrieval. The given query happens in 2th video. The retrieval question matches "
     "the retrieved video because it describes the scene in the image.", 2),
    ("The intent is video retrieval. The given query happens in 4th video. The retrieval question matches "
     "the retrieved video because it describes the scene in the image.", 4),
    ("The intent is video retrieval. The given query happens in 10th video. The retrieved video is a scene "
     "from a TV show or movie that matches the retrieval question.", 10),
]
APPENDIX_MOMENT = [
    ('"The intent is temporal video grounding. The given query happens 0.0 - 3.84 seconds. The retrieval '
     'question matches the retrieved video because it describes the scene of people engaging in a winter sport.',
     (0.0, 3.84)),
    ("The intent is temporal video grounding. The given query happen in 11.62 - 116.98 seconds. The "
     "retrieval question matches the retrieved video because it describes the scene of people surfing.",
     (11.62, 116.98)),
    ("The intent is temporal video grounding. The given query happens 43.44 - 49.3 seconds. The retrieval "
     "question matches the retrieved video because it captures a specific moment in the scene.", (43.44, 49.3)),
]
# TimeChat's answers in the same figures (no intent sentence).
TIMECHAT_MOMENT = [
    ("The given query happens in the 0.0 - 21.6 seconds.", (0.0, 21.6)),
    ("The given query happens in 0.0 - 20.8 seconds.", (0.0, 20.8)),
    ("The given query happens in 0.0 - 5.9 seconds.", (0.0, 5.9)),
]
# Figure 8, dataset JSON ground-truth answers (English and Chinese).
DATASET_INTENTS = [
    ("The intent of this query is to find a complete video.", "retrieval"),
    ("The intent of this query is to further locate a spinning moment.", "moment"),
    ("这个查询的意图是找到一个完整的视频。", "retrieval"),
    ("这个查询的意图是进一步定位转圈的瞬间。", "moment"),
]


@pytest.mark.parametrize("answer,index", APPENDIX_RETRIEVAL)
def test_appendix_retrieval_answers(answer, index):
    assert parse_video_index(answer) == index
    assert parse_intent(answer) == "retrieval"


@pytest.mark.parametrize("answer,span", APPENDIX_MOMENT + TIMECHAT_MOMENT)
def test_appendix_moment_answers(answer, span):
    assert parse_moment(answer) == pytest.approx(span)
    assert parse_intent(answer) == "moment"
    assert parse_video_index(answer) is None


@pytest.mark.parametrize("answer,intent", DATASET_INTENTS)
def test_dataset_intent_sentences(answer, intent):
    assert parse_intent(answer) == intent


def test_paper_template_intents():
    # Paper §4.2 instruction templates.
    assert parse_intent("The intent is video retrieval. The given query happens in <VID> 3 </VID> video.") == "retrieval"
    assert parse_video_index("The intent is video retrieval. The given query happens in <VID> 3 </VID> video.") == 3
    assert parse_intent("The intent is temporal video grounding. The given query happens in 3 - 9 seconds.") == "moment"
    # Older format: "video moment" wording, "video moment retrieval" must not read as retrieval.
    assert parse_intent("This is a video moment retrieval query. It happens in 3 - 9 seconds.") == "moment"


def test_reference_regex_cases():
    assert parse_video_index("Video 3.") == 3
    assert parse_video_index("The answer is video 10.") == 10  # never 1
    assert parse_video_index("video 1 matches the query") == 1
    assert parse_video_index("VIDEO  7 matches") == 7
    assert parse_video_index("video 11") is None  # not a candidate index
    assert parse_video_index("video 0") is None
    assert parse_video_index("videos 3") is None
    assert parse_video_index("The video shows a dog.") is None
    # The first mention wins, whatever its form.
    assert parse_video_index("The 3rd video, not video 5, matches.") == 3
    assert parse_video_index("video 5 matches better than the 3rd video") == 5
    assert parse_video_index("") is None
    assert parse_video_index(None) is None


def test_chinese_video_index():
    assert parse_video_index("答案是视频 7。") == 7
    assert parse_video_index("答案是视频10") == 10
    assert parse_video_index("查询发生在第3个视频中。") == 3
    assert parse_video_index("第十个视频") == 10
    assert parse_video_index("第三个视频") == 3


def test_moment_formats():
    # HEAD GT form and the reference docstring example
    assert parse_moment("Query content found in video 1 at 5s-10s.") == (5.0, 10.0)
    assert parse_moment("from 5s to 10s") == (5.0, 10.0)
    assert parse_moment("It happens between 2.5 to 7.25 seconds") == (2.5, 7.25)
    assert parse_moment("happens in 12.5–20 seconds") == (12.5, 20.0)
    assert parse_moment("发生在 1.5 - 3 秒") == (1.5, 3.0)
    # swapped
    assert parse_moment("happens in 30 - 20 seconds") == (20.0, 30.0)
    # clock ranges and clock times (not "18 - 00")
    assert parse_moment("00:18 - 00:23") == (18.0, 23.0)
    assert parse_moment("The event starts at 00:00:18 and ends at 00:00:23.") == (18.0, 23.0)
    assert parse_moment("from 1:05.5 to 1:10") == (65.5, 70.0)
    # TimeChat fallbacks
    assert parse_moment("Starting time: 0.8 seconds\nEnding time: 1.1 seconds") == (0.8, 1.1)
    assert parse_moment("The start time for this event is 0 seconds, and the end time is 12 seconds.") == (0.0, 12.0)
    # a video index or an ordinal is not a time
    assert parse_moment("In video 3 the event starts at 4 and ends at 9.") == (4.0, 9.0)
    assert parse_moment("video 3-5") is None
    # the echoed TimeChat prompt example is ignored
    assert parse_moment("A specific example is : 20.8 - 30.0 seconds. It happens in 1 - 2 seconds") == (1.0, 2.0)


@pytest.mark.parametrize("answer", ["", None, "I am not sure.", "The intent is video retrieval. video 3.",
                                    "It starts at 5."])
def test_unparseable_moment_is_none(answer):
    assert parse_moment(answer) is None


def test_intent_fallbacks_and_chat():
    assert parse_intent("The intent of this query is to chat.") == "chat"
    assert parse_intent("The intent of this query does not need retrieval; it is a greeting.") == "chat"
    assert parse_intent("Query content found in video 1 at 5s-10s.") == "moment"  # span with unit
    assert parse_intent("video 4 matches the query.") == "retrieval"
    assert parse_intent("The 'similar' in the query may refer to videos of dancing in circles.") is None
    assert parse_intent("I am not sure which one.") is None
    assert parse_intent(None) is None
