"""The first-stage retriever: X-Pool over cached frame features (reference-architecture.md §5).

* ``features``  frame/text feature extractors: BLIP-2 ITC features, a cheap stand-in;
* ``index``     per-frame features of a corpus, extracted once, stored in resumable shards;
* ``search``    exact sharded top-K + X-Pool re-ranking, ``Retriever``, ``write_candidates``;
* ``metrics``   X-Pool's R@k / MedR / MeanR;
* ``train``     X-Pool training (jit, optax, Orbax, Grain).

The models live in ``ivcr_jax.models`` (``xpool``: X-Pool's pooling, similarity, loss and its
export files; ``blip2_itc``: BLIP-2's ITC towers), their weights in ``ivcr_jax.convert``
(``blip2_retrieval``). See docs/retrieval.md.
"""
