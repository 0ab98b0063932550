"""The block-diffusion training objective: masks, batches, and a resumable, deterministic run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import s2d2
from s2d2.errors import ConfigError
from s2d2.training.train import Example, TrainConfig, make_batch, train, two_stream_mask


def test_two_stream_mask_by_hand():
    # 6 clean positions, noisy stream from position 2, blocks of 2
    m = two_stream_mask(6, 2, 2)
    clean, noisy = m[:6, :6], m[6:, :]
    assert torch.equal(clean, torch.ones(6, 6, dtype=torch.bool).tril())  # clean rows are causal
    assert not m[:6, 6:].any()  # clean rows never see the noisy stream
    # noisy position 4 (block 2) sees clean 0-3 and noisy 4, 5; not clean 4, 5 (its own block's answers)
    row = noisy[2]
    assert row[:6].tolist() == [True, True, True, True, False, False]
    assert row[6:].tolist() == [False, False, True, True]


def test_batches_mask_only_the_response_and_label_what_they_mask():
    rng = np.random.default_rng(0)
    examples = [Example([1, 2, 3], [4, 5, 6, 0]), Example([1, 2, 3, 4, 5], [6, 7, 0])]
    for block_size in (1, 2, 4):
        b = make_batch(examples, block_size, eos_id=0, mask_id=99, rng=rng)
        length = int(b["logits_from"])
        noisy = b["input_ids"][:, length:]
        positions = b["position_ids"][0, length:]
        for r, e in enumerate(examples):
            masked = noisy[r] == 99
            assert not masked[positions < len(e.prompt)].any()  # the prompt is never masked
            assert torch.equal(b["labels"][r] != -100, masked)  # loss exactly where masked
            clean = b["input_ids"][r, :length]
            assert torch.equal(b["labels"][r][masked], clean[positions[masked]])
            if block_size == 1:  # pure AR rows: every response position (and EOS) is a prediction
                assert masked.sum() == len(e.response)


SMALL = dict(seed=0, batch_size=4, num_train=300, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
             num_kv_heads=1, head_dim=16, intermediate_size=64, eval_n=2, eval_every=1000, threads=1)


def test_a_tiny_run_logs_checkpoints_and_loads(tmp_path):
    a = train(TrainConfig(out=str(tmp_path / "a"), steps=4, checkpoint_every=4, **SMALL), progress=False)
    c = train(TrainConfig(out=str(tmp_path / "c"), steps=4, checkpoint_every=2, **SMALL), progress=False)
    wa, wc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # checkpointing does not change the run: seeded, in order
    assert json.loads((c / "trainer_state.json").read_text())["step"] == 4
    log = [json.loads(line) for line in (c / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val_accuracy_ar" in log[-1]
    model = s2d2.load(str(a))  # a loadable SDAR checkpoint
    out = model.generate("Q: Tom has 3 apples.\nA:", s2d2.DecodeConfig(method="ar", max_new_tokens=5))[0]
    assert out.stats.num_tokens <= 5


def test_resume_continues_from_the_checkpoint(tmp_path, monkeypatch):
    small = dict(SMALL, checkpoint_every=2)
    straight = train(TrainConfig(out=str(tmp_path / "straight"), steps=4, **small), progress=False)
    # a run killed right after its step-2 checkpoint, then started again with the same command
    import s2d2.training.train as tr

    calls = {"n": 0}
    real_save = tr._save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), steps=4, **small), progress=False)
    monkeypatch.setattr(tr, "_save", real_save)
    train(TrainConfig(out=str(tmp_path / "resumed"), steps=4, **small), progress=False)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_drill_steps_and_precision_are_validated_and_deterministic():
    with pytest.raises(s2d2.ConfigError, match="drill_fraction"):
        TrainConfig(out="x", drill_fraction=1.0)
    with pytest.raises(s2d2.ConfigError, match="precision"):
        TrainConfig(out="x", precision="fp16")
    from s2d2.training.train import draw_examples

    cfg = TrainConfig(out="x", batch_size=4, drill_fraction=0.5)
    pool = [Example([1, 2], [3, 0])] * 10

    def encode(texts):
        return [[ord(ch) % 50 for ch in t] for t in texts]

    kinds = set()
    for step in range(20):
        a = draw_examples(np.random.default_rng([0, step]), pool, cfg, encode, eos_id=0, step=step)
        b = draw_examples(np.random.default_rng([0, step]), pool, cfg, encode, eos_id=0, step=step)
        assert a == b  # a function of (seed, step), so resumed runs draw the same batches
        kinds.add(len(a))
    assert kinds == {4, 8}  # word-problem steps take batch_size examples, drill steps twice as many


def test_length_buckets_split_a_sorted_pool_between_consecutive_steps():
    """With length_buckets = k, steps g*k .. g*k+k-1 take the k slices of one length-sorted pool (each example of
    the pool once, every batch's lengths a contiguous range of the sort), in a seeded order; a function of (seed,
    step) like unbucketed draws; k = 1 draws as before."""
    from s2d2.training.train import draw_examples

    examples = [Example([1] * (3 + i % 17), [2] * (1 + i % 5) + [0]) for i in range(500)]
    cfg = TrainConfig(out="x", batch_size=8, drill_fraction=0.0, length_buckets=4)
    with pytest.raises(ConfigError, match="length_buckets"):
        TrainConfig(out="x", length_buckets=0)

    def draw(step, c=cfg):
        return draw_examples(np.random.default_rng([0, step]), examples, c, lambda t: [], eos_id=0, step=step)

    def length(e):
        return len(e.prompt) + len(e.response)

    orders = []
    for group in range(3):
        batches = [draw(step) for step in range(4 * group, 4 * group + 4)]
        assert batches == [draw(step) for step in range(4 * group, 4 * group + 4)]  # resumable
        ranges = sorted((min(map(length, b)), max(map(length, b))) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))  # disjoint length ranges
        orders.append([min(map(length, b)) for b in batches])
        pool_rng = np.random.default_rng([0, group, 1])
        assert sorted(map(id, sum(batches, []))) == sorted(id(examples[i]) for i in pool_rng.integers(0, 500, 32))
    assert len({tuple(np.argsort(o)) for o in orders}) > 1  # short and long batches in no fixed order
    unbucketed = TrainConfig(out="x", batch_size=8, drill_fraction=0.0)
    rng = np.random.default_rng([0, 5])
    rng.random()  # the drill draw
    assert draw(5, unbucketed) == [examples[i] for i in rng.integers(0, 500, 8)]


def test_training_problems_mix_tasks_by_weight_and_keep_the_single_task_order():
    from s2d2.evaluation.tasks import arith, wordy
    from s2d2.training.train import training_problems

    single = training_problems(TrainConfig(out="x", num_train=50))
    assert [p.prompt for p in single] == [p.prompt for p in arith.generate("train", 50, seed=0)]
    mixed = training_problems(TrainConfig(out="x", num_train=100, tasks=("wordy", "arith"), task_weights=(3.0, 1.0)))
    kinds = [isinstance(p, wordy.WordyProblem) for p in mixed]
    assert len(mixed) == 100 and sum(kinds) == 75
    assert kinds[:75] != [True] * 75  # interleaved, not one task after the other
    assert mixed == training_problems(TrainConfig(out="x", num_train=100, tasks=("wordy", "arith"),
                                                  task_weights=(3.0, 1.0)))  # seeded
    for bad in (dict(tasks=("wordy",), task_weights=(1.0, 1.0)), dict(tasks=("nope",), task_weights=(1.0,)),
                dict(tasks=("wordy", "wordy"), task_weights=(1.0, 1.0)), dict(task_weights=(0.0,))):
        with pytest.raises(ConfigError):
            TrainConfig(out="x", **bad)


def test_train_flags_describe_training_fields(capsys):
    """`s2d2 train --help` explains TrainConfig's fields in training terms (its `steps` is not DecodeConfig's)."""
    from s2d2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS optimizer steps (default: 4000)" in text and "denoising" not in text


@pytest.mark.slow  # torch.compile
def test_a_compiled_run_takes_the_same_steps_as_an_eager_one(tmp_path, monkeypatch):
    from s2d2.models.decoder import Decoder

    small = dict(SMALL, precision="fp32", checkpoint_every=3)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), steps=3, **small), progress=False)
    compiled_models = []
    real_compile = Decoder.compile

    def spy(self):
        compiled_models.append(self)
        real_compile(self)

    monkeypatch.setattr(Decoder, "compile", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train(TrainConfig(out=str(tmp_path / "compiled"), steps=3, compile=True, **small), progress=False)
    # the training model was compiled and stayed compiled (no fallback to eager)
    assert len(compiled_models) == 1 and compiled_models[0].compiled
    assert not [w for w in caught if "torch.compile is not available" in str(w.message)]
    losses = [[json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]
              for d in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-4)
    a, b = load_file(str(eager / "model.safetensors")), load_file(str(compiled / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
