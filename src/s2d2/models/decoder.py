"""The one decoder-only transformer every family runs, in plain PyTorch, with an arbitrary boolean attention mask.

Pre-norm layers of RMSNorm, rotary embeddings (NeoX half split, optionally partial), grouped-query attention
through SDPA and a SwiGLU MLP or routed experts (:mod:`s2d2.models.moe`), with optional per-head q/k RMSNorm and
optional q/k/v bias. That covers Qwen2 (Fast-dLLM v2, Dream: q/k/v bias), Qwen3 (SDAR: q/k norm), LLaDA-8B (LLaMA
blocks under OLMo's weight names) and the LLaDA2 mixture of experts (BailingMoeV2: q/k norm, partial RoPE, dense
first layers). The module knows nothing about block diffusion: callers pass the token rows, their positions and the
mask; the family adapter decides what those are.

Weights load under the checkpoint's names, which each family declares in a :class:`WeightNames` table
(:data:`QWEN_WEIGHT_NAMES` here, the default; the others in their family modules). At load time q/k/v are fused
into one matrix and gate/up into another, so one forward runs two matmuls per sub-layer instead of five: on small
models the per-kernel overhead, not the arithmetic, dominates a forward.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2d2.errors import ModelLoadError
from s2d2.models.batching import AttentionGroup, PackedBatch
from s2d2.models.cache import BatchKVCache, KVCache
from s2d2.models.moe import MoEConfig, MoEMLP

# Checkpoint tensors known to be unused, and ignored when loading (every other unused tensor is an error):
# ``rotary_emb.inv_freq``, the RoPE frequency buffers older transformers versions saved with each layer (or the
# model); they are a function of rope_theta and head_dim, which the model recomputes. transformers ignores them too.
IGNORED_CHECKPOINT_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class WeightNames:
    """A checkpoint's weight names: the top-level tensors, then per layer names after ``layer`` (its ``{i}`` the
    layer index). A bias is named as its weight with ``bias`` for ``weight``. The MLP and MoE defaults are the
    Hugging Face convention (Qwen, DeepSeek-V3, BailingMoeV2)."""

    embed: str
    norm: str
    lm_head: str
    layer: str
    input_norm: str
    post_norm: str
    qkv: tuple[str, ...]  # the q, k and v matrices, or one name for a fused [Q heads | K heads | V heads] matrix
    o_proj: str
    q_norm: str | None = None  # per-head q/k RMSNorm, for a config with qk_norm
    k_norm: str | None = None
    mlp: str = "mlp."  # the dense MLP's prefix, before the SwiGLU names
    swiglu: tuple[str, str, str] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")  # gate, up, down
    router: str = "mlp.gate.weight"
    expert_bias: str = "mlp.gate.expert_bias"
    experts: str = "mlp.experts.{e}."  # an expert's prefix, before the SwiGLU names
    shared_experts: str = "mlp.shared_experts."

    def __post_init__(self) -> None:
        if len(self.qkv) not in (1, 3):
            raise ValueError(f"qkv names three matrices (q, k, v) or one fused matrix, not {self.qkv!r}.")


# Qwen2 / Qwen3 names (SDAR, Fast-dLLM v2, Dream)
QWEN_WEIGHT_NAMES = WeightNames(
    embed="model.embed_tokens.weight", norm="model.norm.weight", lm_head="lm_head.weight", layer="model.layers.{i}.",
    input_norm="input_layernorm.weight", post_norm="post_attention_layernorm.weight",
    qkv=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    o_proj="self_attn.o_proj.weight", q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture hyper-parameters, read from a Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3 / SDAR: RMSNorm over head_dim on q and k, before RoPE
    qkv_bias: bool = False  # Qwen2 / Fast-dLLM v2: bias on q/k/v projections
    # rotate q/k in float32 and cast back (LLaDA's rope_full_precision); else in the model dtype
    rope_float32: bool = False
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dims of each head (LLaDA2: 0.5)
    moe: MoEConfig | None = None  # routed-expert MLPs (LLaDA2), from layer first_k_dense_replace on
    first_k_dense_replace: int = 0
    layout: WeightNames = QWEN_WEIGHT_NAMES  # the checkpoint's weight names (the family's table)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ModelLoadError(
                    f"config.json field {name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ModelLoadError(f"partial_rotary_factor {self.partial_rotary_factor} gives a rotary dimension of "
                                 f"{self.rotary_dim}, which must be even and within head_dim ({self.head_dim}).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.qk_norm and (self.layout.q_norm is None or self.layout.k_norm is None):
            raise ModelLoadError("this checkpoint layout names no q/k norm weights, so qk_norm is not supported.")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, qk_norm: bool, qkv_bias: bool,
                layout: WeightNames = QWEN_WEIGHT_NAMES) -> DecoderConfig:
        """Build from a config.json dict; ``head_dim`` defaults to hidden_size / num_attention_heads (Qwen2)."""
        try:
            heads = int(cfg["num_attention_heads"])
            scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
            rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else None
            if rope_type not in (None, "default"):
                raise ModelLoadError(f"rope_scaling of type {rope_type!r} is not supported yet.")
            theta = cfg.get("rope_theta")
            if theta is None and isinstance(scaling, dict):
                theta = scaling.get("rope_theta")
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta if theta is not None else 10000.0),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qk_norm=qk_norm,
                qkv_bias=qkv_bias,
                layout=layout,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the required field {e.args[0]!r}.") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has a field of the wrong type ({e}).") from None


def _check_shape(name: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    """A ModelLoadError if checkpoint tensor ``name`` does not have the shape of the part of the model it fills."""
    if tuple(tensor.shape) != tuple(target.shape):
        raise ModelLoadError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, but config.json implies {tuple(target.shape)}.")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """A ModelLoadError if a floating-point checkpoint tensor holds NaN or Inf (a corrupt or diverged checkpoint)."""
    if not tensor.is_floating_point():
        return
    # The sum is non-finite whenever an element is, and needs no tensor-sized temporary; a finite tensor whose
    # sum overflows is told apart by the exact count below.
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ModelLoadError(f"weight {name!r} holds {bad} NaN or infinite value(s); the checkpoint is corrupt.")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, cast back, then scale: the order transformers' Qwen RMSNorm uses, so reduced-precision
    # runs round the same way.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style RoPE on the first ``cos.shape[-1]`` dims of each head (all of them unless partial); the rest pass.
    Tables in float32 for a lower-precision ``x`` rotate in float32 and cast back (LLaDA's ``rope_full_precision``)."""
    if cos.dtype != x.dtype:
        return _rotate(x.float(), cos, sin).to(x.dtype)
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((_rotate(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# A forward path's attention: ``attend(layer_index, q, k, v)`` with q ``[..., heads, head_dim]`` and k, v
# ``[..., kv_heads, head_dim]`` (RoPE applied) writes k and v into the path's cache and returns the attention output
# ``[..., heads * head_dim]``, with the same leading dims.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _attention_inputs(x: torch.Tensor, input_norm: torch.Tensor, qkv: nn.Module, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int,
                      kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's q, k (RoPE applied) and v ``[..., heads, head_dim]`` from its input rows ``x`` ``[..., H]``: the
    token-wise work before attention. A function of its arguments alone (the layer's modules and tensors passed in),
    so that one compiled graph serves every layer: torch.compile inlines the modules and guards on their shapes,
    not their identity. Module calls keep their hooks (tests add a LoRA path through them)."""
    rows = x.shape[:-1]
    q, k, v = qkv(_rms_norm(x, input_norm, eps)).split(
        (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k, v = q.view(*rows, heads, head_dim), k.view(*rows, kv_heads, head_dim), v.view(*rows, kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _dense_block(x: torch.Tensor, attn: torch.Tensor, o_proj: nn.Module, post_norm: torch.Tensor,
                 gate_up: nn.Module, down: nn.Module, eps: float) -> torch.Tensor:
    """The token-wise work after attention in a dense layer: output projection and SwiGLU MLP, each added to the
    residual stream ``x`` (as :func:`_attention_inputs`, one graph for every layer)."""
    x = x + o_proj(attn)
    gate, up = gate_up(_rms_norm(x, post_norm, eps)).chunk(2, dim=-1)
    return x + down(F.silu(gate) * up)


@dataclass(frozen=True)
class Kernels:
    """The token-wise parts of a layer, eager or compiled (:meth:`Decoder.compile`)."""

    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = _attention_inputs
    dense_block: Callable[..., torch.Tensor] = _dense_block


EAGER_KERNELS = Kernels()


class SplitLinear(nn.Module):
    """A linear map over weight matrices kept apart, their outputs concatenated: what one fused matrix computes, over
    another model's separate q/k/v (or gate/up) tensors, shared rather than copied (:meth:`Decoder.sharing`)."""

    def __init__(self, weights: list[nn.Parameter], biases: list[nn.Parameter] | None = None) -> None:
        super().__init__()
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases) if biases else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = list(self.biases) if self.biases is not None else [None] * len(self.weights)
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights, biases)], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        """The fused matrix's values (a copy: for export, never for the forward)."""
        return torch.cat(list(self.weights))

    @property
    def bias(self) -> torch.Tensor | None:
        return torch.cat(list(self.biases)) if self.biases is not None else None


class _Layer(nn.Module):
    def __init__(self, c: DecoderConfig, index: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.index, self.eps = index, c.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.input_norm = nn.Parameter(torch.ones(c.hidden_size, **kw))
        self.qkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.qkv_bias, **kw)
        self.q_norm = nn.Parameter(torch.ones(c.head_dim, **kw)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim, **kw)) if c.qk_norm else None
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=False, **kw)
        self.post_norm = nn.Parameter(torch.ones(c.hidden_size, **kw))
        self.moe = MoEMLP(c.moe, device, dtype) if c.moe is not None and index >= c.first_k_dense_replace else None
        dense = self.moe is None
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False, **kw) if dense else None
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, **kw) if dense else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                kernels: Kernels = EAGER_KERNELS) -> torch.Tensor:
        """The layer over the rows of ``x`` ``[..., H]`` (``[b, L]`` or ``[N]`` rows; ``cos`` / ``sin`` broadcast
        over the heads): attention through ``attend``, then the MLP, each added to the residual stream. The
        token-wise parts run through ``kernels`` (compiled ones for the packed forward)."""
        q, k, v = kernels.attention_inputs(x, self.input_norm, self.qkv, self.q_norm, self.k_norm, cos, sin,
                                           self.eps, self.heads, self.kv_heads, self.head_dim)
        attn = attend(self.index, q, k, v)
        if self.moe is None:
            return kernels.dense_block(x, attn, self.o_proj, self.post_norm, self.gate_up, self.down, self.eps)
        x = x + self.o_proj(attn)  # a mixture-of-experts layer: its routed MLP stays eager (data-dependent)
        h = _rms_norm(x, self.post_norm, self.eps)
        return x + self.moe(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def _swiglu_layout(prefix: str, names: tuple[str, str, str], gate_up: torch.Tensor, down: torch.Tensor, inter: int,
                   expert: int | None = None) -> dict[str, tuple[torch.Tensor, Any]]:
    """The gate / up / down ``names`` of one SwiGLU MLP (of ``expert`` in stacked expert weights)."""
    gate_name, up_name, down_name = names
    gate, up = slice(0, inter), slice(inter, 2 * inter)
    if expert is not None:
        gate, up = (expert, gate), (expert, up)
    return {prefix + gate_name: (gate_up, gate), prefix + up_name: (gate_up, up), prefix + down_name: (down, expert)}


class _Fallback:
    """The shared way back to eager of one :meth:`Decoder.compile`: the first compiler failure calls ``on_failure``
    (which warns and restores the eager forwards); every compiled function then runs eager, including those a
    forward already in progress holds."""

    def __init__(self, on_failure: Callable[[Exception], None]) -> None:
        self.on_failure, self.failed = on_failure, False

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with ``torch.compile`` (dynamic shapes), or ``fn`` itself once a compilation failed (a
        real error in the computation then re-raises from ``fn``)."""
        compiled = torch.compile(fn, dynamic=True)

        def run(*args: Any) -> Any:
            if not self.failed:
                try:
                    return compiled(*args)
                except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, eager re-raises real errors
                    self.failed = True
                    self.on_failure(e)
            return fn(*args)

        return run


class Decoder(nn.Module):
    """Decoder-only transformer; ``forward`` runs one batch-1 pass against a :class:`KVCache`."""

    def __init__(self, config: DecoderConfig, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(_Layer(c, i, device, dtype) for i in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size, device=device, dtype=dtype))
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(
            c.hidden_size, c.vocab_size, bias=False, device=device, dtype=dtype)
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)
        self._kernels = EAGER_KERNELS  # the packed forward's token-wise parts (compiled by :meth:`compile`)

    def _inv_freq(self, device: Any) -> torch.Tensor:
        c = self.config
        dim = c.rotary_dim
        return 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    def _rope(self, position_ids: torch.Tensor, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[L, 1, rotary_dim]`` for ``position_ids``, looked up in a table grown on demand. ``upto``
        bounds the positions from the host (a cache's capacity), so that a cached forward reads no device value
        (``position_ids.max()`` would wait for the device)."""
        needed = upto if upto is not None else int(position_ids.max()) + 1
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < needed or table[0].device != position_ids.device:
            size = max(needed, 2 * (table[0].shape[0] if table is not None else 0), 512)
            positions = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
            freqs = positions[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
            dtype = torch.float32 if self.config.rope_float32 else self.embed.weight.dtype
            table = self._rope_table = (emb.cos().to(dtype), emb.sin().to(dtype))
        return table[0][position_ids], table[1][position_ids]

    @classmethod
    def from_hf_weights(cls, config: DecoderConfig, tensors: Mapping[str, torch.Tensor], device: Any = "cpu",
                        dtype: torch.dtype = torch.float32) -> Decoder:
        """Build with no random initialisation (on the meta device) and fill from Hugging Face-named tensors."""
        with torch.device("meta"):
            model = cls(config, dtype=dtype, device="meta")
        model = model.to_empty(device=device)
        model.inv_freq = model._inv_freq(device)
        model.load_hf_state_dict(tensors)
        return model.eval().requires_grad_(False)

    @classmethod
    def sharing(cls, config: DecoderConfig, tensors: Mapping[str, torch.Tensor]) -> Decoder:
        """A decoder whose weights *are* ``tensors`` (another model's parameters by checkpoint name, e.g. a
        transformers model's ``named_parameters()``): nothing is copied or cast, so it computes on their device and
        in their dtype, and sees any change made to them. Where this decoder fuses q/k/v or gate/up, a
        :class:`SplitLinear` runs over the separate tensors. The names are checked as :meth:`load_hf_state_dict`
        checks a checkpoint's. Routed experts are kept per expert (:meth:`MoEMLP.share_experts`), as the other model
        holds them."""
        first = next(iter(tensors.values()))
        with torch.device("meta"):
            model = cls(config, device="meta", dtype=first.dtype)
        layout = model._hf_layout()
        model._check_names(tensors, layout)
        parents = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
        owners = {id(p): (module, name) for module in model.modules()
                  for name, p in module.named_parameters(recurse=False)}
        fused: dict[int, list[tuple[int, str]]] = {}
        experts: dict[int, tuple[MoEMLP, dict[tuple[str, int], torch.Tensor]]] = {}
        for name, (param, rows) in layout.items():
            if name not in tensors:
                continue  # a tied head
            tensor = tensors[name]
            _check_shape(name, tensor, param[rows] if rows is not None else param)
            if rows is None:
                module, attr = owners[id(param)]
                setattr(module, attr, nn.Parameter(tensor.detach(), requires_grad=False))  # the same storage
            elif isinstance(rows, slice):  # a part of a fused matrix
                fused.setdefault(id(param), []).append((rows.start, name))
            else:  # a routed expert's gate or up (``(e, rows)``) or down (``e``) in the stacked expert weights
                module, _ = owners[id(param)]
                e, part = rows if isinstance(rows, tuple) else (rows, None)
                kind = "down" if part is None else "gate" if part.start == 0 else "up"
                experts.setdefault(id(module), (module, {}))[1][kind, e] = tensor
        for moe, given in experts.values():  # the experts are another model's separate tensors: kept per expert
            moe.share_experts(*([given[kind, e] for e in range(moe.config.num_experts)]
                                 for kind in ("gate", "up", "down")))
        for param_id, parts in fused.items():  # a fused matrix (or bias): its module becomes a SplitLinear
            module, attr = owners[param_id]
            parent, child = parents[id(module)]
            split = getattr(parent, child)
            shared = [nn.Parameter(tensors[name].detach(), requires_grad=False) for _, name in sorted(parts)]
            if not isinstance(split, SplitLinear):
                split = SplitLinear(shared) if attr == "weight" else SplitLinear([], shared)
                setattr(parent, child, split)
            elif attr == "weight":
                split.weights = nn.ParameterList(shared)
            else:
                split.biases = nn.ParameterList(shared)
        left = [name for name, p in model.named_parameters() if p.is_meta]
        if left:
            raise ModelLoadError(f"the model has no tensor for {len(left)} weight(s) of this decoder, first "
                                 f"{left[0]!r}.")
        model.inv_freq = model._inv_freq(first.device)
        return model.eval()

    # ------------------------------------------------------------------ cache
    def new_cache(self, capacity: int) -> KVCache:
        """A cache for this model's shapes, device and dtype, able to hold ``capacity`` token slots."""
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity,
                       device=self.embed.weight.device, dtype=self.embed.weight.dtype)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,  # [L] int64 (or [b, L] without a cache)
        position_ids: torch.Tensor,  # same shape as input_ids
        cache: KVCache | None,
        attn_mask: torch.Tensor,  # [L, cache.length + L] bool, True = may attend (or [b, 1, L, L] without a cache)
        *,
        num_store: int = 0,
        logits_from: int = 0,
        logits_to: int | None = None,
    ) -> torch.Tensor:
        """Run the rows ``input_ids`` after the committed cache; returns float32 logits for rows ``logits_from`` to
        ``logits_to`` (exclusive; None: the last row), ``[logits_to - logits_from, V]``.

        Keys are ``[committed cache | these rows]``. The K/V of the first ``num_store`` rows become committed
        (their rows must not attend to later rows, which the mask guarantees); the others stay scratch.
        Logits are computed only for those rows, since the LM head is a large share of a small
        model's forward and most rows (pending commits, a verifier's first half) need none.

        With ``cache=None`` (training) the input may be a batch ``[b, L]`` whose rows attend only to each other
        through ``attn_mask`` ``[b, 1, L, L]``; logits are then ``[b, L - logits_from, V]``.
        """
        batched = input_ids.dim() == 2
        ids = input_ids if batched else input_ids[None]
        n = ids.shape[1]
        start = 0 if cache is None else cache.length
        if cache is not None and (batched or start + n > cache.capacity):
            raise RuntimeError(
                f"cached forwards take one row of tokens that fits the cache ({start} + {n} > {cache.capacity})")
        cos, sin = self._rope(position_ids if batched else position_ids[None],  # [b, L, 1, head_dim]
                              None if cache is None else cache.capacity)
        mask = attn_mask if batched else attn_mask[None, None]
        keys, values = (None, None) if cache is None else (cache.keys, cache.values)
        logits = self._layers(ids, cos, sin, mask, keys, values, start, logits_from, logits_to)
        if cache is not None:
            cache.commit(num_store)
        return logits if batched else logits[0]

    def compile(self) -> None:  # type: ignore[override]  # (nn.Module.compile compiles __call__; this, the layers)
        """Compile the forwards with ``torch.compile`` (inductor, dynamic shapes, so that row counts and cache lengths
        do not each recompile): the single-row forward's layers whole, and the packed forward's token-wise parts
        (:class:`Kernels`: one graph each, shared by every layer; attention over the rows' cache slots stays eager,
        its shapes being the batch's). Compilation happens at the first forwards; if it fails there (no C++
        compiler, an unsupported backend), one warning says so and the model runs eager from then on."""
        eager = self._layers  # the class's method, bound

        def back_to_eager(error: Exception) -> None:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            warnings.warn(f"torch.compile is not available here ({reason}); running the eager forward",
                          RuntimeWarning, stacklevel=3)
            self.__dict__.pop("_layers", None)  # the class's eager method again
            self._kernels = EAGER_KERNELS

        fallback = _Fallback(back_to_eager)
        self._layers = fallback.wrap(eager)  # type: ignore[method-assign]
        self._kernels = Kernels(*map(fallback.wrap, (EAGER_KERNELS.attention_inputs, EAGER_KERNELS.dense_block)))

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` was called and has not fallen back to the eager forward."""
        return "_layers" in self.__dict__

    def _layers(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor] | None, values: list[torch.Tensor] | None, start: int, logits_from: int,
                logits_to: int | None) -> torch.Tensor:
        """The layers of :meth:`forward` over ``ids`` ``[b, L]`` (K/V written into ``keys`` / ``values`` from slot
        ``start`` when given) and the LM head over rows ``logits_from .. logits_to``: the part that
        :meth:`compile` compiles, free of Python-side state (the cache's length, the RoPE table's growth)."""
        b, n = ids.shape

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, L, hd]
            if keys is not None and values is not None:  # write this forward's K/V after the committed ones
                keys[i][:, start:start + n] = k[0]
                values[i][:, start:start + n] = v[0]
                k, v = keys[i][None, :, :start + n], values[i][None, :, :start + n]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [b, heads, L, hd]
            return attn.transpose(1, 2).reshape(b, n, -1)

        return self._stack(ids, cos, sin, attend, (slice(None), slice(logits_from, logits_to)), EAGER_KERNELS)

    def _stack(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
               logit_rows: Any, kernels: Kernels) -> torch.Tensor:
        """Embed ``tokens``, run every layer with the path's ``attend`` and token-wise ``kernels``, and return
        float32 logits of the rows ``x[logit_rows]`` (final norm, then the LM head)."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, attend, kernels)
        x = _rms_norm(x[logit_rows], self.norm, self.config.rms_norm_eps)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def new_batch_cache(self, num_slots: int, capacity: int) -> BatchKVCache:
        """A cache of ``num_slots`` independent rows of ``capacity`` token slots each (the engine's batch)."""
        c = self.config
        return BatchKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_slots, capacity,
                            device=self.embed.weight.device, dtype=self.embed.weight.dtype)

    def forward_packed(self, batch: PackedBatch, cache: BatchKVCache) -> torch.Tensor:
        """One forward over the packed rows of several requests; returns float32 logits ``[R, V]`` for
        ``batch.logits_index``, batch row by batch row.

        Token-wise layers run over the N valid rows only; attention runs per group of batch rows over their cache
        slots (:class:`~s2d2.models.batching.AttentionGroup`), with the query rows scattered into a padded layout and
        gathered back. Each row's K/V are written into its slot after its committed tokens (scratch until the
        caller commits them), as :meth:`forward` does for one row.
        """
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            shared = batch.num_shared
            if shared:  # the rows of slots in the shared buffers come first
                cache.keys[i][batch.slot_of_row, :, batch.cache_pos] = k[:shared]
                cache.values[i][batch.slot_of_row, :, batch.cache_pos] = v[:shared]
            if len(batch.groups) == 1 and shared:
                return self._group_attention(q, cache.keys[i], cache.values[i], batch.groups[0])
            attn = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            for g in batch.groups:
                if g.own_slot is None:
                    keys, values = cache.keys[i], cache.values[i]
                else:  # a slot with buffers of its own: its rows' K/V go there, and it attends over them alone
                    own_keys, own_values = cache.own[g.own_slot]
                    keys, values = own_keys[i], own_values[i]
                    end = g.own_start + g.rows.stop - g.rows.start
                    keys[:, g.own_start:end] = k[g.rows].transpose(0, 1)
                    values[:, g.own_start:end] = v[g.rows].transpose(0, 1)
                attn[g.rows] = self._group_attention(q[g.rows], keys, values, g)
            return attn

        cos, sin = self._rope(batch.positions, cache.max_capacity)  # [N, 1, head_dim]
        return self._stack(batch.tokens, cos, sin, attend, batch.logits_index, self._kernels)

    def _group_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         g: AttentionGroup) -> torch.Tensor:
        """Attention of one group's query rows ``[n, heads, head_dim]`` over their slots; returns ``[n, q_size]``."""
        c = self.config
        b, width = int(g.attn_mask.shape[0]), g.width
        if g.own_slot is not None:  # the slot's own buffers [kv_heads, capacity, head_dim]
            keys, values = keys[None, :, :g.key_len], values[None, :, :g.key_len]
        elif g.slot_range is not None:
            keys = keys[g.slot_range[0]:g.slot_range[1], :, :g.key_len]
            values = values[g.slot_range[0]:g.slot_range[1], :, :g.key_len]
        else:
            keys = keys[:, :, :g.key_len].index_select(0, g.key_slots)
            values = values[:, :, :g.key_len].index_select(0, g.key_slots)
        padded = q.new_zeros(b * width, c.num_attention_heads, c.head_dim)
        padded[g.query_index] = q
        padded = padded.view(b, width, c.num_attention_heads, c.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=g.attn_mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * width, -1)[g.query_index]

    # ---------------------------------------------------------------- weights
    def load_hf_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up, reading each of ``tensors`` once, in its order.

        Each of these is a :class:`ModelLoadError` naming the tensor: a weight the model needs is missing or has
        the wrong shape; a weight holds NaN or Inf; the checkpoint holds a tensor the model would not use (a sign
        that config.json does not describe the checkpoint, e.g. q/k/v biases without ``attention_bias``), except
        the names in :data:`IGNORED_CHECKPOINT_TENSORS`. With ``tie_word_embeddings`` an ``lm_head.weight`` equal
        to the embedding is ignored, and a different one is used as an untied head, as transformers 5 does.
        """
        embed_name, head_name = self.config.layout.embed, self.config.layout.lm_head
        if self.lm_head is None and head_name in tensors:
            self._untie_if_different(tensors[head_name], tensors.get(embed_name))
        own = self._hf_layout()
        self._check_names(tensors, own)
        with torch.no_grad():
            # In the source's order, one tensor at a time, each cast while it is copied into place: a lazily read
            # checkpoint (:class:`~s2d2.checkpoint.CheckpointTensors`) then never holds more than a few of its
            # tensors beside the model, and no cast makes a tensor-sized temporary.
            for name in tensors:
                if name not in own:
                    continue  # an ignored tensor (checked above)
                param, rows = own[name]
                src = tensors[name]
                target = param[rows] if rows is not None else param
                _check_shape(name, src, target)
                _check_finite(name, src)
                target.copy_(src)
                del src

    def _check_names(self, tensors: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> None:
        """A ModelLoadError if a weight this decoder needs is missing from ``tensors`` (a tied head aside), or if
        ``tensors`` holds one it would not use (:data:`IGNORED_CHECKPOINT_TENSORS` aside)."""
        head_name = self.config.layout.lm_head
        missing = [name for name in own if name not in tensors and not (self.lm_head is None and name == head_name)]
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {len(missing)} weight(s), first {missing[0]!r}.")
        unexpected = sorted(n for n in tensors if n not in own and not IGNORED_CHECKPOINT_TENSORS.search(n))
        if unexpected:
            raise ModelLoadError(
                f"the checkpoint holds {len(unexpected)} tensor(s) that this config.json does not use, first "
                f"{unexpected[0]!r} (does config.json describe this checkpoint?).")

    def _untie_if_different(self, head: torch.Tensor, embed: torch.Tensor | None) -> None:
        """Give a tied model its own LM head when the checkpoint's ``lm_head.weight`` differs from the embedding.

        transformers (5.x) does the same: a config that ties the two, with a checkpoint holding both with different
        values, means the config is wrong, and the checkpoint's head is the one the model was trained with. Equal
        values (checkpoints converted from ``.bin`` files store the shared tensor twice) keep the tie.
        """
        if embed is not None and head.shape == embed.shape and torch.equal(head, embed.to(head.device, head.dtype)):
            return
        c, weight = self.config, self.embed.weight
        with torch.device("meta"):  # no random initialisation: the checkpoint's values are copied in next
            lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=weight.dtype)
        self.lm_head = lm_head.to_empty(device=weight.device)
        self.config = replace(c, tie_word_embeddings=False)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under its checkpoint's names (un-fused), e.g. to save as safetensors."""
        out = {}
        head_name = self.config.layout.lm_head
        for name, (param, rows) in self._hf_layout().items():
            if name == head_name and self.lm_head is None:
                continue
            out[name] = (param[rows] if rows is not None else param).detach().clone().contiguous()
        return out

    def _hf_layout(self) -> dict[str, tuple[torch.Tensor, Any]]:
        """Map each checkpoint weight name (the config's :class:`WeightNames`) to (our parameter, the index of the
        part of it that holds it)."""
        c, names = self.config, self.config.layout
        out: dict[str, tuple[torch.Tensor, Any]] = {names.embed: (self.embed.weight, None)}
        for i, layer in enumerate(self.layers):
            p, q, kv = names.layer.format(i=i), layer.q_size, layer.kv_size
            out[p + names.input_norm] = (layer.input_norm, None)
            out[p + names.post_norm] = (layer.post_norm, None)
            parts = (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)) if len(names.qkv) == 3 else (None,)
            for name, rows in zip(names.qkv, parts):
                out[p + name] = (layer.qkv.weight, rows)
                if c.qkv_bias:
                    out[p + name.removesuffix("weight") + "bias"] = (layer.qkv.bias, rows)
            if c.qk_norm:
                out[p + names.q_norm] = (layer.q_norm, None)
                out[p + names.k_norm] = (layer.k_norm, None)
            out[p + names.o_proj] = (layer.o_proj.weight, None)
            if layer.moe is None:
                out.update(_swiglu_layout(p + names.mlp, names.swiglu, layer.gate_up.weight, layer.down.weight,
                                          c.intermediate_size))
                continue
            moe, inter = layer.moe, c.moe.moe_intermediate_size
            out[p + names.router] = (moe.router, None)
            out[p + names.expert_bias] = (moe.expert_bias, None)
            for e in range(c.moe.num_experts):
                prefix = p + names.experts.format(e=e)
                if moe.gate_up is not None:  # stacked
                    out.update(_swiglu_layout(prefix, names.swiglu, moe.gate_up, moe.down, inter, e))
                else:  # per expert (MoEMLP.share_experts)
                    out.update({prefix + name: (weights[e], None)
                                for name, weights in zip(names.swiglu, (moe.gate, moe.up, moe.down))})
            if moe.shared_gate_up is not None:
                out.update(_swiglu_layout(p + names.shared_experts, names.swiglu, moe.shared_gate_up.weight,
                                          moe.shared_down.weight, inter * c.moe.num_shared_experts))
        out[names.norm] = (self.norm, None)
        out[names.lm_head] = (self.lm_head.weight if self.lm_head is not None else self.embed.weight, None)
        return out
