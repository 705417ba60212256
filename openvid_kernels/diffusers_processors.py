"""Drop-in diffusers attention processors that run on openvid_kernels' attention ops.

One line speeds up a diffusers DiT you did not write (Latte, PixArt-alpha/sigma, SD3 and other models whose
``Attention`` modules use diffusers' standard processors)::

    report = patch_diffusers_model(pipe.transformer)   # print(report): which module runs on what, and why not

Every patched ``Attention`` module keeps its projections, norms and modules (LoRA and hooks still apply); only
the attention product changes:

* self-attention -> :func:`openvid_kernels.spatial_attention` on ``[B, S, H, D]`` views of the projections
  (no copies); Latte's temporal blocks (``LatteTransformer3DModel.temporal_transformer_blocks``, sequences of
  T <= 128 frames) -> :func:`openvid_kernels.temporal_attention`;
* cross-attention, and self-attention with a key mask -> :func:`openvid_kernels.cross_attention`, masks
  turned into key lengths (below);
* SD3's joint text-image attention (``JointAttnProcessor2_0``) -> :func:`openvid_kernels.spatial_attention` on
  the concatenated ``[image; text]`` tokens. (``joint_attention`` reads each stream's q, k, v packed as
  ``[..., 3, H, D]``; diffusers projects q, k and v separately, so packing them costs the same copy as the
  concatenation, and one ``spatial_attention`` call runs every query on the fastest forward kernel.)

Masks: diffusers passes key-padding masks as booleans (True: keep) or additive biases (PixArt turns its 0/1
caption mask into ``(1 - mask) * -10000.0`` of shape ``[B, 1, L]``). A mask that is the same for every query
and head, with values 0 (keep) and <= -10000 as the mask's dtype holds it / ``-inf`` / False (drop), runs
exactly: kept keys that are not a prefix are gathered to the front (attention does not depend on key order)
and their count is passed as ``kv_lens``. A row whose keys are all dropped by one finite bias (-10000 on
every key, at least -1e5) attends to all keys, as the bias cancels in stock diffusers' softmax; all ``-inf`` /
False gives zeros, as PyTorch's SDPA math path does. Checking a mask reads it back to the host once; the verdict
is cached on the mask tensor's identity and version, so a forward pass that hands every block the same mask
checks it once (the lengths themselves are recomputed on the device in every call).

Anything else runs on the stock processor: modules the patch cannot take are left on their original
processor (listed in the report, with a warning); per call, masks that are not key-padding masks (other
values, per-query or per-head masks, a fully masked row of one bias below -1e5) and masks first seen while a
CUDA graph is being captured fall back to the original processor with a warning, once per processor and
reason. A dtype the kernels do not take (float64) runs the attention on the reference ops, also with a warning.
:func:`unpatch_diffusers_model` restores the original processors.

diffusers is imported lazily, so this module imports without it.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from openvid_kernels import _attention_args as attention_args
from openvid_kernels import backends
from openvid_kernels.cross import cross_attention
from openvid_kernels.spatial import spatial_attention
from openvid_kernels.temporal import MAX_FRAMES, temporal_attention

__all__ = [
    "OpenVidAttnProcessor",
    "OpenVidJointAttnProcessor",
    "PatchReport",
    "patch_diffusers_model",
    "unpatch_diffusers_model",
]

# PixArt's mask bias; a key is dropped where the bias is at most this, as the mask's dtype rounds it (bf16 holds
# -9984). exp(bias + score) then underflows to exactly 0 in the fp32 softmax while scores differ by < ~9800.
MASKED_BIAS = -10000.0
# A key-padding row whose keys are all dropped by one bias at or above this cancels in the fp32 softmax (the
# scores keep about 1e-3 of their precision next to it); below it the scores round away.
CANCELLING_BIAS_FLOOR = -1e5
_MASK_CACHE_SIZE = 16


def _diffusers_attention_module():
    try:
        from diffusers.models import attention_processor  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("openvid_kernels.diffusers_processors needs diffusers (pip install diffusers)") from exc
    return attention_processor


def _check_backend(backend) -> None:
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be None or one of {backends.BACKENDS}, got {backend!r}")


def _heads_first(norm, x: torch.Tensor) -> torch.Tensor:
    """Apply a qk-norm to ``x [B, S, H, D]`` as stock diffusers does, on its ``[B, H, S, D]`` view; returns
    ``[B, S, H, D]`` (a view of the norm's output)."""
    return x if norm is None else norm(x.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Masks as key lengths
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _KeyPadding:
    """A key-padding mask as the cross-attention op takes it."""

    kv_lens: torch.Tensor | None  # int32 [B] kept keys per sequence, on the queries' device; None: all kept
    order: torch.Tensor | None  # int64 [B, L], kept keys first in their order; None: kept keys are a prefix


@dataclass(frozen=True)
class _MaskVerdict:
    """What checking a mask on the host found: the mask is a key-padding mask of this structure."""

    all_kept: bool
    is_prefix: bool


def _first_row_and_kept(attn, mask, batch: int, num_keys: int):
    """(the mask broadcast as stock diffusers does, ``[B, heads, queries or 1, L]``; its first row ``[B, L]``;
    the kept keys ``[B, L]``). Device work only. A row whose keys are all dropped by one finite bias keeps them
    all (the bias cancels in the softmax); otherwise the zeros (or True) are kept."""
    per_head = attn.prepare_attention_mask(mask, num_keys, batch).view(batch, attn.heads, -1, num_keys)
    first = per_head[:, 0, 0, :]
    if first.dtype == torch.bool:
        return per_head, first, first
    keep = first == 0
    return per_head, first, torch.where(keep.any(-1)[:, None], keep, torch.isfinite(first))


def _check_mask(attn, mask: torch.Tensor, batch: int, num_queries: int, num_keys: int) -> _MaskVerdict | str:
    """Whether the mask is a key-padding mask (and its structure), or why not. Reads the mask back once."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return f"an attention mask of dtype {mask.dtype} (expected bool or floating point)"
    if mask.dim() < 2 or mask.shape[-1] != num_keys:
        return f"an attention mask of shape {list(mask.shape)} for {num_keys} keys (expected [..., {num_keys}])"
    try:
        per_head, first, kept = _first_row_and_kept(attn, mask, batch, num_keys)
    except RuntimeError:
        return f"an attention mask of shape {list(mask.shape)} that diffusers cannot broadcast"
    if per_head.shape[2] not in (1, num_queries):
        return f"an attention mask of shape {list(mask.shape)} that does not broadcast over {num_queries} queries"
    same_for_all = (per_head == per_head[:, :1, :1, :]).all()
    if first.dtype == torch.bool:
        values_ok = torch.ones((), dtype=torch.bool, device=first.device)
    else:
        keep = first == 0
        drop = first <= torch.tensor(MASKED_BIAS, dtype=first.dtype).item()
        # A fully dropped row of one value cancels in the softmax if fp32 still resolves the scores next to it
        # (stock then attends to all keys with their scores), or is -inf (zeros); a lower finite bias rounds
        # the scores away (stock averages the values uniformly), which no key-padding mask expresses.
        row = first[:, :1]
        cancels = (first == row).all(-1) & ((row[:, 0] >= CANCELLING_BIAS_FLOOR) | (row[:, 0] == -math.inf))
        values_ok = (keep | drop).all() & (keep.any(-1) | cancels).all()
    is_prefix = (kept[:, :-1] | ~kept[:, 1:]).all()
    flags = torch.stack([same_for_all, values_ok, is_prefix, kept.all()]).tolist()  # the one host sync
    same_for_all, values_ok, is_prefix, all_kept = flags
    if not same_for_all:
        return "an attention mask that differs between queries or heads (or holds NaN), not a key-padding mask"
    if not values_ok:
        return ("an attention mask with values other than 0 (keep) and <= -10000 / -inf (drop), or a fully "
                f"masked row of mixed values or of one value below {CANCELLING_BIAS_FLOOR:g}")
    return _MaskVerdict(all_kept, is_prefix)


_mask_cache: OrderedDict[tuple, tuple[weakref.ref, _MaskVerdict | str]] = OrderedDict()


def _key_padding(attn, mask, batch, num_queries, num_keys, device) -> _KeyPadding | str:
    """The mask as key lengths (and a key order), or why it cannot be one.

    The host-side check (:func:`_check_mask`) is cached on the mask tensor's identity and version (every block
    of a forward gets the same mask tensor); inference tensors keep no version counter, so they are checked on
    every call. The lengths and the order are computed from the mask on the device in every call, so a CUDA
    graph captured after a warm call reads the mask's current contents at each replay (a mask refilled in
    place must keep the structure it was checked with: which rows are all kept, kept keys a prefix or not)."""
    try:
        version = mask._version
    except RuntimeError:
        version = None
    key = (id(mask), version, batch, attn.heads, num_queries, num_keys)
    hit = _mask_cache.get(key) if version is not None else None
    if hit is not None and hit[0]() is mask:
        _mask_cache.move_to_end(key)
        verdict = hit[1]
    elif mask.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return ("a mask first seen while a CUDA graph is captured (checking it needs a host sync; run the model "
                "once with the same mask tensor before capturing)")
    else:
        verdict = _check_mask(attn, mask, batch, num_queries, num_keys)
        if version is not None:
            _mask_cache[key] = (weakref.ref(mask), verdict)
            while len(_mask_cache) > _MASK_CACHE_SIZE:
                _mask_cache.popitem(last=False)
    if isinstance(verdict, str):
        return verdict
    if verdict.all_kept:
        return _KeyPadding(None, None)
    kept = _first_row_and_kept(attn, mask, batch, num_keys)[2]
    order = None if verdict.is_prefix else torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(device)
    return _KeyPadding(kept.sum(-1, dtype=torch.int32).to(device), order)


# ---------------------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------------------

class _OpenVidProcessor:
    """What both processors share: the backend, the stock processor they mirror, per-call fallback."""

    _stock_names: tuple[str, ...] = ()

    def __init__(self, backend: str | None, original):
        _check_backend(backend)
        attention_processor = _diffusers_attention_module()
        if original is None:
            original = getattr(attention_processor, self._stock_names[0])()
        stock_types = tuple(getattr(attention_processor, name) for name in self._stock_names)
        if type(original) not in stock_types:
            raise ValueError(f"original must be one of diffusers' {', '.join(self._stock_names)} (the processor this "
                             f"one mirrors and falls back to), got {type(original).__name__}")
        self.backend = backend
        self.original = original
        self._warned: set[str] = set()

    def _warn_once(self, reason: str, instead: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{type(self).__name__}: {reason}; this call runs on {instead}", stacklevel=4)

    def _fall_back(self, reason: str, call):
        self._warn_once(reason, f"diffusers' {type(self.original).__name__}")
        return call()

    def _call_backend(self, x: torch.Tensor) -> str | None:
        """This call's backend: the processor's, or the reference ops for a dtype the kernels do not take (on
        the tensors already projected, so that projections, LoRA layers and hooks run once)."""
        if x.dtype in attention_args.KERNEL_DTYPES or backends.resolve_backend(self.backend, x.device) == "reference":
            return self.backend
        self._warn_once(f"dtype {x.dtype}, which the kernels do not take", "the reference (PyTorch) ops")
        return "reference"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, original={type(self.original).__name__})"


class OpenVidAttnProcessor(_OpenVidProcessor):
    """diffusers' ``AttnProcessor2_0`` (or ``AttnProcessor``, ``FusedAttnProcessor2_0``) on openvid_kernels ops.

    Computes what the stock processor computes (spatial norm, 4-D inputs, group norm, cross norm, qk-norm, output
    projection and dropout, residual connection, output rescale), with the attention on our ops: self-attention
    on :func:`~openvid_kernels.spatial_attention` (``temporal=True``: :func:`~openvid_kernels.temporal_attention`
    up to 128 tokens), masked self-attention and cross-attention on :func:`~openvid_kernels.cross_attention`.

    Args:
        backend: passed to the ops (``None``, ``"auto"``, ``"cuda"``, ``"triton"``, ``"reference"``).
        temporal: the module attends over frames (many short sequences, as Latte's temporal blocks).
        original: the stock processor this one mirrors and falls back to; default a new ``AttnProcessor2_0``.
            With ``AttnProcessor`` the softmax scale is ``attn.scale`` and qk-norms are not applied (as there);
            with ``FusedAttnProcessor2_0`` the projections are the module's fused ``to_qkv`` / ``to_kv``.
    """

    _stock_names = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")

    def __init__(self, backend: str | None = None, temporal: bool = False, original=None):
        super().__init__(backend, original)
        self.temporal = bool(temporal)
        kind = type(self.original).__name__
        self._classic = kind == "AttnProcessor"
        self._fused = kind == "FusedAttnProcessor2_0"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        stock = functools.partial(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                  *args, **kwargs)

        if args or kwargs.get("scale") is not None:
            warnings.warn("the `scale` argument of attention processors is deprecated and ignored, as in diffusers",
                          FutureWarning, stacklevel=2)
        input_ndim = hidden_states.ndim
        num_queries = hidden_states.shape[2] * hidden_states.shape[3] if input_ndim == 4 else hidden_states.shape[1]
        if encoder_hidden_states is None:
            batch_size, num_keys = hidden_states.shape[0], num_queries
        else:
            batch_size, num_keys = encoder_hidden_states.shape[:2]
        key_padding = None
        if attention_mask is not None:
            key_padding = _key_padding(attn, attention_mask, batch_size, num_queries, num_keys, hidden_states.device)
            if isinstance(key_padding, str):
                return self._fall_back(key_padding, stock)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self._fused and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # views of one projection
        else:
            query = attn.to_q(hidden_states)
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if encoder_hidden_states is not None and attn.norm_cross is not None:
                context = attn.norm_encoder_hidden_states(context)
            if self._fused:
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        if not self._classic:  # the classic processor applies no qk-norm
            q, k = _heads_first(attn.norm_q, q), _heads_first(attn.norm_k, k)
        backend = self._call_backend(q)

        # SDPA's default scale in AttnProcessor2_0 (it ignores attn.scale); the classic processor uses attn.scale.
        scale = attn.scale if self._classic else None
        out = self._attend(q, k, v, encoder_hidden_states is not None, key_padding, scale, backend)
        hidden_states = out.flatten(2).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, q, k, v, cross: bool, key_padding: _KeyPadding | None, scale, backend: str | None):
        masked = key_padding is not None and key_padding.kv_lens is not None
        if masked and key_padding.order is not None:
            index = key_padding.order[:, :, None, None].expand(-1, -1, *k.shape[2:])
            k, v = k.gather(1, index), v.gather(1, index)
        if cross or masked:
            kv_lens = key_padding.kv_lens if masked else None
            return cross_attention(q, k, v, kv_lens, softmax_scale=scale, backend=backend)
        if self.temporal and q.shape[1] <= MAX_FRAMES:
            return temporal_attention(q, k, v, scale, backend)  # [N, T, H, D]: N sequences of T frames
        return spatial_attention(q, k, v, scale, backend)


class OpenVidJointAttnProcessor(_OpenVidProcessor):
    """diffusers' ``JointAttnProcessor2_0`` (SD3's joint text-image attention) on openvid_kernels ops.

    Image tokens (``to_q/k/v``) and context tokens (``add_q/k/v_proj``), each with its qk-norm, attend jointly
    through :func:`~openvid_kernels.spatial_attention` on the concatenated ``[image; context]`` tokens; the
    outputs are split and projected (``to_out``, and ``to_add_out`` unless ``context_pre_only``). Without
    context tokens it is self-attention on views. Like the stock processor it takes no mask (one passed is
    ignored, as there).

    Args:
        backend: passed to the op (``None``, ``"auto"``, ``"cuda"``, ``"triton"``, ``"reference"``).
        original: the stock processor to fall back to; default a new ``JointAttnProcessor2_0``.
    """

    _stock_names = ("JointAttnProcessor2_0",)

    def __init__(self, backend: str | None = None, original=None):
        super().__init__(backend, original)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        q, k = _heads_first(attn.norm_q, q), _heads_first(attn.norm_k, k)
        backend = self._call_backend(q)

        num_image_tokens = q.shape[1]
        if encoder_hidden_states is not None:
            context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states))
            cq, ck, cv = (t.view(batch_size, -1, attn.heads, head_dim) for t in context)
            cq, ck = _heads_first(attn.norm_added_q, cq), _heads_first(attn.norm_added_k, ck)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = spatial_attention(q, k, v, backend=backend).flatten(2).to(query.dtype)

        hidden_states = out[:, :num_image_tokens]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states = out[:, num_image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# ---------------------------------------------------------------------------------------------------------
# Patching a model
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PatchReport:
    """What :func:`patch_diffusers_model` did: module name -> what now runs it, or why it was left alone."""

    model: str
    backend: str | None
    replaced: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        total = len(self.replaced) + len(self.left_alone)
        lines = [f"openvid_kernels patch of {self.model} (backend={self.backend!r}): {len(self.replaced)} of "
                 f"{total} attention modules now run on openvid_kernels"]
        for title, entries in (("replaced", self.replaced), ("left on their original processor", self.left_alone)):
            if not entries:
                continue
            groups = _group_names(entries)
            width = max(len(pattern) for pattern, _ in groups)
            lines.append(f"  {title}:")
            lines.extend(f"    {pattern.ljust(width)}  {what}" for pattern, what in groups)
        return "\n".join(lines)


def _group_names(entries: dict[str, str]) -> list[tuple[str, str]]:
    """Module names with their block indices folded (``transformer_blocks.*.attn1 (28)``), per description."""
    counts: dict[tuple[str, str], int] = {}
    for name, what in entries.items():
        key = (re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name), what)
        counts[key] = counts.get(key, 0) + 1
    return [(f"{pattern} ({count})" if count > 1 else pattern, what) for (pattern, what), count in counts.items()]


_SUPPORTED = {
    "AttnProcessor2_0": OpenVidAttnProcessor,
    "AttnProcessor": OpenVidAttnProcessor,
    "FusedAttnProcessor2_0": OpenVidAttnProcessor,
    "JointAttnProcessor2_0": OpenVidJointAttnProcessor,
}


def _unsupported_reason(attn, processor, attention_processor) -> str | None:
    if not isinstance(attn, attention_processor.Attention):
        return f"{type(attn).__name__} is not diffusers' Attention class"
    kind = type(processor).__name__
    if kind not in _SUPPORTED or type(processor) is not getattr(attention_processor, kind):
        return f"processor {kind} is not one of the processors mirrored here ({', '.join(_SUPPORTED)})"
    if attn.inner_dim % attn.heads:
        return f"inner dim {attn.inner_dim} is not a multiple of its {attn.heads} heads"
    head_dim = attn.inner_dim // attn.heads
    if head_dim % 8 or not 8 <= head_dim <= attention_args.MAX_HEAD_DIM:
        return f"head dim {head_dim}: the kernels take multiples of 8 up to {attention_args.MAX_HEAD_DIM}"
    if attn.inner_kv_dim != attn.inner_dim:
        return "fewer key/value heads than query heads (kv_heads) is not supported"
    if attn.added_kv_proj_dim is not None and kind != "JointAttnProcessor2_0":
        return f"added key/value projections with {kind} are not supported"
    return None


def _temporal_modules(model: torch.nn.Module) -> set[int]:
    """ids of the modules inside Latte's temporal blocks (attention over the frames of each position), in
    ``model`` or any module it holds."""
    temporal = set()
    for module in model.modules():
        blocks = getattr(module, "temporal_transformer_blocks", None)
        if isinstance(blocks, torch.nn.Module):
            temporal.update(id(m) for m in blocks.modules())
    return temporal


def _route(attn, processor) -> str:
    if isinstance(processor, OpenVidJointAttnProcessor):
        if getattr(attn, "add_q_proj", None) is not None:
            return "joint image-text attention -> spatial_attention on [image; text]"
        return "self-attention -> spatial_attention"
    if processor.temporal:
        return "temporal self-attention -> temporal_attention"
    if attn.is_cross_attention:
        return "cross-attention -> cross_attention (masks as key lengths)"
    return "self-attention -> spatial_attention"


def patch_diffusers_model(model: torch.nn.Module, backend: str | None = None) -> PatchReport:
    """Run a loaded diffusers model's attention on openvid_kernels, in place (``Attention.set_processor``).

    Every ``Attention`` module whose processor is diffusers' ``AttnProcessor2_0``, ``AttnProcessor``,
    ``FusedAttnProcessor2_0`` or ``JointAttnProcessor2_0`` gets the matching openvid processor (which keeps the
    original, for per-call fallback and :func:`unpatch_diffusers_model`). Modules it cannot take (another
    processor or attention class, a head dim that is not a multiple of 8 in [8, 128], grouped key/value heads,
    added key/value projections outside SD3's joint attention) keep their processor and are named in the report
    and in one warning. Patching a patched model again replaces the openvid processors (e.g. another backend).

    Args:
        model: a diffusers model (``pipe.transformer``, e.g. ``LatteTransformer3DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``), or any module holding diffusers
            ``Attention`` modules.
        backend: passed to every op call (``None``: the default of :func:`openvid_kernels.use_backend`).

    Returns:
        A :class:`PatchReport`; ``print(report)`` lists what runs where.
    """
    if not isinstance(model, torch.nn.Module):
        hint = " (for a pipeline, pass pipe.transformer)" if hasattr(model, "components") else ""
        raise TypeError(f"model must be a torch.nn.Module holding diffusers Attention modules{hint}, "
                        f"got {type(model).__name__}")
    _check_backend(backend)
    attention_processor = _diffusers_attention_module()
    report = PatchReport(model=type(model).__name__, backend=backend)
    temporal = _temporal_modules(model)
    for name, module in model.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
            continue
        current = module.processor
        original = current.original if isinstance(current, _OpenVidProcessor) else current
        reason = _unsupported_reason(module, original, attention_processor)
        if reason is not None:
            report.left_alone[name] = reason
            continue
        processor_type = _SUPPORTED[type(original).__name__]
        if processor_type is OpenVidAttnProcessor:
            processor = OpenVidAttnProcessor(backend, temporal=id(module) in temporal, original=original)
        else:
            processor = processor_type(backend, original=original)
        module.set_processor(processor)
        report.replaced[name] = _route(module, processor)
    if report.left_alone:
        reasons = sorted(set(report.left_alone.values()))
        warnings.warn(f"patch_diffusers_model: {len(report.left_alone)} attention modules of {report.model} keep "
                      f"their original processor: {'; '.join(reasons)}", stacklevel=2)
    return report


def unpatch_diffusers_model(model: torch.nn.Module) -> int:
    """Give every module patched by :func:`patch_diffusers_model` its original processor back; returns how many."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, _OpenVidProcessor) and hasattr(module, "set_processor"):
            module.set_processor(processor.original)
            restored += 1
    return restored
