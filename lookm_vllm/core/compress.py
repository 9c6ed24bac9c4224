"""One layer's prompt KV cache in, the compressed (selected and merged) cache out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import CompressionConfig
from .dispatch import Kernel, use_triton
from .merge import MERGES, assign_to_kept
from .selection import select_kept, selector_for


@dataclass(frozen=True)
class CompressedKV:
    """A compressed layer cache; every head keeps the same number ``K`` of positions.

    Attributes
    ----------
    keys, values : Tensor
        ``[Hkv, K, d]`` in the input dtype, row ``i`` of head ``h`` holding position
        ``kept[h, i]`` (merged into, when a merge is configured).
    kept : Tensor
        int64 ``[Hkv, K]``, the original positions kept by each head, ascending.
    kept_mask : Tensor
        bool ``[Hkv, L]``, True where head ``h`` keeps position ``j`` (``kept`` as a mask).
    merge_counts : Tensor
        int64 ``[Hkv, K]``, how many evicted tokens were merged into each kept row (n_c); a row
        with 0 holds its original, unmodified entry.
    num_kept : int
        ``K``, kept positions per head.
    num_kept_evictable : int
        Kept positions per head that were evictable: a multiple of ``keep_multiple``, unless all
        evictable positions are kept.
    """

    keys: Tensor
    values: Tensor
    kept: Tensor
    kept_mask: Tensor
    merge_counts: Tensor
    num_kept: int
    num_kept_evictable: int

    @property
    def compressed(self) -> bool:
        """Whether anything was evicted (False: ``keys``/``values`` are the input tensors)."""
        return self.num_kept < self.kept_mask.shape[1]


def _positions_per_head(mask: Tensor) -> Tensor:
    """Ascending positions of the True entries of each row of a mask with equal row counts."""
    num_heads, length = mask.shape
    positions = torch.arange(length, device=mask.device).expand(num_heads, length)
    return positions[mask].view(num_heads, -1)


def _gather_positions(tensor: Tensor, positions: Tensor) -> Tensor:
    return tensor.gather(1, positions[..., None].expand(-1, -1, tensor.shape[-1]))


def compress(
    keys: Tensor,
    values: Tensor,
    scores: Tensor | None,
    is_image: Tensor | None,
    config: CompressionConfig | dict | str | None = None,
    *,
    evictable: Tensor | None = None,
    keep_multiple: int = 1,
    kernel: Kernel = "auto",
    modality: Tensor | None = None,
) -> CompressedKV:
    """Compress one layer's prompt KV cache as ``config`` says (LOOK-M by default).

    Parameters
    ----------
    keys, values : Tensor
        ``[Hkv, L, d]`` prompt keys (post-RoPE) and values of one layer.
    scores : Tensor, optional
        ``[Hkv, L]`` accumulated attention (:func:`accumulated_attention` over the queries
        :func:`scoring_queries` names); may be ``None`` for methods that do not rank by attention.
    is_image : Tensor, optional
        bool ``[L]``, True at the positions of visual tokens (image patches, video frames: what
        the text prior does not protect); ``None`` means a text-only prompt (which LOOK-M leaves
        uncompressed).
    config : CompressionConfig, dict, str or None
        Anything :meth:`CompressionConfig.parse` accepts.
    evictable : Tensor, optional
        bool ``[L]`` for engines that evict whole blocks: the positions the engine is able to
        free. False positions are always kept; the evictable candidates get their proportional
        share of the paper's selection. All positions when not given.
    keep_multiple : int
        Every head keeps the same number ``k`` of evictable positions, rounded UP to a multiple
        of this (e.g. the block size) and capped at the number of evictable positions. ``k``
        depends on the layout, budget and ``keep_multiple`` only, never on ``scores``.
    kernel : {"auto", "torch", "triton"}
        The merge assignment's implementation (:mod:`lookm_vllm.core.dispatch`).
    modality : Tensor, optional
        int64 ``[L]`` modality ids (0 = text, e.g. 1 = image, 2 = video; non-zero exactly where
        ``is_image``): with ``merge_scope="same_modality"`` an evicted token merges only into
        kept tokens of its own id. Default: ``is_image`` (text vs visual).

    Returns
    -------
    CompressedKV
        Nothing evicted (method ``none``, budget 1.0, no image for LOOK-M, a budget covering
        everything) returns the input tensors unchanged with ``kept = arange(L)`` per head.

    Notes
    -----
    Budget, per head (see :mod:`lookm_vllm.core.selection`): ``M = int(recent_ratio * L)``,
    ``N = int(budget * L) - M``. Protected positions (the last ``M`` and, for LOOK-M, all text)
    are always kept; the older protected ones use up ``N`` first, and the best remaining
    candidates fill the rest, so the paper keeps ``max(n_protected_older, N) + M`` per head: its
    ``S = max(0, N - n_protected_older)`` best candidates (unprotected positions). With
    ``evictable`` / ``keep_multiple``, each head keeps every non-evictable position and ``k``
    evictable ones: its ``n_pe`` protected evictable positions plus its best-ranked evictable
    candidates, ``k = min(round_up(n_pe + ceil(S * n_ev / n_c), keep_multiple), n_evictable)``
    (``n_c`` candidates, ``n_ev`` of them evictable), so ``K = n_non_evictable + k`` is the same
    for every head, layer and tensor-parallel rank. All evictable and ``keep_multiple = 1`` give
    exactly the paper's selection.
    """
    config = CompressionConfig.parse(config)
    num_heads, length, _ = keys.shape
    if values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"values {tuple(values.shape)} do not match keys {tuple(keys.shape)}")
    if scores is not None and scores.shape != (num_heads, length):
        raise ValueError(f"scores must be [{num_heads}, {length}], got {tuple(scores.shape)}")
    if is_image is None:
        is_image = torch.zeros(length, dtype=torch.bool, device=keys.device)
    for name, mask in (("is_image", is_image), ("evictable", evictable)):
        if mask is not None and (mask.shape != (length,) or mask.dtype != torch.bool):
            raise ValueError(f"{name} must be a bool tensor of shape [{length}]")
    if modality is not None and modality.shape != (length,):
        raise ValueError(f"modality must have shape [{length}]")
    is_image = is_image.to(keys.device)
    modality = None if modality is None else modality.to(keys.device, torch.int64)
    evictable = None if evictable is None else evictable.to(keys.device)

    if config.is_active:
        selection = select_kept(
            selector_for(config), scores, is_image, config, num_heads, evictable, keep_multiple
        )
        kept_mask, num_kept = selection.kept_mask, selection.num_kept
        num_kept_evictable = selection.num_kept_evictable
    else:
        kept_mask = torch.ones(num_heads, length, dtype=torch.bool, device=keys.device)
        num_kept = length
        num_kept_evictable = length if evictable is None else int(evictable.sum())

    kept = _positions_per_head(kept_mask)
    merge_counts = torch.zeros_like(kept)
    if num_kept == length:
        return CompressedKV(keys, values, kept, kept_mask, merge_counts, num_kept,
                            num_kept_evictable)

    kept_keys = _gather_positions(keys, kept)
    kept_values = _gather_positions(values, kept)
    if config.merge != "none":
        evicted = _positions_per_head(~kept_mask)
        kept_group, evicted_group = _merge_groups(
            config, is_image.to(torch.int64) if modality is None else modality, kept, evicted)
        compute_dtype = torch.promote_types(keys.dtype, torch.float32)
        evicted_keys = _gather_positions(keys, evicted)
        if use_triton(kernel, keys):
            # The kernel takes the cached dtype as is: the same values, multiplied on tensor
            # cores and accumulated in float32 (a float32 copy would only slow it down).
            assignment = assign_to_kept(kept_keys, evicted_keys, kept_group, evicted_group,
                                        kernel="triton")
            kept_keys, evicted_keys = kept_keys.to(compute_dtype), evicted_keys.to(compute_dtype)
        else:
            kept_keys, evicted_keys = kept_keys.to(compute_dtype), evicted_keys.to(compute_dtype)
            assignment = assign_to_kept(kept_keys, evicted_keys, kept_group, evicted_group,
                                        kernel="torch")
        merge = MERGES[config.merge]
        kept_keys = merge(kept_keys, evicted_keys, assignment).to(keys.dtype)
        kept_values = merge(
            kept_values.to(compute_dtype),
            _gather_positions(values, evicted).to(compute_dtype),
            assignment,
        ).to(values.dtype)
        merge_counts = assignment.counts(num_kept)
    return CompressedKV(kept_keys, kept_values, kept, kept_mask, merge_counts, num_kept,
                        num_kept_evictable)


def _merge_groups(config: CompressionConfig, modality: Tensor, kept: Tensor, evicted: Tensor
                  ) -> tuple[Tensor | None, Tensor | None]:
    """Merge groups for :func:`assign_to_kept`: the modality with ``same_modality``, else none
    (any kept token may receive, as in the paper)."""
    if config.merge_scope == "all":
        return None, None
    return modality[kept], modality[evicted]
