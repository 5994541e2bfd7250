"""The browser app: ``python -m ivcr_jax.app --checkpoint W --corpus C`` (or ``--demo``).

A gradio page over the same :class:`~ivcr_jax.conversation.ChatSession` as the terminal chat
(``python -m ivcr_jax.chat``): the chat, the 10 candidates of a retrieval turn as thumbnails with the
chosen one highlighted and playing, the video of a moment turn with the span marked on its timeline
and playback starting there, each stage's latency under the answer, a reset button and an upload of
a clip of your own. ``__main__.py`` is the command line, ``ui.py`` builds the page.
"""
