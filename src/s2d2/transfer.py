"""Host values onto the model's device without making the host wait.

A plain copy from ordinary (pageable) host memory to a CUDA device synchronises: PyTorch's blocking copy waits for
the stream, so every queued kernel must finish first, which is what the engine's one read per step avoids (issue
28). Values the decoder writes to the device between forwards (committed tokens, a verification's rows, the packed
batch's sizes, the sampler's per-row values) therefore go through :func:`to_device`: on CUDA they are staged in
pinned memory and copied asynchronously in stream order (PyTorch's pinned-memory allocator keeps the staging block
until the copy has run); on a CPU it is the plain tensor it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``values`` (host numbers, or a CPU tensor) as a ``dtype`` tensor on ``device``, without a synchronising copy."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
