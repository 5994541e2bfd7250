"""Evaluation: answer parsers, the paper's metrics, reports (reference-architecture §8.4–§8.5).

Scoring a predictions file needs no model: ``python -m ivcr_jax.eval --annotations FILE
--predictions PRED.jsonl --out DIR``. The model-driven mode lives in ``ivcr_jax.eval.run_model``.
"""
from ivcr_jax.eval.metrics import (
    PredictionsFormatError,
    bleu4,
    evaluate_predictions,
    iou,
    moment_recall,
    read_predictions,
    recall_at_1,
    recall_at_10,
)
from ivcr_jax.eval.parse import parse_intent, parse_moment, parse_video_index

__all__ = [
    "PredictionsFormatError",
    "bleu4",
    "evaluate_predictions",
    "iou",
    "moment_recall",
    "parse_intent",
    "parse_moment",
    "parse_video_index",
    "read_predictions",
    "recall_at_1",
    "recall_at_10",
]
