"""The public Python API: ``s2d2.load(...)`` returns a :class:`Model`; ``Model.generate`` decodes prompts."""

from __future__ import annotations

import datetime
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from s2d2.checkpoint import (
    load_tokenizer,
    read_chat_template,
    read_config,
    read_generation_defaults,
    read_special_ids,
    read_template_tokens,
    resolve_model_dir,
)
from s2d2.config import DEFAULT_BATCH_SIZE, DecodeConfig, check_batch_size
from s2d2.core.sampling import row_seed
from s2d2.core.state import sequence_length
from s2d2.core.stats import DecodeStats
from s2d2.engine.engine import BatchStats, Engine, row_capacity
from s2d2.engine.memory import BatchPlan, plan_batch, request_rows
from s2d2.engine.runner import run_batch
from s2d2.errors import ConfigError, InputError, ModelLoadError
from s2d2.families import build_adapter, decoder_config_for, family_for
from s2d2.families.base import FamilyAdapter
from s2d2.models.decoder import Decoder

BUNDLED = "bundled"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Generation:
    """One decoded prompt."""

    text: str
    token_ids: list[int]  # generated ids, stop token excluded (with stop strings: up to the token completing one)
    finish_reason: str  # "stop" (a stop token or stop string was generated) or "length" (max_new_tokens reached)
    stats: DecodeStats
    trace: list[dict[str, Any]] | None = None  # the step trace (s2d2.core.trace, schema s2d2.trace/1) with trace=True
    stop_token_id: int | None = None  # the stop token that ended it (finish_reason "stop" without a stop string)

    def to_dict(self) -> dict[str, Any]:
        """The ``s2d2 generate --json`` object."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


class Model:
    """A loaded block-diffusion model with its tokenizer, ready to decode with any :class:`DecodeConfig`."""

    def __init__(self, adapter: FamilyAdapter, tokenizer: Any, *, name: str, chat_template: str | None = None,
                 generation_defaults: dict[str, Any] | None = None,
                 template_tokens: dict[str, str] | None = None) -> None:
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        # bos_token, eos_token, ... as the chat template sees them (transformers passes the same variables)
        self.template_tokens = dict(template_tokens or {})
        # sampling fields from the checkpoint's generation_config.json; DecodeConfig fields a request leaves unset
        # take these values (DecodeConfig.generation_config="auto", the default)
        self.generation_defaults = dict(generation_defaults or {})
        self.last_batch_stats: BatchStats | None = None  # the engine's figures for the last generate() call
        # the rows the last generate() / loglikelihoods() call decoded together, and the memory that allowed them
        self.last_batch_plan: BatchPlan | None = None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (what ``load(..., dtype="auto")`` chose)."""
        return self.adapter.model.embed.weight.dtype

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added); text that is not valid UTF-8 is an :class:`InputError`.

        Special tokens written in the text (``<|im_end|>``, ``<|endoftext|>``, ...) are parsed as special tokens:
        a raw prompt, like a completions API's, belongs wholly to the caller, so a pre-rendered chat prompt works.
        The mask token is the exception: :meth:`generate` refuses any prompt holding it ("Special tokens in
        prompts" in docs/decoding.md).
        """
        _check_utf8(text, "the prompt")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render chat ``messages`` with the checkpoint's Jinja chat template (sandboxed), as transformers'
        ``apply_chat_template(..., tokenize=False)`` renders it.

        ``template_kwargs`` reach the template as variables, e.g. ``enable_thinking=False`` for SDAR and Qwen3
        templates (the serving convention: vLLM's ``chat_template_kwargs``).

        Message text is user content: a message holding the literal text of any of the tokenizer's special tokens
        (a role marker, an end-of-sequence, the mask) is an :class:`InputError`, so no message can forge a turn
        boundary or end the conversation early. The special tokens the template itself writes are of course kept.
        A template that raises (``raise_exception``, e.g. roles that do not alternate) is an :class:`InputError`
        with its message.
        """
        if self.chat_template is None:
            raise InputError(f"model {self.name} has no chat template.")
        self._check_messages(messages)
        import jinja2

        try:
            return _chat_environment().from_string(self.chat_template).render(
                **{**self.template_tokens, **template_kwargs}, messages=messages,
                add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template of {self.name} cannot render these messages ({e}).") from None

    def _check_messages(self, messages: list[dict[str, str]]) -> None:
        """Refuse chat messages that are not dicts, hold text that is not valid UTF-8, or hold a special token."""
        special = sorted({t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                          if t.special and t.content})
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InputError(f"chat message {i} must be a dict with 'role' and 'content', "
                                 f"not a {type(message).__name__}.")
            for text in _strings(message):
                _check_utf8(text, f"chat message {i}")
                token = next((s for s in special if s in text), None)
                if token is not None:
                    raise InputError(f"chat message {i} contains the special token {token!r}; chat messages are user "
                                     "text and may not hold special tokens.")

    def warm_up(self) -> float:
        """Run the forwards a decoding needs once (one row, a block's draft, a 2L verification, with and without a
        cache; alone and packed with another row) so that a compiled model (``load(..., compile=True)``) compiles
        now rather than inside the first request; returns the seconds it took."""
        t0 = time.perf_counter()
        ids = [self.adapter.mask_id - 1 if self.adapter.mask_id > 0 else 1] * 5
        for cfg in (DecodeConfig(method="ar", max_new_tokens=3), DecodeConfig(method="s2d2", max_new_tokens=12)):
            for batch in (1, 2):
                self.generate([ids] * batch, cfg.replace(stop_token_ids=(), generation_config="none"),
                              batch_size=batch)
        return time.perf_counter() - t0

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], config: DecodeConfig | None = None,
                 *, batch_size: int | str = DEFAULT_BATCH_SIZE, trace: bool = False, progress: bool | str = False,
                 **overrides: Any) -> list[Generation]:
        """Decode each prompt (text, or a list of token ids) with ``config`` (fields may be overridden by keyword).

        Sampling fields the config leaves unset (temperature, top_k, top_p) take the checkpoint's
        generation_config.json values (:attr:`generation_defaults`) unless ``generation_config="none"``.

        Up to ``batch_size`` prompts decode together (``"auto"``: as many as fit in the free memory, up to 64 on a
        CPU and 256 on a GPU; an explicit size that does not fit is a ConfigError before anything is allocated;
        :attr:`last_batch_plan` says what was chosen), one batched forward per step, each at its own pace; a
        finished prompt's place goes to the next (continuous batching, :class:`s2d2.engine.engine.Engine`). Results do
        not depend on the batch: greedy output and per-prompt stats equal batch 1's (up to float rounding at exact
        logit ties), and sampling is reproducible per prompt: prompt ``i`` draws from a generator seeded with
        ``seed + i`` (a seed is drawn from torch's global RNG if none is set), whatever shares its batch. Every
        prompt is checked before any is decoded. :attr:`last_batch_stats` holds the batch-level figures.
        ``trace=True`` records each prompt's step trace in :attr:`Generation.trace` (:mod:`s2d2.core.trace`).
        ``progress`` (True, or the bar's label) shows a progress bar of finished prompts on stderr (tqdm).
        """
        cfg = self.resolve_config(config, **overrides)
        check_batch_size(batch_size)
        items = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
        encoded = []  # every prompt is checked before any is decoded, so a bad one wastes no work
        for i, prompt in enumerate(items):
            try:
                encoded.append(self.encode_prompt(prompt, cfg))
            except InputError as e:
                if len(items) == 1:
                    raise
                raise InputError(f"prompt {i}: {e}") from None
        longest = max(len(ids) for ids in encoded)
        capacity = row_capacity(self.adapter, longest, cfg)
        self.last_batch_plan = plan_batch(self.adapter.model.config, self.dtype, self.device, batch_size, len(encoded),
                                          capacity, *request_rows(longest, cfg.block_size))
        engine = Engine(self.adapter, self.last_batch_plan.rows, capacity)
        stop_check = self.stop_check(cfg)
        order = {engine.add(ids, cfg, generator, stop_check, trace): i
                 for i, (ids, generator) in enumerate(zip(encoded, self.row_generators(cfg, len(encoded))))}
        results: list[Any] = [None] * len(encoded)
        with tqdm(total=len(encoded), desc=progress if isinstance(progress, str) else "generate", unit="prompt",
                  dynamic_ncols=True, disable=not progress) as bar:
            while not engine.idle:
                for event in engine.step():
                    if event.finish_reason == "refused":  # not with one capacity for all rows, but never silently
                        raise ConfigError(event.error or "the engine refused a prompt for want of memory.")
                    if event.finished:
                        results[order[event.request_id]] = event
                        bar.update(1)
        self.last_batch_stats = engine.stats
        return [self.to_generation(e.token_ids, e.finish_reason, e.stats, cfg, e.trace, e.stop_token_id)
                for e in results]

    def resolve_config(self, config: DecodeConfig | None = None, **overrides: Any) -> DecodeConfig:
        """``config`` (default: DecodeConfig()) with ``overrides`` and the checkpoint's sampling defaults applied,
        checked against this model (a :class:`ConfigError` if it cannot be honoured)."""
        cfg = (config or DecodeConfig()).replace(**overrides) if overrides else (config or DecodeConfig())
        cfg = cfg.with_generation_defaults(self.generation_defaults)
        family: dict[str, Any] = {}  # the family's own defaults for fields the config leaves unset
        if self.adapter.default_block_size is not None and not cfg.is_set("block_size") and cfg.method != "ar":
            family["block_size"] = self.adapter.default_block_size
        if self.adapter.default_sub_block_size is not None and cfg.sub_block_size is None and cfg.method != "ar":
            family["sub_block_size"] = self.adapter.default_sub_block_size
        cfg = cfg.replace(**family) if family else cfg
        if cfg.greedy and cfg.ratio_tempering != 1.0:
            raise ConfigError("ratio_tempering applies to sampled decoding (temperature > 0); greedy acceptance is "
                              "deterministic: use relax or ratio_threshold.")
        if cfg.editing_threshold is not None and not getattr(self.adapter, "supports_editing", False):
            raise ConfigError(f"editing_threshold applies to models trained for token editing (LLaDA2.x); "
                              f"{self.name} is a {self.adapter.family} model.")
        self._validate_config(cfg)
        return cfg

    def encode_prompt(self, prompt: str | Sequence[int], cfg: DecodeConfig) -> list[int]:
        """The token ids of one prompt (text, or ids), checked: an :class:`InputError` for an empty prompt, ids
        outside the vocabulary, a mask token, or a prompt that leaves no room for ``cfg.max_new_tokens``."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_prompt_ids(ids, cfg)
        return ids

    def _positions_needed(self, prompt_len: int, cfg: DecodeConfig) -> int:
        """Positions a prompt and its ``max_new_tokens`` occupy, rounded up to whole blocks."""
        return sequence_length(prompt_len, cfg.block_size, cfg.max_new_tokens, self.adapter.blocks_from_prompt_end)

    def row_seeds(self, cfg: DecodeConfig, count: int, choices: int = 1) -> list[int]:
        """One seed per row, for ``count`` rows that are ``choices`` consecutive samples of each prompt: prompt
        ``i`` draws from ``seed + i`` and its further choices from seeds derived from that (``row_seed``; a seed is
        drawn from torch's global RNG when ``cfg.seed`` is None), so a row's samples depend on its seed alone, never
        on what shares its batch."""
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
        return [row_seed(seed, j // choices, j % choices) for j in range(count)]

    def row_generators(self, cfg: DecodeConfig, count: int, choices: int = 1) -> list[torch.Generator]:
        """A generator seeded with each of :meth:`row_seeds`."""
        return [torch.Generator(device=self.device).manual_seed(s) for s in self.row_seeds(cfg, count, choices)]

    def stop_check(self, cfg: DecodeConfig) -> Callable[[list[int]], bool] | None:
        """What ends a row at a block boundary once its text holds one of ``cfg.stop`` (None without stop strings)."""
        if not cfg.stop:
            return None
        return lambda done: find_stop(self.decode(done), cfg.stop) >= 0

    def to_generation(self, token_ids: list[int], finish_reason: str, stats: DecodeStats,
                      cfg: DecodeConfig, trace: list[dict[str, Any]] | None = None,
                      stop_token_id: int | None = None) -> Generation:
        """A row's result as a :class:`Generation`: its text, cut before the first stop string (the tokens then end
        with the one completing it, and the finish reason is ``"stop"``)."""
        text = self.decode(token_ids)
        if cfg.stop and (cut := find_stop(text, cfg.stop)) >= 0:
            token_ids = token_ids[:next(k for k in range(1, len(token_ids) + 1)
                                        if find_stop(self.decode(token_ids[:k]), cfg.stop) >= 0)]
            text, finish_reason, stats.num_tokens = text[:cut], "stop", len(token_ids)
            stop_token_id = None  # a stop string ended it
        return Generation(text, token_ids, finish_reason, stats, trace, stop_token_id)

    @torch.inference_mode()
    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                       batch_size: int | str = DEFAULT_BATCH_SIZE) -> list[tuple[float, bool]]:
        """For each ``(context ids, continuation ids)``: the log-probability of the continuation given the context in
        the model's AR mode (block size 1: each token conditioned on everything before it), and whether it is the
        greedy continuation. One forward per pair, batched: the verifier's forward (the 2L construction for
        aligned logits, a causal forward for shifted ones) over context + continuation. Tokens the decoder never
        emits (the mask, the vocabulary's padding rows) get probability 0. A context longer than the model allows
        is cut from the left; a pair needs a non-empty context (lm-eval gives an end-of-text token) and continuation.
        """
        adapter = self.adapter
        rows: list[tuple[list[int], int]] = []
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise InputError(f"pair {i}: log-likelihood needs a non-empty context and continuation.")
            ids = [int(t) for t in (*context, *continuation)][-adapter.max_positions:]
            if len(ids) == len(continuation):
                raise InputError(f"pair {i}: the continuation alone fills the model's {adapter.max_positions} "
                                 "positions.")
            bad = next((t for t in ids if not 0 <= t < adapter.vocab_size), None)
            if bad is not None:
                raise InputError(f"pair {i}: token id {bad} is outside the vocabulary (size {adapter.vocab_size}).")
            rows.append((ids, len(ids) - len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
        if not order:
            return results
        longest = adapter.verify_spec(rows[order[0]][0], 0, 0, rows[order[0]][1]).num_rows  # the first chunk's
        self.last_batch_plan = plan_batch(
            self.adapter.model.config, self.dtype, self.device, check_batch_size(batch_size), len(order), longest,
            logit_rows=max(len(ids) - first + 1 for ids, first in rows), query_rows=longest)
        step = self.last_batch_plan.rows
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            specs = [adapter.verify_spec(rows[i][0], 0, 0, rows[i][1]) for i in chunk]
            cache = adapter.new_batch_cache(len(chunk), max(spec.num_rows for spec in specs))
            for i, logits in zip(chunk, run_batch(adapter, specs, cache, list(range(len(chunk))))):
                ids, first = rows[i]
                target = torch.tensor(ids[first:], device=logits.device)
                logp = torch.log_softmax(logits[:len(target)].float(), dim=-1)  # shifted: one row more, unused
                results[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        return results

    def summed_stats(self, generations: Sequence[Generation]) -> DecodeStats:
        """The stats of the last :meth:`generate` call's ``generations``, summed, with its wall time.

        A prompt's own ``time_s`` is its latency, which in a batch overlaps the others'; summed, the counters add up
        but the time is the call's wall time (and forward time the batch's), so tokens/s is the throughput."""
        total = DecodeStats.total([g.stats for g in generations])
        if self.last_batch_stats is not None:
            total.time_s = self.last_batch_stats.time_s
            total.forward_time_s = self.last_batch_stats.forward_time_s
        return total

    def _validate_config(self, cfg: DecodeConfig) -> None:
        """Refuse, before any decoding starts, options this model cannot honour: stop token ids outside its
        vocabulary (they could never be generated, so decoding would silently ignore them), and a block size or a
        token budget that alone exceeds its context (whatever the prompt)."""
        context = self.adapter.max_positions
        if cfg.method != "ar" and cfg.block_size > context:
            raise ConfigError(f"block_size {cfg.block_size} is larger than the model's context of {context} "
                              "positions.")
        if cfg.max_new_tokens >= context:  # the prompt needs one position at least
            raise ConfigError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in the model's "
                              f"context of {context} positions.")
        vocab = self.adapter.vocab_size
        bad = next((t for t in cfg.stop_token_ids or () if t >= vocab), None)
        if bad is not None:
            raise ConfigError(f"stop_token_ids holds {bad}, outside the model's vocabulary of {vocab} tokens "
                              f"(ids 0 to {vocab - 1}).")

    def _check_prompt_ids(self, prompt_ids: list[int], cfg: DecodeConfig) -> None:
        """Refuse an empty prompt, ids outside the vocabulary, the mask token (text and id prompts alike), and a
        prompt that leaves no room for ``cfg.max_new_tokens`` in the model's context.

        The mask token marks the positions the model is to fill; inside a prompt it would be read as a hole to
        fill rather than as context, so it never enters one, whether typed as text or passed as an id.
        """
        if not prompt_ids:
            raise InputError("the prompt is empty.")
        vocab = self.adapter.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InputError(f"the prompt holds token ids outside the vocabulary [0, {vocab}).")
        mask_id = self.adapter.mask_id
        if mask_id in prompt_ids:
            token = self.tokenizer.id_to_token(mask_id)
            name = f"the mask token {token!r} (id {mask_id})" if token is not None else f"the mask token id {mask_id}"
            raise InputError(f"the prompt contains {name} at position {prompt_ids.index(mask_id)}; "
                             "a prompt may not hold mask tokens.")
        total = self._positions_needed(len(prompt_ids), cfg)
        if total > self.adapter.max_positions:
            raise InputError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({cfg.max_new_tokens}), rounded up to "
                f"whole blocks, needs {total} positions but the model's context is {self.adapter.max_positions}.")

@functools.lru_cache(maxsize=1)
def _chat_environment() -> Any:
    """A sandboxed Jinja environment with what Hugging Face chat templates expect: trimmed blocks, ``break`` and
    ``continue``, a ``tojson`` that writes plain JSON (Jinja's own escapes ``<``, ``>`` and ``&`` for HTML), and the
    ``raise_exception`` and ``strftime_now`` globals."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env




def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(found, default=-1)


def _check_utf8(text: str, what: str) -> None:
    """Refuse text holding lone surrogates: bytes that were not valid UTF-8 (``surrogateescape``, how Python
    passes such command-line arguments and file names on) or a broken UTF-16 pair; the tokenizer cannot read them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        where = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}")
        raise InputError(f"{what} is not valid UTF-8 text ({where} at character {e.start}).") from None


def _strings(value: Any) -> list[str]:
    """Every string inside a chat message (its role, its content, and the text parts of a list content)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def bundled_model_dir() -> Path:
    """Where the model shipped inside the package lives."""
    return Path(str(resources.files("s2d2"))) / "bundled"


def load(name_or_path: str = BUNDLED, *, device: str = "cpu", dtype: str = "auto",
         adapter: str | None = None, compile: bool = False) -> Model:
    """Load a model: ``"bundled"``, a local Hugging Face-format directory, or a hub id.

    ``dtype="auto"`` computes in the checkpoint's ``torch_dtype`` on an accelerator; on a CPU, in bfloat16 for a
    model of :data:`CPU_BF16_MIN_PARAMS` parameters or more where the CPU has native bfloat16 (1.6-3.3x faster at
    real sizes), else in float32 (where greedy S2D2 == AR holds exactly; :attr:`Model.dtype` says which).
    Weights are read tensor by tensor into the model's dtype and device: loading needs the model's memory, not the
    checkpoint file's as well. ``adapter``: a peft LoRA adapter (directory or hub id) merged into the weights at load
    (no peft needed: the merge is ``W += alpha / r * B @ A``). ``compile``: compile the forwards with
    ``torch.compile`` (the single-row forward whole, the packed forward's token-wise parts; the first forwards compile
    them, :meth:`Model.warm_up` does that up front), falling back to eager with one warning where compilation is not
    available (docs/decoding.md "Compiled forwards").
    ``device="meta"`` reads the model's files but not its weights: a model that tokenizes, formats and checks
    requests but cannot decode (what the server's API process holds; its engine processes load the weights).
    """
    dev = _resolve_device(device)
    if name_or_path == BUNDLED:
        model_dir = bundled_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError("this build of s2d2 carries no bundled model yet; pass --model DIR "
                                 "(`s2d2 init-random --family sdar --out DIR` writes a tiny random one).")
    else:
        model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    special = read_special_ids(model_dir, config, tokenizer)
    lora_dir = resolve_model_dir(adapter) if adapter is not None else None
    family = build_adapter(model_dir, config, special, tokenizer, dev, _resolve_dtype(dtype, config, dev, model_dir),
                           lora_dir)
    if compile:
        family.model.compile()
    return Model(family, tokenizer, name=name_or_path, chat_template=read_chat_template(model_dir),
                 generation_defaults=read_generation_defaults(model_dir),
                 template_tokens=read_template_tokens(model_dir))


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a valid torch device (try cpu or cuda).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but no CUDA device is available.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was requested but MPS is not available.")
    return dev


# On a CPU with native bfloat16 arithmetic, models from this size on compute in bfloat16 under dtype="auto": a packed
# forward of 1 and 16 rows is 1.6x and 2.3x faster than float32 at 143M parameters and 1.6x and 3.3x at SDAR-1.7B's
# 2.0B, while the bundled 3.7M model runs at the same speed in both (BENCHMARKS.md, "Real-sized checkpoints";
# scripts/dtype_cost.py). Below it float32 costs nothing and keeps greedy S2D2 == AR exact.
CPU_BF16_MIN_PARAMS = 100_000_000


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX); elsewhere bfloat16 is emulated."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def _num_parameters(config: dict[str, Any]) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return sum(p.numel() for p in Decoder(decoder_config_for(config), device="meta").parameters())


def _resolve_dtype(dtype: str, config: dict[str, Any], device: torch.device, model_dir: Path) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            native = cpu_has_bf16()
            return torch.bfloat16 if native and _num_parameters(config) >= CPU_BF16_MIN_PARAMS else torch.float32
        trained = family_for(config, model_dir / "config.json").checkpoint_dtype(config)
        return _DTYPES.get(trained or "float32", torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}.")
    return _DTYPES[dtype]
