"""Load any model we score, the one way eval.py and sample.py share; export ours to other formats.

A MODEL argument is one of
  - a checkpoint file written by train.py (out/RUN/ckpt.pt, or a ckpt_STEP.pt snapshot),
  - a run directory (its ckpt.pt, the latest checkpoint),
  - a directory in the Hugging Face GPT-2 format (config.json and model.safetensors),
  - a directory in the book's format (model.json and model.safetensors, as the story's code saved
    its models), or one of the story's Hugging Face uploads (config.json of type gpjtgpt2),
  - a Hugging Face hub id of a GPT-2 model (gpt2, openai-community/gpt2, ...) or of the story's.
The names and shapes of each format live in format_hf.py and format_book.py; this module reads
and writes the files and builds the model.
"""

import dataclasses
import json
import logging
import os
import re
from contextlib import contextmanager

import torch

from gpt_interventions import format_book, format_hf
from gpt_interventions.atomic import atomic_write, write_json
from gpt_interventions.checkpoint import load_checkpoint, model_config_of
from gpt_interventions.errors import UsageError
from model import GPT, GPTConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model(spec, device="cpu"):
    """(model in eval mode on `device`, info) for a MODEL argument; UsageError for bad input.

    info is plain data for results: model (what to call it), source, checkpoint or hub_id, and
    the config (ours: model and train config of the run; others: the model config).
    """
    if os.path.isfile(spec):
        if os.path.basename(spec) in format_hf.FILES + format_book.FILES:
            raise UsageError(f"{spec} is one file of a model directory; pass the directory")
        model, info = _from_checkpoint(spec)
    elif os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "ckpt.pt")):
            model, info = _from_checkpoint(os.path.join(spec, "ckpt.pt"))
        elif os.path.isfile(os.path.join(spec, "metrics.jsonl")):  # train.py writes it first
            raise UsageError(f"run directory {spec} has no ckpt.pt yet")
        elif os.path.isfile(os.path.join(spec, "config.json")):
            model, info = _from_hub_layout(*(os.path.join(spec, name) for name in format_hf.FILES), label=spec)
        elif os.path.isfile(os.path.join(spec, "model.json")):
            model, info = _from_book(*(os.path.join(spec, name) for name in format_book.FILES), label=spec)
        else:
            raise UsageError(f"{spec} holds neither ckpt.pt (a run), config.json (a Hugging Face model) "
                             "nor model.json (the book's format)")
    elif _looks_like_hub_id(spec):
        model, info = _from_hub_layout(*_download(spec), label=spec)
        info["hub_id"] = spec
    else:
        raise UsageError(f"{spec} not found")
    return model.to(device).eval(), info


def is_download(spec):
    """Whether load_model would fetch MODEL from the hub rather than read a local path."""
    return not os.path.exists(spec) and _looks_like_hub_id(spec)


def _looks_like_hub_id(spec):
    """owner/name or name, and not a path into a local directory that exists (out/typo)."""
    head = spec.split("/")[0]
    return bool(HUB_ID.match(spec)) and not spec.endswith(".pt") and not ("/" in spec and os.path.isdir(head))


def _build(config, state_dict, where):
    """GPT from a complete state dict, without spending time on a random init (meta device)."""
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise UsageError(f"{where}: weights do not fit the model config "
                         f"({' '.join(str(e).split())[:200]})") from None
    if config.tie_weights:  # assign=True gave the two names two tensors: share one again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _from_checkpoint(path):
    ckpt = load_checkpoint(path)
    try:
        config = GPTConfig(**model_config_of(ckpt["model_config"]))
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path} has no usable model_config ({e})") from None
    model = _build(config, {k: v.float() for k, v in ckpt["model"].items()}, path)
    info = {"model": path, "source": "checkpoint", "checkpoint": path, "step": ckpt.get("step"),
            "train_tokens": ckpt.get("tokens"), "config": {"model": ckpt["model_config"], "train": ckpt.get("train_config")}}
    return model, info


# ----------------------------------------------------------------------------------------------
# files


def _read_json(path, holds):
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; {holds}")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise UsageError(f"{path} is not readable JSON ({str(e)[:120]})") from None


def _read_tensors(path, holds):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; {holds}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({str(e)[:120]})") from None


def _write(out_dir, config_name, config, tensors, metadata):
    from safetensors.torch import save
    os.makedirs(out_dir, exist_ok=True)
    data = save(tensors, metadata=metadata)
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(data))
    write_json(os.path.join(out_dir, config_name), config)


