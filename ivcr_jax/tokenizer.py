"""The LLaMA tokenizer with InterLLaVA's special tokens, through ``transformers``.

The reference adds five tokens to LLaMA-2's 32000-piece vocabulary (reference-architecture §7,
§8.7): ``<VID> </VID> <VIDEO> </VIDEO> <VIDEOTOKEN>`` with ids 32000..32004. ``<VIDEOTOKEN>``
marks where a video's token block is spliced into the LLM input.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ("<VID>", "</VID>", "<VIDEO>", "</VIDEO>", "<VIDEOTOKEN>")
VIDEO_TOKEN = "<VIDEOTOKEN>"
BOS_ID = 1
EOS_ID = 2   # generation stops here (reference-architecture §3)
PAD_ID = 2   # the reference pads with eos: text, timestamp sentences and generated tails


def load_tokenizer(path: str | os.PathLike, add_special: bool = True):
    """Load a LLaMA tokenizer from a ``tokenizer.model`` file or an HF tokenizer directory.

    Adds the five IVCR special tokens (in the reference's order) and sets pad = eos (id 2), as
    the IVCR code does. Raises ``FileNotFoundError`` naming the path when nothing is there.
    """
    # transformers warns "PyTorch was not found" on import when torch is absent; only its tokenizers
    # are used here, so that advice is noise (an explicit TRANSFORMERS_NO_ADVISORY_WARNINGS wins).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(path)
    if path.is_file():
        # transformers reads a sentencepiece model only as ``tokenizer.model`` inside a
        # directory (passing ``vocab_file=`` silently yields an empty vocabulary).
        tmp = Path(tempfile.mkdtemp(prefix="ivcr_tok_"))
        shutil.copyfile(path, tmp / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True, add_eos_token=False)
    elif path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path))
        elif (path / "tokenizer.model").is_file():
            tok = LlamaTokenizer.from_pretrained(str(path), add_bos_token=True, add_eos_token=False)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.model / tokenizer.json in this directory")
    else:
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    if add_special:
        missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bundled_test_tokenizer() -> Path:
    """A real LLaMA-format sentencepiece model shipped by the ``mistral-common`` package.

    Same format as LLaMA-2's ``tokenizer.model`` (32000 BPE pieces, byte fallback, bos/eos 1/2),
    different vocabulary. Used by the demo and the tests when ``config.data.tokenizer`` is empty
    (mistral-common is a runtime dependency).
    """
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("config.data.tokenizer is empty and the bundled tokenizer's package, "
                                "mistral-common, is not installed (pip install mistral-common)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer.model.v1 missing from mistral-common")
    return p


def digit_ids(tok) -> tuple[int, ...]:
    """Token ids of the ten digits as they appear inside numbers (LLaMA splits numbers into digits)."""
    return tuple(int(tok.convert_tokens_to_ids([d])[0]) for d in "0123456789")
