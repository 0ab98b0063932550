"""The batched engine (design invariant 7): a prompt's result does not depend on its batch.

Greedy output and per-row stats of every method equal batch-1 decoding (``s2d2.engine.runner.decode`` with a single-row
cache, the reference path); sampled rows draw from their own generator; each row's committed cache is untouched by
the other rows' and its own draft and verify forwards; cancelled rows free their slot; requests join mid-run.

Float rounding: a packed forward multiplies matrices of other shapes than a single-row one, so a logit can round
differently. A greedy difference is accepted only where the batch-1 run had a near-tie (top-2 logit gap below
``NEAR_TIE``) before it, and every such case is reported as a warning; the random models' logits are well separated
(init std 0.2), so none is expected.
"""

from __future__ import annotations

import random
import sys
import warnings

import pytest
import torch
from single_row import run_commit, run_draft, run_verify

import s2d2
import s2d2.engine.runner
from s2d2 import DecodeConfig
from s2d2.engine.engine import Engine, row_capacity
from s2d2.engine.runner import decode

NEAR_TIE = 1e-4

METHODS = {
    "ar": dict(method="ar"),
    "static": dict(method="static", block_size=4, steps=2),
    "dynamic": dict(method="dynamic", block_size=8, threshold=0.5),
    "s2d2-A": dict(method="s2d2", block_size=8),
    "s2d2-always": dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
    "s2d2-span2": dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=2, threshold=0.3),
    "s2d2-dyn": dict(method="s2d2", block_size=8, score_type="difference_dynamic", estimator="hard_margin_threshold"),
    "s2d2-hyst": dict(method="s2d2", block_size=8, policy="score_hysteresis", tau_on=0.5, tau_off=-0.5),
    "s2d2-ucb": dict(method="s2d2", block_size=8, policy="contextual_bandit_ucb", threshold=0.7),
    "s2d2-skip": dict(method="s2d2", block_size=8, skip_confident=True, threshold=0.6),
    "s2d2-unfused": dict(method="s2d2", block_size=4, fuse_commit=False),
    "s2d2-no-cache-ver": dict(method="s2d2", block_size=4, cache_ver=False, draft_ver=False),
}


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


def reference(model: s2d2.Model, ids: list[int], cfg: DecodeConfig) -> tuple[list[int], s2d2.DecodeStats, float]:
    """Batch-1 decoding, and the smallest top-2 logit gap of any forward it ran (for near-tie reports)."""
    gaps = []
    real = s2d2.engine.runner.run_request

    def spy(adapter, request, cache, spec=None):
        out = real(adapter, request, cache, spec)
        if out is not None:
            top2 = out.topk(2, dim=-1).values
            gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
        return out

    s2d2.engine.runner.run_request = spy
    try:
        tokens, _, stats = decode(model.adapter, ids, cfg, model.adapter.new_cache(512))
    finally:
        s2d2.engine.runner.run_request = real
    return tokens, stats, min(gaps)


def assert_batch_independent(model: s2d2.Model, batch: list[list[int]], cfg: DecodeConfig, batch_size: int) -> None:
    outs = model.generate(batch, cfg, batch_size=batch_size)
    excused = 0
    for i, (ids, out) in enumerate(zip(batch, outs)):
        tokens, stats, gap = reference(model, ids, cfg)
        if out.token_ids != tokens:
            assert gap < NEAR_TIE, f"prompt {i}: batched output differs from batch 1 with no near-tie (gap {gap:.2e})"
            warnings.warn(f"prompt {i}: batched != batch 1 at a near-tie (top-2 gap {gap:.2e}); not a bug")
            excused += 1
            continue
        for name in ("nfe", "draft_forwards", "verify_forwards", "fused_drafts", "steps", "accepted_tokens",
                     "corrected_tokens", "fallback_tokens", "prefill_forwards", "commit_forwards", "num_tokens"):
            assert getattr(out.stats, name) == getattr(stats, name), (i, name)
    assert excused <= len(batch) // 10


