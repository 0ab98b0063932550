"""S2D2 on a model already loaded with transformers: :func:`from_transformers`.

Users of SDAR, Fast-dLLM v2, LLaDA and Dream often hold the model as a transformers object (their own dtype,
device, fine-tuned weights). :func:`from_transformers` makes an s2d2 :class:`~s2d2.api.Model` over it without
reloading anything: the family comes from ``model.config`` (``model_type``, as for a directory), and the native
decoder *shares* the transformers model's parameter tensors (:meth:`s2d2.models.decoder.Decoder.sharing`): no copy, on
the model's device, in its dtype. Nothing here imports transformers: the model and tokenizer are used through what
they expose (``config.to_dict()``, ``named_parameters()``, ``generation_config``, a fast tokenizer's
``backend_tokenizer``).
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from s2d2.api import Model
from s2d2.checkpoint import (
    SpecialIds,
    as_token_ids,
    generation_defaults,
    load_tokenizer,
    read_chat_template,
    read_special_ids,
    read_template_tokens,
)
from s2d2.config import DecodeConfig
from s2d2.errors import ConfigError, ModelLoadError
from s2d2.families import family_for, wrap_decoder
from s2d2.models.decoder import Decoder

__all__ = ["CUSTOM_GENERATE", "from_transformers", "generate"]

# The directory to pass as ``custom_generate`` to a transformers model's ``generate`` (with ``trust_remote_code=True``,
# which transformers asks for any local directory): its ``custom_generate/generate.py`` calls :func:`generate`.
CUSTOM_GENERATE = str(Path(__file__).resolve().parent / "hf_generate")

# generate()'s own arguments that s2d2 has no use for: fine when unset (None, or an empty list), refused when set
_UNSUPPORTED = ("logits_processor", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
                "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus")
# fields of both GenerationConfig and DecodeConfig, read from the generation config
_BOTH = frozenset({"max_new_tokens", "temperature", "top_k", "top_p"})
# arguments of the transformers forward that decoding through s2d2 makes moot (it always caches)
_MOOT = ("use_cache", "use_model_defaults", "kwargs")


def from_transformers(model: Any, tokenizer: Any = None) -> Model:
    """An s2d2 :class:`~s2d2.api.Model` over a transformers model object, sharing its weights (nothing copied).

    ``model``: a loaded causal LM of a supported family (``model.config.model_type`` one of s2d2's: ``sdar`` /
    ``qwen3``, ``Fast_dLLM_Qwen``, ``llada``, ``llada2_moe``, ``Dream``), all its parameters on one device in one
    floating dtype.
    ``tokenizer``: a transformers fast tokenizer (its ``backend_tokenizer`` is used, so ids are identical), a
    ``tokenizers.Tokenizer``, or None to read the one in the model's directory (``model.name_or_path``).
    Refused in one sentence (:class:`~s2d2.errors.ModelLoadError`): an unsupported ``model_type``, weights spread over
    devices (a ``device_map``), quantised or mixed-dtype weights, a slow tokenizer, a config without a mask token.
    Routed experts (LLaDA2) are shared one expert at a time, as the model holds them.
    """
    if not hasattr(model, "config") or not hasattr(model, "named_parameters"):
        raise ModelLoadError(f"from_transformers needs a transformers model object, not a {type(model).__name__}.")
    config = model.config.to_dict()
    family = family_for(config, "model.config")  # an unsupported model_type, before anything else
    params = dict(model.named_parameters())
    devices = sorted({str(p.device) for p in params.values()})
    if len(devices) > 1:
        raise ModelLoadError(f"the model's weights are spread over {', '.join(devices)} (a device_map); s2d2 decodes "
                             "a model whose weights are all on one device.")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    if len(dtypes) > 1 or not next(iter(params.values())).is_floating_point():
        raise ModelLoadError(f"the model's weights are {', '.join(dtypes)}; s2d2 shares weights of one floating "
                             "dtype (quantised weights are not supported).")
    decoder = Decoder.sharing(family.decoder_config(config), params)
    directory = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    tok = _backend_tokenizer(tokenizer, directory)
    special = read_special_ids(directory, config, tok)
    eos = as_token_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if eos:  # the loaded model's generation config, which may differ from its directory's file
        special = SpecialIds(special.mask_id, eos)
    adapter = wrap_decoder(decoder, config, special, tok, "model.config")
    template = getattr(tokenizer, "chat_template", None) or read_chat_template(directory)
    return Model(adapter, tok, name=str(getattr(model, "name_or_path", "") or type(model).__name__),
                 chat_template=template if isinstance(template, str) else None,
                 generation_defaults=_generation_defaults(getattr(model, "generation_config", None)),
                 template_tokens=_template_tokens(tokenizer, directory))


def _backend_tokenizer(tokenizer: Any, directory: Path) -> Any:
    """A ``tokenizers.Tokenizer``: the transformers tokenizer's own backend, the one given, or the directory's."""
    from tokenizers import Tokenizer

    if tokenizer is None:
        if not directory.is_dir():
            raise ModelLoadError("pass the tokenizer: the model has no local directory (name_or_path) to read one "
                                 "from.")
        return load_tokenizer(directory)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise ModelLoadError(f"the tokenizer is a {type(tokenizer).__name__} without a fast backend; pass a fast "
                         "tokenizer (use_fast=True) or a tokenizers.Tokenizer.")


def _generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling defaults a loaded model's ``GenerationConfig`` sets, read as ``s2d2.load`` reads the checkpoint's
    file (:func:`s2d2.checkpoint.generation_defaults`) from the fields that differ from transformers' defaults
    (``to_diff_dict``: an explicit ``do_sample=False`` is a default there, so it cannot be told from an absent one)."""
    if generation_config is None or not hasattr(generation_config, "to_diff_dict"):
        return {}
    return generation_defaults(generation_config.to_diff_dict(), "the model's generation_config")


