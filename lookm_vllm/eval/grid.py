"""The evaluation grid: compression methods x KV budgets, plus the full-cache reference.

A method name is ``<method>[-<merge>][+<scoring>]`` in :class:`CompressionConfig`'s terms:
``lookm`` (= ``lookm-pivotal``, the paper's LOOK-M), ``lookm-average``, ``lookm-weighted``,
``lookm-none`` (text prior only), ``h2o``, ``snapkv``, ``streaming``, ``random``, and ``none``
(the full cache); ``+full`` / ``+window`` choose the attention scoring (e.g. ``h2o+window``),
otherwise the method's default applies. Every grid starts with ``none``: it is the reference for
the agreement numbers.

The budget is split as in LOOK-M's scripts (heavy-hitter ratio 0.1 + recent ratio 0.1 for a 0.2
budget): ``recent_ratio = recent_share * budget`` with ``recent_share = 0.5`` by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from lookm_vllm.core.config import CompressionConfig, MergeName, Method, Scoring
from lookm_vllm.core.selection import SELECTORS

FULL_CACHE = "none"
DEFAULT_METHODS: tuple[str, ...] = (
    "none", "lookm-pivotal", "lookm-average", "lookm-weighted", "h2o", "snapkv", "streaming")
DEFAULT_BUDGETS: tuple[float, ...] = (0.1, 0.2, 0.5)
DEFAULT_RECENT_SHARE = 0.5


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method at a budget (``budget`` is ``None`` for the full cache)."""

    method: str
    budget: float | None
    config: CompressionConfig

    @property
    def name(self) -> str:
        """File-name-safe label: ``none`` or ``<method>@<budget>`` (e.g. ``lookm-pivotal@0.2``)."""
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"

    def request_config(self) -> dict[str, Any]:
        """The ``SamplingParams.extra_args["kv_compression"]`` entry for this cell's requests."""
        return self.config.model_dump(mode="json")


def method_fields(name: str) -> dict[str, str]:
    """``"lookm-average"`` -> ``{"method": "lookm", "merge": "average"}``, ``"h2o+window"`` ->
    ``{"method": "h2o", "scoring": "window"}`` (validated names)."""
    name, plus, scoring = name.partition("+")
    if plus and scoring not in get_args(Scoring):
        raise ValueError(f"unknown scoring {scoring!r} in {name}+{scoring}: one of "
                         f"{', '.join(get_args(Scoring))}")
    method, _, merge = name.partition("-")
    if method not in get_args(Method):
        raise ValueError(f"unknown method {name!r}: the method part must be one of "
                         f"{', '.join(get_args(Method))}")
    if method == FULL_CACHE and merge:
        raise ValueError(f"method {name!r}: the full cache takes no merge")
    if merge and merge not in get_args(MergeName):
        raise ValueError(f"unknown merge in {name!r}: one of {', '.join(get_args(MergeName))}")
    if method == FULL_CACHE and plus:
        raise ValueError(f"method {name!r}: the full cache takes no scoring")
    fields = {"method": method, "merge": merge} if merge else {"method": method}
    return {**fields, "scoring": scoring} if plus else fields


def with_scorings(methods: Sequence[str], scorings: Sequence[str]) -> list[str]:
    """Each method that ranks by attention once per scoring (``h2o`` -> ``h2o+full``,
    ``h2o+window``); the full cache, methods that do not score (``streaming``, ``random``) and
    names that already choose a scoring once."""
    out: list[str] = []
    for name in methods:
        method = method_fields(name)["method"]
        selector = SELECTORS.get(method)
        if "+" in name or selector is None or not selector.needs_scores:
            out.append(name)
        else:
            out.extend(f"{name}+{s}" for s in scorings)
    return list(dict.fromkeys(out))


def build_grid(methods: Sequence[str] = DEFAULT_METHODS,
               budgets: Sequence[float] = DEFAULT_BUDGETS,
               recent_share: float = DEFAULT_RECENT_SHARE) -> list[Cell]:
    """The full-cache cell, then every other method at every budget (in the given orders).

    Raises
    ------
    ValueError
        For an unknown method or merge, or a budget/recent split that
        :class:`CompressionConfig` rejects (its message names the field).
    """
    if not 0.0 <= recent_share <= 1.0:
        raise ValueError(f"recent_share must be in [0, 1], got {recent_share}")
    cells = [Cell(FULL_CACHE, None, CompressionConfig(method="none"))]
    for name in dict.fromkeys(methods):  # keeps order, drops repeats
        fields = method_fields(name)
        if fields["method"] == FULL_CACHE:
            continue
        for budget in budgets:
            config = CompressionConfig.parse({**fields, "budget": float(budget),
                                              "recent_ratio": round(recent_share * budget, 9)})
            cells.append(Cell(name, float(budget), config))
    return cells
