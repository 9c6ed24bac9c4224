"""Merging evicted KV pairs into kept ones (paper Eq. 9-12).

Each evicted token j goes to the kept token c whose KEY is most cosine-similar (per head, argmax
over the kept tokens it may merge into); the same assignment moves its key and its value. A kept
token c receiving the set E_c (n_c = |E_c|) becomes, for keys and values alike::

    average   k_c' = (k_c + sum_j k_j) / (1 + n_c)
    pivotal   k_c' = (k_c + sum_j (k_j + k_c) / 2) / (1 + n_c)      (LOOK-M's default)
    weighted  k_c' = (k_c + sum_j s_j k_j) / (1 + n_c),   s_j = j's max cosine similarity

All three are ``(a_c k_c + sum_j w_j k_j) / (1 + n_c)``: a merge only says what the receiver's own
weight ``a_c`` and each sent item's weight ``w_j`` are. There is no similarity filter: the paper
has none (the reference code's shared above-mean filter is a bug).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dispatch import Kernel, use_triton

# Upper bound on the elements of one [H, evicted, kept] similarity block (128 MiB in float32).
_MAX_BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Assignment:
    """Where every evicted token of every head goes.

    Attributes
    ----------
    target : Tensor
        int64 ``[H, E]``, index into the kept tokens of the head (meaningless where not valid).
    similarity : Tensor
        ``[H, E]`` cosine similarity of the evicted key to its target's key.
    valid : Tensor
        bool ``[H, E]``; False where the token had no allowed target and is dropped.
    """

    target: Tensor
    similarity: Tensor
    valid: Tensor

    def counts(self, num_kept: int) -> Tensor:
        """int64 ``[H, K]``: how many evicted tokens each kept token receives (n_c)."""
        counts = torch.zeros(self.target.shape[0], num_kept, dtype=torch.int64,
                             device=self.target.device)
        return counts.scatter_add_(1, self.target, self.valid.to(torch.int64))


def assign_to_kept(
    kept_keys: Tensor,
    evicted_keys: Tensor,
    kept_group: Tensor | None = None,
    evicted_group: Tensor | None = None,
    kernel: Kernel = "auto",
) -> Assignment:
    """Send every evicted token to its most cosine-similar allowed kept token, per head.

    Parameters
    ----------
    kept_keys : Tensor
        ``[H, K, d]`` keys of the kept tokens.
    evicted_keys : Tensor
        ``[H, E, d]`` keys of the evicted tokens.
    kept_group, evicted_group : Tensor, optional
        int64 ``[H, K]`` and ``[H, E]``: an evicted token may only merge into a kept token of the
        same group (e.g. its modality); kept tokens of group -1 receive nothing. Both or neither.
    kernel : {"auto", "torch", "triton"}
        The implementation (:mod:`lookm_vllm.core.dispatch`).

    Returns
    -------
    Assignment
    """
    if use_triton(kernel, evicted_keys):
        from lookm_vllm.kernels import triton_cosine_argmax

        return Assignment(*triton_cosine_argmax(kept_keys, evicted_keys, kept_group,
                                                evicted_group))
    num_heads, num_evicted, _ = evicted_keys.shape
    kept_unit = torch.nn.functional.normalize(kept_keys, dim=-1)
    evicted_unit = torch.nn.functional.normalize(evicted_keys, dim=-1)
    similarity = evicted_keys.new_full((num_heads, num_evicted), float("-inf"))
    target = torch.zeros(num_heads, num_evicted, dtype=torch.int64, device=evicted_keys.device)
    if kept_group is None or evicted_group is None:
        _best_kept(evicted_unit, kept_unit, similarity, target)
    else:
        # One group at a time, on the group's own rows and columns only (each head's senders and
        # receivers of the group, gathered and padded): no [H, E, K] mask, and no similarity
        # of a token with a kept token it may not merge into is computed at all.
        for group in torch.unique(evicted_group).tolist():
            if group < 0:
                continue
            senders, rows = _members(evicted_group == group)
            receivers, columns = _members(kept_group == group)
            if senders.shape[1] == 0 or receivers.shape[1] == 0:
                continue
            group_similarity = similarity.new_full(senders.shape, float("-inf"))
            group_target = torch.zeros_like(senders)
            _best_kept(_rows(evicted_unit, senders), _rows(kept_unit, receivers),
                       group_similarity, group_target, columns)
            group_target = receivers.gather(1, group_target)       # back to kept indices
            # padded sender rows point at other groups' tokens: write their values back as is
            similarity.scatter_(1, senders, torch.where(rows, group_similarity,
                                                        similarity.gather(1, senders)))
            target.scatter_(1, senders, torch.where(rows, group_target,
                                                    target.gather(1, senders)))
    valid = torch.isfinite(similarity)
    return Assignment(target=target, similarity=similarity, valid=valid)


def _members(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's True positions, ascending, padded to the longest row: ``(index, real)``, both
    ``[H, n]`` (padding indexes some False position; ``real`` is False there)."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    real = torch.arange(width, device=mask.device) < counts[:, None]
    return index, real


def _rows(tensor: Tensor, index: Tensor) -> Tensor:
    return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))


def _best_kept(evicted_unit: Tensor, kept_unit: Tensor, similarity: Tensor, target: Tensor,
               columns: Tensor | None = None) -> None:
    """Fill ``similarity`` / ``target`` ``[H, E]`` with each evicted row's best kept row (cosine,
    first of equals); ``columns`` ``[H, K]``: False marks padding kept rows, never chosen."""
    num_heads, num_evicted, _ = evicted_unit.shape
    num_kept = kept_unit.shape[1]
    kept_t = kept_unit.transpose(1, 2)
    bias = None
    if columns is not None and not bool(columns.all()):
        bias = torch.zeros(num_heads, 1, num_kept, dtype=kept_unit.dtype,
                           device=kept_unit.device).masked_fill_(~columns[:, None, :],
                                                                 float("-inf"))
    # Rows in blocks: the similarity matrix of a long prompt would not fit in memory at once.
    step = max(1, _MAX_BLOCK_ELEMENTS // max(1, num_heads * num_kept))
    for first in range(0, num_evicted, step):
        last = min(first + step, num_evicted)
        if bias is None:
            block = torch.bmm(evicted_unit[:, first:last], kept_t)
        else:
            block = torch.baddbmm(bias.expand(-1, last - first, -1), evicted_unit[:, first:last],
                                  kept_t)
        similarity[:, first:last], target[:, first:last] = block.max(dim=-1)


@dataclass(frozen=True)
class KVMerge:
    """Base merge: ``(a_c x_c + sum_j w_j x_j) / (1 + n_c)`` for keys and values alike."""

    def pivot_weight(self, counts: Tensor) -> Tensor:
        """``a_c``, the weight of the receiving token's own entry, ``[H, K]``."""
        return torch.ones_like(counts, dtype=torch.get_default_dtype())

    def source_weight(self, assignment: Assignment) -> Tensor:
        """``w_j``, the weight of each sent entry, ``[H, E]``."""
        return torch.ones_like(assignment.similarity)

    def __call__(self, kept: Tensor, evicted: Tensor, assignment: Assignment) -> Tensor:
        """Merge ``evicted`` ``[H, E, d]`` into ``kept`` ``[H, K, d]`` along ``assignment``.

        Computed in ``kept``'s dtype (callers pass at least float32).
        """
        counts = assignment.counts(kept.shape[1])
        weights = self.source_weight(assignment).to(kept.dtype) * assignment.valid
        sent = (evicted * weights[..., None]).to(kept.dtype)
        index = assignment.target[..., None].expand(-1, -1, kept.shape[-1])
        total = (kept * self.pivot_weight(counts).to(kept.dtype)[..., None]).scatter_add_(
            1, index, sent
        )
        return total / (1 + counts).to(kept.dtype)[..., None]


