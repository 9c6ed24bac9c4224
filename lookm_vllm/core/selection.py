"""Which prompt positions each KV head keeps: budgets, the text prior and the baselines.

Budget (the paper's, for every method): with ``L`` prompt positions, the recent window ``R`` is the
last ``M = int(recent_ratio * L)`` positions and ``N = int(budget * L) - M`` more are kept from the
older positions. A method ranks the positions per head; the shared :func:`select_kept` keeps the
best of them.

1. The paper's selection. Some positions are *protected*, kept whatever their rank: the recent
   window and the method's :meth:`Selector.always_kept` (for LOOK-M every text token: the text
   prior). The older protected positions use up ``N`` first; each head then keeps its
   ``max(0, N - n_protected_older)`` best-ranked unprotected positions, so per head::

       kept = max(n_protected_older, N) + M       # the paper's max(n_text_nonrecent, N) + M

   the same count for every head, though which candidates are kept may differ per head.

2. The engine's rule (``evictable`` / ``keep_multiple``, for engines that free whole blocks).
   ``evictable`` says which positions the engine is *able* to free. A paged engine frees blocks
   shared by every layer and every tensor-parallel rank (each holding a subset of the heads), so
   how many evictable positions are kept must depend only on the prompt layout, the budget and
   ``keep_multiple``, never on the scores. Every non-evictable position is kept. With::

       n_c   = #candidates                      (candidates: the unprotected positions)
       n_ev  = #(candidates & evictable)
       n_pe  = #(protected & evictable)
       S     = max(0, N - n_protected_older)    (candidates the paper keeps per head, above)
       share = ceil(S * n_ev / n_c)             (0 when n_c == 0)
       k     = min(round_up(n_pe + share, keep_multiple), n_evictable)

   the evictable candidates get their proportional share of the paper's ``S``, and each head keeps
   its ``n_pe`` protected evictable positions plus its ``k - n_pe`` best-ranked evictable
   candidates (all of them when that reaches ``n_ev``). So, in every head::

       num_kept = n_non_evictable + k,    num_kept_evictable = k

   a pure function of ``(L, is_image, evictable, config, keep_multiple)``: the same for every
   layer, head and rank; only *which* evictable candidates are kept follows the scores. Without
   ``evictable`` (or with all positions evictable) and with ``keep_multiple = 1``,
   ``share = S`` and this is exactly the paper's selection. Evicted means not kept; merging is
   unaffected by this rule.

3. Budgets in tokens (``max_kv_tokens = C``). The paper's ``N + M`` is ``min(C, L)`` instead of
   ``int(budget * L)``, with ``M = min(int(recent_ratio * L), C)``, and the rules above apply.
   ``C`` is a cap, so ``k`` is then also bounded from above, rounded DOWN::

       k = min(k, max(round_down(C - n_non_evictable, keep_multiple),
                      round_up(n_pe, keep_multiple)))

   hence ``num_kept <= C`` whenever the positions that are always kept (the non-evictable ones:
   for LOOK-M all text, the recent window and partially filled blocks) fit under ``C``. When
   they do not, every evictable position the method may evict is evicted and ``num_kept`` is
   those positions' count (the text prior is never broken to meet a cap).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from .scoring import SNAPKV_POOL_KERNEL, snapkv_pool

if TYPE_CHECKING:  # config.py reads SELECTORS at import time: no runtime import back
    from .config import CompressionConfig


def recent_window_size(length: int, recent_ratio: float) -> int:
    """``M = int(recent_ratio * L)``, the paper's alpha1 share (the recent window)."""
    return int(recent_ratio * length)


def important_count(length: int, budget: float, recent_ratio: float) -> int:
    """``N = int(budget * L) - M``, the paper's alpha2 share (older positions kept by rank)."""
    return int(budget * length) - recent_window_size(length, recent_ratio)


def budget_tokens(length: int, config: CompressionConfig) -> int:
    """The paper's ``N + M`` for ``config``: ``int(budget * L)``, or ``min(max_kv_tokens, L)``."""
    if config.max_kv_tokens is not None:
        return min(config.max_kv_tokens, length)
    return int(config.budget * length)


def recent_tokens(length: int, config: CompressionConfig) -> int:
    """``M`` for ``config``: ``int(recent_ratio * L)``, at most :func:`budget_tokens` (a
    ``budget`` config guarantees that already: ``recent_ratio <= budget``)."""
    return min(recent_window_size(length, config.recent_ratio), budget_tokens(length, config))


