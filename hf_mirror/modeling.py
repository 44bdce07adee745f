"""Loading a causal LM and its tokenizer, with the checks hf-mirror relies on."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from hf_mirror.errors import InputError

logger = logging.getLogger(__name__)


NOT_CAUSAL = (
    "is not a causal language model; hf-mirror needs a decoder-only LM loadable with AutoModelForCausalLM "
    "(e.g. GPT-2, Llama, SmolLM)."
)


def _causal_config(config) -> bool:
    """Decoder-only config: in the causal-LM mapping, and not an encoder merely usable as a decoder."""
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


def check_causal_lm(model) -> None:
    """Refuse models that are not decoder-only causal LMs."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    is_causal = (
        config is not None
        and _causal_config(config)
        and hasattr(model, "generate")
        and (name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM"))
    )
    if not is_causal:
        raise InputError(f"{type(model).__name__} {NOT_CAUSAL}")


_CONFIG_KWARGS = ("gguf_file", "local_files_only")  # what AutoConfig needs of the model's loading options
HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")  # 'gpt2', 'org/name'


def is_local(name_or_path: str | Path) -> bool:
    """Whether a model name is a local path, which is never looked up on the Hub.

    The rule: a name that exists on disk, whose parent directory exists here, or that is not shaped like a Hub id, is
    a local path. A Hub id is ``name`` or ``org/name`` (ASCII letters, digits, ``_``, ``-``, ``.``; each part
    starting with a letter, digit or ``_``). So ``./m``, ``../m``, ``/abs/m``, ``~/m``, ``.m``, ``runs/a/m`` and
    ``C:\\m`` are local paths; ``gpt2`` and ``org/name`` are Hub ids unless ``org/name`` or the directory ``org``
    exists here.
    """
    text = str(name_or_path)
    path = Path(text)
    return HUB_ID.fullmatch(text) is None or path.exists() or "/" in text and path.parent.is_dir()


def local_only(name_or_path: str, kwargs: dict) -> dict:
    """A local model directory is loaded without any network call (``local_files_only``); a local path that is not
    a directory (missing, or a file) is refused before anything is loaded."""
    if not is_local(name_or_path):
        return kwargs
    path = Path(str(name_or_path))
    if not path.is_dir():
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise InputError(f"The model path {str(name_or_path)!r} {what}; pass a directory written by save_pretrained "
                         "(for a GGUF file: its directory, and its file name with --gguf-file). A name is looked up "
                         "on the Hub only when it is shaped like 'name' or 'org/name' and no such path exists here.")
    gguf = kwargs.get("gguf_file")
    if gguf and not (path / gguf).is_file():
        raise InputError(f"The model directory {str(name_or_path)!r} holds no GGUF file {gguf!r} (--gguf-file).")
    return {"local_files_only": True, **kwargs}


def load_config(name_or_path: str, **kwargs):
    """``AutoConfig.from_pretrained`` with local paths kept local, and an InputError naming the path when it fails."""
    kwargs = local_only(name_or_path, {k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS})
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot load a model config from {name_or_path!r}: {e}") from e


def load_model(name_or_path: str, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with a clear error for non-causal models and missing files."""
    kwargs = local_only(name_or_path, kwargs)
    config = load_config(name_or_path, **kwargs)
    if not _causal_config(config):
        raise InputError(f"{name_or_path!r} (a {config.model_type!r} model) {NOT_CAUSAL}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # e.g. "no file named model.safetensors, or pytorch_model.bin, found in directory ..."
        raise InputError(f"Cannot load the model weights from {name_or_path!r}: {e}") from e
    model.eval()
    return model


def prepare_tokenizer(tokenizer):
    """Make sure the tokenizer can pad: use the EOS token as padding when there is no pad token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(
                "The tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the model's embeddings)."
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked: nothing for the user to do (hence debug)
        logger.debug("Tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name_or_path: str, **kwargs):
    """``AutoTokenizer.from_pretrained``, refusing a path without a usable tokenizer (transformers builds an empty
    one from a config.json alone) with an InputError naming it."""
    kwargs = local_only(name_or_path, kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot load a tokenizer from {name_or_path!r}: {e}") from e
    if not tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise InputError(f"{name_or_path!r} holds no tokenizer (no tokenizer.json or vocabulary files: text becomes "
                         "no tokens); save the tokenizer there with tokenizer.save_pretrained.")
    return prepare_tokenizer(tokenizer)


def context_length(model, tokenizer=None, cap: int = 1024) -> int:
    """The model's context window (capped at ``cap`` to bound memory per batch)."""
    cfg = model.config
    n = None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            break
    limit = getattr(tokenizer, "model_max_length", None)
    candidates = [x for x in (n, limit if isinstance(limit, int) and limit < 10**8 else None) if x]
    return min([*candidates, cap])


def window_length(model, tokenizer, max_length: int | None) -> int:
    """The scan's window length: ``max_length`` (refused above the model's context window) or, when not given,
    the model's context window capped at 1024 tokens."""
    limit = context_length(model, None, cap=1 << 62)
    if max_length is not None and max_length > limit:
        raise InputError(f"--max-length {max_length} is above the model's context window ({limit} tokens); pass at "
                         f"most {limit}.")
    return max_length or context_length(model, tokenizer)


def resolve_model(model, tokenizer=None, model_kwargs: dict | None = None) -> tuple[PreTrainedModel, object, str]:
    """``(model, tokenizer, name)`` from a ``from_pretrained`` name/path or a loaded model and its tokenizer.

    Checks that the model is a causal LM and that the tokenizer can pad.
    """
    name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        model = load_model(name, **(model_kwargs or {}))
        if tokenizer is None:
            tokenizer = load_tokenizer(name, **{k: v for k, v in (model_kwargs or {}).items() if k in _CONFIG_KWARGS})
    if tokenizer is None:
        raise InputError("Pass the tokenizer along with a loaded model (tokenizer=...).")
    check_causal_lm(model)
    prepare_tokenizer(tokenizer)
    quiet_defaults(model, tokenizer)
    return model, tokenizer, name


def quiet_defaults(model, tokenizer=None) -> None:
    """Spell out what transformers would pick anyway, so it does not warn about it on every run: the causal-LM
    loss (GPT-2 leaves ``loss_type`` unset) and the pad token of generation."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer is not None:
        gen.pad_token_id = tokenizer.pad_token_id
