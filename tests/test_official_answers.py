"""The released scorer's parsers (metrics/eval.py), on its docstring examples and constructed cases."""
import pytest

from ivcr_jax.data import answers
from ivcr_jax.data.official_answers import OfficialScorerError, gt_spans, iou, moment, video_index


def test_gt_spans_on_the_reference_docstring_examples():
    assert gt_spans("Query content found in video 1 at 5s-10s.") == [5.0, 10.0]
    assert gt_spans("Content at 1.5s-3.2s and 10s-15.5s") == [1.5, 3.2, 10.0, 15.5]


@pytest.mark.parametrize("text, want", [
    ("The given query happens in 2.0 - 4.5 seconds.", []),      # the demo's GT format: no "s-"
    ("at 5s - 10s", []),                                        # spaces are not allowed
    ("at 5 s-10 s", []),
    ("12.5s-20s", [12.5, 20.0]),
])
def test_gt_spans_needs_the_compact_format(text, want):
    assert gt_spans(text) == want


@pytest.mark.parametrize("text, want", [
    ("Video 10 matches the description.", 10),
    ("The intent ... video 3 matches, not video 5.", 3),
    ("video 0", 0),                    # [0-9]: 0 is an index for the released scorer
    ("videos 3", None),
    ("video 11", None),                # \b after the digits: "11" is neither 10 nor one digit
    ("the 3rd video", None),
    ("VIDEO   7.", 7),
])
def test_video_index(text, want):
    assert video_index(text) == want


@pytest.mark.parametrize("text, want", [
    ("The given query happens in 2.0 - 4.5 seconds.", (2.0, 4.5)),
    ("It happens in 4.5s - 2s.", (2.0, 4.5)),                   # ordered
    ("A specific example is : 20.8 - 30.0 seconds. It is 5 - 9 seconds.", (5.0, 9.0)),  # example removed
    ("From 12...5 - 20 seconds", (12.5, 20.0)),                  # runs of dots collapse first
    ("1-2 and 3-4", (1.0, 2.0)),                                 # the first span only
    # No "a - b": the first number of each sentence; "." does not end a sentence.
    ("It starts at 3 seconds!It ends at 7 seconds", (3.0, 7.0)),
    ("It starts at 3.5 and ends at 7 seconds.", (0.0, 0.0)),     # one sentence: one number, no pair
    ("Starts at 9\nends at 2.5 or so\nand 4", (2.5, 9.0)),      # 9, 2.5 paired (ordered), 4 dropped
    ("no numbers here", (0.0, 0.0)),
    ("It is at 00:01:05 and 00:01:20.", (0.0, 0.0)),             # clock times: never a span
    ("3 - 3 seconds", (3.0, 3.0)),
])
def test_moment(text, want):
    assert moment(text) == pytest.approx(want)


def test_moment_differs_from_the_lenient_parser_where_documented():
    # Ours reads both numbers of a single sentence ("from 3.5 to 7"); the released scorer does not.
    text = "It starts at 3.5 and ends at 7 seconds."
    assert answers.parse_moment(text) == pytest.approx((3.5, 7.0))
    assert moment(text) == (0.0, 0.0)


def test_iou_as_the_released_function():
    assert iou([2.0, 6.0], (4.0, 8.0)) == pytest.approx(2 / 6)
    assert iou([2.0, 6.0], (7.0, 8.0)) == 0
    assert iou([2.0, 6.0, 10.0, 12.0], (10.0, 12.0)) == 0       # only the first GT span counts
    assert iou([2.0, 6.0], ()) == 0
    with pytest.raises(OfficialScorerError, match="no '<a>s-<b>s' span"):
        iou([], (1.0, 2.0))
    with pytest.raises(OfficialScorerError, match="zero-length union"):
        iou([3.0, 3.0], (3.0, 3.0))
