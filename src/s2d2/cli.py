"""The ``s2d2`` command line. Flags of ``generate`` are derived from :class:`DecodeConfig` fields (kebab-case).

A user error (bad flag value, missing model, empty prompt, ...) ends in one sentence on stderr and exit code 2;
``config_from_args`` is the single translation from parsed flags to a :class:`DecodeConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_origin

from s2d2.config import DEFAULT_BATCH_SIZE, DecodeConfig, check_batch_size, list_item_type
from s2d2.errors import S2D2Error
from s2d2.evaluation.distributed import DataParallel

# Help for the flags users reach for first; every other field documents itself in s2d2/config.py.
_HELP = {
    "method": "decoding method",
    "block_size": "tokens per block (default: 1 for ar, else the checkpoint's (Fast-dLLM v2, LLaDA2, D2F: 32) or 4)",
    "steps": "denoising steps per block (default: block size)",
    "sub_block_size": "decode each block sub-block by sub-block: spans and commits stay in the left-most sub-block "
                      "with masks (default: 8 for Fast-dLLM v2, else the whole block)",
    "editing_threshold": "LLaDA2.x token editing: replace a committed generated token of the block whose draft "
                         "differs with confidence above this (default: off)",
    "max_post_steps": "editing-only steps a block may run after its last mask while edits fire",
    "block_add_threshold": "pipelined blocks (D2F): open the next block when the last one's decoded share reaches "
                           "this (D2F's example: 0.5); unset: one block in flight",
    "decoded_token_threshold": "pipelined blocks: a block gets at least one token per step once its predecessor's "
                               "decoded share reaches this",
    "threshold": "confidence threshold of the dynamic strategy",
    "policy": "routing policy deciding when to verify (s2d2)",
    "estimator": "acceptance estimator used by score policies",
    "min_span": "mask_span_length: verify iff the span has at least this many masks",
    "temperature": "0 = greedy (deterministic); unset: the checkpoint's generation_config.json, else 0",
    "top_k": "0 = off; unset: the checkpoint's generation_config.json, else 0",
    "top_p": "1 = off; unset: the checkpoint's generation_config.json, else 1",
    "generation_config": "auto: unset sampling flags take the checkpoint's generation_config.json values "
                         "(generate; eval and bench decode greedily unless this is given); none: ignore that file",
    "seed": "sampling seed: prompt i draws from seed + i (default: a random seed)",
    "stop": "strings that end generation; the text is cut before the first (default: none)",
    "stop_token_ids": "token ids that end generation (default: the model's end-of-sequence ids)",
    "skip_confident": "s2d2: do not verify a span whose drafts all clear --threshold (the fallback commits it)",
    "commit_confident": "s2d2: after a verification also commit every other draft above --threshold (the "
                        "reference's always_check_high_confidence; not exact)",
    "prefix_cache": "write the block's committed prefix to the KV cache as it grows, so that forwards carry only "
                    "the rows after it (same tokens)",
    "fuse_draft_threshold": "s2d2: a verification carries the next block's draft rows only when its span's draft "
                            "confidences multiply to at least this (0 = always; ~0.3 on a CPU)",
    "redraft": "s2d2: after a rejection, use the verifier's rows after the correction as the next draft "
               "(no draft forward) when the first is at least this confident; always verified, exact "
               "(default: off)",
    "relax": "s2d2 relaxed acceptance, 0 = exact .. 1 = typical acceptance with epsilon 0.3 (not exact above 0)",
    "typical_epsilon": "typical acceptance's epsilon (expert; wins over --relax; default: from --relax)",
    "typical_delta": "typical acceptance's delta (expert; default sqrt(epsilon))",
    "ratio_tempering": "sampled acceptance ratio (q/p) ** this (the reference's ssd_ratio_tempering_factor)",
    "ratio_threshold": "after a rejection also commit later span drafts whose ratio reaches this (the reference's "
                       "ssd_ratio_threshold; default: off)",
}
# The same for `s2d2 train` (TrainConfig's field names overlap DecodeConfig's with other meanings: steps).
_TRAIN_HELP = {
    "steps": "optimizer steps",
    "batch_size": "training sequences per step",
    "lr": "peak learning rate (linear warm-up, cosine decay to min_lr_ratio of it)",
    "block_sizes": "block sizes drawn per step (must include 1, the AR mode S2D2 verifies with)",
    "block_weights": "probabilities of block_sizes",
    "num_train": "distinct training problems generated",
    "tasks": "word-problem tasks the training problems come from (s2d2.evaluation.tasks: arith, wordy)",
    "task_weights": "shares of tasks",
    "eval_every": "steps between validation evaluations (AR greedy, eval_n problems per task)",
    "checkpoint_every": "steps between resumable checkpoints",
    "drill_fraction": "share of steps on bare-equation drills",
    "precision": "bf16: forwards under bfloat16 autocast (weights and optimizer float32); fp32",
    "length_buckets": "word-problem batches of similar length: consecutive steps share a length-sorted pool of this "
                      "many batches (1 = off)",
    "compile": "torch.compile the training steps (minutes of compiling first; eager where unavailable)",
}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type = DecodeConfig, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field of ``cls`` (kebab-case), defaulting to None so unset flags keep the defaults."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    helps = _HELP if cls is DecodeConfig else _TRAIN_HELP
    if cls is DecodeConfig:
        group.add_argument("--config", metavar="FILE", default=None,
                           help="decoding options from a JSON file (`s2d2 tune` writes one); flags given here win")
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not MISSING else None
        help_text = helps.get(f.name, f.name.replace("_", " "))
        if "default" not in help_text and "unset" not in help_text:  # texts that explain their default keep theirs
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        args = [a for a in get_args(tp) if a is not type(None)]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif get_origin(tp) is typing.Literal:
            group.add_argument(flag, choices=list(get_args(tp)), **kwargs)
        elif (item := list_item_type(tp)) is not None:
            group.add_argument(flag, type=item, nargs="*", metavar="X", **kwargs)
        else:
            base = args[0] if args else tp
            if get_origin(base) is typing.Literal:
                group.add_argument(flag, choices=list(get_args(base)), **kwargs)
            else:
                group.add_argument(flag, type=base, **kwargs)


def config_from_args(ns: argparse.Namespace, cls: type = DecodeConfig) -> Any:
    """The ``cls`` (DecodeConfig) the user asked for: only flags given on the command line override the defaults,
    or the fields of ``--config FILE`` (an ``s2d2 tune`` result) where one is given."""
    given = {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    base = DecodeConfig.file_fields(ns.config) if cls is DecodeConfig and getattr(ns, "config", None) else {}
    return cls(**{**base, **given})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one sentence and exit 2, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose and load the model, the same for every command that decodes."""
    parser.add_argument("--model", default="bundled", help="bundled, a local HF-format directory, or a hub id")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a peft LoRA adapter (local directory or hub id) merged into the weights at load")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--compile", action="store_true",
                        help="compile the forward with torch.compile (one-time warm-up, reported; eager where "
                             "unavailable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads torch computes with (default: the cores the rest of the machine leaves "
                             "idle at start, at least 1 and at most torch's own choice, one per core)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``s2d2`` argument parser."""
    parser = _Parser(prog="s2d2", description="Fast decoding for block-diffusion language models (S2D2).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="decode one or more prompts")
    gen.add_argument("prompt", nargs="*", help="the prompt text (several: decoded together, see --batch-size)")
    gen.add_argument("--prompts-file", default=None, metavar="FILE",
                     help="more prompts, one per line (\\n inside a line stands for a newline)")
    gen.add_argument("--batch-size", type=_batch_arg, default=None,
                     help="prompts decoded together, one batched forward per step: a number, or auto (default: as "
                          "many as fit in the free memory, up to 64 on a CPU, 256 on a GPU)")
    _add_model_flags(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                     help='a JSON object of extra chat template variables, e.g. \'{"enable_thinking": false}\' '
                          "(with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    gen.add_argument("--trace", default=None, metavar="FILE",
                     help="write each prompt's step trace as JSON lines (schema s2d2.trace/1; `s2d2 trace plot` "
                          "draws it)")
    _add_config_flags(gen)

    ev = sub.add_parser("eval", help="accuracy and decoding stats on a task with checkable answers")
    ev.add_argument("--task", default="wordy",
                    help="wordy (grade-school word problems from a grammar, with a generalisation split of held-out "
                         "sentence frames; the bundled model's main task, the default) or arith (templated ones)")
    # --limit (lm-eval's name) also serves under torchrun, whose own parser takes --n for an abbreviation of its flags
    ev.add_argument("--n", "--limit", dest="n", type=int, default=500, help="number of problems")
    ev.add_argument("--split", default="test", help="train, validation, test (wordy: also generalisation)")
    _add_model_flags(ev)
    ev.add_argument("--json", action="store_true", help='print {"accuracy": ..., "n": ..., "stats": {...}}')
    ev.add_argument("--batch-size", type=_batch_arg, default=None,
                    help=f"problems decoded together: a number, or auto (default: {DEFAULT_BATCH_SIZE})")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ev.add_argument("--samples", default=None, metavar="FILE",
                    help="also write one JSON line per problem (text, correct, NFE and the row's other counters)")
    _add_config_flags(ev)

    be = sub.add_parser("bench", help="methods side by side: accuracy, NFE, tokens/s, speedup vs AR")
    _add_model_flags(be)
    be.add_argument("--task", default="wordy", help="wordy (default) or arith")
    be.add_argument("--split", default="test", help="test (default), validation; wordy: also generalisation")
    be.add_argument("--n", "--limit", dest="n", type=int, default=None, help="problems (default 200; 10 with --quick)")
    be.add_argument("--grid", default=None, help='JSON list of {"name": ..., "config": {DecodeConfig fields}}')
    be.add_argument("--out", default="bench-out", help="directory for results.jsonl, results.md, pareto.png")
    be.add_argument("--repeats", type=int, default=None, help="timed rounds; medians are reported (default 3)")
    be.add_argument("--quick", action="store_true", help="a 3-setting grid, few problems, one round (for CI)")
    be.add_argument("--no-progress", action="store_true")
    be.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                    help="add a throughput section: AR, dynamic and S2D2 at these batch sizes (e.g. 1 4 16 64)")
    be.add_argument("--no-grid", action="store_true", help="with --batch-sizes: only the throughput section")
    be.add_argument("--config", default=None, metavar="FILE",
                    help="add this config file's setting (`s2d2 tune` writes one) to the grid and the throughput "
                         "section")

    tr_ = sub.add_parser("trace", help="draw a step trace (`s2d2 generate --trace FILE`)")
    trace_sub = tr_.add_subparsers(dest="trace_command", required=True)
    plot = trace_sub.add_parser("plot", help="a picture of what the decoder did at each step")
    plot.add_argument("traces", nargs="+", metavar="FILE", help="trace files; two or more are drawn side by side")
    plot.add_argument("-o", "--out", default="trace.png", help="the picture (PNG, SVG or PDF; default trace.png)")
    plot.add_argument("--row", type=int, default=0, help="which prompt of each file (default 0)")
    plot.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                      help="a name per file shown before its method and settings (e.g. the model)")

    tu = sub.add_parser("tune", help="the fastest setting within an accuracy budget of AR, on the validation split")
    _add_model_flags(tu)
    tu.add_argument("--task", default="wordy",
                    help="wordy (default) or arith, or lm-eval:NAME for an lm-eval generation task (its metric)")
    tu.add_argument("--metric", default=None, help="with lm-eval:NAME: the metric to hold within budget "
                                                  "(default: the task's first)")
    tu.add_argument("--split", default="validation", help="the split the choice is made on (default: validation)")
    tu.add_argument("--n", "--limit", dest="n", type=int, default=150, help="problems (default 150)")
    tu.add_argument("--max-accuracy-drop", type=float, default=1.0,
                    help="accuracy points below AR a setting may lose (default 1.0)")
    tu.add_argument("--objective", default="tokens_per_forward", choices=["tokens_per_forward", "tokens_per_s"],
                    help="what fastest means: tokens per forward (exact) or measured tokens/s at batch 1")
    tu.add_argument("--timed", type=int, default=3, help="with tokens_per_s: how many candidates to time (default 3)")
    tu.add_argument("--repeats", type=int, default=3, help="with tokens_per_s: timed rounds (default 3)")
    tu.add_argument("--batch-size", type=_batch_arg, default=None,
                    help=f"problems decoded together in the exact pass: a number, or auto (default: "
                         f"{DEFAULT_BATCH_SIZE})")
    tu.add_argument("--quick", action="store_true", help="a 3-setting search space (for tests)")
    tu.add_argument("--exact-only", action="store_true",
                    help="search only S2D2 settings whose verification keeps AR's tokens (no relax, no "
                         "commit-confident, no dynamic baselines)")
    tu.add_argument("--out", default="tuned.json", metavar="FILE",
                    help="where the chosen setting is written, for --config FILE (default tuned.json)")
    tu.add_argument("--report", default=None, metavar="FILE", help="also write every setting's record (JSON lines)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    _add_model_flags(sv)
    sv.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=_batch_arg, default="auto",
                    help="requests decoded together per engine: a number, or auto (default: as many as fit in the "
                         "memory left beside the weights, up to 64 on a CPU, 256 on a GPU)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a slot beyond --max-batch; more are answered 429 (default: 64)")
    sv.add_argument("--timeout", type=float, default=600.0,
                    help="seconds after which an unfinished request is cancelled, 504 (default: 600)")
    sv.add_argument("--data-parallel-size", "--dp", type=int, default=1, metavar="N",
                    help="engine processes, each with its own copy of the model (on CUDA, its own GPU: cuda:0 .. "
                         "cuda:N-1; on a CPU, --threads each, default the idle cores / N); requests go to the "
                         "least-loaded one (default: 1)")
    sv.add_argument("--api-key", default=os.environ.get("S2D2_API_KEY"),
                    help="require this key as 'Authorization: Bearer KEY' on every /v1 route (default: the "
                         "S2D2_API_KEY environment variable; unset: no key)")
    sv.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                    help="larger request bodies are answered 413 (default: 8 MiB)")
    sv.add_argument("--stream-interval", type=float, default=0.02, metavar="SECONDS",
                    help="streamed responses: hold each request's new text up to this long and send it as one chunk "
                         "(fewer, larger chunks, less work beside the engine; 0: every step) (default: 0.02)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds in-flight requests may take to finish before they are cut (default: 30)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_config_flags(sv)  # the server's defaults for every request

    from s2d2.training.config import TrainConfig

    tr = sub.add_parser("train", help="train a small SDAR-architecture model on synthetic word problems (the "
                                      "bundled model's recipe: scripts/train_bundled.sh)",
                        description="Train a small SDAR-architecture block-diffusion model on synthetic word problems. "
                                    "The defaults are a shorter arith-only run; the bundled model's recipe is "
                                    "scripts/train_bundled.sh (wordy and arith, 6000 compiled steps, 74 minutes on "
                                    "2 CPU cores).")
    tr.add_argument("--out", required=True, help="output directory (resumes if it holds a run)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(tr, TrainConfig, skip=("out",))

    init = sub.add_parser("init-random", help="write a tiny randomly initialised model in HF format")
    init.add_argument("--family", required=True, help="sdar, fast_dllm_v2, llada2, d2f_llada or d2f_dream")
    init.add_argument("--out", required=True, type=Path, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    return parser


def _generate(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns)  # validate flags before the (slow) model load
    batch_size = _batch_size(ns.batch_size)
    template_kwargs = _json_object_flag("--chat-template-kwargs", ns.chat_template_kwargs)
    if template_kwargs and not ns.chat:
        raise S2D2Error("--chat-template-kwargs needs --chat.")
    if "messages" in template_kwargs:
        raise S2D2Error("--chat-template-kwargs cannot set 'messages': the prompt is the message.")
    texts = list(ns.prompt) + (_read_prompts_file(ns.prompts_file) if ns.prompts_file else [])
    if not texts:
        raise S2D2Error("give a prompt (or several, or --prompts-file FILE).")
    trace_file = _open_output(ns.trace, "--trace") if ns.trace else None  # a bad path fails before any work
    model = _load_model(ns, ns.device)
    if ns.chat:
        texts = [model.apply_chat_template([{"role": "user", "content": t}], **template_kwargs) for t in texts]
    outs = model.generate(texts, cfg, batch_size=batch_size, trace=trace_file is not None)
    _say_plan(model)
    if trace_file is not None:
        with trace_file:
            for i, out in enumerate(outs):
                header = {**out.trace[0], "text": texts[i], "prompt_ids": model.encode(texts[i]),
                          "tokens": {str(t): model.decode([t]) for t in sorted(set(out.token_ids))}}
                trace_file.writelines(json.dumps({"row": i, **event}) + "\n" for event in [header, *out.trace[1:]])
    for out in outs:  # one JSON object per prompt (JSON Lines), or the texts
        print(json.dumps(out.to_dict()) if ns.json else out.text)
    if not ns.json:
        total = model.summed_stats(outs)
        print(f"[{cfg.method}] {total.summary()}", file=sys.stderr)
    return 0


def _load_model(ns: argparse.Namespace, device: str) -> typing.Any:
    """The :class:`s2d2.Model` a command names (``--model``, ``--adapter``, ``--dtype`` on ``device``), after
    setting torch's CPU threads (``--threads``, default :func:`auto_threads`); with ``--compile`` its forward is
    compiled now, and the one-time warm-up is reported on stderr."""
    import torch

    from s2d2.api import load

    threads = _threads(ns)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    model = load(ns.model, device=device, dtype=ns.dtype, adapter=ns.adapter, compile=ns.compile)
    if ns.dtype == "auto" and model.device.type == "cpu" and model.dtype != torch.float32:
        params = sum(p.numel() for p in model.adapter.model.parameters())
        print(f"[s2d2] dtype auto: {str(model.dtype).removeprefix('torch.')} ({params / 1e9:.2f}B parameters, native "
              "bfloat16 on this CPU; --dtype float32 keeps greedy S2D2 == AR exact)", file=sys.stderr, flush=True)
    if ns.compile:
        print("[s2d2] compiling the forward (torch.compile, one-time warm-up) ...", file=sys.stderr, flush=True)
        seconds = model.warm_up()
        state = "compiled" if model.adapter.model.compiled else "not compiled (eager; see the warning above)"
        print(f"[s2d2] forward {state}, warm-up {seconds:.1f} s", file=sys.stderr, flush=True)
    return model


def _threads(ns: argparse.Namespace, processes: int = 1) -> int:
    """The CPU threads each of ``processes`` decoding processes computes with: ``--threads``, or by default its
    share of :func:`auto_threads` (at least 1)."""
    import torch

    if ns.threads is not None and ns.threads < 1:
        raise S2D2Error(f"--threads must be at least 1, got {ns.threads}.")
    return ns.threads or max(1, auto_threads(torch.get_num_threads()) // processes)


def idle_cores(seconds: float = 0.05) -> float | None:
    """How many of this process's cores the rest of the machine left idle over the next ``seconds`` (Linux:
    ``/proc/stat`` idle and iowait time of the cores in this process's affinity set, in 10 ms ticks, so 50 ms read
    it to a fifth of a core), None where that cannot be read (other systems, restricted containers)."""
    import os
    import time

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *ticks = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit()):
                    continue
                if allowed is not None and int(name[3:]) not in allowed:
                    continue
                values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
                total, idle = total + sum(values), idle + values[3] + values[4]
        return total, idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return None
    cores = len(allowed) if allowed is not None else (os.cpu_count() or 1)
    return cores * (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def auto_threads(most: int, idle: float | None = None) -> int:
    """``--threads``' default: as many threads as there are idle cores (rounded), at least 1, at most ``most``
    (torch's own choice, one per core). Measured with the bundled model on 2 cores (scripts/threads_bench.py,
    BENCHMARKS.md "Threads"): on an idle machine 2 threads give 0.99-1.47x one thread's tokens/s, but with one or
    both cores busy with other work they give 0.17-0.65x, since every parallel region waits for the thread that
    lost its core. ``idle``: the measured idle cores (measured now when not given)."""
    idle = idle_cores() if idle is None else idle
    if idle is None:
        return most
    return max(1, min(most, int(idle + 0.5)))


def _say_plan(model: typing.Any) -> None:
    """One line on stderr when ``--batch-size auto`` decoded fewer rows together than it would have with more memory."""
    plan = model.last_batch_plan
    if plan is not None and plan.limited:
        print(f"[s2d2] {plan.describe()}: memory bounds the batch", file=sys.stderr, flush=True)


def _batch_arg(text: str) -> int | str:
    """``--batch-size``: ``auto`` or a whole number (argparse reports anything else in its usage message)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor auto") from None


def _batch_size(value: int | str | None) -> int | str:
    return DEFAULT_BATCH_SIZE if value is None else check_batch_size(value)


def _open_output(path: str, flag: str) -> typing.TextIO:
    """``path`` opened for writing (UTF-8), or one sentence saying why it cannot be."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise S2D2Error(f"cannot write {flag} {path} ({e.strerror or type(e).__name__}).") from None


def _read_prompts_file(path: str) -> list[str]:
    """Prompts, one per line; blank lines are skipped and a literal backslash-n stands for a newline."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise S2D2Error(f"cannot read --prompts-file {path} ({e.strerror or type(e).__name__}).") from None
    return [line.replace("\\n", "\n") for line in lines if line.strip()]


def _json_object_flag(flag: str, text: str | None) -> dict[str, Any]:
    """The JSON object a flag holds ({} when the flag is not given); anything else is a one-sentence error."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise S2D2Error(f"{flag} is not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(value, dict):
        raise S2D2Error(f"{flag} must be a JSON object, not {type(value).__name__}.")
    return value


def _eval(ns: argparse.Namespace) -> int:
    from s2d2.evaluation.evaluate import evaluate

    cfg = config_from_args(ns)
    if ns.generation_config is None:  # accuracy is measured greedily unless sampling is asked for explicitly
        cfg = cfg.replace(generation_config="none")
    if ns.n < 1:
        raise S2D2Error(f"--n must be >= 1, got {ns.n}.")
    batch_size = _batch_size(ns.batch_size)
    with DataParallel.from_env(ns.device) as dp:  # torchrun: this process's rank; else a single process
        # a bad path fails before any work (rank 0 writes the results)
        samples = _open_output(ns.samples, "--samples") if ns.samples and dp.is_main else None
        model = _load_model(ns, dp.device(ns.device))
        result = evaluate(model, cfg, ns.task, ns.n, ns.split, batch_size=batch_size, dp=dp,
                          progress=not ns.no_progress)
        _say_plan(model)
    if not dp.is_main:
        return 0
    if samples is not None:
        with samples:
            samples.writelines(json.dumps(r) + "\n" for r in result.samples)
    if ns.json:
        print(json.dumps({**result.to_dict(), "world_size": dp.world_size}))
    else:
        by_level = ", ".join(f"level {k}: {v:.1%}" for k, v in result.accuracy_by_level.items())
        ranks = f" ({dp.world_size} processes)" if dp.world_size > 1 else ""
        print(f"{ns.task} {ns.split}: accuracy {result.accuracy:.1%} on {result.n} problems ({by_level}){ranks}")
        print(f"[{cfg.method}] {result.stats.summary()}")
    return 0


def _bench(ns: argparse.Namespace) -> int:
    from s2d2.evaluation import bench
    from s2d2.evaluation.evaluate import TASKS

    if ns.task not in TASKS:
        raise S2D2Error(f"--task must be one of {', '.join(TASKS)}; got {ns.task!r}.")
    n = ns.n if ns.n is not None else (10 if ns.quick else 200)
    repeats = ns.repeats if ns.repeats is not None else (1 if ns.quick else 3)
    if n < 1 or repeats < 1:
        raise S2D2Error("--n and --repeats must be >= 1.")
    batch_sizes = [check_batch_size(b) for b in ns.batch_sizes or []]
    if ns.no_grid and not batch_sizes:
        raise S2D2Error("--no-grid needs --batch-sizes: there would be nothing to run.")
    grid = bench.load_grid(ns.grid) if ns.grid else bench.default_grid(quick=ns.quick)
    tuned = [bench.Setting(f"config {ns.config}", DecodeConfig.file_fields(ns.config))] if ns.config else []
    grid += tuned
    with DataParallel.from_env(ns.device) as dp:
        if dp.world_size > 1 and batch_sizes:
            raise S2D2Error("--batch-sizes measures one process's batched engine; run it without torchrun.")
        return _run_bench(ns, bench, grid, n, repeats, batch_sizes, dp, tuned)


def _run_bench(ns: argparse.Namespace, bench: Any, grid: list[Any], n: int, repeats: int, batch_sizes: list[int],
               dp: DataParallel, tuned: list[Any]) -> int:
    from s2d2.evaluation.tasks import task_module

    task = task_module(ns.task, ns.split)
    model = _load_model(ns, dp.device(ns.device))
    problems = task.generate(ns.split, n, seed=0)
    prompts = [p.prompt for p in problems]

    def checker(i: int, text: str) -> bool:
        return task.is_correct(problems[i], text)

    out = Path(ns.out)
    ranks = f", {dp.world_size} processes" if dp.world_size > 1 else ""
    title = f"{ns.model} on {ns.task} ({n} {ns.split} problems, {repeats} round{'s' if repeats != 1 else ''}{ranks})"
    if not ns.no_grid:
        records = bench.run_bench(model, prompts, checker, grid, repeats=repeats, progress=not ns.no_progress, dp=dp)
        if not dp.is_main:
            return 0
        bench.write_outputs(records, out, title)
        print((out / "results.md").read_text())
    if batch_sizes:
        records = bench.run_throughput(model, prompts, checker, bench.throughput_grid(quick=ns.quick) + tuned,
                                       batch_sizes, repeats=repeats, progress=not ns.no_progress)
        bench.write_throughput(records, out, f"batched: {title}")
        print((out / "throughput.md").read_text())
    return 0


def _trace(ns: argparse.Namespace) -> int:
    from s2d2.evaluation.trace_plot import plot_traces, read_trace

    if ns.labels is not None and len(ns.labels) != len(ns.traces):
        raise S2D2Error(f"--labels needs one name per trace file ({len(ns.traces)}), got {len(ns.labels)}.")
    traces = [read_trace(path, ns.row) for path in ns.traces]
    try:
        plot_traces(traces, ns.out, labels=ns.labels)
    except (OSError, ValueError) as e:  # an unwritable path, or a suffix matplotlib has no format for
        raise S2D2Error(f"cannot write {ns.out} ({getattr(e, 'strerror', None) or e}).") from None
    print(f"wrote {ns.out}")
    return 0


def _tune(ns: argparse.Namespace) -> int:
    from s2d2.evaluation.tasks import TASKS, task_module
    from s2d2.evaluation.tune import search_space, tune, verification, winner_config

    lm_task = ns.task[len("lm-eval:"):] if ns.task.startswith("lm-eval:") else None
    if lm_task is None and ns.task not in TASKS:
        raise S2D2Error(f"--task must be one of {', '.join(TASKS)} or lm-eval:NAME; got {ns.task!r}.")
    task = task_module(ns.task, ns.split) if lm_task is None else None
    if lm_task is not None and ns.split not in ("train", "validation", "test"):
        raise S2D2Error(f"--split must be one of train, validation, test; got {ns.split!r}.")
    if ns.n < 1 or ns.timed < 1 or ns.repeats < 1:
        raise S2D2Error("--n, --timed and --repeats must be >= 1.")
    if lm_task is not None and ns.objective != "tokens_per_forward":
        raise S2D2Error("with an lm-eval task, tune chooses by tokens per forward (--objective tokens_per_forward).")
    batch_size = _batch_size(ns.batch_size)
    with DataParallel.from_env(ns.device) as dp:
        if lm_task is not None and dp.world_size > 1:
            raise S2D2Error("tune on an lm-eval task runs in one process; launch it without torchrun.")
        # a bad path fails before any work (rank 0 writes the results)
        out = _open_output(ns.out, "--out") if dp.is_main else None
        report = _open_output(ns.report, "--report") if ns.report and dp.is_main else None
        model = _load_model(ns, dp.device(ns.device))
        space = search_space(ns.quick, ns.exact_only)
        if lm_task is not None:
            from s2d2.evaluation.tune import lm_eval_exact, search

            exact = lm_eval_exact(model, lm_task, ns.split, ns.n, batch_size, ns.metric)
            result = search(exact, space, ns.max_accuracy_drop, progress=dp.is_main)
        else:
            problems = task.generate(ns.split, ns.n, seed=0)
            result = tune(model, [p.prompt for p in problems], lambda i, text: task.is_correct(problems[i], text),
                          space, ns.max_accuracy_drop, ns.objective, ns.timed, ns.repeats, batch_size, dp,
                          progress=dp.is_main)
    if out is None:
        return 0
    with out:
        out.write(json.dumps(winner_config(result), indent=1) + "\n")
    if report is not None:
        with report:
            report.writelines(json.dumps(r) + "\n" for r in result.records)
    print(f"{ns.task} {ns.split}, {ns.n} problems; AR accuracy {result.ar_accuracy:.1%}; budget: at most "
          f"{ns.max_accuracy_drop:g} points below AR; objective: {ns.objective}\n")
    print(result.table())
    print(f"\nchosen: {result.winner['name']}, verification {verification(result.winner['config'])} -> {ns.out} "
          f"(use it with --config {ns.out})")
    return 0


def _train(ns: argparse.Namespace) -> int:
    from s2d2.training.train import TrainConfig, train

    ns.out = str(ns.out)
    cfg = config_from_args(ns, TrainConfig)
    path = train(cfg, progress=not ns.no_progress)
    print(f"trained model in {path}")
    return 0


def _init_random(ns: argparse.Namespace) -> int:
    from s2d2.training.random_init import LORA_ADAPTER_DIR, write_random_model

    if ns.seed < 0:
        raise S2D2Error(f"--seed must be a non-negative integer, got {ns.seed}.")
    if ns.out.exists() and not ns.out.is_dir():
        raise S2D2Error(f"--out {ns.out} exists and is not a directory.")
    if (ns.out / "config.json").exists() and not ns.force:
        raise S2D2Error(f"{ns.out} already holds a model; pass --force to overwrite it.")
    try:
        path = write_random_model(ns.out, family=ns.family, seed=ns.seed)
    except OSError as e:
        raise S2D2Error(f"cannot write {ns.out}: {e.strerror or e}.") from None
    print(f"wrote a random {ns.family} model to {path}")
    if (path / LORA_ADAPTER_DIR / "adapter_config.json").is_file():
        print(f"and its LoRA adapter to {path / LORA_ADAPTER_DIR} (pass it with --adapter)")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    try:
        from s2d2.serve.app import serve
        from s2d2.serve.protocol import ServerConfig
    except ImportError as e:
        raise S2D2Error(f"s2d2 serve needs the serve extra (pip install 's2d2[serve]'): {e}.") from None
    if not 0 <= ns.port <= 65535:
        raise S2D2Error(f"--port must be between 0 and 65535, got {ns.port}.")
    from s2d2.api import load
    from s2d2.serve.core import ModelSource

    cfg = ServerConfig(model_name=ns.served_model_name or ns.model, max_batch=ns.max_batch, max_queue=ns.max_queue,
                       timeout_s=ns.timeout, defaults=config_from_args(ns), api_key=ns.api_key,
                       max_body_bytes=ns.max_body_bytes, shutdown_timeout_s=ns.shutdown_timeout,
                       data_parallel_size=ns.data_parallel_size, stream_interval_s=ns.stream_interval)
    # The API process tokenizes and formats with the model's files alone (no weights: the meta device); each engine
    # process loads the weights itself, with its share of the idle cores on a CPU.
    threads = None if ns.device.startswith("cuda") and ns.threads is None else _threads(ns, ns.data_parallel_size)
    model = load(ns.model, device="meta", dtype=ns.dtype)
    model.resolve_config(cfg.defaults)  # the defaults must suit this model before any request arrives
    source = ModelSource(ns.model, device=ns.device, dtype=ns.dtype, adapter=ns.adapter, compile=ns.compile,
                         threads=threads)
    serve(model, cfg, host=ns.host, port=ns.port, log_level=ns.log_level, source=source)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``s2d2`` console script."""
    ns = build_parser().parse_args(argv)
    try:
        commands = {"generate": _generate, "eval": _eval, "bench": _bench, "tune": _tune, "trace": _trace,
                    "serve": _serve, "train": _train, "init-random": _init_random}
        return commands[ns.command](ns)
    except S2D2Error as e:
        print(f"s2d2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
