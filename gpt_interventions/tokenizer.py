"""The GPT-2 BPE (tiktoken), loaded from the files the project carries: offline gives the same tokens."""

import os

from gpt_interventions import ROOT

EOT = 50256  # GPT-2 <|endoftext|>, placed before every document
GPT2_VOCAB = EOT + 1  # the BPE's 50,000 merges + 256 bytes + <|endoftext|>
TIKTOKEN_CACHE = os.path.join(ROOT, "assets", "tiktoken_cache")
# tiktoken's gpt2 files under the names its cache gives them (sha1 of the URL): OpenAI's encoder.json
# (token -> id), which is Hugging Face GPT-2's vocab.json, and vocab.bpe (the merges, in rank order),
# which is its merges.txt
ENCODER_JSON = os.path.join(TIKTOKEN_CACHE, "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
VOCAB_BPE = os.path.join(TIKTOKEN_CACHE, "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")


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