@dataclass(frozen=True)
class Selector:
    """A compression method: ranks the older prompt positions of every KV head (higher is kept
    first) and says which positions it never evicts.

    Subclasses override :meth:`rank` and, to protect positions beyond the recent window,
    :meth:`always_kept`; one entry in :data:`SELECTORS` makes the method known to
    :class:`CompressionConfig`, :func:`compress` and the engine (see docs/methods.md).

    Attributes
    ----------
    needs_scores : bool
        Whether :meth:`rank` reads the accumulated attention scores (False: the engine captures
        no queries for the method).
    default_merge : str
        ``CompressionConfig.merge`` when the request gives none (a :data:`MERGES` name or
        ``"none"``).
    default_scoring : str
        ``CompressionConfig.scoring`` when the request gives none (``"full"`` or ``"window"``).
    """

    needs_scores: ClassVar[bool] = True
    default_merge: ClassVar[str] = "none"
    default_scoring: ClassVar[str] = "full"

    def configured(self, config: CompressionConfig) -> Selector:
        """This selector with the parameters ``config`` sets (itself by default)."""
        return self

    def rank(self, scores: Tensor | None, num_heads: int, length: int) -> Tensor:
        """Per-head ranking ``[H, L]`` (by default: the accumulated attention scores)."""
        if scores is None:
            raise ValueError(f"{type(self).__name__} ranks by attention: scores are required")
        # Half-precision scores would create ties that decide by index (the reference's bf16 bug).
        return scores.to(torch.promote_types(scores.dtype, torch.float32))

    def always_kept(self, is_image: Tensor) -> Tensor | None:
        """``[L]`` positions this method never evicts, or ``None``."""
        return None


@dataclass(frozen=True)
class TextPriorSelector(Selector):
    """LOOK-M's text-prior selection (paper Eq. 5, 8): only image tokens are ever evicted.

    The paper adds ``T_p = max(scores)`` to every text score, so each text token outranks each
    image token, and keeps ``T U TopN U R``. That equals protecting all text and ranking the image
    tokens by their raw scores, which is what is done here: exact, with no offset that could tie a
    zero-score text token with the best image token or be rounded away in low precision.
    """

    default_merge: ClassVar[str] = "pivotal"

    def always_kept(self, is_image: Tensor) -> Tensor:
        return ~is_image


@dataclass(frozen=True)
class H2OSelector(Selector):
    """H2O: per-head top-N by accumulated attention; text may be evicted."""


@dataclass(frozen=True)
class SnapKVSelector(Selector):
    """SnapKV: observation-window scores, average-pooled over the key axis, per-head top-N."""

    kernel_size: int = SNAPKV_POOL_KERNEL
    default_scoring: ClassVar[str] = "window"

    def rank(self, scores: Tensor | None, num_heads: int, length: int) -> Tensor:
        return snapkv_pool(super().rank(scores, num_heads, length), self.kernel_size)


@dataclass(frozen=True)
class StreamingSelector(Selector):
    """StreamingLLM: the first ``sink_tokens`` positions, then the most recent ones."""

    sink_tokens: int = 4
    needs_scores: ClassVar[bool] = False

    def configured(self, config: CompressionConfig) -> StreamingSelector:
        return replace(self, sink_tokens=config.sink_tokens)

    def rank(self, scores: Tensor | None, num_heads: int, length: int) -> Tensor:
        rank = torch.arange(length, dtype=torch.float32)
        # Sinks above every later position, the earliest first when the budget cannot hold them.
        rank[: self.sink_tokens] = 2 * length - rank[: self.sink_tokens]
        return rank.expand(num_heads, length)


