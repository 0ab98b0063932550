"""Reading a Hugging Face-format model directory: config, safetensors weights, tokenizer, chat template, special ids.

Nothing here runs code from the checkpoint: weights load only from safetensors (never pickle), the tokenizer only
from ``tokenizer.json`` through the ``tokenizers`` library, and no ``trust_remote_code`` is involved. Every failure
a user can cause (missing directory, corrupt file, offline hub id) becomes a :class:`~s2d2.errors.ModelLoadError`
with a one-sentence message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from s2d2.config import SAMPLING_DEFAULTS, DecodeConfig
from s2d2.errors import ConfigError, ModelLoadError
from s2d2.files import parse_json_file

__all__ = [
    "CheckpointTensors",
    "SpecialIds",
    "as_token_ids",
    "generation_defaults",
    "load_tokenizer",
    "load_weights",
    "merge_lora",
    "open_weights",
    "read_chat_template",
    "read_config",
    "read_generation_defaults",
    "read_json",
    "read_special_ids",
    "read_template_tokens",
    "resolve_model_dir",
]

# "owner/name" as the hub spells repository ids; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|role_end|>", "</s>", "<eos>")  # <|role_end|>: LLaDA2 turns
_MASK_TOKENS = ("<|MASK|>", "<|mask|>", "|<MASK>|", "<MASK>", "[MASK]")  # "|<MASK>|": Fast-dLLM v2


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the decoder needs beyond the vocabulary itself."""

    mask_id: int | None  # the diffusion mask token; None if the checkpoint names none
    eos_ids: tuple[int, ...]  # every id that ends generation, in the checkpoint's order


# ------------------------------------------------------------------------------------------------ directory


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it here so a later change still counts.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_dir(name_or_path: str) -> Path:
    """Return the local directory of a model: ``name_or_path`` itself, or a hub id's downloaded snapshot.

    An existing directory is returned as is. A string shaped like ``owner/name`` that is not a local path is
    fetched from the Hugging Face hub (config, safetensors, tokenizer and template files only); with
    ``HF_HUB_OFFLINE=1`` only the local hub cache is consulted.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {name_or_path} is a file, not a model directory.")
    if not _HUB_ID.fullmatch(str(name_or_path)):
        raise ModelLoadError(f"model directory {name_or_path} does not exist.")
    try:
        import huggingface_hub  # lazily: only hub ids need it

        local = huggingface_hub.snapshot_download(
            str(name_or_path), allow_patterns=_HUB_PATTERNS, local_files_only=_offline())
    except Exception as e:  # offline, unknown repo, gated repo, network error: all the same to the user
        how = "offline mode is on and it is not in the local cache" if _offline() else type(e).__name__
        raise ModelLoadError(
            f"{name_or_path!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({how}).") from None
    return Path(local)


# ----------------------------------------------------------------------------------------------------- json


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; a missing, invalid or non-object file is a ModelLoadError."""
    path = Path(path)
    data = parse_json_file(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not a {type(data).__name__}.")
    return data


def _read_optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (required)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"model directory {model_dir} has no config.json.")
    return read_json(path)


# -------------------------------------------------------------------------------------------------- weights


# Bytes read through one open file before it is opened afresh. A safetensors file is memory-mapped, and a map kept
# open keeps every page read through it resident: loading a whole checkpoint through one map holds the file in
# memory beside the model's own copy (2x the weights). Reopening drops the pages already copied into the model.
READ_BUDGET = 32 << 20


def _corrupt(path: Path, error: Exception) -> ModelLoadError:
    reason = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    return ModelLoadError(f"weights file {path} is corrupt or truncated ({reason}).")


