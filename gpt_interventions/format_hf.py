"""The Hugging Face GPT-2 format (transformers' GPT2LMHeadModel), mapped onto our GPT by name.

GPT-2 is our GPT with qkv_bias=True and (usually) tie_weights=True. Hugging Face stores the four
projections as Conv1D, whose weights are (in, out), transposed from nn.Linear. These functions
only map names, shapes and configs; gpt_interventions/formats.py reads and writes the files.
"""

import dataclasses
import json

import torch

from gpt_interventions.errors import UsageError
from gpt_interventions.tokenizer import ENCODER_JSON, EOT, GPT2_VOCAB, VOCAB_BPE
from model import GPTConfig

FILES = ("config.json", "model.safetensors")
EOT_TEXT = "<|endoftext|>"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# causal-mask buffers that older GPT-2 files (the original OpenAI upload) carry; not weights
BUFFERS = (".attn.bias", ".attn.masked_bias")
# GPTConfig switches that change the function in a way GPT-2's architecture (and so the book's, which
# is GPT-2's) cannot express, with what each is. bias=False is not here: zero biases hold it.
NOT_GPT2 = {"position": "rotary positions", "norm": "RMSNorm", "qk_norm": "QK-norm", "mlp": "another MLP",
            "logit_softcap": "soft-capped logits", "n_expert": "a mixture of experts",
            "parametrization": "muP's scaled logits and attention"}


def check_gpt2(config, fmt):
    """UsageError naming each field of `config` that the format `fmt` (GPT-2's architecture) cannot hold."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    differs = [f"{name}={getattr(config, name)} ({what})" for name, what in NOT_GPT2.items()
               if getattr(config, name) != defaults[name]]
    if differs:
        raise UsageError(f"{fmt} cannot hold this model: {'; '.join(differs)} is not GPT-2's architecture; "
                         "evaluate and sample from its checkpoint, which eval.py and sample.py read")


def absent_biases(model):
    """{name: zeros} of the Linear and LayerNorm biases the model was built without (qkv_bias=False,
    bias=False): GPT-2's layout has them all, and a zero bias computes what no bias does."""
    zeros = {}
    for name, module in model.named_modules():
        if module is model.lm_head or getattr(module, "bias", True) is not None:
            continue
        size = module.out_features if isinstance(module, torch.nn.Linear) else module.weight.numel()
        zeros[f"{name}.bias"] = torch.zeros(size)
    return zeros


def config_from_hf(cfg, where):
    """Our GPTConfig for a Hugging Face GPT-2 config.json; UsageError if it is another model."""
    if cfg.get("model_type") != "gpt2":
        raise UsageError(f"{where} is a {cfg.get('model_type')!r} model; only GPT-2 maps onto ours")
    try:
        n_embd = cfg["n_embd"]
        config = GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=n_embd,
                           block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], dropout=0.0,
                           qkv_bias=True, tie_weights=cfg.get("tie_word_embeddings", True))
    except KeyError as e:
        raise UsageError(f"{where} lacks {e.args[0]}") from None
    # variants our GPT does not compute: refuse them rather than score a different function
    differs = {"activation_function": cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
               "layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5) != 1e-5,
               "n_inner": cfg.get("n_inner") not in (None, 4 * n_embd),
               "scale_attn_weights": not cfg.get("scale_attn_weights", True),
               "scale_attn_by_inverse_layer_idx": cfg.get("scale_attn_by_inverse_layer_idx", False)}
    if any(differs.values()):
        raise UsageError(f"{where}: our GPT does not implement this GPT-2 variant "
                         f"({', '.join(k for k, v in differs.items() if v)})")
    return config


def state_from_hf(tensors, config):
    """Our state dict from a Hugging Face GPT-2 file's tensors."""
    state = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")  # save_pretrained writes it; the OpenAI upload does not
        if name.endswith(BUFFERS):
            continue
        if name != "lm_head.weight":
            name = "transformer." + name
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).float().contiguous()
    if config.tie_weights and "transformer.wte.weight" in state:  # a tied file stores the head once, as wte
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def to_hf(model):
    """(config.json, tensors) of `model` as a Hugging Face GPT-2 that GPT2LMHeadModel loads.

    GPT-2 always has its biases: those ours lacks are written as zeros, which compute the same.
    UsageError for a model GPT-2 cannot compute (check_gpt2).
    """
    c = model.config
    check_gpt2(c, "the Hugging Face GPT-2 format")
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_weights:
            continue  # stored once, as wte; tie_word_embeddings says to share it
        tensor = tensor.t() if name.endswith(CONV1D) else tensor
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: c.vocab_size]  # pad_vocab's unused rows are not part of the model
        state[name] = tensor.detach().float().cpu().contiguous()
    state.update(absent_biases(model))
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
              "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_weights,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
              "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout,
              "torch_dtype": "float32"}
    if c.vocab_size > EOT:  # GPT-2 BPE: <|endoftext|> begins and ends documents
        config.update(bos_token_id=EOT, eos_token_id=EOT)
    return config, state


def generation_config(c):
    """generation_config.json: stop at <|endoftext|> as GPT-2 does, and never past the context
    (transformers' generate has no sliding window: a position >= n_positions has no embedding)."""
    config = {"max_length": c.block_size}
    if c.vocab_size > EOT:
        # GPT-2 has no padding token; padding with <|endoftext|> (masked out) is the usual choice
        config.update(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)
    return config


def has_gpt2_tokenizer(c):
    """Whether the GPT-2 BPE is this model's tokenizer: only a model with exactly its vocabulary
    (pad_vocab's rows are not written) is taken to be trained on GPT-2 tokens."""
    return c.vocab_size == GPT2_VOCAB


def tokenizer_files(c):
    """{file name: bytes} of the GPT-2 BPE as a Hugging Face tokenizer, from the tiktoken files
    the project carries: vocab.json and merges.txt (the slow tokenizer's files, copied), tokenizer.json
    (the same vocabulary and merges for the `tokenizers` library, which fast tokenizers and other
    runtimes read) and tokenizer_config.json. Decoding keeps spaces as they are, as tiktoken does."""
    with open(ENCODER_JSON, "rb") as f:
        vocab_json = f.read()
    with open(VOCAB_BPE, "rb") as f:
        merges_txt = f.read()
    vocab = json.loads(vocab_json)
    # line 1 is "#version: 0.2"; every merge is two byte-level symbols, which never hold a space
    merges = [line for line in merges_txt.decode().split("\n")[1:] if line]
    assert len(vocab) == GPT2_VOCAB and vocab[EOT_TEXT] == EOT and len(merges) == EOT - 256
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": EOT, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},  # GPT-2's split regex, then bytes as symbols
        "post_processor": {"type": "ByteLevel", **byte_level},  # adds no tokens
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    return {"vocab.json": vocab_json, "merges.txt": merges_txt,
            "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
