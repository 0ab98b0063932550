"""Host values onto the model's device without making the host wait.

A plain copy from ordinary (pageable) host memory to a CUDA device synchronises: PyTorch's blocking copy waits for
the stream, so every queued kernel must finish first, which is what the engine's one read per step avoids (issue
28). Values the decoder writes to the device between forwards (committed tokens, a verification's rows, the packed
batch's sizes, the sampler's per-row values) therefore go through :func:`to_device`: on CUDA they are staged in
pinned memory and copied asynchronously in stream order (PyTorch's pinned-memory allocator keeps the staging block
until the copy has run); on a CPU it is the plain tensor it was.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

# array codes of the dtypes whose host values are built through :mod:`array`: about 3x faster than torch.tensor
# on a list of Python numbers, which matters once a step's whole index set (issue 28) goes through here
_ARRAY_CODES = {torch.long: "q", torch.float64: "d"}


def to_device(values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """``values`` (host numbers: a flat sequence, or an :class:`array.array` of ``dtype``'s code; or a CPU tensor) as
    a ``dtype`` tensor on ``device``, without a synchronising copy. On a CPU the result may share the memory of an
    ``array`` passed in."""
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif dtype in _ARRAY_CODES:
        code = _ARRAY_CODES[dtype]
        buffer = values if isinstance(values, array) and values.typecode == code else array(code, values)
        host = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
