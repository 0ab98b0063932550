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

from pathlib import Path
from typing import Any

from s2d2.api import Model
from s2d2.checkpoint import (
    SpecialIds,
    load_tokenizer,
    read_chat_template,
    read_special_ids,
    read_template_tokens,
)
from s2d2.config import SAMPLING_DEFAULTS
from s2d2.errors import ModelLoadError
from s2d2.families import family_for, wrap_decoder
from s2d2.models.decoder import Decoder

__all__ = ["from_transformers"]


def from_transformers(model: Any, tokenizer: Any = None) -> Model:
    """An s2d2 :class:`~s2d2.api.Model` over a transformers model object, sharing its weights (nothing copied).

    ``model``: a loaded causal LM of a supported family (``model.config.model_type`` one of s2d2's: ``sdar`` /
    ``qwen3``, ``Fast_dLLM_Qwen``, ``llada``, ``Dream``), all its parameters on one device in one floating dtype.
    ``tokenizer``: a transformers fast tokenizer (its ``backend_tokenizer`` is used, so ids are identical), a
    ``tokenizers.Tokenizer``, or None to read the one in the model's directory (``model.name_or_path``).
    Refused in one sentence (:class:`~s2d2.errors.ModelLoadError`): an unsupported ``model_type``, weights spread over
    devices (a ``device_map``), quantised or mixed-dtype weights, routed experts (LLaDA2: load it with
    :func:`s2d2.load`), a slow tokenizer, a config without a mask token.
    """
    if not hasattr(model, "config") or not hasattr(model, "named_parameters"):
        raise ModelLoadError(f"from_transformers needs a transformers model object, not a {type(model).__name__}.")
    config = model.config.to_dict()
    family_for(config, "model.config")  # an unsupported model_type, before anything else
    params = dict(model.named_parameters())
    devices = sorted({str(p.device) for p in params.values()})
    if len(devices) > 1:
        raise ModelLoadError(f"the model's weights are spread over {', '.join(devices)} (a device_map); s2d2 decodes "
                             "a model whose weights are all on one device.")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    if len(dtypes) > 1 or not next(iter(params.values())).is_floating_point():
        raise ModelLoadError(f"the model's weights are {', '.join(dtypes)}; s2d2 shares weights of one floating "
                             "dtype (quantised weights are not supported).")
    decoder = Decoder.sharing(family_for(config).decoder_config(config), params)
    directory = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    tok = _backend_tokenizer(tokenizer, directory)
    special = read_special_ids(directory, config, tok)
    eos = _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
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


def _ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0))


def _generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling defaults a loaded model's ``GenerationConfig`` sets, as :func:`s2d2.checkpoint
    .read_generation_defaults` reads them from a file: only values that differ from transformers' defaults count
    (``to_diff_dict``), and ``do_sample=False`` means greedy."""
    if generation_config is None or not hasattr(generation_config, "to_diff_dict"):
        return {}
    data = generation_config.to_diff_dict()
    if not getattr(generation_config, "do_sample", False):
        return {"temperature": 0.0} if "do_sample" in data else {}
    return {k: data[k] for k in SAMPLING_DEFAULTS if data.get(k) is not None}


def _template_tokens(tokenizer: Any, directory: Path) -> dict[str, str]:
    """The special-token strings a chat template may use: the transformers tokenizer's, else the directory's."""
    out = read_template_tokens(directory) if directory.is_dir() else {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, str):
            out[key] = value
    return out
