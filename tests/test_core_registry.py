"""The method registry: SELECTORS (and MERGES) are the one place a method (or merge) is declared.

Config validation, default resolution, ``compress`` and the engine's block plan all read the
registry, so registering a selector is all it takes to add a method (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pydantic
import pytest
import torch

from lookm_vllm.core import (
    MERGES,
    SELECTORS,
    CompressionConfig,
    Selector,
    compress,
    scoring_queries,
    selector_for,
)
from lookm_vllm.core.config import MergeName, Method, Scoring, merge_names, method_names
from lookm_vllm.vllm_adapter.plan import RequestPlan

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_the_valid_names_are_the_registries_plus_none():
    assert method_names() == (*SELECTORS, "none") and "none" not in SELECTORS
    assert merge_names() == (*MERGES, "none") and "none" not in MERGES
    # The Literal aliases are snapshots of the registries, for type hints and get_args.
    assert get_args(Method) == method_names() and get_args(MergeName) == merge_names()


@pytest.mark.parametrize("method", list(SELECTORS))
def test_every_method_resolves_its_defaults_from_its_selector(method):
    selector = SELECTORS[method]
    assert selector.default_merge in merge_names()
    assert selector.default_scoring in get_args(Scoring)
    config = CompressionConfig(method=method)
    assert (config.merge, config.scoring) == (selector.default_merge, selector.default_scoring)
    assert config.needs_attention is selector.needs_scores
    assert type(selector_for(config)) is type(selector)


def test_an_unknown_method_or_merge_lists_the_registered_names():
    with pytest.raises(pydantic.ValidationError) as error:
        CompressionConfig(method="pyramidkv", merge="max")
    message = str(error.value)
    assert ", ".join(repr(m) for m in SELECTORS) + " or 'none'" in message
    assert ", ".join(repr(m) for m in MERGES) + " or 'none'" in message


def test_the_docs_table_lists_every_method():
    table = DOCS.read_text()
    for method in (*SELECTORS, "none"):
        assert f"| `{method}` |" in table, method


@dataclass(frozen=True)
class KeepFirstSelector(Selector):
    """A toy method: keeps the earliest positions, and never evicts the first ``pinned``."""

    pinned: int = 5
    needs_scores = False  # class attributes, as in Selector: not dataclass fields
    default_merge = "average"

    def rank(self, scores, num_heads, length):
        return -torch.arange(length, dtype=torch.float32).expand(num_heads, length)

    def always_kept(self, is_image):
        return torch.arange(is_image.shape[0], device=is_image.device) < self.pinned


def test_a_registered_method_works_everywhere_without_editing_another_file(monkeypatch):
    with pytest.raises(pydantic.ValidationError, match="method"):
        CompressionConfig(method="keep_first")
    monkeypatch.setitem(SELECTORS, "keep_first", KeepFirstSelector())

    # The config accepts it, resolves its defaults from the selector and round-trips.
    config = CompressionConfig(method="keep_first", budget=0.25, recent_ratio=0.1)
    assert (config.merge, config.scoring) == ("average", "full")
    assert not config.needs_attention and scoring_queries(config, 40) == 0
    assert CompressionConfig.parse(config.model_dump_json()) == config
    with pytest.raises(pydantic.ValidationError, match="'keep_first' or 'none'"):
        CompressionConfig(method="bogus")

    # compress runs it: L = 40, M = 4 recent, N = 6; the 5 pinned positions use up N first,
    # the best-ranked (earliest) candidate fills the rest, then the recent window.
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 40, 8, generator=generator)
    is_image = torch.zeros(40, dtype=torch.bool)
    is_image[8:30] = True
    out = compress(keys, values, None, is_image, config)
    assert out.kept.tolist() == [[*range(6), *range(36, 40)]] * 2
    assert (out.merge_counts.sum(dim=1) == 30).all()  # "average" merged every evicted token

    # The engine's plan follows its always_kept: blocks holding a pinned position stay.
    plan = RequestPlan(config, 40, ((8, 30),))
    assert plan.evictable_blocks(4) == [2, 3, 4, 5, 6, 7, 8]  # recent window from 36: 9 blocks
    lookm = RequestPlan(CompressionConfig(method="lookm", budget=0.25), 40, ((8, 30),))
    assert lookm.evictable_blocks(4) == [2, 3, 4, 5, 6]  # image-only blocks
    # ... and compress under the plan: non-evictable kept, k = round_up(ceil(1 * 28/31), 4) = 4.
    out = compress(keys, values, None, is_image, config, evictable=plan.evictable_mask(4),
                   keep_multiple=4)
    assert out.num_kept_evictable == 4
    assert out.kept.tolist() == [[*range(12), *range(36, 40)]] * 2
