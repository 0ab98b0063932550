"""How many rows fit: the KV cache's bytes per token from the model's shape, the memory that is free, and the batch
size ``"auto"`` chooses from them.

A row of the batch costs its cache (``capacity`` tokens x layers x K and V x KV heads x head dim x the dtype's bytes)
and, while a forward runs, its query rows' activations (the float32 logits over the vocabulary dominate at real
sizes: 151,936 x 4 bytes per row for SDAR). Free memory is the device's (``torch.cuda.mem_get_info``) or, on the CPU,
the host's available memory (``MemAvailable``), bounded by the container's cgroup limit where there is one. The
weights are loaded before anything here is asked, so free memory is what is left beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from s2d2.core.sampling import STAGE_BYTES
from s2d2.errors import ConfigError
from s2d2.models.decoder import DecoderConfig

# Share of the free memory kept back: allocator slack, the tokenizer and Python objects of many requests, and what
# other processes take meanwhile.
MARGIN = 0.15
# The most rows "auto" decodes together: on a CPU the fastest batch for the bundled model (BENCHMARKS.md, "Batched
# decoding"); on an accelerator the batch that the field's engines run 1.7-8B models at (JetEngine: 128-256).
AUTO_LIMIT = {"cpu": 64, "cuda": 256}
AUTO_LIMIT_OTHER = 64


def kv_bytes_per_token(config: DecoderConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one cached token takes across all layers (SDAR-1.7B in bf16: 114,688)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def request_rows(prompt_len: int, block_size: int) -> tuple[int, int]:
    """A decoding request's ``(logit_rows, query_rows)`` for :func:`row_bytes`: its most logit rows are a verification
    that also drafts the next block (three blocks), its largest forward its prefill (the prompt and the block)."""
    return 3 * block_size, prompt_len + 2 * block_size


def row_bytes(config: DecoderConfig, dtype: torch.dtype, capacity: int, logit_rows: int, query_rows: int) -> int:
    """Bytes one row of the batch needs: its cache of ``capacity`` tokens, and while a forward runs, the activations of
    up to ``query_rows`` query rows (its prefill is the largest: the prompt and a block), ``logit_rows`` of which get
    logits (in the model's dtype, in float32, and the numerical stage's work on them, which it keeps within
    ``s2d2.core.sampling.STAGE_BYTES`` per entry by working in chunks), and the boolean
    attention masks over its keys. Attention itself adds no scores-sized memory (the fused kernels of SDPA).

    The activations per query row (two of the widest projection's outputs and ten hidden states' worth: the MLP's
    gate/up output and its product, the residual stream, normalised copies, q/k/v and the padded attention layout)
    are set from a measured prefill: 8 prompts of 2,000 tokens at SDAR-1.7B's shape in bf16 added 3.11 and 2.98 GiB
    in two runs, where this count gives 3.39 GiB (scripts/auto_batch.py; half as many gave 2.66 GiB, too few)."""
    size = dtype.itemsize
    widest = max(2 * config.intermediate_size, config.num_attention_heads * config.head_dim + 2 * config.hidden_size)
    logits = logit_rows * config.vocab_size * (4 + STAGE_BYTES + size)  # model dtype, float32, the stage's work
    hidden = query_rows * (2 * widest + 10 * config.hidden_size) * size
    masks = 4 * query_rows * capacity
    return capacity * kv_bytes_per_token(config, dtype) + logits + hidden + masks


def _cgroup_free() -> int | None:
    """Bytes the process's cgroup (v2) still allows, or None where it sets no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def _host_available() -> int:
    """The host's available memory (``MemAvailable``: free plus what the kernel can reclaim), else its free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and other Unixes without /proc
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def free_memory(device: torch.device) -> int:
    """Bytes that new tensors on ``device`` can take now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory the caching allocator holds but no tensor uses is free to this process too
        return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = _host_available()
    cgroup = _cgroup_free()
    return available if cgroup is None else min(available, cgroup)


@dataclass(frozen=True)
class BatchPlan:
    """What a batch of rows needs and what it was given: the rows, what each needs, and the memory there was."""

    rows: int
    row_bytes: int
    free_bytes: int
    auto: bool  # chosen by "auto" (else asked for)
    limited: bool = False  # "auto" chose fewer rows than there were (and its limit allows): memory was short

    def describe(self) -> str:
        """One line for a log: the rows, their memory and the memory that was free."""
        how = "batch size auto: " if self.auto else "batch size "
        total = format_bytes(self.rows * self.row_bytes)
        return (f"{how}{self.rows} rows of {format_bytes(self.row_bytes)} each ({total}; "
                f"{format_bytes(self.free_bytes)} free)")


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it fills (``1.5 GiB``, ``12.0 MiB``, ``512 KiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.0f} KiB"


def plan_batch(config: DecoderConfig, dtype: torch.dtype, device: torch.device, batch_size: int | str, rows: int,
               capacity: int, logit_rows: int, query_rows: int, free: int | None = None) -> BatchPlan:
    """The rows to decode together: ``batch_size`` (an int, checked to fit, or ``"auto"``: as many as fit, up to the
    device's :data:`AUTO_LIMIT`) and never more than the ``rows`` there are to decode, each row as
    :func:`row_bytes` counts it. Free memory is measured unless ``free`` is given. A batch that cannot fit (not
    even one row) is a :class:`ConfigError` before anything is allocated.
    """
    per_row = row_bytes(config, dtype, capacity, logit_rows, query_rows)
    free = free_memory(device) if free is None else free
    usable = int(free * (1 - MARGIN))
    fitting = usable // per_row
    if fitting < 1:
        raise ConfigError(
            f"one row of {capacity} tokens needs {format_bytes(per_row)} for its cache and activations, but only "
            f"{format_bytes(free)} is free on {device.type}; shorten the prompt or max_new_tokens, or free memory.")
    if batch_size == "auto":
        limit = AUTO_LIMIT.get(device.type, AUTO_LIMIT_OTHER)
        return BatchPlan(min(rows, limit, fitting), per_row, free, auto=True, limited=fitting < min(rows, limit))
    assert isinstance(batch_size, int)
    taken = min(batch_size, rows)
    if taken > fitting:
        raise ConfigError(
            f"batch_size {batch_size} needs {format_bytes(taken * per_row)} for {taken} rows of {capacity} tokens "
            f"({format_bytes(per_row)} each), but {format_bytes(free)} is free on {device.type} and {fitting} rows "
            f"fit; use batch_size auto or at most {fitting}.")
    return BatchPlan(taken, per_row, free, auto=False)
