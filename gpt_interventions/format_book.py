"""The book's model format: Raschka's GPTModel, which the story's code trained, mapped onto our GPT.

Two layouts hold it:
  (a) a directory with model.json (the story's model config: vocab_size, context_length, emb_dim,
      n_heads, n_layers, drop_rate, qkv_bias, optional tie_weights) and model.safetensors in the
      book's parameter names;
  (b) the story's Hugging Face repos: config.json with model_type "gpjtgpt2" and that config under
      "cfg", and the same weights prefixed "model." (its wrapper holds the GPTModel as .model).
The book's parameter names, per block N, with ours:
  tok_emb, pos_emb                        transformer.wte, transformer.wpe
  trf_blocks.N.att.W_query|W_key|W_value  rows 0:C, C:2C, 2:3C of transformer.h.N.attn.c_attn
  trf_blocks.N.att.out_proj               transformer.h.N.attn.c_proj
  trf_blocks.N.ff.layers.0, .2            transformer.h.N.mlp.c_fc, c_proj
  trf_blocks.N.norm1|norm2.scale|shift    transformer.h.N.ln_1|ln_2.weight|bias
  final_norm.scale|shift, out_head        transformer.ln_f.weight|bias, lm_head
Its attention also saves a causal mask buffer per block (trf_blocks.N.att.mask, ones above the
diagonal), which is not a weight. A tied model shares one tensor between tok_emb and out_head, and
safetensors' save_model stores it once, under either name.
These functions only map names, shapes and configs; gpt_interventions/formats.py does the files.
"""

import torch

from gpt_interventions.errors import UsageError
from gpt_interventions.format_hf import check_gpt2
from model import GPTConfig

FILES = ("model.json", "model.safetensors")
STORY_HF_TYPE = "gpjtgpt2"  # the story's Hugging Face wrapper (layout b)
QKV = ("W_query", "W_key", "W_value")


BOOK_CONFIG = {"n_layers": int, "n_heads": int, "emb_dim": int, "context_length": int, "vocab_size": int,
               "drop_rate": (int, float), "qkv_bias": bool}


def config_from_book(cfg, where):
    """Our GPTConfig for the story's model.json (a dict), each field of the type the book's code reads."""
    if not isinstance(cfg, dict):
        raise UsageError(f"{where} is not a model config")
    for key, typ in {**BOOK_CONFIG, "tie_weights": bool}.items():
        if key not in cfg and key != "tie_weights":
            raise UsageError(f"{where} lacks {key}: not the book's model config")
        value = cfg.get(key, False)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)) or \
                (typ is int and value <= 0):
            raise UsageError(f"{where}: {key} is {value!r}, not a {'positive whole number' if typ is int else typ}")
    if cfg["emb_dim"] % cfg["n_heads"] or not 0 <= cfg["drop_rate"] < 1:
        raise UsageError(f"{where}: emb_dim {cfg['emb_dim']} is not divisible by n_heads {cfg['n_heads']}, "
                         f"or drop_rate {cfg['drop_rate']} is not in [0, 1)")
    return GPTConfig(n_layer=cfg["n_layers"], n_head=cfg["n_heads"], n_embd=cfg["emb_dim"],
                     block_size=cfg["context_length"], vocab_size=cfg["vocab_size"],
                     dropout=float(cfg["drop_rate"]), qkv_bias=cfg["qkv_bias"], tie_weights=cfg.get("tie_weights", False))


