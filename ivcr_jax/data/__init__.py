"""IVCR-200K data: from the dialogue JSON to static-shape training and evaluation batches.

Read top to bottom:

* ``schema``   the released JSON (dialogue records), validated into ``Dialogue`` / ``Turn``.
* ``samples``  every dialogue prefix as a sample: the HEAD prompt, labels, ``<VIDEOTOKEN>`` expansion.
* ``frames``   decord frame sampling, timestamps and the timestamp texts.
* ``pipeline`` the Grain pipeline: decode, pad to buckets, batch, shard, resume.
* ``prepare``  a TFDS ``array_record`` copy of the decoded frames (prepare once, train many times).
* ``demo``     a small synthetic corpus in the same schema.

Submodules are imported on use; this package imports nothing heavy.
"""