def _open_safetensors(path: Path, device: str) -> Any:
    """``safe_open`` on ``path``, as a ModelLoadError if the file is missing or its header cannot be read."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing.")
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise _corrupt(path, e) from None


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by Hugging Face name, each read from its safetensors file when asked for.

    Construction reads only the files' headers (so a missing, corrupt or truncated file is an error before any
    weight is read). A tensor comes from the file's memory map without a copy; after :data:`READ_BUDGET` bytes
    read from one file it is opened afresh, so that a loader that copies each tensor into its model and drops it
    holds at most a few tensors of the file beside the model, not the file. Iteration follows the files, so such a
    loader reads each file once, front to back.
    """

    def __init__(self, names_by_file: Mapping[Path, list[str]], device: str = "cpu") -> None:
        self._file_of = {name: path for path, names in names_by_file.items() for name in names}
        self._device = device
        self._open: tuple[Path, Any] | None = None
        self._read = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]  # a KeyError for an unknown name, as a Mapping should
        if self._open is None or self._open[0] != path or self._read >= READ_BUDGET:
            self._open, self._read = None, 0  # drop the old map before mapping again
            self._open = (path, _open_safetensors(path, self._device))
        try:
            tensor = self._open[1].get_tensor(name)
        except Exception as e:  # a header that points past the data, an unknown dtype
            raise _corrupt(path, e) from None
        self._read += tensor.numel() * tensor.element_size()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def close(self) -> None:
        """Drop the open file (tensors already returned stay valid)."""
        self._open = None


def _names_in(path: Path) -> list[str]:
    """The tensor names in one safetensors file's header, in file order."""
    f = _open_safetensors(path, "cpu")
    try:
        return list(f.keys())
    except Exception as e:
        raise _corrupt(path, e) from None


def _sharded_names(model_dir: Path, index_path: Path) -> dict[Path, list[str]]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index_path} has no valid weight_map (a JSON object of weight name to file name).")
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    for file in by_file:  # check every shard first, so a missing one is reported before any large read
        if not (model_dir / file).is_file():
            raise ModelLoadError(f"shard {file} named in {index_path.name} is missing from {model_dir}.")
    out: dict[Path, list[str]] = {}
    for file, names in by_file.items():
        present = _names_in(model_dir / file)
        absent = sorted(names - set(present))
        if absent:
            raise ModelLoadError(f"shard {file} lacks weight {absent[0]!r} that {index_path.name} places in it.")
        out[model_dir / file] = [n for n in present if n in names]
    return out