def book_names(config):
    """[(book name, our name)] of every weight (the c_attn rows are handled apart)."""
    pairs = [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight"),
             ("final_norm.scale", "transformer.ln_f.weight"), ("final_norm.shift", "transformer.ln_f.bias"),
             ("out_head.weight", "lm_head.weight")]
    for i in range(config.n_layer):
        b, o = f"trf_blocks.{i}.", f"transformer.h.{i}."
        pairs += [(b + "att.out_proj.weight", o + "attn.c_proj.weight"), (b + "att.out_proj.bias", o + "attn.c_proj.bias"),
                  (b + "ff.layers.0.weight", o + "mlp.c_fc.weight"), (b + "ff.layers.0.bias", o + "mlp.c_fc.bias"),
                  (b + "ff.layers.2.weight", o + "mlp.c_proj.weight"), (b + "ff.layers.2.bias", o + "mlp.c_proj.bias"),
                  (b + "norm1.scale", o + "ln_1.weight"), (b + "norm1.shift", o + "ln_1.bias"),
                  (b + "norm2.scale", o + "ln_2.weight"), (b + "norm2.shift", o + "ln_2.bias")]
    return pairs


def state_from_book(tensors, config, where, prefix=""):
    """Our state dict from the book's tensors (names after `prefix`); UsageError naming what is missing."""
    tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if config.tie_weights:  # one tensor under either name (or both, equal)
        both = [tensors[k] for k in ("tok_emb.weight", "out_head.weight") if k in tensors]
        if len(both) == 2 and not torch.equal(*both):
            raise UsageError(f"{where}: model.json ties the head to the embedding, but the file holds two "
                             "different tensors for tok_emb and out_head")
        if both:
            tensors["tok_emb.weight"] = tensors["out_head.weight"] = both[0]
    known = {b for b, _ in book_names(config)} | {f"trf_blocks.{i}.att.mask" for i in range(config.n_layer)}
    parts = ("weight", "bias") if config.qkv_bias else ("weight",)
    known |= {f"trf_blocks.{i}.att.{m}.{p}" for i in range(config.n_layer) for m in QKV for p in parts}
    missing, unexpected = sorted(known - set(tensors) - {k for k in known if k.endswith(".att.mask")}), \
        sorted(set(tensors) - known)
    if missing or unexpected:
        raise UsageError(f"{where}: weights do not fit the book's GPTModel of model.json"
                         + (f"; missing {', '.join(missing[:3])}" if missing else "")
                         + (f"; unexpected {', '.join(unexpected[:3])}" if unexpected else ""))
    state = {ours: tensors[book].float() for book, ours in book_names(config)}
    for i in range(config.n_layer):
        att = f"trf_blocks.{i}.att."
        for p in parts:
            state[f"transformer.h.{i}.attn.c_attn.{p}"] = torch.cat([tensors[f"{att}{m}.{p}"].float() for m in QKV])
    return state


def to_book(model):
    """(model.json, tensors, safetensors metadata) of `model` in the book's format, masks included,
    so that the book's GPTModel loads it strictly (load_state_dict, or safetensors' load_model)."""
    c = model.config
    check_gpt2(c, "the book's format")
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for name in ("transformer.wte.weight", "lm_head.weight"):
        ours[name] = ours[name][: c.vocab_size]  # pad_vocab's unused rows are not part of the model
    tensors = {book: ours[o].contiguous() for book, o in book_names(c)}
    parts = ("weight", "bias") if c.qkv_bias else ("weight",)
    mask = torch.triu(torch.ones(c.block_size, c.block_size), diagonal=1)
    for i in range(c.n_layer):
        att = f"trf_blocks.{i}.att."
        for p in parts:
            for m, t in zip(QKV, ours[f"transformer.h.{i}.attn.c_attn.{p}"].split(c.n_embd)):
                tensors[f"{att}{m}.{p}"] = t.contiguous()
        tensors[att + "mask"] = mask.clone()  # a tensor each: safetensors refuses shared memory
    metadata = {"format": "pt"}
    if c.tie_weights:  # as safetensors' save_model writes a shared tensor: once, the other name mapped to it
        del tensors["tok_emb.weight"]
        metadata["tok_emb.weight"] = "out_head.weight"
    cfg = {"vocab_size": c.vocab_size, "context_length": c.block_size, "emb_dim": c.n_embd, "n_heads": c.n_head,
           "n_layers": c.n_layer, "drop_rate": c.dropout, "qkv_bias": c.qkv_bias, "tie_weights": c.tie_weights}
    return cfg, tensors, metadata
