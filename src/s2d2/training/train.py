"""Training a small SDAR-architecture model with the block-diffusion objective (the bundled model's recipe).

Objective (BD3-LM / SDAR style, with the two streams of cpu-notes.md): the input is ``[x_clean ; x_noisy]``
with positions repeated. Clean rows attend causally (so their K/V are exactly what ``cache_ver`` decoding caches:
the AR-consistent cache), noisy rows attend bidirectionally within their block and to the clean tokens of earlier
blocks. Response positions of each noisy block are masked with probability t ~ U(0, 1) drawn per block; the loss
is the cross-entropy of the masked positions, logits position-aligned (a mask predicts itself). The block size is
drawn per batch from ``block_sizes``, which include 1: a block of one mask that sees the causal prefix is exactly
the AR mode the S2D2 verifier runs, so the same objective trains drafter and verifier.

A share of the steps (``drill_fraction``) trains on bare equations instead of word problems (``arith.drill``):
a small model's remaining errors are carries and borrows, and word problems repeat each fact only a few times.
Forwards run under bfloat16 autocast by default (``precision``), about 1.5x faster on CPUs with AVX-512 BF16;
weights, optimizer state and the loss stay float32. ``compile`` runs the steps through torch.compile.

Only the prompt is never masked; the response is followed by end-of-sequence tokens up to the end of the block
holding the first one (what a decoder sees after the answer). Data order is a pure function of (seed, step), so a
resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from s2d2.models.decoder import Decoder, DecoderConfig
from s2d2.training.config import TrainConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|mask|>")
# The chat template written into tokenizer_config.json: chat turns in the task's own format, a user message becoming
# "Q: <message>\nA:" (what the model was trained on), so chat APIs (s2d2 serve's /v1/chat/completions) work.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\\nA:' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + '\\n' }}"
    "{%- else -%}{{ raise_exception('message roles are system, user and assistant, not ' + m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """Byte-level BPE with every digit its own token (numbers stay digit by digit) and the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


# --------------------------------------------------------------------------------------------------- batches
@dataclass
class Example:
    prompt: list[int]
    response: list[int]  # target tokens then one end-of-sequence token


def two_stream_mask(length: int, noisy_start: int, block_size: int) -> torch.Tensor:
    """``[L + N, L + N]`` bool: clean rows causal; noisy rows (positions ``noisy_start..L-1``) see the clean
    tokens of earlier blocks and the noisy tokens of their own block."""
    n = length - noisy_start
    pos_c = torch.arange(length)
    pos_n = torch.arange(noisy_start, length)
    mask = torch.zeros(length + n, length + n, dtype=torch.bool)
    mask[:length, :length] = pos_c[:, None] >= pos_c[None, :]
    blk_n = pos_n // block_size
    mask[length:, :length] = pos_c[None, :] < (blk_n * block_size)[:, None]
    mask[length:, length:] = blk_n[:, None] == blk_n[None, :]
    return mask


def make_batch(examples: list[Example], block_size: int, eos_id: int, mask_id: int,
               rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Input ids, positions, mask and labels (-100 = no loss) for one block-diffusion batch."""
    ends = [-(-(len(e.prompt) + len(e.response)) // block_size) * block_size for e in examples]
    length = max(ends)
    noisy_start = min(len(e.prompt) for e in examples) // block_size * block_size
    b, n = len(examples), length - noisy_start
    clean = torch.full((b, length), eos_id, dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    noisy = torch.empty((b, n), dtype=torch.long)
    for r, (e, end) in enumerate(zip(examples, ends)):
        seq = e.prompt + e.response
        clean[r, : len(seq)] = torch.tensor(seq)
        p = len(e.prompt)
        row = clean[r, noisy_start:].clone()
        # per-block masking ratio; block size 1 masks every response position (pure AR training)
        num_blocks = -(-n // block_size)
        t = np.ones(num_blocks) if block_size == 1 else rng.random(num_blocks)
        u = rng.random(n)
        pos = np.arange(noisy_start, length)
        masked = (u < t[(pos - noisy_start) // block_size]) & (pos >= p) & (pos < end)
        masked_t = torch.from_numpy(masked)
        labels[r][masked_t] = row[masked_t]
        row[masked_t] = mask_id
        noisy[r] = row
    positions = torch.cat((torch.arange(length), torch.arange(noisy_start, length)))
    return {
        "input_ids": torch.cat((clean, noisy), dim=1),
        "position_ids": positions[None].expand(b, -1),
        "attn_mask": two_stream_mask(length, noisy_start, block_size)[None, None],
        "labels": labels,
        "logits_from": torch.tensor(length),
    }


def batch_loss(model: Decoder, batch: dict[str, torch.Tensor], precision: str = "fp32") -> torch.Tensor:
    """Mean cross-entropy over the masked noisy positions. ``precision="bf16"`` runs the forward under CPU
    autocast (weights and optimizer stay float32); the loss itself is always computed in float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(batch["input_ids"], batch["position_ids"], None, batch["attn_mask"],
                       logits_from=int(batch["logits_from"]))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           ignore_index=-100)


