"""Evaluation with the paper's metrics (reference-architecture §8.4–§8.5).

``python -m ivcr_jax.eval`` scores a predictions file (``--predictions``, no model needed) or runs
a model over the test dialogues first (``--config`` + ``--checkpoint``: ``run_model.py``).
``metrics.py`` computes the tables, ``report.py`` writes them; the answer parsers and IoU they use
live in ``ivcr_jax.data.answers`` (training reads answers the same way).
"""
