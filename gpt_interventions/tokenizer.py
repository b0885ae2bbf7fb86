"""The GPT-2 BPE (tiktoken), loaded from the files the project carries: offline gives the same tokens."""

import os

from gpt_interventions import ROOT

EOT = 50256  # GPT-2 <|endoftext|>, placed before every document
TIKTOKEN_CACHE = os.path.join(ROOT, "assets", "tiktoken_cache")


def get_tokenizer():
    """GPT-2 BPE through tiktoken, loaded from the files the project ships.

    They are the exact files tiktoken downloads, named as its cache names them; tiktoken checks
    their sha256, so an online and an offline machine produce identical tokens.
    """
    import tiktoken
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_CACHE
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