def training_problems(cfg: TrainConfig) -> list[Any]:
    """The ``num_train`` training problems: each task's share of its ``train`` split (seeded), interleaved by a
    seeded shuffle when there are several tasks (one task: its problems in order, as before tasks existed)."""
    from s2d2.evaluation.tasks import task_module

    total = sum(cfg.task_weights)
    counts = [round(cfg.num_train * w / total) for w in cfg.task_weights]
    problems = [p for task, n in zip(cfg.tasks, counts) for p in task_module(task).generate("train", n, seed=cfg.seed)]
    if len(cfg.tasks) > 1:
        random.Random(cfg.seed).shuffle(problems)
    return problems


def draw_examples(step_rng: np.random.Generator, examples: list[Example], cfg: TrainConfig,
                  encode: Callable[[list[str]], list[list[int]]], eos_id: int, step: int) -> list[Example]:
    """The examples of one step: with probability ``drill_fraction`` a batch of bare-equation drills, twice
    ``batch_size`` of them since they are about a third as long (similar tokens per step); otherwise
    ``batch_size`` word problems drawn from the training set (with ``length_buckets`` > 1, this step's share of
    its group's length-sorted pool). A function of (seed, step), so a resumed run draws the same batches."""
    from s2d2.evaluation.tasks import arith

    if step_rng.random() < cfg.drill_fraction:
        rng = random.Random(int(step_rng.integers(2**62)))
        problems = [arith.drill(rng) for _ in range(2 * cfg.batch_size)]
        prompts = encode([p.prompt for p in problems])
        targets = encode([p.target for p in problems])
        return [Example(a, b + [eos_id]) for a, b in zip(prompts, targets)]
    k = cfg.length_buckets
    if k == 1:
        return [examples[i] for i in step_rng.integers(0, len(examples), cfg.batch_size)]
    pool_rng = np.random.default_rng([cfg.seed, step // k, 1])  # the group's own stream (steps use [seed, step])
    pool = pool_rng.integers(0, len(examples), k * cfg.batch_size)
    pool = sorted(pool, key=lambda i: (len(examples[i].prompt) + len(examples[i].response), i))
    slot = int(pool_rng.permutation(k)[step % k])  # long and short batches in no fixed order within the group
    return [examples[i] for i in pool[slot * cfg.batch_size:(slot + 1) * cfg.batch_size]]


# -------------------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def model_config(cfg: TrainConfig, vocab_size: int, eos_id: int, mask_id: int) -> dict[str, Any]:
    """config.json of the trained model (SDAR layout)."""
    return {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": cfg.max_positions,
        "tie_word_embeddings": False, "attention_bias": False, "block_size": 4, "mask_token_id": mask_id,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id, "torch_dtype": "float32",
    }


def _save(model: Decoder, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig, out: Path) -> None:
    """Weights (HF names) and optimizer moments as safetensors, step in trainer_state.json; atomic renames."""
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.float() for k, v in model.hf_state_dict().items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    moments = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p)
        if st:
            moments[f"{i}.exp_avg"], moments[f"{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            moments[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(moments, str(out / "optimizer.safetensors.tmp"))
    os.replace(out / "optimizer.safetensors.tmp", out / "optimizer.safetensors")
    (out / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2))


def _restore(model: Decoder, opt: torch.optim.Optimizer, out: Path) -> int:
    """Load a previous run's weights and optimizer moments; returns the step to continue from (0 if none)."""
    state_file = out / "trainer_state.json"
    if not state_file.exists():
        return 0
    step = int(json.loads(state_file.read_text())["step"])
    model.load_hf_state_dict(load_file(str(out / "model.safetensors")))
    moments = load_file(str(out / "optimizer.safetensors"))
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"{i}.exp_avg" in moments:
            opt.state[p] = {"exp_avg": moments[f"{i}.exp_avg"], "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
                            "step": moments[f"{i}.step"][0].clone()}
    return step


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a word-problem model in ``cfg.out``; returns the directory, a loadable HF-format model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, progress: bool) -> Path:
    from s2d2.training.random_init import (
        init_weights,  # one initialiser for random and trained models
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = training_problems(cfg)
    tok_path = out / "tokenizer.json"
    if tok_path.exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer([p.prompt + p.target for p in problems[:50_000]], cfg.vocab_size)
        tok.save(str(tok_path))
    eos_id, mask_id = tok.token_to_id(SPECIAL_TOKENS[0]), tok.token_to_id(SPECIAL_TOKENS[1])
    hf_config = model_config(cfg, tok.get_vocab_size(), eos_id, mask_id)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id], "pad_token_id": eos_id}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL_TOKENS[0],
         "pad_token": SPECIAL_TOKENS[0], "mask_token": SPECIAL_TOKENS[1], "bos_token": None,
         "chat_template": CHAT_TEMPLATE}, indent=2))

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts)]

    examples = [Example(a, b + [eos_id]) for a, b in zip(encode([p.prompt for p in problems]),
                                                          encode([p.target for p in problems]))]

    torch.manual_seed(cfg.seed)
    model = Decoder(DecoderConfig.from_hf(hf_config, qk_norm=True, qkv_bias=False))
    init_weights(model, cfg.seed, weight_std=0.02, norm_std=0.0)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = _restore(model, opt, out)
    if cfg.compile:
        model.compile()
    log = (out / "train_log.jsonl").open("a")
    weights = np.array(cfg.block_weights) / sum(cfg.block_weights)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    t0 = time.time()
    model.train()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        block_size = int(rng.choice(cfg.block_sizes, p=weights))
        batch = make_batch(draw_examples(rng, examples, cfg, encode, eos_id, step), block_size, eos_id, mask_id, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = batch_loss(model, batch, cfg.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        record = {"step": step + 1, "loss": round(loss.item(), 5), "block_size": block_size,
                  "lr": lr_at(step, cfg), "elapsed_s": round(time.time() - t0, 1)}
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            model.eval()
            _save(model, opt, step + 1, cfg, out)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                for i, task in enumerate(cfg.tasks):  # the first task's under the name of single-task runs
                    key = "val_accuracy_ar" if i == 0 else f"val_accuracy_ar_{task}"
                    record[key] = evaluate_dir(out, n=cfg.eval_n, split="validation", task=task)
            model.train()
        log.write(json.dumps(record) + "\n")
        log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", B=block_size,
                            **({"acc": record["val_accuracy_ar"]} if "val_accuracy_ar" in record else {}))
    if bar is not None:
        bar.close()
    return out


def evaluate_dir(model_dir: Path, n: int, split: str = "validation", task: str = "arith") -> float:
    """AR greedy accuracy of the checkpoint in ``model_dir`` on ``n`` problems of ``task``'s ``split``."""
    from s2d2.api import load
    from s2d2.config import DecodeConfig
    from s2d2.evaluation.evaluate import evaluate

    return evaluate(load(str(model_dir)), DecodeConfig(method="ar", max_new_tokens=64), task=task, n=n,
                    split=split).accuracy
