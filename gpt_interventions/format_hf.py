"""The Hugging Face GPT-2 format (transformers' GPT2LMHeadModel), mapped onto our GPT by name.

GPT-2 is our GPT with qkv_bias=True and (usually) tie_weights=True. Hugging Face stores the four
projections as Conv1D, whose weights are (in, out), transposed from nn.Linear. These functions
only map names, shapes and configs; gpt_interventions/formats.py reads and writes the files.
"""

import dataclasses

import torch

from gpt_interventions.errors import UsageError
from gpt_interventions.tokenizer import EOT
from model import GPTConfig

FILES = ("config.json", "model.safetensors")
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# causal-mask buffers that older GPT-2 files (the original OpenAI upload) carry; not weights
BUFFERS = (".attn.bias", ".attn.masked_bias")
# GPTConfig fields that, away from their defaults, make a model that neither GPT-2 nor the book's
# GPTModel computes: the exports refuse them rather than write a different function
NOT_GPT2 = {"n_expert": "a mixture of experts"}


def check_gpt2(config, fmt):
    """UsageError naming each field of `config` that the format `fmt` (GPT-2's architecture) cannot hold."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    differs = [f"{name}={getattr(config, name)} ({what})" for name, what in NOT_GPT2.items()
               if getattr(config, name) != defaults[name]]
    if differs:
        raise UsageError(f"{fmt} cannot hold this model: {'; '.join(differs)} is not GPT-2's architecture; "
                         "keep its checkpoint, which eval.py and sample.py read")


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

    GPT-2 always has a QKV bias: without one, ours is written as zeros, which computes the same.
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
    if not c.qkv_bias:
        for i in range(c.n_layer):
            state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * c.n_embd)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
              "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_weights,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
              "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout,
              "torch_dtype": "float32"}
    if c.vocab_size > EOT:  # GPT-2 BPE: <|endoftext|> begins and ends documents
        config.update(bos_token_id=EOT, eos_token_id=EOT)
    return config, state