@dataclass(frozen=True)
class AverageMerge(KVMerge):
    """Averaged merge (Eq. 10): the receiver and its evicted tokens, equally weighted."""


@dataclass(frozen=True)
class PivotalMerge(KVMerge):
    """Pivotal merge (Eq. 12, LOOK-M's default): each sent item is first averaged with the pivot.

    ``(k_c + sum_j (k_j + k_c)/2) / (1 + n_c)`` = ``((1 + n_c/2) k_c + sum_j k_j/2) / (1 + n_c)``.
    """

    def pivot_weight(self, counts: Tensor) -> Tensor:
        return 1 + counts.to(torch.get_default_dtype()) / 2

    def source_weight(self, assignment: Assignment) -> Tensor:
        return torch.full_like(assignment.similarity, 0.5)


@dataclass(frozen=True)
class WeightedMerge(KVMerge):
    """Weighted merge (Eq. 11): each sent item is scaled by its cosine similarity to the pivot."""

    def source_weight(self, assignment: Assignment) -> Tensor:
        # Dropped tokens carry -inf similarity, and -inf * 0 would poison the sums with NaN.
        return torch.where(assignment.valid, assignment.similarity, 0.0)


MERGES: dict[str, KVMerge] = {
    "pivotal": PivotalMerge(),
    "average": AverageMerge(),
    "weighted": WeightedMerge(),
}
"""Every merge by its ``CompressionConfig.merge`` name (``"none"``, no merging, is not one); the
order is the order in which validation messages list them."""