def _template_tokens(tokenizer: Any, directory: Path) -> dict[str, str]:
    """The special-token strings a chat template may use: the transformers tokenizer's, else the directory's."""
    out = read_template_tokens(directory) if directory.is_dir() else {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, str):
            out[key] = value
    return out


def generate(model: Any, inputs: torch.Tensor | None = None, generation_config: Any = None, *,
             tokenizer: Any = None, **kwargs: Any) -> torch.Tensor:
    """transformers' ``model.generate`` contract, decoded by s2d2: returns ``[batch, prompt + new]`` token ids, each
    row its input (padding kept) followed by its generated tokens, the stop token that ended it, then
    ``pad_token_id`` up to the longest row, as transformers returns them.

    ``inputs`` / ``input_ids`` ``[batch, length]`` (or ``[length]``), left-padded rows with their ``attention_mask``
    (or none, in which case ``pad_token_id`` marks padding), each decoded as its own prompt. The standard
    ``GenerationConfig`` fields (from ``generation_config``, else the model's, updated by keyword arguments) map onto
    :class:`~s2d2.config.DecodeConfig`: ``max_new_tokens`` (or ``max_length`` minus the input length),
    ``do_sample`` (False: greedy), ``temperature``, ``top_k``, ``top_p``, ``eos_token_id`` (the stop tokens),
    ``stop_strings``; every other keyword is a DecodeConfig field (``method``, ``block_size``, ...). What s2d2 cannot
    honour (logits processors, streamers, assistant models, ``return_dict_in_generate``, unknown arguments) is a
    ConfigError sentence; ``stopping_criteria`` that each stop on a string (lm-eval's) become stop strings. The
    s2d2 model over ``model`` (:func:`from_transformers`) is made once and kept with it.
    """
    ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if ids is None:
        raise ConfigError("generate needs input_ids (or inputs).")
    ids = ids[None] if ids.dim() == 1 else ids
    attention_mask = kwargs.pop("attention_mask", None)
    for name in _UNSUPPORTED:
        value = kwargs.pop(name, None)
        if value is not None and not (isinstance(value, (list, tuple)) and not value) and value is not False:
            raise ConfigError(f"s2d2's generate does not support {name}.")
    for name in _MOOT:
        kwargs.pop(name, None)
    criteria_stops = _stop_strings(kwargs.pop("stopping_criteria", None))
    gen = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    s2d2_fields = {f.name for f in fields(DecodeConfig) if f.init}
    # a GenerationConfig field goes to the generation config (the four both configs have too: they are mapped below)
    hf_fields = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(gen, k) and (k not in s2d2_fields or k in _BOTH)}
    if hf_fields:
        gen.update(**hf_fields)
    unknown = sorted(k for k in kwargs if k not in s2d2_fields)
    if unknown:
        raise ConfigError(f"generate got {unknown[0]!r}, which is neither a GenerationConfig nor a DecodeConfig field.")
    if getattr(gen, "return_dict_in_generate", False):
        raise ConfigError("s2d2's generate returns the sequences tensor only (return_dict_in_generate is not "
                          "supported).")
    s2d2_model = _cached_model(model, tokenizer)
    eos = as_token_ids(gen.eos_token_id)
    pad = gen.pad_token_id if isinstance(gen.pad_token_id, int) else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = (ids != pad) if gen.pad_token_id is not None else torch.ones_like(ids)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(ids, attention_mask)]
    max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - ids.shape[1]
    sampling = {"temperature": float(gen.temperature or 1.0), "top_k": int(gen.top_k or 0),
                "top_p": float(gen.top_p if gen.top_p is not None else 1.0)} if gen.do_sample else {"temperature": 0.0}
    stops = [gen.stop_strings] if isinstance(gen.stop_strings, str) else list(gen.stop_strings or [])
    stops += [x for x in criteria_stops if x not in stops]
    config = DecodeConfig(max_new_tokens=max_new, **sampling, **({"stop_token_ids": eos} if eos else {}),
                          **({"stop": tuple(stops)} if stops else {}), generation_config="none")
    outs = s2d2_model.generate(prompts, config.replace(**kwargs) if kwargs else config)
    rows = [o.token_ids + ([o.stop_token_id] if o.stop_token_id is not None else []) for o in outs]
    width = max(len(r) for r in rows)
    new = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)
    for i, r in enumerate(rows):
        new[i, :len(r)] = torch.tensor(r, dtype=ids.dtype)
    return torch.cat([ids, new], dim=1)


def _stop_strings(criteria: Any) -> list[str]:
    """The stop strings of ``stopping_criteria`` made of criteria that each stop on one string (a ``sequence``
    attribute: lm-eval's ``MultiTokenEOSCriteria``, what ``lm_eval --model hf`` passes for a task's ``until``);
    any other criterion is a ConfigError sentence."""
    if not criteria:
        return []
    stops = [getattr(c, "sequence", None) for c in criteria]
    if not all(isinstance(x, str) for x in stops):
        raise ConfigError("s2d2's generate supports stopping criteria that stop on a string (a 'sequence' attribute, "
                          "as lm-eval's are); use stop_strings otherwise.")
    return stops


def _cached_model(model: Any, tokenizer: Any) -> Model:
    """The s2d2 model over ``model``, made once per tokenizer and weights (kept on the model object; made again if
    its tensors moved: ``.to()`` replaces them)."""
    first = next(model.parameters())
    key = (id(tokenizer), first.data_ptr(), first.dtype, str(first.device))
    cached = model.__dict__.get("_s2d2_model")
    if cached is None or cached[0] != key:
        cached = (key, from_transformers(model, tokenizer))
        model.__dict__["_s2d2_model"] = cached
    return cached[1]