def open_weights(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> CheckpointTensors:
    """The checkpoint's tensors, by Hugging Face name, read lazily from safetensors only
    (:class:`CheckpointTensors`: what a loader that must not hold the file beside the model reads from).

    Looks for ``model.safetensors``, then a sharded ``model.safetensors.index.json``, then any ``*.safetensors``
    files. Pickle checkpoints (``*.bin``, ``*.pt``) are refused, never opened.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist.")
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        names = {single: _names_in(single)}
    elif index.is_file():
        names = _sharded_names(model_dir, index)
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
        if not files:
            pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise ModelLoadError(
                    f"model directory {model_dir} holds only pickle weights ({pickles[0]}), "
                    f"and only safetensors checkpoints are supported.")
            raise ModelLoadError(f"model directory {model_dir} holds no safetensors weights.")
        names = {p: _names_in(p) for p in files}
    return CheckpointTensors(names, str(device))


def load_weights(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by Hugging Face name, as a dict (:func:`open_weights`, all read at once)."""
    weights = open_weights(model_dir, device)
    return {name: weights[name] for name in weights}


# ------------------------------------------------------------------------------------------------ tokenizer


# Qwen2's pre-tokenization split (letters, single digits, punctuation runs, newlines, spaces), as its tokenizer
# defines it; Qwen2.5-based checkpoints (Fast-dLLM v2, Dream) may ship only vocab.json + merges.txt.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


# adapter_config.json options a plain merge cannot honour, and the values (absent included) that leave them unused
_LORA_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_dora": (None, False), "fan_in_fan_out": (None, False), "bias": (None, "none"), "modules_to_save": (None,),
    "layer_replication": (None,), "rank_pattern": (None, {}), "alpha_pattern": (None, {}),
}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class _LoraMerged(Mapping[str, torch.Tensor]):
    """``base`` with each target weight merged with its LoRA update as it is read (``W + scale * B @ A``, computed in
    float32 and cast back), so that merging holds one updated weight at a time, never the whole model twice."""

    def __init__(self, base: Mapping[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scale: float) -> None:
        self._base, self._pairs, self._scale = base, pairs, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        w = self._base[name]
        if name not in self._pairs:
            return w
        a, b = self._pairs[name]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ModelLoadError(f"the adapter's update for {name!r} has shape {(b.shape[0], a.shape[1])}, the weight "
                                 f"{tuple(w.shape)}.")
        return (w.float() + self._scale * (b.float() @ a.float()).to(w.device)).to(w.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __contains__(self, name: object) -> bool:
        return name in self._base


def merge_lora(tensors: Mapping[str, torch.Tensor], adapter_dir: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """Merge a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``tensors`` (Hugging
    Face names): ``W += scale * B @ A`` per target, computed in float32, ``scale = lora_alpha / r`` (``/ sqrt(r)``
    with ``use_rslora``). Returns a read-only view of ``tensors`` that merges each target as it is read. Options this
    merge cannot honour, and targets the checkpoint lacks, are ModelLoadErrors here; an update whose shape differs
    from its weight's is one when that weight is read.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"adapter directory {adapter_dir} has no adapter_config.json (a peft LoRA adapter).")
    cfg = read_json(config_path)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"{config_path} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters are supported.")
    for key, accepted in _LORA_NEUTRAL.items():
        if cfg.get(key) not in accepted:
            raise ModelLoadError(f"{config_path} sets {key}={cfg.get(key)!r}, which merging does not support.")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ModelLoadError(f"{config_path} needs an integer r >= 1 and a number lora_alpha (got {r!r}, {alpha!r}).")
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"adapter directory {adapter_dir} has no adapter_model.safetensors.")
    adapter = CheckpointTensors({weights: _names_in(weights)})
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in adapter:
        match = _LORA_KEY.match(name)
        if match is None:
            raise ModelLoadError(f"{weights.name} holds {name!r}, which is not a LoRA A/B weight of a target module.")
        found.setdefault(match["base"] + ".weight", {})[match["ab"]] = adapter[name]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for base, ab in sorted(found.items()):
        if base not in tensors:
            module = base.rsplit(".", 2)[-2]
            raise ModelLoadError(f"the adapter targets {base!r} (module {module!r}), which this checkpoint does not "
                                 "have.")
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"the adapter has only lora_{next(iter(ab))} for {base!r}.")
        if ab["B"].shape[1] != ab["A"].shape[0]:
            raise ModelLoadError(f"the adapter's lora_B for {base!r} has {ab['B'].shape[1]} columns but its lora_A "
                                 f"{ab['A'].shape[0]} rows.")
        pairs[base] = (ab["A"], ab["B"])
    return _LoraMerged(tensors, pairs, scale)


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """The fast tokenizer from ``tokenizer.json`` (no transformers, no remote code); for a Qwen2 tokenizer shipped
    as ``vocab.json`` + ``merges.txt`` only, the same tokenizer built from those files and the added tokens."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        if (Path(model_dir) / "vocab.json").is_file() and (Path(model_dir) / "merges.txt").is_file():
            return _qwen2_tokenizer(Path(model_dir))
        raise ModelLoadError(f"model directory {model_dir} has no tokenizer.json (nor vocab.json and merges.txt).")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise ModelLoadError(f"{path} is not a valid tokenizers file ({reason}).") from None


def _qwen2_tokenizer(model_dir: Path) -> Tokenizer:
    """Byte-level BPE from ``vocab.json`` and ``merges.txt`` with Qwen2's NFC normalisation and pre-tokenization,
    plus the added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``) and ``added_tokens.json``."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    config = _read_optional_json(model_dir / "tokenizer_config.json")
    if config.get("tokenizer_class") not in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise ModelLoadError(f"model directory {model_dir} has no tokenizer.json, and its vocab.json + merges.txt "
                             f"are of a {config.get('tokenizer_class')!r}, which only a tokenizer.json describes.")
    try:
        bpe = models.BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ModelLoadError(f"{model_dir}/vocab.json or merges.txt is not a valid BPE vocabulary ({e}).") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added: dict[int, tuple[str, bool]] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
            added[int(key)] = (entry["content"], bool(entry.get("special", True)))
    for content, i in _read_optional_json(model_dir / "added_tokens.json").items():
        if isinstance(i, int):
            added.setdefault(i, (content, True))
    for i in sorted(added):  # in id order, so each lands on its id right after the vocabulary
        content, special = added[i]
        if tok.token_to_id(content) is None:
            tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
        if tok.token_to_id(content) != i:
            raise ModelLoadError(f"added token {content!r} should have id {i} but follows the vocabulary at "
                                 f"{tok.token_to_id(content)} (vocab.json and the added tokens disagree).")
    return tok


def read_chat_template(model_dir: str | os.PathLike[str]) -> str | None:
    """The Jinja chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s field, else None."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{jinja} cannot be read ({type(e).__name__}).") from None
    template = _read_optional_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None


def read_template_tokens(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The special-token strings a chat template may use (``bos_token``, ``eos_token``, ``pad_token``,
    ``unk_token``), from ``tokenizer_config.json``, else ``special_tokens_map.json``; as strings or ``{"content": ...}``
    dicts there."""
    model_dir = Path(model_dir)
    out: dict[str, str] = {}
    for source in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        data = _read_optional_json(model_dir / source)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


def read_generation_defaults(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The sampling defaults a checkpoint's ``generation_config.json`` sets, as DecodeConfig fields
    (:func:`generation_defaults` of the file's contents; none without the file)."""
    path = Path(model_dir) / "generation_config.json"
    return generation_defaults(_read_optional_json(path), str(path))


def generation_defaults(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The sampling defaults a generation config's ``data`` sets, as DecodeConfig fields.

    The serving convention (vLLM's ``--generation-config auto``): ``temperature``, ``top_k`` and ``top_p`` that
    ``data`` sets become the defaults of requests that leave them unset. Only keys present count (transformers' own
    defaults, such as top_k 50, do not). One difference from vLLM, which ignores ``do_sample``: ``"do_sample": false``
    means greedy, as it does in transformers, so the temperature is not used then. A value of the wrong type or range
    is a ModelLoadError naming ``where`` and the key.
    """
    if data.get("do_sample") is False:
        defaults: dict[str, Any] = {"temperature": 0.0}
    else:
        defaults = {k: data[k] for k in SAMPLING_DEFAULTS if data.get(k) is not None}
    if defaults.get("top_k") is not None and isinstance(defaults["top_k"], float) and defaults["top_k"].is_integer():
        defaults["top_k"] = int(defaults["top_k"])
    try:
        DecodeConfig(**defaults)
    except ConfigError as e:
        raise ModelLoadError(f"{where} holds an invalid sampling default: {e}") from None
    return defaults


def _as_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def as_token_ids(value: Any) -> tuple[int, ...]:
    """Token ids from a config value (an id or a list of them), invalid entries dropped, duplicates once, in order."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for v in values:
        i = _as_id(v)
        if i is not None and i not in out:
            out.append(i)
    return tuple(out)


def read_special_ids(
    model_dir: str | os.PathLike[str], config: dict[str, Any], tokenizer: Tokenizer | None,
) -> SpecialIds:
    """Mask, end-of-sequence and padding ids, from the config files first and the tokenizer's vocabulary last.

    eos: ``generation_config.json`` ``eos_token_id`` (int or list), else ``config.json``'s, else whichever of
    ``<|im_end|>``, ``<|endoftext|>``, ``<|role_end|>``, ``</s>``,
    ``<eos>`` the tokenizer knows. mask: ``config.json``
    ``mask_token_id``, else ``tokenizer_config.json`` ``mask_token``, else the first known of ``<|MASK|>``,
    ``<|mask|>``, ``|<MASK>|`` (Fast-dLLM v2, whose id lives only in added_tokens.json), ``<MASK>``, ``[MASK]``.
    pad: ``config.json`` ``pad_token_id``.
    """
    model_dir = Path(model_dir)

    def token_id(token: str) -> int | None:
        return tokenizer.token_to_id(token) if tokenizer is not None else None

    eos = as_token_ids(_read_optional_json(model_dir / "generation_config.json").get("eos_token_id"))
    if not eos:
        eos = as_token_ids(config.get("eos_token_id"))
    if not eos:
        eos = as_token_ids([token_id(t) for t in _EOS_TOKENS])

    mask_id = _as_id(config.get("mask_token_id"))
    if mask_id is None:
        mask_token = _read_optional_json(model_dir / "tokenizer_config.json").get("mask_token")
        if isinstance(mask_token, dict):
            mask_token = mask_token.get("content")
        if isinstance(mask_token, str):
            mask_id = token_id(mask_token)
    if mask_id is None:
        mask_id = next((i for i in (token_id(t) for t in _MASK_TOKENS) if i is not None), None)

    return SpecialIds(mask_id=mask_id, eos_ids=eos)
