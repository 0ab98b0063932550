"""lm-evaluation-harness integration: the ``s2d2`` model and the bundled ``s2d2_arith`` task.

Run it with the wrapper, which registers the model and adds the package's task folder, then hands over to
lm-eval's own command line (every lm-eval flag works)::

    python -m s2d2.lm_eval --model s2d2 --model_args method=s2d2,block_size=8 --tasks s2d2_arith --limit 20

``--model_args`` takes ``pretrained`` (a model directory, a hub id or ``bundled``, the default), ``device``,
``dtype``, ``adapter``, ``config`` (a config file written by ``s2d2 tune``), and every
:class:`~s2d2.config.DecodeConfig` field by name. List-valued fields take space-separated
values (``stop_token_ids=2 5``), since lm-eval splits the argument string on commas. A request's own generation
settings win over ``--model_args``: ``until`` becomes the stop strings, ``max_gen_toks`` the token budget, and
``do_sample``/``temperature`` the sampling temperature. lm-eval is an optional extra: ``pip install s2d2[eval]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval integration needs lm-eval: pip install 's2d2[eval]'") from e

from s2d2.api import Model, load
from s2d2.config import DEFAULT_BATCH_SIZE, DecodeConfig, check_batch_size, list_item_type
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError, S2D2Error
from s2d2.evaluation.distributed import DataParallel

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
log = logging.getLogger("lm_eval.s2d2")  # under lm-eval's logger, so its handlers print our lines


def decode_config_from_model_args(args: dict[str, Any]) -> DecodeConfig:
    """A :class:`DecodeConfig` from lm-eval's parsed ``--model_args`` (values already typed by lm-eval, except
    list-valued fields, which arrive as one value or a space-separated string)."""
    hints = typing.get_type_hints(DecodeConfig)
    values = dict(args)
    for f in fields(DecodeConfig):
        value = values.get(f.name)
        item = list_item_type(hints[f.name])
        if item is None or value is None or isinstance(value, (list, tuple)):
            continue
        parts = str(value).split() if item is int else [str(value)]
        try:
            values[f.name] = tuple(item(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{f.name} must be space-separated {item.__name__} values, got {value!r}.") from None
    return DecodeConfig.from_dict(values)


def _parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> int | str:
    """lm-eval's batch_size model argument: an int, or ``"auto"`` (``auto:N`` too: s2d2's memory plan needs no
    re-search), which ``max_batch_size`` turns into that number."""
    text = str(batch_size)
    if text.startswith("auto"):
        return check_batch_size(int(max_batch_size)) if max_batch_size else DEFAULT_BATCH_SIZE
    try:
        return check_batch_size(int(text))
    except ValueError:
        raise ConfigError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}.") from None


@register_model("s2d2")
class S2D2LM(LM):
    """lm-eval model that decodes with s2d2 (any method: ar, static, dynamic, s2d2): generate_until, and
    loglikelihood / loglikelihood_rolling scored in the model's AR mode; data-parallel under a multi-process launch."""

    def __init__(self, pretrained: str = "bundled", device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_batch_size: int | None = None, adapter: str | None = None,
                 compile: bool = False, **decode_args: Any) -> None:
        # lm-eval passes batch_size (an int, or "auto"/"auto:N": s2d2's memory plan, s2d2.engine.memory, or
        # max_batch_size if given) and max_batch_size
        super().__init__()
        if decode_args.get("config"):  # an `s2d2 tune` result; the other model_args win over it
            decode_args = {**DecodeConfig.file_fields(str(decode_args.pop("config"))), **decode_args}
        decode_args.pop("config", None)
        self.config = decode_config_from_model_args(decode_args)  # validate before the (slow) load
        if "generation_config" not in decode_args:
            # measure greedily unless told (as lm-eval's HF model and s2d2 eval do): the checkpoint's
            # generation_config.json sampling defaults apply only with generation_config=auto
            self.config = self.config.replace(generation_config="none")
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its own default, cuda:0, when --device is not given (its HF model falls back too)
            log.warning("no CUDA device is available; s2d2 decodes on the CPU")
            device = "cpu"
        # Launched as several processes (accelerate launch / torchrun: RANK, WORLD_SIZE, LOCAL_RANK), lm-eval's
        # evaluator gives each rank its share of the documents and gathers the results through the primitives below.
        self._dp = DataParallel.from_env(device)
        self._rank, self._world_size = self._dp.rank, self._dp.world_size
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be true or false, got {compile!r}.")
        self.model = load(str(pretrained), device=self._dp.device(device), dtype=dtype, adapter=adapter or None,
                               compile=compile)
        if compile:  # the one-time warm-up, reported, before lm-eval's own timing starts
            log.info("s2d2: compiled the forward, warm-up %.1f s", self.model.warm_up())
        self.stats = DecodeStats()  # summed over every request served

    @classmethod
    def wrap(cls, model: Model, batch_size: int | str = 1, config: DecodeConfig | None = None) -> S2D2LM:
        """The lm-eval model around an already loaded :class:`s2d2.Model` (one process; ``s2d2 tune`` uses it)."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm.config = config or DecodeConfig(generation_config="none")
        lm.batch_size = check_batch_size(batch_size)
        lm._dp = DataParallel()
        lm.model, lm.stats = model, DecodeStats()
        return lm

    @property
    def device(self) -> torch.device:
        return self.model.device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, concatenated in rank order (a 0-d tensor counts as one element)."""
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in parts])

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (None elsewhere)."""
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        self._dp.barrier()

    @property
    def tokenizer_name(self) -> str:
        return self.model.name.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode each request's context with the request's stop strings and token budget."""
        from tqdm import tqdm

        # requests with the same settings decode together, batch_size at a time (results do not depend on the batch)
        groups: dict[DecodeConfig, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._config_for(req.args[1]), []).append(i)
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="s2d2 generate_until", disable=disable_tqdm or len(requests) < 2)
        for cfg, indices in groups.items():
            # chunks of a few batches, so progress and the log move
            size = 4 * (self.batch_size if isinstance(self.batch_size, int) else 64)
            for start in range(0, len(indices), size):
                chunk = indices[start:start + size]
                gens = self.model.generate([requests[i].args[0] for i in chunk], cfg, batch_size=self.batch_size)
                self.stats = DecodeStats.total([self.stats, self.model.summed_stats(gens)])
                for i, gen in zip(chunk, gens):
                    outputs[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                bar.update(len(chunk))
        bar.close()
        s = self.stats.to_dict()
        log.info("s2d2 decoding so far: %d tokens, NFE %d, %.2f tokens/forward, %.1f tokens/s",
                 s["num_tokens"], s["nfe"], s["tokens_per_forward"], s["tokens_per_s"])
        return outputs

    def _config_for(self, gen_kwargs: dict[str, Any]) -> DecodeConfig:
        """The model's config with a request's generation settings applied."""
        kwargs = dict(gen_kwargs or {})
        changes: dict[str, Any] = {}
        until = kwargs.pop("until", None)
        if until:
            changes["stop"] = (until,) if isinstance(until, str) else tuple(until)
        if "max_gen_toks" in kwargs:
            changes["max_new_tokens"] = int(kwargs.pop("max_gen_toks"))
        do_sample = kwargs.pop("do_sample", None)
        temperature = kwargs.pop("temperature", None)
        if do_sample is False:
            changes["temperature"] = 0.0
        elif temperature is not None:
            changes["temperature"] = float(temperature)
        for name in ("top_p", "top_k", "seed"):
            if name in kwargs:
                changes[name] = kwargs.pop(name)
        if kwargs:
            log.warning("s2d2 ignores generation settings it does not know: %s", ", ".join(sorted(kwargs)))
        return self.config.replace(**changes)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is greedy)`` per request, in the model's AR mode
        (:meth:`s2d2.Model.loglikelihoods`), so that multiple-choice tasks run."""
        pairs = [self._encode_pair(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self.model.loglikelihoods(pairs, batch_size=self.batch_size)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, scored in windows of the model's length (lm-eval's rolling
        windows, the first token conditioned on an end-of-text token)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self._prefix_token()
        pairs, owners = [], []
        for k, request in enumerate(requests):
            # a window's context and continuation together fill at most the model's positions
            windows = get_rolling_token_windows(token_list=self.model.encode(request.args[0]), prefix_token=prefix,
                                                max_seq_len=self.model.adapter.max_positions - 1, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self.model.loglikelihoods(pairs, batch_size=self.batch_size)):
            totals[k] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation, as lm-eval's HF model splits them: trailing spaces of the
        context move to the continuation, the pair is encoded whole, and an empty context becomes an end-of-text
        token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self._prefix_token()], self.model.encode(continuation)
        whole, head = self.model.encode(context + continuation), self.model.encode(context)
        return head, whole[len(head):]

    def _prefix_token(self) -> int:
        """The token an empty context stands for: the model's first end-of-sequence id."""
        return self.model.adapter.stop_ids[0] if self.model.adapter.stop_ids else 0


