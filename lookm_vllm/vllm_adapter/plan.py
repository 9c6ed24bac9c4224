"""Per-request compression plan: which prompt blocks may become holes. No vLLM import.

Invariants this module relies on (see docs/engine.md):
- Savings are whole paged blocks: only blocks lying entirely inside the compressible span of the
  prompt (image tokens for LOOK-M, any token for the baselines) and entirely before the recent
  window may be freed. Everything else stays where vLLM put it.
- The plan depends only on the prompt length, image positions, block size and config, never on
  scores, so every layer, KV head and tensor-parallel rank derives the same holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lookm_vllm.core import CompressionConfig, recent_window_size, scoring_queries


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
    """

    config: CompressionConfig
    prompt_len: int
    image_spans: tuple[tuple[int, int], ...]
    epoch: int = 0

    def is_image(self) -> torch.Tensor:
        """bool ``[P]``: True at image embedding positions."""
        mask = torch.zeros(self.prompt_len, dtype=torch.bool)
        for start, end in self.image_spans:
            mask[start:min(end, self.prompt_len)] = True
        return mask

    @property
    def num_scoring_queries(self) -> int:
        """The last prompt queries whose attention feeds the scores (0: no scores needed)."""
        return scoring_queries(self.config, self.prompt_len)

    def evictable_blocks(self, block_size: int) -> list[int]:
        """Logical prompt blocks that may be freed, ascending.

        A block qualifies when it is full, lies before the recent window, and (for LOOK-M, which
        never evicts text) holds image tokens only.
        """
        recent_start = self.prompt_len - recent_window_size(self.prompt_len,
                                                              self.config.recent_ratio)
        num_blocks = recent_start // block_size
        if self.config.method != "lookm":
            return list(range(num_blocks))
        is_image = self.is_image()
        return [b for b in range(num_blocks)
                if bool(is_image[b * block_size:(b + 1) * block_size].all())]

    def evictable_mask(self, block_size: int) -> torch.Tensor:
        """bool ``[P]``: True at positions inside :meth:`evictable_blocks`."""
        mask = torch.zeros(self.prompt_len, dtype=torch.bool)
        for b in self.evictable_blocks(block_size):
            mask[b * block_size:(b + 1) * block_size] = True
        return mask

    def to_dict(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "prompt_len": self.prompt_len,
                "image_spans": [list(s) for s in self.image_spans], "epoch": self.epoch}

    @classmethod
    def from_dict(cls, data: dict) -> RequestPlan:
        return cls(CompressionConfig.parse(data["config"]), int(data["prompt_len"]),
                   tuple((int(a), int(b)) for a, b in data["image_spans"]), int(data["epoch"]))