def assert_never_verifying_is_dynamic(model: s2d2.Model, batch: list[list[int]], **base) -> list[s2d2.Generation]:
    """Invariant: S2D2 whose policy never verifies is the dynamic baseline, token for token and forward for forward
    (and edit for edit); returns the dynamic outputs."""
    outs = []
    for prompt in batch:
        dyn = model.generate(prompt, DecodeConfig(method="dynamic", **base), batch_size=1)[0]
        never = model.generate(prompt, DecodeConfig(method="s2d2", policy="mask_span_length", min_span=10**6, **base),
                               batch_size=1)[0]
        assert never.token_ids == dyn.token_ids and never.stats.nfe == dyn.stats.nfe, prompt
        assert never.stats.verify_forwards == 0 and never.stats.edits == dyn.stats.edits
        outs.append(dyn)
    return outs


def assert_draft_and_verify_leave_the_cache_unchanged(adapter) -> None:
    """Only committed tokens enter the cache (a draft and a verification leave its committed part as it was), and a
    cached draft equals one uncached forward with the draft mask (an aligned-logit adapter)."""
    from s2d2.families.sdar import draft_mask

    ids = torch.tensor(list(range(30, 46)) + [adapter.mask_id] * 4)  # 16 committed, then a block of 4 masks
    cache = adapter.new_cache(64)
    run_commit(adapter, ids, cache, 16, 4, cache_ver=True)
    keys = [k[:, :16].clone() for k in cache.keys]
    draft = run_draft(adapter, ids, cache, 16, 4, 0, cache_ver=True, draft_ver=True)
    run_verify(adapter, [5, 6], cache, 16, 16)
    assert cache.length == 16 and all(torch.equal(k[:, :16], old) for k, old in zip(cache.keys, keys))
    full = adapter.model(ids, torch.arange(20), adapter.new_cache(20), draft_mask(16, 4, 0, True, True, adapter.device))
    full[:, adapter.banned_ids] = float("-inf")
    torch.testing.assert_close(draft, full[16:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_batched_greedy_equals_batch_1_for_every_method(random_models, name):
    cfg = DecodeConfig(**METHODS[name], max_new_tokens=28, stop_token_ids=())
    for m_index, m in enumerate(random_models[:2]):
        assert_batch_independent(m, prompts(7, seed=m_index), cfg, batch_size=4)


def test_rows_that_stop_early_and_a_batch_larger_than_the_prompts(model):
    batch = prompts(6, seed=3)
    free = model.generate(batch, DecodeConfig(method="s2d2", block_size=4, max_new_tokens=24, stop_token_ids=()))
    stop = free[2].token_ids[5]  # prompt 2 stops at its 6th token; others stop wherever that token appears
    cfg = DecodeConfig(method="s2d2", block_size=4, max_new_tokens=24, stop_token_ids=(stop,))
    outs = model.generate(batch, cfg, batch_size=16)
    assert outs[2].finish_reason == "stop" and len(outs[2].token_ids) <= 5
    assert any(o.finish_reason == "length" for o in outs)
    assert_batch_independent(model, batch, cfg, batch_size=16)
    assert model.last_batch_stats.to_dict()["mean_batch"] <= 6


def test_batch_stats_add_up(model):
    """Batch 1 runs one row per step, unpacked (no padding); a batch runs the same rows in fewer steps: packing
    computes exactly the valid rows, so rows computed equal batch 1's; the time split adds up."""
    batch = prompts(5, seed=4)
    cfg = DecodeConfig(method="s2d2", block_size=4, max_new_tokens=16, stop_token_ids=())
    outs = model.generate(batch, cfg, batch_size=1)
    one = model.last_batch_stats
    assert one.steps == one.row_forwards == sum(o.stats.nfe for o in outs) and one.padded_rows == 0
    model.generate(batch, cfg, batch_size=4)
    four = model.last_batch_stats
    assert four.row_forwards == one.row_forwards and four.rows_computed == one.rows_computed
    assert four.steps < one.steps and four.padded_rows > 0
    assert four.forward_time_s + four.row_time_s <= four.time_s
    d = four.to_dict()
    assert 0.0 <= d["engine_share"] <= d["host_share"] < 1.0
    assert d["padding_share"] == four.padded_rows / (four.rows_computed + four.padded_rows)


def test_stop_strings_batched(model):
    batch = prompts(5, seed=8)
    base = DecodeConfig(method="dynamic", block_size=4, threshold=0.5, max_new_tokens=32, stop_token_ids=())
    free = model.generate(batch, base)
    stops = tuple(sorted({o.text[6] for o in free if len(o.text) > 6 and o.text[6].isascii()}))
    assert stops
    one = model.generate(batch, base.replace(stop=stops), batch_size=1)
    many = model.generate(batch, base.replace(stop=stops), batch_size=5)
    assert [(o.text, o.token_ids, o.finish_reason) for o in one] == [(o.text, o.token_ids, o.finish_reason)
                                                                      for o in many]


def test_sampled_rows_depend_only_on_their_seed(model):
    batch = prompts(6, seed=5)
    cfg = DecodeConfig(method="s2d2", block_size=4, temperature=0.9, top_p=0.95, seed=11, max_new_tokens=20,
                       stop_token_ids=())
    one = [o.token_ids for o in model.generate(batch, cfg, batch_size=1)]
    assert one == [o.token_ids for o in model.generate(batch, cfg, batch_size=6)]
    # prompt i draws from seed + i, whatever shares its batch: alone, as the only prompt, it gets seed + 0
    assert one[3] == model.generate(batch[3], cfg.replace(seed=14))[0].token_ids
    assert one != [o.token_ids for o in model.generate(batch, cfg.replace(seed=12), batch_size=6)]


def test_whole_number_temperature_samples_as_its_float(model):
    """A request's "temperature": 1 (an integer, as JSON clients send it) decodes as 1.0 does, batched and alone."""
    batch = prompts(3, seed=6)
    cfg = DecodeConfig(method="s2d2", block_size=4, temperature=1, top_p=1, seed=2, max_new_tokens=12,
                       stop_token_ids=())
    as_float = [o.token_ids for o in model.generate(batch, cfg.replace(temperature=1.0, top_p=1.0), batch_size=3)]
    assert [o.token_ids for o in model.generate(batch, cfg, batch_size=3)] == as_float
    assert [o.token_ids for o in model.generate(batch, cfg, batch_size=1)] == as_float


def _committed(engine: Engine, slot: int, length: int) -> list[torch.Tensor]:
    view = engine.cache.slot(slot)  # the shared buffers' slot, or the slot's own buffers
    return [buf[:, :length].clone() for buf in view.keys + view.values]


@pytest.mark.parametrize("capacity", [128, 16], ids=["shared-slots", "own-buffers"])
def test_every_step_leaves_each_rows_committed_cache_unchanged(model, capacity):
    """Invariant 1, per row: a step only appends to a row's committed K/V (drafts and verifications commit
    nothing), and what a row committed equals its batch-1 cache; in the shared slots, and in buffers of a row's own
    (every row here is longer than 16 tokens)."""
    cfg = DecodeConfig(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, max_new_tokens=16,
                       stop_token_ids=())
    batch = prompts(3, seed=9)
    engine = Engine(model.adapter, 3, capacity=capacity)
    ids = [engine.add(p, cfg) for p in batch]
    engine.step()  # admits all three
    assert len(engine.cache.own) == (3 if capacity == 16 else 0)
    steps = 0
    finished = {}
    last: dict[int, tuple[int, list[torch.Tensor]]] = {}  # each slot's committed K/V before its row's last step
    while not engine.idle:
        running = {r.slot for r in engine._rows.values()}
        before = {s: (engine.cache.lengths[s], _committed(engine, s, engine.cache.lengths[s])) for s in running}
        last.update(before)
        for event in engine.step():
            if event.finished:
                finished[event.request_id] = event
        steps += 1
        for s in running & {r.slot for r in engine._rows.values()}:  # rows still running: their K/V are there
            length, kv = before[s]
            assert engine.cache.lengths[s] >= length
            for a, b in zip(kv, _committed(engine, s, length)):
                assert torch.equal(a, b), (s, steps)
    for slot, (rid, p) in enumerate(zip(ids, batch)):
        cache = model.adapter.new_cache(128)
        decode(model.adapter, p, cfg, cache)
        n, kv = last[slot]
        assert 0 < n <= cache.length
        for got, want in zip(kv, [k[:, :n] for k in cache.keys + cache.values]):
            assert torch.allclose(got, want, atol=1e-5)
        assert finished[rid].token_ids == decode(model.adapter, p, cfg, model.adapter.new_cache(128))[0]


def _run_to_end(engine: Engine) -> dict[int, list[int]]:
    out = {}
    while not engine.idle:
        for event in engine.step():
            if event.finished:
                out[event.request_id] = event.token_ids
    return out


def test_cancel_frees_the_slot_and_a_request_added_mid_run_is_unaffected(model):
    cfg = DecodeConfig(method="dynamic", block_size=4, threshold=0.5, max_new_tokens=24, stop_token_ids=())
    a, b, c, d = prompts(4, seed=12)
    alone = {name: decode(model.adapter, p, cfg, model.adapter.new_cache(128))[0]
             for name, p in zip("abcd", (a, b, c, d))}
    engine = Engine(model.adapter, 2, capacity=128)
    ra, rb, rc = engine.add(a, cfg), engine.add(b, cfg), engine.add(c, cfg)
    engine.step()
    engine.step()
    assert set(engine._rows) == {ra, rb}  # c waits for a slot
    assert engine.cancel(ra)
    assert not engine.cancel(ra)  # already gone
    engine.step()
    assert set(engine._rows) == {rb, rc}  # c took a's slot at once; b went on
    rd = engine.add(d, cfg)  # joins while b and c run
    got = _run_to_end(engine)
    assert ra not in got
    assert (got[rb], got[rc], got[rd]) == (alone["b"], alone["c"], alone["d"])


def test_a_waiting_request_can_be_cancelled(model):
    cfg = DecodeConfig(method="ar", max_new_tokens=4, stop_token_ids=())
    engine = Engine(model.adapter, 1)
    first, second = engine.add([1, 2, 3], cfg), engine.add([4, 5], cfg)
    assert engine.cancel(second)
    assert set(_run_to_end(engine)) == {first}


def test_streaming_events_only_carry_left_committed_tokens(model):
    cfg = DecodeConfig(method="s2d2", block_size=8, max_new_tokens=30, stop_token_ids=())
    batch = prompts(3, seed=21)
    engine = Engine(model.adapter, 3, stream=True)
    rids = [engine.add(p, cfg) for p in batch]
    streamed: dict[int, list[int]] = {r: [] for r in rids}
    final = {}
    while not engine.idle:
        for event in engine.step():
            streamed[event.request_id] += event.new_token_ids
            if event.finished:
                final[event.request_id] = event.token_ids
    for r, p in zip(rids, batch):
        assert streamed[r] == final[r] == decode(model.adapter, p, cfg, model.adapter.new_cache(128))[0]


def test_bad_batch_input_is_refused_before_any_decoding(model, monkeypatch):
    with pytest.raises(s2d2.ConfigError, match="batch_size must be an integer >= 1"):
        model.generate(["a", "b"], DecodeConfig(max_new_tokens=2), batch_size=0)
    stepped = []
    monkeypatch.setattr(Engine, "step", lambda self: stepped.append(1) or [])
    with pytest.raises(s2d2.InputError, match=r"^prompt 1: the prompt is empty\.$"):
        model.generate(["ok", "", "fine"], DecodeConfig(max_new_tokens=2), batch_size=3)
    with pytest.raises(s2d2.InputError, match=r"^prompt 2: the prompt \(3000 tokens\)"):
        model.generate([[5], [6], [7] * 3000], DecodeConfig(max_new_tokens=2), batch_size=3)
    assert not stepped


# ------------------------------------------------------------------------------------------------ interfaces
def test_cli_generate_decodes_several_prompts_in_batches(random_model_dir, tmp_path, capsys):
    import json

    from s2d2.cli import main

    file = tmp_path / "prompts.txt"
    file.write_text("second\\nline\n\nthird\n")
    args = ["generate", "first", "--prompts-file", str(file), "--model", str(random_model_dir), "--max-new-tokens",
            "12", "--json", "--stop-token-ids"]
    assert main(args + ["--batch-size", "3"]) == 0
    batched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(args + ["--batch-size", "1"]) == 0
    one = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = s2d2.load(str(random_model_dir))
    api = model.generate(["first", "second\nline", "third"], DecodeConfig(max_new_tokens=12, stop_token_ids=()))
    assert [o["token_ids"] for o in batched] == [o["token_ids"] for o in one] == [g.token_ids for g in api]
    assert [o["stats"]["nfe"] for o in batched] == [g.stats.nfe for g in api]
    assert main(["generate", "x", "--model", str(random_model_dir), "--batch-size", "0"]) == 2
    assert main(["generate", "--model", str(random_model_dir)]) == 2
    assert main(["generate", "--prompts-file", str(tmp_path / "missing.txt"), "--model", str(random_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("s2d2: error: ") for line in err)


def test_cli_eval_batched_gives_the_same_accuracy_and_nfe(random_model_dir, capsys):
    import json

    from s2d2.cli import main

    base = ["eval", "--n", "6", "--model", str(random_model_dir), "--method", "s2d2", "--block-size", "4",
            "--max-new-tokens", "10", "--json"]
    results = []
    for b in ("1", "4"):
        assert main(base + ["--batch-size", b]) == 0
        results.append(json.loads(capsys.readouterr().out))
    one, four = results
    assert one["accuracy"] == four["accuracy"]
    for key in ("nfe", "num_tokens", "draft_forwards", "verify_forwards", "accepted_tokens"):
        assert one["stats"][key] == four["stats"][key], key


def test_lm_eval_model_honours_batch_size(random_model_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from s2d2.evaluation.lm_eval import S2D2LM

    lm = S2D2LM(pretrained=str(random_model_dir), device="cpu", batch_size=3, method="dynamic", block_size=4,
                max_new_tokens=12, stop_token_ids="")
    assert lm.batch_size == 3
    assert S2D2LM(pretrained=str(random_model_dir), batch_size="auto", max_batch_size=8).batch_size == 8
    with pytest.raises(s2d2.ConfigError, match="batch_size must be an integer >= 1 or 'auto'"):
        S2D2LM(pretrained=str(random_model_dir), batch_size="big")
    seen = []
    real = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda p, c, batch_size: seen.append((len(p), batch_size))
                        or real(p, c, batch_size=batch_size))
    texts = [lm.model.decode([65 + i, 66, 67]) for i in range(5)]
    kwargs = [{"max_gen_toks": 12}, {"max_gen_toks": 12}, {"max_gen_toks": 6}, {"max_gen_toks": 12}, {"max_gen_toks": 6}]
    requests = [Instance("generate_until", {}, (t, k), i) for i, (t, k) in enumerate(zip(texts, kwargs))]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert sorted(seen) == [(2, 3), (3, 3)]  # two groups of equal settings, each decoded as one batch
    want = [real(t, lm._config_for(k), batch_size=1)[0].text for t, k in zip(texts, kwargs)]
    assert got == want  # in request order, equal to batch 1


# Every way a tensor's values reach the host (on a GPU each one waits for the device to drain its queue).
_TO_HOST = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _inside_moe_dispatch() -> bool:
    """Whether the caller runs inside the MoE layer's expert dispatch (LLaDA2's forward reads its per-expert token
    counts on the host to run one matmul per expert in use: the forward's own reads, left for a fused kernel)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_experts" and frame.f_code.co_filename.endswith("models/moe.py"):
            return True
        frame = frame.f_back
    return False


def _count_to_host(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch every host-reading method of tensors to count its calls outside the MoE dispatch; returns the counter
    (a one-item list)."""
    count = [0]
    for name in _TO_HOST:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count[0] += not _inside_moe_dispatch()
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


_STEP_READS = {**METHODS, "s2d2-pipelined": dict(method="s2d2", block_size=4, block_add_threshold=0.5, threshold=0.6),
               "s2d2-editing": dict(method="s2d2", block_size=4, editing_threshold=0.5),
               "s2d2-redraft": dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, redraft=0.0)}


@pytest.mark.parametrize("name", list(_STEP_READS))
def test_a_greedy_engine_step_reads_the_device_once(family_model, monkeypatch, name):
    """Issue 28: the rows' numbers are computed for the whole batch after the forward and reach the host in one
    transfer per engine step, whatever the method and the family (the rows' algorithm reads host values only)."""
    families = ("sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream")
    for model in [family_model(f) for f in families if name != "s2d2-editing" or f == "llada2"]:
        engine = Engine(model.adapter, max_batch_size=5)
        for ids in prompts(5, seed=11):
            engine.add(ids, DecodeConfig(**_STEP_READS[name], max_new_tokens=16, stop_token_ids=()))
        count, per_step = _count_to_host(monkeypatch), []
        while not engine.idle:
            count[0] = 0
            engine.step()
            per_step.append(count[0])
        monkeypatch.undo()
        assert per_step and max(per_step) == 1, (model.adapter.family, per_step)


def _step_costs(model: s2d2.Model, cfg: DecodeConfig, batch: list[list[int]],
                counted_step_costs) -> list[tuple[int, int]]:
    """(tensor operations outside the forward, host-to-device copies) of every engine step decoding ``batch``
    (``counted_step_costs``: the device check's counter)."""
    engine, costs = Engine(model.adapter, max_batch_size=len(batch)), []
    for ids in batch:
        engine.add(ids, cfg)
    with counted_step_costs() as count:
        while not engine.idle:
            count[:] = [0, 0]
            engine.step()
            costs.append(tuple(count))
    return costs


@pytest.mark.parametrize("name", ["ar", "dynamic", "s2d2-always", "s2d2-A"])
def test_a_greedy_step_costs_the_device_the_same_at_any_batch_size(family_model, device_check, name):
    """Issue 28: a greedy engine step copies host values to the device once (every row's tokens, positions and
    indices in one buffer: the rows keep their sequences on the host, and their specs are host values), and the
    tensor operations it runs outside the forward (packing, the numerical stage, the rows' algorithm) do not grow
    with the number of rows: 8 rows in lockstep cost what 2 cost, step for step, on every family (a shifted-logit
    draft's placeholder row is made only if its logits are read; masks are cached tensors, so rows share them)."""
    for family in ("sdar", "llada2", "fast_dllm_v2", "d2f_dream"):
        model = family_model(family)
        cfg = DecodeConfig(**METHODS[name], max_new_tokens=12, stop_token_ids=())
        prompt = prompts(1, seed=31)[0]
        count = device_check.counted_step_costs
        _step_costs(model, cfg, [prompt] * 2, count)  # the masks' caches warm (their first use builds them)
        two, eight = (_step_costs(model, cfg, [prompt] * n, count) for n in (2, 8))
        assert two == eight, (family, two, eight)
        assert {c for _, c in eight} == {1}, family


# the sampled rows of a batch, each with its own transform: one batch takes top-p from a whole sort and top-k
_SAMPLED = [dict(temperature=0.8, top_p=0.95), dict(temperature=1.2, top_k=8, top_p=0.9), dict(temperature=0.6, top_k=5)]


def _count_calls(monkeypatch, module, names: tuple[str, ...]) -> list[int]:
    """Count calls of ``module``'s functions ``names`` (undone with monkeypatch.undo())."""
    count = [0]
    for name in names:
        real = getattr(module, name)

        def counted(*args, __real=real, **kwargs):
            count[0] += 1
            return __real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return count


@pytest.mark.parametrize("name", ["ar", "dynamic", "s2d2-A", "s2d2-always", "s2d2-pipelined", "s2d2-redraft"])
def test_a_sampled_or_mixed_engine_step_reads_the_device_once(family_model, monkeypatch, name):
    """Issue 28, sampled rows: the step filters every sampled row's distributions in one set of operations (each
    row with its own temperature, top-k and top-p), makes every row's draws (drafts, acceptance and residual draw,
    AR tokens) at once from uniforms each row takes from its own generator, and reads them with the greedy rows'
    choices in one transfer, at batch 1 too; a batch mixing sampled and greedy rows, and rows sampled differently,
    decodes every row as batch 1 does."""
    for family in ("sdar", "fast_dllm_v2", "d2f_dream"):
        model = family_model(family)
        fields = dict(_STEP_READS[name], max_new_tokens=16, stop_token_ids=())
        configs = [DecodeConfig(**fields, **_SAMPLED[i // 2], seed=3 + i) if i % 2 == 0 else DecodeConfig(**fields)
                   for i in range(5)]
        batch, results = prompts(5, seed=17), {}
        for size in (5, 1):
            engine = Engine(model.adapter, max_batch_size=size)
            ids = {engine.add(p, c, torch.Generator().manual_seed(c.seed) if c.seed is not None else None): k
                   for k, (p, c) in enumerate(zip(batch, configs))}
            count, per_step, done = _count_to_host(monkeypatch), [], {}
            sorts = _count_calls(monkeypatch, torch, ("softmax",))  # the greedy table's, and the filters' two
            draws = _count_calls(monkeypatch, torch, ("searchsorted",))  # the draws, and the corrections' draw
            filters, draw_calls = [], []
            while not engine.idle:
                count[0] = sorts[0] = draws[0] = 0
                done.update({ids[e.request_id]: e.token_ids for e in engine.step() if e.finished})
                per_step.append(count[0])
                filters.append(sorts[0])
                draw_calls.append(draws[0])
            monkeypatch.undo()
            assert per_step and max(per_step) == 1, (family, size, per_step)
            assert max(filters) <= 3 and max(draw_calls) <= 2, (family, size, filters, draw_calls)  # not per row
            results[size] = done
        assert results[5] == results[1], family


def test_routing_features_are_computed_only_for_batches_that_read_them(model):
    """The stage computes only the features (entropy, margin, collision) some row's routing reads; a batch mixing rows
    that read different ones (or none) decodes every row as batch 1 does."""
    from s2d2.core.routing import reads_features
    from s2d2.core.sampling import greedy_choices

    none, every = frozenset(), frozenset(("entropy", "margin", "collision"))
    assert reads_features(DecodeConfig(method="ar")) == reads_features(DecodeConfig(method="dynamic")) == none
    assert reads_features(DecodeConfig(method="s2d2", policy="mask_span_length")) == none
    assert reads_features(DecodeConfig(method="s2d2", policy="mask_span_length"), traced=True) == every
    assert reads_features(DecodeConfig(method="s2d2", estimator="soft_entropy_negexp")) == {"entropy"}
    assert reads_features(DecodeConfig(method="s2d2", estimator="hard_margin_threshold")) == {"margin"}
    assert reads_features(DecodeConfig(method="s2d2", estimator="soft_confidence_power")) == none
    assert reads_features(DecodeConfig(method="s2d2", policy="contextual_bandit_ucb",
                                       estimator="soft_renyi_2_entropy")) == {"entropy"}
    # a sampled row computes the features of its own drafts by the same rule; greedy rows' are the batch's
    assert reads_features(DecodeConfig(method="s2d2", temperature=0.7, estimator="soft_renyi_2_entropy")) == {
        "collision"}
    assert reads_features(DecodeConfig(method="dynamic", temperature=0.7)) == none
    lean = greedy_choices(torch.randn(3, 11), features=())
    assert lean.entropy is None and lean.rows(1).margin is None and len(lean.pad_front(2)) == 5
    assert greedy_choices(torch.randn(3, 11), features={"margin"}).entropy is None
    # rows reading different features in one batch: each estimator's own, the union computed once
    configs = [METHODS["ar"], METHODS["s2d2-A"], METHODS["dynamic"], METHODS["s2d2-ucb"], METHODS["s2d2-always"],
               {**METHODS["s2d2-A"], "estimator": "hard_margin_threshold", "tau": 0.5},
               {**METHODS["s2d2-A"], "estimator": "soft_renyi_2_entropy"}]
    batch = prompts(len(configs), seed=13)
    engine = Engine(model.adapter, max_batch_size=len(configs))
    ids = {engine.add(p, DecodeConfig(**c, max_new_tokens=16)): (p, c) for p, c in zip(batch, configs)}
    done = {}
    while not engine.idle:
        done.update({e.request_id: e.token_ids for e in engine.step() if e.finished})
    for rid, (p, c) in ids.items():
        assert done[rid] == reference(model, p, DecodeConfig(**c, max_new_tokens=16))[0], c


# ------------------------------------------------------------------------------ rows longer than the shared slots


OWN_FAMILIES = ["sdar", "fast_dllm_v2", "llada2", "d2f_llada"]


@pytest.mark.parametrize("family", OWN_FAMILIES)
@pytest.mark.parametrize("name", ["ar", "dynamic", "s2d2-A", "s2d2-prefix"])
def test_a_long_row_gets_buffers_of_its_own_and_gives_batch_1_tokens(family_model, family, name):
    """Rows longer than the shared slots decode in buffers of their own, beside short rows in the shared ones (and
    each other): tokens and forward counts equal batch 1's, the shared capacity never grows, and the buffers are
    returned when the rows end."""
    model = family_model(family)
    fields = {**METHODS.get(name, {}), **({"method": "s2d2", "block_size": 8, "prefix_cache": True}
                                        if name == "s2d2-prefix" else {})}
    cfg = model.resolve_config(DecodeConfig(**fields, max_new_tokens=24, stop_token_ids=(), generation_config="none"))
    rng = random.Random(7)
    batch = [[rng.randrange(200) for _ in range(n)] for n in (5, 70, 9, 90, 3)]  # two need more than 64 slots
    alone = [decode(model.adapter, p, cfg, model.adapter.new_cache(256)) for p in batch]
    engine = Engine(model.adapter, 4, capacity=64)
    ids = [engine.add(p, cfg) for p in batch]
    seen_own: set[int] = set()
    got: dict[int, tuple[list[int], s2d2.DecodeStats]] = {}
    while not engine.idle:
        for event in engine.step():
            if event.finished:
                got[event.request_id] = (event.token_ids, event.stats)
        seen_own |= set(engine.cache.own)
    assert len(seen_own) == 2 and engine.cache.capacity == 64 and engine.cache.own == {}
    for rid, (tokens, _, stats) in zip(ids, alone):
        assert got[rid][0] == tokens
        assert (got[rid][1].nfe, got[rid][1].verify_forwards) == (stats.nfe, stats.verify_forwards)


class _Pool:
    """A device with ``size`` bytes for the rows' own buffers: what is free is what they do not hold."""

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine, self.size = engine, size

    def __call__(self, device) -> int:
        return self.size - self.engine.cache.own_bytes


def test_a_long_row_waits_for_memory_and_one_that_never_fits_is_refused(model, monkeypatch):
    import s2d2.engine.engine as engine_module
    from s2d2.engine.memory import MARGIN, kv_bytes_per_token, row_bytes

    cfg = model.resolve_config(DecodeConfig(method="s2d2", block_size=4, max_new_tokens=16, stop_token_ids=()))
    long_a, long_b, short = [7] * 80, [9] * 84, [3, 4, 5]
    engine = Engine(model.adapter, 3, capacity=32)
    capacity = row_capacity(model.adapter, len(long_b), cfg)
    need = row_bytes(model.adapter.model.config, model.dtype, capacity, 12, 84 + 8)
    held = capacity * kv_bytes_per_token(model.adapter.model.config, model.dtype)  # a long row's own buffers
    pool = _Pool(engine, int(need / (1 - MARGIN) + held / 2))  # room for one long row at a time
    monkeypatch.setattr(engine_module, "free_memory", pool)
    ra, rb, rs = engine.add(long_a, cfg), engine.add(long_b, cfg), engine.add(short, cfg)
    engine.step()
    assert set(engine._rows) == {ra, rs} and [w.request_id for w in engine._waiting] == [rb]  # b waits, s passes
    got = _run_to_end(engine)
    for rid, prompt in ((ra, long_a), (rb, long_b), (rs, short)):
        assert got[rid] == decode(model.adapter, prompt, cfg, model.adapter.new_cache(256))[0]
    pool.size = need // 2  # now not even one long row fits
    rc = engine.add(long_a, cfg)
    events = engine.step()
    refused = next(e for e in events if e.request_id == rc)
    assert refused.finished and refused.finish_reason == "refused" and refused.token_ids == []
    assert refused.error.startswith("the request needs ") and refused.error.endswith("shorten the prompt or "
                                                                                         "max_tokens.")
    assert engine.idle


def test_engine_steps_copy_host_values_to_the_device_without_waiting(family_model, monkeypatch):
    """Issue 28: what the decoder writes to the device between forwards (committed tokens, a verification's rows,
    the packed batch's sizes, the sampler's values) goes through s2d2.transfer.to_device, which on CUDA copies from
    pinned memory asynchronously; a tensor built from host values directly on the device (a blocking copy, which
    waits for every queued kernel on CUDA) is counted here, where the device is the CPU, and there is none."""
    import s2d2.transfer

    direct = []
    real_tensor = torch.tensor

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            direct.append(kwargs["device"])
        return real_tensor(*args, **kwargs)

    for family in ("sdar", "fast_dllm_v2", "d2f_dream"):
        model = family_model(family)
        engine = Engine(model.adapter, max_batch_size=4)
        for i, ids in enumerate(prompts(4, seed=23)):
            fields = dict(_STEP_READS[("s2d2-A", "s2d2-pipelined", "s2d2-redraft", "ar")[i]], max_new_tokens=16,
                          stop_token_ids=())
            engine.add(ids, DecodeConfig(**fields, **(_SAMPLED[1] if i % 2 else {}), seed=i))
        monkeypatch.setattr(torch, "tensor", tensor)
        while not engine.idle:
            engine.step()
        monkeypatch.undo()
        assert direct == [], family

    # the CUDA path, with the pinned copy and the asynchronous transfer recorded instead of run
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    out = s2d2.transfer.to_device([3, 1, 2], torch.long, torch.device("cuda"))
    assert out.tolist() == [3, 1, 2] and out.dtype == torch.long
    assert calls[-2:] == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
