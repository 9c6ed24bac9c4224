"""The evaluation grid: compression methods x KV budgets, plus the full-cache reference.

A method name is ``<method>`` or ``<method>-<merge>`` in :class:`CompressionConfig`'s terms:
``lookm`` (= ``lookm-pivotal``, the paper's LOOK-M), ``lookm-average``, ``lookm-weighted``,
``lookm-none`` (text prior only), ``h2o``, ``snapkv``, ``streaming``, ``random``, and ``none``
(the full cache). Every grid starts with ``none``: it is the reference for the agreement numbers.

The budget is split as in LOOK-M's scripts (heavy-hitter ratio 0.1 + recent ratio 0.1 for a 0.2
budget): ``recent_ratio = recent_share * budget`` with ``recent_share = 0.5`` by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from lookm_vllm.core.config import CompressionConfig, MergeName, Method

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
    """``"lookm-average"`` -> ``{"method": "lookm", "merge": "average"}`` (validated names)."""
    method, _, merge = name.partition("-")
    if method not in get_args(Method):
        raise ValueError(f"unknown method {name!r}: the method part must be one of "
                         f"{', '.join(get_args(Method))}")
    if method == FULL_CACHE and merge:
        raise ValueError(f"method {name!r}: the full cache takes no merge")
    if merge and merge not in get_args(MergeName):
        raise ValueError(f"unknown merge in {name!r}: one of {', '.join(get_args(MergeName))}")
    return {"method": method, "merge": merge} if merge else {"method": method}


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
