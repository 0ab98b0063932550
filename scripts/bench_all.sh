#!/usr/bin/env bash
# Re-run every measurement in BENCHMARKS.md on the bundled model, in the document's order, one job at a time (two
# CPU-heavy jobs on a small machine slow each other and make every timing meaningless). About two hours on the
# 2-core CPU VM of 2026-12-03 (a slow one: see BENCHMARKS.md); the grids after the first use fewer timed rounds
# (their exact figures do not depend on rounds). Committed figures land in benchmarks/; per-run JSON (evals,
# data-parallel, tune on test, batch 1 and 16 samples) in $RUNS (default runs/bench_all).
# Usage: bash scripts/bench_all.sh [section ...]   sections: wordy grid batched host pipelined relaxed prefix
#                                                             compile threads dp tune serve (default: all)
#        SOAK_MINUTES=0 skips the serving soak (default 10 minutes).
#        bash scripts/bench_all.sh real   the SDAR-1.7B-shaped measurements ("Real-sized checkpoints", about 40
#        minutes; not in the default run: it writes a 4 GB checkpoint to $SIZED from the published files in
#        $PUBLISHED, default ../shared/checkpoints)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/s2d2 ] && export PATH="$PWD/.venv/bin:$PATH"
RUNS=${RUNS:-runs/bench_all}
mkdir -p "$RUNS"
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(wordy grid batched host pipelined relaxed prefix compile threads dp tune serve)
say() { echo "[bench_all $(date -u +%H:%M:%S)] $*"; }

for s in "${sections[@]}"; do
  say "section $s"
  case $s in
    wordy)
      s2d2 bench --task wordy --n 150 --repeats 2 --out benchmarks/bundled-wordy
      python scripts/model_card_eval.py --n 500 --out "$RUNS/model_card.json" > benchmarks/bundled-wordy/model_card.md ;;
    grid)
      s2d2 bench --task arith --n 150 --repeats 3 --out benchmarks/bundled-arith ;;
    batched)
      s2d2 bench --task arith --no-grid --batch-sizes 1 4 16 64 --n 200 --repeats 3 --out benchmarks/bundled-arith
      python scripts/forward_cost.py --out benchmarks/bundled-arith
      for m in s2d2 ar dynamic; do  # batching changes how many rows share a forward, never what a row does
        for b in 1 16; do s2d2 eval --task arith --n 200 --method "$m" --batch-size "$b" --samples "$RUNS/$m-b$b.jsonl" >/dev/null; done
        cmp "$RUNS/$m-b1.jsonl" "$RUNS/$m-b16.jsonl" && say "$m: batch 1 and 16 samples identical"
      done ;;
    host)  # the host's cost of an engine step against the batch size (~3 min)
      python scripts/host_cost.py --n 128 --batch-sizes 1 4 16 64 --rounds 3 > benchmarks/bundled-wordy/host_cost.md ;;
    pipelined)
      s2d2 bench --task arith --grid benchmarks/pipelined/grid.json --n 150 --repeats 3 --out benchmarks/pipelined ;;
    relaxed)
      s2d2 bench --task arith --grid benchmarks/relaxed/grid.json --n 200 --repeats 1 --out benchmarks/relaxed ;;
    prefix)
      s2d2 bench --task arith --grid benchmarks/prefix-cache/grid.json --n 200 --repeats 2 --out benchmarks/prefix-cache
      for pc in prefix-cache no-prefix-cache; do  # pipelined blocks: exact rows per forward with and without
        s2d2 eval --task arith --limit 200 --batch-size 64 --method s2d2 --block-size 16 --threshold 0.9 --skip-confident \
          --block-add-threshold 0.5 --$pc --json > "$RUNS/pipelined-s2d2-$pc.json"
        s2d2 eval --task arith --limit 200 --batch-size 64 --method dynamic --block-size 4 --threshold 0.9 \
          --block-add-threshold 0.5 --$pc --json > "$RUNS/pipelined-dynamic-$pc.json"
      done ;;
    compile)
      python scripts/compile_bench.py --out benchmarks/compile ;;
    threads)  # --threads' default: 1 and 2 threads and the default, idle and with 1 or 2 cores busy (~25 min)
      python scripts/threads_bench.py --rounds 3 --busy 0 1 2 --out "$RUNS/threads.jsonl" > benchmarks/threads.md ;;
    dp)
      for round in 1 2; do
        for m in s2d2 ar; do
          s2d2 eval --task arith --limit 200 --method "$m" --batch-size 16 --json > "$RUNS/dp-$m-1proc-r$round.json"
          torchrun --standalone --nproc-per-node 2 -m s2d2 eval --task arith --limit 200 --method "$m" --batch-size 16 --json \
            > "$RUNS/dp-$m-2proc-r$round.json"
        done
      done ;;
    tune)
      s2d2 tune --task arith --limit 150 --objective tokens_per_s --max-accuracy-drop 1 --out benchmarks/tune/tuned.json \
        --report benchmarks/tune/records.jsonl > benchmarks/tune/table.md
      s2d2 eval --task arith --split test --limit 500 --method ar --json > "$RUNS/tune-test-ar.json"
      s2d2 eval --task arith --split test --limit 500 --config benchmarks/tune/tuned.json --json > "$RUNS/tune-test-tuned.json" ;;
    serve)
      python scripts/loadtest.py --methods s2d2 ar --concurrency 1 4 16 --seconds 30 --soak-minutes "${SOAK_MINUTES:-10}" \
        --out benchmarks/bundled-arith/loadtest.json ;;
    real)
      SIZED=${SIZED:-/tmp/sdar-1.7b}
      PUBLISHED=${PUBLISHED:-../shared/checkpoints}
      [ -f "$SIZED/model.safetensors" ] || python scripts/sized_checkpoint.py \
        --published "$PUBLISHED/JetLM__SDAR-1.7B-Chat" --bpe "$PUBLISHED/_qwen2-bpe" --out "$SIZED"
      python scripts/load_memory.py "$SIZED" --dtypes bfloat16 float32
      for dt in bfloat16 float32; do
        python scripts/forward_cost.py --model "$SIZED" --dtype $dt --counts 1 2 4 8 16 32 64 --repeats 3 --warmup 2 \
          --out benchmarks/sdar-1.7b-random/$dt
      done
      python scripts/dtype_cost.py --model "$SIZED" --out benchmarks/sdar-1.7b-random/dtype_cost.json
      python scripts/long_context.py --model "$SIZED" --long-tokens 16000 --short 15 \
        --out benchmarks/sdar-1.7b-random/long_context.json ;;
    *) echo "unknown section: $s" >&2; exit 2 ;;
  esac
done
say "done"
