"""Per-request compression plan: which prompt blocks may become holes. No vLLM import.

Invariants this module relies on (see docs/engine.md):
- Savings are whole paged blocks: only blocks lying entirely inside the compressible span of the
  prompt (image and video tokens for LOOK-M, any token for the baselines) and entirely before the
  recent window may be freed. Everything else stays where vLLM put it.
- The plan depends only on the prompt length, image positions, block size and config, never on
  scores, so every layer, KV head and tensor-parallel rank derives the same holes. The masks are
  therefore computed once per plan (and device), not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lookm_vllm.core import (
    SELECTORS,
    CompressionConfig,
    recent_tokens,
    scoring_queries,
    selector_for,
)
from lookm_vllm.core.selection import num_kept_evictable

# Modality ids of prompt positions (``RequestPlan.modality``, ``core.compress(modality=...)``).
TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITIES = {"text": TEXT, "image": IMAGE, "video": VIDEO}


@dataclass(frozen=True)
class RequestPlan:
    """What the worker needs to compress one request (sent once by the scheduler).

    Attributes
    ----------
    config : CompressionConfig
        The request's validated config.
    prompt_len : int
        Number of prompt tokens ``P``; compression happens once positions ``[0, P)`` are cached.
    image_spans : tuple of (start, end)
        Half-open position ranges of image embedding tokens.
    epoch : int
        Bumped by the scheduler on every preemption, so results of an older run are ignored.
    video_spans : tuple of (start, end)
        Half-open position ranges of video embedding tokens (frames). Compressed exactly like
        image tokens (the text prior protects text only); a modality of their own for
        ``merge_scope="same_modality"``.
    """

    config: CompressionConfig
    prompt_len: int
    image_spans: tuple[tuple[int, int], ...]
    epoch: int = 0
    video_spans: tuple[tuple[int, int], ...] = ()
    # Derived tensors, by (name, block size, device): a pure function of the fields above.
    _memo: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _cached(self, key: tuple, device, build):
        device = torch.device("cpu") if device is None else torch.device(device)
        value = self._memo.get((*key, device))
        if value is None:
            cpu = self._memo.get((*key, torch.device("cpu")))
            if cpu is None:
                cpu = self._memo[(*key, torch.device("cpu"))] = build()
            value = self._memo[(*key, device)] = cpu.to(device)
        return value

    def modality(self, device=None) -> torch.Tensor:
        """int64 ``[P]``: :data:`TEXT`, :data:`IMAGE` or :data:`VIDEO` per prompt position."""
        def build():
            ids = torch.full((self.prompt_len,), TEXT, dtype=torch.int64)
            for spans, value in ((self.image_spans, IMAGE), (self.video_spans, VIDEO)):
                for start, end in spans:
                    ids[start:min(end, self.prompt_len)] = value
            return ids

        return self._cached(("modality",), device, build)

    def is_image(self, device=None) -> torch.Tensor:
        """bool ``[P]``: True at image or video embedding positions, the visual tokens
        ``core.compress`` may evict (on ``device``, CPU by default)."""
        return self._cached(("is_image",), device, lambda: self.modality() != TEXT)

    def modality_counts(self) -> dict[str, int]:
        """Prompt positions per modality: ``{"text": ..., "image": ..., "video": ...}``."""
        counts = torch.bincount(self.modality(), minlength=3).tolist()
        return {name: counts[value] for name, value in MODALITIES.items()}

    @property
    def num_scoring_queries(self) -> int:
        """The last prompt queries whose attention feeds the scores (0: no scores needed)."""
        return scoring_queries(self.config, self.prompt_len)

    def evictable_blocks(self, block_size: int) -> list[int]:
        """Logical prompt blocks that may be freed, ascending.

        A block qualifies when it is full, lies before the recent window, and (for LOOK-M, which
        never evicts text) holds image tokens only.
        """
        key = ("evictable_blocks", block_size)
        if key not in self._memo:
            self._memo[key] = tuple(self._evictable_blocks(block_size))
        return list(self._memo[key])

    def _evictable_blocks(self, block_size: int) -> list[int]:
        recent_start = self.prompt_len - recent_tokens(self.prompt_len, self.config)
        num_blocks = recent_start // block_size
        # The positions the method never evicts (LOOK-M: text) pin their blocks; "none" has no
        # selector and pins nothing.
        always_kept = (selector_for(self.config).always_kept(self.is_image())
                       if self.config.method in SELECTORS else None)
        if always_kept is None:
            return list(range(num_blocks))
        pinned = always_kept[:num_blocks * block_size].view(num_blocks, block_size).any(dim=1)
        return (~pinned).nonzero().flatten().tolist()

    def holes(self, block_size: int) -> list[int]:
        """The prompt blocks compression frees, ascending: the evictable blocks after the
        ``k / block_size`` that the kept evictable entries are packed into. ``k`` depends on the
        layout, the config and the block size only (``core.selection``), so this is known
        before any score, exactly as every layer and rank will find it."""
        key = ("holes", block_size)
        if key not in self._memo:
            evictable = self.evictable_blocks(block_size)
            kept = 0
            if evictable:
                kept = num_kept_evictable(selector_for(self.config), self.is_image(),
                                          self.config, self.evictable_mask(block_size),
                                          block_size) // block_size
            self._memo[key] = tuple(evictable[kept:])
        return list(self._memo[key])

    def evictable_block_ids(self, block_size: int, device=None) -> torch.Tensor:
        """int64 :meth:`evictable_blocks` as a tensor on ``device``."""
        return self._cached(("evictable_block_ids", block_size), device,
                            lambda: torch.tensor(self.evictable_blocks(block_size),
                                                 dtype=torch.long))

    def evictable_mask(self, block_size: int, device=None) -> torch.Tensor:
        """bool ``[P]``: True at positions inside :meth:`evictable_blocks`."""
        def build():
            mask = torch.zeros(self.prompt_len, dtype=torch.bool)
            for b in self.evictable_blocks(block_size):
                mask[b * block_size:(b + 1) * block_size] = True
            return mask

        return self._cached(("evictable_mask", block_size), device, build)

    def to_dict(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "prompt_len": self.prompt_len,
                "image_spans": [list(s) for s in self.image_spans], "epoch": self.epoch,
                "video_spans": [list(s) for s in self.video_spans]}

    @classmethod
    def from_dict(cls, data: dict) -> RequestPlan:
        def spans(key):
            return tuple((int(a), int(b)) for a, b in data.get(key, ()))

        return cls(CompressionConfig.parse(data["config"]), int(data["prompt_len"]),
                   spans("image_spans"), int(data["epoch"]), spans("video_spans"))