@dataclass(frozen=True)
class RandomSelector(Selector):
    """Random eviction (a control): ``torch.rand([H, L])`` from a CPU generator seeded ``seed``."""

    seed: int = 0
    needs_scores: ClassVar[bool] = False

    def configured(self, config: CompressionConfig) -> RandomSelector:
        return replace(self, seed=config.seed)

    def rank(self, scores: Tensor | None, num_heads: int, length: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(num_heads, length, generator=generator)


SELECTORS: dict[str, Selector] = {
    "lookm": TextPriorSelector(),
    "h2o": H2OSelector(),
    "snapkv": SnapKVSelector(),
    "streaming": StreamingSelector(),
    "random": RandomSelector(),
}
"""Every compression method by its ``CompressionConfig.method`` name (``"none"``, no compression,
is not one). Adding an entry is all it takes to add a method (docs/methods.md); the order is the
order in which validation messages list the methods."""


def selector_for(config: CompressionConfig) -> Selector:
    """The selector of ``config.method`` with ``config``'s parameters (none for ``none``)."""
    selector = SELECTORS.get(config.method)
    if selector is None:
        raise ValueError(f"method {config.method!r} selects nothing")
    return selector.configured(config)


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`select_kept`.

    Attributes
    ----------
    kept_mask : Tensor
        bool ``[H, L]``, True where head h keeps position j; the same count in every row.
    num_kept : int
        Kept positions per head.
    num_kept_evictable : int
        Kept positions per head that are evictable (a multiple of ``keep_multiple`` unless every
        evictable position is kept).
    """

    kept_mask: Tensor
    num_kept: int
    num_kept_evictable: int


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


@dataclass(frozen=True)
class _Layout:
    protected: Tensor           # bool [L]: kept whatever the scores
    evictable: Tensor           # bool [L]
    num_protected_evictable: int
    kept_evictable: int         # k, the kept evictable positions per head


def _layout(selector: Selector, is_image: Tensor, config: CompressionConfig,
            evictable: Tensor | None, keep_multiple: int) -> _Layout:
    """The score-free part of :func:`select_kept`: what is protected and how many evictable
    positions every head keeps (rules 2 and 3 of the module docstring)."""
    length = is_image.shape[0]
    device = is_image.device
    if keep_multiple < 1:
        raise ValueError(f"keep_multiple must be >= 1, got {keep_multiple}")
    num_recent = recent_tokens(length, config)
    recent = torch.arange(length, device=device) >= length - num_recent
    protected = recent.clone()
    always_kept = selector.always_kept(is_image)
    if always_kept is not None:
        protected |= always_kept
    if evictable is None:
        evictable = torch.ones(length, dtype=torch.bool, device=device)

    # The paper's count S of candidates kept per head, as if every position were evictable.
    wanted = budget_tokens(length, config) - num_recent
    num_selected = max(0, wanted - int((protected & ~recent).sum()))
    num_candidates = length - int(protected.sum())
    # The evictable candidates' proportional share of S, then k: layout only, never the scores.
    num_evictable_candidates = int((evictable & ~protected).sum())
    share = -(-num_selected * num_evictable_candidates // num_candidates) if num_candidates else 0
    num_protected_evictable = int((protected & evictable).sum())
    num_evictable = int(evictable.sum())
    kept_evictable = min(_round_up(num_protected_evictable + share, keep_multiple), num_evictable)
    if config.max_kv_tokens is not None:
        # A cap, not a target: every non-evictable position is kept, the evictable ones get the
        # room left under the cap, rounded DOWN to whole multiples (never below the protected).
        room = max(0, config.max_kv_tokens - (length - num_evictable))
        kept_evictable = min(kept_evictable, max(room // keep_multiple * keep_multiple,
                                                 _round_up(num_protected_evictable,
                                                           keep_multiple)))
        kept_evictable = min(kept_evictable, num_evictable)
    return _Layout(protected, evictable, num_protected_evictable, kept_evictable)


def num_kept_evictable(selector: Selector, is_image: Tensor, config: CompressionConfig,
                       evictable: Tensor | None = None, keep_multiple: int = 1) -> int:
    """``k``, the evictable positions every head keeps (:func:`select_kept`'s
    ``Selection.num_kept_evictable``), computed without scores: it never depends on them."""
    return _layout(selector, is_image, config, evictable, keep_multiple).kept_evictable


def select_kept(
    selector: Selector,
    scores: Tensor | None,
    is_image: Tensor,
    config: CompressionConfig,
    num_heads: int,
    evictable: Tensor | None = None,
    keep_multiple: int = 1,
) -> Selection:
    """Choose the kept positions of every head (the rule is in the module docstring).

    Parameters
    ----------
    selector : Selector
        The method's ranking and protected positions.
    scores : Tensor, optional
        ``[H, L]`` accumulated attention; only read when candidates must be ranked.
    is_image : Tensor
        bool ``[L]``, True at image-token positions.
    config : CompressionConfig
        Supplies ``budget`` and ``recent_ratio``.
    num_heads : int
        Number of KV heads ``H``.
    evictable : Tensor, optional
        bool ``[L]``, the positions the engine can free. False positions are always kept; the
        evictable candidates get their proportional share of the paper's selection. All
        positions when not given.
    keep_multiple : int
        The kept evictable count ``k`` is rounded up to a multiple of this (capped at the number
        of evictable positions); ``k`` never depends on ``scores``.

    Returns
    -------
    Selection
    """
    layout = _layout(selector, is_image, config, evictable, keep_multiple)
    length, device = is_image.shape[0], is_image.device
    protected, evictable = layout.protected, layout.evictable
    evictable_candidates = evictable & ~protected
    kept_evictable, num_evictable = layout.kept_evictable, int(evictable.sum())

    # Every head: protected and non-evictable positions, then its best evictable candidates.
    num_chosen = kept_evictable - layout.num_protected_evictable
    num_evictable_candidates = int(evictable_candidates.sum())
    kept_mask = (protected | ~evictable).expand(num_heads, length).clone()
    if num_chosen >= num_evictable_candidates:
        kept_mask |= evictable
    elif num_chosen > 0:
        rank = selector.rank(scores, num_heads, length).to(device)
        candidate_rank = rank.masked_fill(~evictable_candidates, float("-inf"))
        kept_mask.scatter_(1, candidate_rank.topk(num_chosen, dim=-1, sorted=False).indices,
                           True)
    return Selection(
        kept_mask=kept_mask,
        num_kept=length - num_evictable + kept_evictable,
        num_kept_evictable=kept_evictable,
    )