def _device_flag(args: list[str]) -> str | None:
    """The value of ``--device`` on lm-eval's command line (``--device X`` or ``--device=X``), None if absent."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--device")
    return parser.parse_known_args(args)[0].device


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``s2d2`` model registered and the bundled tasks on the include path."""
    # lm-eval fills its model registry with its own models only while the registry is empty, so the s2d2 model,
    # registered first, would hide them (`--model hf`): load lm-eval's entries now, beside ours.
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    evaluates = bool(args) and not set(args) & {"-h", "--help"}
    if "--include_path" in args[:-1]:
        i = args.index("--include_path") + 1
        args[i] = f"{args[i]}:{TASKS_DIR}"  # lm-eval takes several folders joined by ':'
    elif evaluates:
        args += ["--include_path", str(TASKS_DIR)]
    device = _device_flag(args)
    if device is None and evaluates and not torch.cuda.is_available():
        args += ["--device", "cpu"]  # lm-eval's default is cuda:0; without a GPU the CPU is what the user means
    sys.argv = [sys.argv[0], *args]
    try:
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            # as `s2d2 generate --device cuda` does: an explicit request that cannot be met is an error, not a warning
            raise ConfigError(f"--device {device} was requested but no CUDA device is available (use --device cpu).")
        cli_evaluate()
        # lm-eval leaves the process group up; a rank that exits while rank 0 still writes the results (or still
        # reads its last gather) can abort in gloo's teardown (seen once in CI: SIGABRT on rank 1). Every rank waits
        # for the others here and tears the group down before the interpreter does.
        DataParallel.joined().close()
    except S2D2Error as e:  # bad model_args, a missing model, ...: one sentence, exit 2, as the s2d2 CLI does
        print(f"s2d2: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
