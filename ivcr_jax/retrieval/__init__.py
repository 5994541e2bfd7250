"""The first-stage retriever: X-Pool over cached frame features (reference-architecture.md §5).

* ``features``  frame/text feature extractors: BLIP-2 ITC features, a cheap stand-in;
* ``index``     per-frame features of a corpus, extracted once, stored in resumable shards;
* ``xpool``     X-Pool's text-conditioned pooling, similarity and InfoNCE loss;
* ``search``    exact sharded top-K + X-Pool re-ranking, ``Retriever``, ``write_candidates``;
* ``metrics``   X-Pool's R@k / MedR / MeanR;
* ``train``     X-Pool training (jit, optax, Orbax, Grain).

See docs/retrieval.md.
"""