def check_new_dir(path):
    """Exports never overwrite: the directory must not exist yet or be empty."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"{path} exists and is not an empty directory; choose another")


# ----------------------------------------------------------------------------------------------
# the Hugging Face layout: GPT-2, or the story's upload of the book's model


def _from_hub_layout(config_path, weights_path, label):
    holds = f"a Hugging Face model directory holds {' and '.join(format_hf.FILES)}"
    cfg = _read_json(config_path, holds)
    if isinstance(cfg, dict) and cfg.get("model_type") == format_book.STORY_HF_TYPE:
        config = format_book.config_from_book(cfg.get("cfg"), f"{config_path} (its cfg)")
        state = format_book.state_from_book(_read_tensors(weights_path, holds), config, weights_path, prefix="model.")
        source = "story-huggingface"
    else:
        config = format_hf.config_from_hf(cfg, config_path)
        state = format_hf.state_from_hf(_read_tensors(weights_path, holds), config)
        source = "huggingface"
    model = _build(config, state, weights_path)
    return model, {"model": label, "source": source, "config": {"model": dataclasses.asdict(config)}}


def _download(repo_id):
    """Paths of the hub model's config.json and model.safetensors (the hub's cache is reused)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    files = format_hf.FILES
    hint = (f"on a machine with network run `hf download {repo_id} {' '.join(files)} --local-dir DIR` "
            "and pass DIR as MODEL")
    try:
        with _quiet("huggingface_hub"):  # its retry warnings would bury the one-line error
            return [hf_hub_download(repo_id, name) for name in files]
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "no network"
        raise UsageError(f"cannot fetch {repo_id} from the Hugging Face hub ({why}) and it is not "
                         f"in the local cache; {hint}") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo_id} is neither a local path nor a model on the Hugging Face hub") from None
    except EntryNotFoundError:
        raise UsageError(f"{repo_id} on the Hugging Face hub lacks {' or '.join(files)}; "
                         "only GPT-2 models in safetensors format load") from None
    except HFValidationError:
        raise UsageError(f"{repo_id} not found") from None
    except (HfHubHTTPError, OSError) as e:
        raise UsageError(f"cannot fetch {repo_id} from the Hugging Face hub "
                         f"({str(e).strip().splitlines()[0][:120]}); {hint}") from None


@contextmanager
def _quiet(logger_name):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_hf(model, out_dir, info, where=None):
    """Write `model` (load_model's `info` describes it) as a self-contained Hugging Face GPT-2
    directory: weights and config, generation config, model card (README.md) and, for a model with
    GPT-2's vocabulary, the GPT-2 tokenizer, so AutoTokenizer and pipeline need nothing else.
    `where`: what the card tells users to load (a hub id); default out_dir."""
    from gpt_interventions.model_card import model_card
    check_new_dir(out_dir)
    config, tensors = format_hf.to_hf(model)
    _write(out_dir, "config.json", config, tensors, {"format": "pt"})
    write_json(os.path.join(out_dir, "generation_config.json"), format_hf.generation_config(model.config))
    tokenizer = format_hf.has_gpt2_tokenizer(model.config)
    for name, data in (format_hf.tokenizer_files(model.config) if tokenizer else {}).items():
        atomic_write(os.path.join(out_dir, name), lambda f, data=data: f.write(data))
    card = model_card(info, model.config, tokenizer, where or out_dir)
    atomic_write(os.path.join(out_dir, "README.md"), lambda f: f.write(card.encode()))


# ----------------------------------------------------------------------------------------------
# the book's format


def _from_book(config_path, weights_path, label):
    holds = f"a directory in the book's format holds {' and '.join(format_book.FILES)}"
    config = format_book.config_from_book(_read_json(config_path, holds), config_path)
    state = format_book.state_from_book(_read_tensors(weights_path, holds), config, weights_path)
    model = _build(config, state, weights_path)
    return model, {"model": label, "source": "book", "config": {"model": dataclasses.asdict(config)}}


def export_book(model, out_dir):
    """Write `model` in the book's format (model.json, model.safetensors), which the book's and the
    story's code load into their GPTModel."""
    check_new_dir(out_dir)
    config, tensors, metadata = format_book.to_book(model)
    _write(out_dir, "model.json", config, tensors, metadata)
