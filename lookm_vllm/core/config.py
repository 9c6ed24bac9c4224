"""The one compression configuration shared by the HTTP server, the per-request API and the plugin.

Defaults live here and nowhere else, except each method's default ``merge`` and ``scoring``, which
its selector states (``Selector.default_merge`` / ``default_scoring``). ``merge`` and ``scoring``
default to ``None`` in the input and are resolved from ``method`` at validation time, so a dumped
config always states them explicitly and ``model_validate_json(model_dump_json())`` round-trips to
an equal object. The valid ``method`` and ``merge`` values are the names registered in
:data:`~lookm_vllm.core.selection.SELECTORS` and :data:`~lookm_vllm.core.merge.MERGES`, plus
``none``, read at validation time (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from .merge import MERGES
from .selection import SELECTORS

# The value of ``method`` and ``merge`` that turns compression or merging off.
NO_COMPRESSION = "none"
NO_MERGE = "none"
# ``budget`` when neither it nor ``max_kv_tokens`` is given (the paper's 0.1 + 0.1).
DEFAULT_BUDGET = 0.2


def method_names() -> tuple[str, ...]:
    """Every valid ``method``: the registered selectors (:data:`SELECTORS`), then ``none``."""
    return (*SELECTORS, NO_COMPRESSION)


def merge_names() -> tuple[str, ...]:
    """Every valid ``merge``: the registered merges (:data:`MERGES`), then ``none``."""
    return (*MERGES, NO_MERGE)


# Snapshots of the registries at import time, for type hints and ``typing.get_args``;
# validation reads the registries themselves, so a method registered later is accepted too.
Method = Literal[method_names()]  # type: ignore[valid-type]
MergeName = Literal[merge_names()]  # type: ignore[valid-type]
MergeScope = Literal["all", "same_modality"]
Scoring = Literal["full", "window"]


def _registered(names: Callable[[], tuple[str, ...]]) -> Any:
    """A ``str`` field whose allowed values are read from a registry at validation time.

    Invalid values get pydantic's own ``Literal`` error (``literal_error``, "Input should be
    'a', 'b' or 'c'"), and the JSON schema lists the values as an ``enum``.
    """
    def check(value: Any) -> str:
        allowed = names()
        if isinstance(value, str) and value in allowed:
            return value
        quoted = [repr(name) for name in allowed]
        expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": expected})

    return Annotated[str, PlainValidator(check, json_schema_input_type=str),
                     Field(json_schema_extra=lambda schema: schema.update(enum=list(names())))]


MethodField = _registered(method_names)
MergeField = _registered(merge_names)


class CompressionConfig(BaseModel):
    """How to compress one request's prompt KV cache at the end of prefill.

    Parameters
    ----------
    method : {"lookm", "h2o", "snapkv", "streaming", "random", "none"}
        Which tokens to keep: a name in ``SELECTORS``, or ``none``. ``lookm`` is the paper's
        text-prior selection (only image tokens are ever evicted); the others are the paper's
        baselines plus a random control (docs/methods.md). ``none`` disables compression and
        ignores every other field.
    budget : float, optional
        Fraction of the prompt KV kept, the paper's alpha1 + alpha2, in (0, 1]. With ``lookm`` the
        real kept fraction can be larger: all text is kept whatever the budget. Default 0.2 when
        ``max_kv_tokens`` is not given; giving both is an error.
    max_kv_tokens : int, optional
        The budget as a token count instead of a fraction: at most this many prompt KV
        positions are kept per layer and KV head (the paper's ``N + M`` is
        ``min(max_kv_tokens, L)``). An engine that frees whole blocks rounds the kept image
        positions DOWN to whole blocks, so the cap is never exceeded by rounding; it is exceeded
        only where the positions the method never evicts (for ``lookm``: all text and the recent
        window, and the tokens of partially filled blocks) already exceed it
        (:func:`~lookm_vllm.core.selection.select_kept`). Exclusive with ``budget``.
    recent_ratio : float
        The paper's alpha1: the last ``int(recent_ratio * L)`` positions (the recent window) are
        always kept. Part of the budget, so ``0 <= recent_ratio <= budget``; with
        ``max_kv_tokens`` the window is at most ``max_kv_tokens`` positions.
    merge : {"pivotal", "average", "weighted", "none"}, optional
        How evicted KV pairs are merged into kept ones (paper Eq. 9-12): a name in ``MERGES``, or
        ``none``. Default: the method's ``default_merge``, ``pivotal`` for ``lookm`` (the paper's
        LOOK-M), ``none`` for the baselines. Any merge may be combined with
        any method (e.g. ``h2o`` + ``average``); ``lookm`` + ``none`` is the paper's "TP only".
    merge_scope : {"all", "same_modality"}
        ``all`` (the paper): an evicted token merges into its most similar kept token of either
        modality. ``same_modality``: only into kept tokens of its own modality (EffiVLM-Bench found
        image-into-text merging hurts at very low budgets); dropped when there is none.
    scoring : {"full", "window"}, optional
        Which queries the attention scores sum over: all prompt queries (paper Eq. 4) or only the
        last ``window`` ones (SnapKV's observation window). Default: the method's
        ``default_scoring``, ``window`` for ``snapkv``, ``full`` otherwise. Ignored by methods
        that do not rank by attention.
    window : int
        Observation window W (number of last prompt queries) for ``scoring="window"``.
    seed : int
        Seed of the ``random`` method, so a request is reproducible.
    sink_tokens : int
        Number of initial "attention sink" tokens ``streaming`` keeps besides the recent tokens.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: MethodField = "lookm"
    # strict: a JSON string "0.2" is a client bug worth reporting, not a number to guess at.
    budget: float | None = Field(default=None, gt=0.0, le=1.0, strict=True,
                                 allow_inf_nan=False)
    max_kv_tokens: int | None = Field(default=None, ge=1, strict=True)
    recent_ratio: float = Field(default=0.1, ge=0.0, le=1.0, strict=True, allow_inf_nan=False)
    merge: MergeField | None = None
    merge_scope: MergeScope = "all"
    scoring: Scoring | None = None
    window: int = Field(default=32, ge=1, strict=True)
    seed: int = Field(default=0, strict=True)
    sink_tokens: int = Field(default=4, ge=0, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_method_defaults(cls, data: Any) -> Any:
        # Resolved before field validation so the stored config is explicit and frozen from the
        # start; an unknown method is left alone and reported by the field validation.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("max_kv_tokens") is not None:
            if data.get("budget") is not None:
                raise ValueError("give either budget (a fraction of the prompt) or "
                                 "max_kv_tokens (a token count), not both")
        elif data.get("budget") is None:
            data["budget"] = DEFAULT_BUDGET
        method = data.get("method", cls.model_fields["method"].default)
        selector = SELECTORS.get(method) if isinstance(method, str) else None
        if data.get("merge") is None:
            data["merge"] = NO_MERGE if selector is None else selector.default_merge
        if data.get("scoring") is None:
            data["scoring"] = "full" if selector is None else selector.default_scoring
        return data

    @model_validator(mode="after")
    def _check_recent_within_budget(self) -> CompressionConfig:
        if self.budget is not None and self.recent_ratio > self.budget:
            raise ValueError(
                f"recent_ratio ({self.recent_ratio}) must not exceed budget ({self.budget}): "
                "the recent window is part of the kept budget"
            )
        return self

    @classmethod
    def parse(cls, obj: CompressionConfig | dict[str, Any] | str | None) -> CompressionConfig:
        """Build a config from whatever a caller has at hand.

        Parameters
        ----------
        obj : CompressionConfig, dict, str or None
            An existing config (returned as is), a dict of fields, a JSON object string (as sent
            through vLLM's ``vllm_xargs``), or ``None`` for the defaults.

        Raises
        ------
        pydantic.ValidationError
            A ``ValueError`` naming the offending field, for bad values or unknown fields.
        TypeError
            For any other type of ``obj``.
        """
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            return cls.model_validate_json(obj)
        if isinstance(obj, dict):
            return cls.model_validate(obj)
        raise TypeError(
            f"compression config must be a CompressionConfig, dict, JSON string or None, "
            f"not {type(obj).__name__}"
        )

    @property
    def is_active(self) -> bool:
        """Whether this config can change a cache at all (not ``none``; a budget below 1 or a
        token cap)."""
        return self.method != NO_COMPRESSION and (self.max_kv_tokens is not None
                                                  or self.budget < 1.0)

    @property
    def needs_attention(self) -> bool:
        """Whether ``compress`` needs accumulated attention scores for this config."""
        return self.is_active and SELECTORS[self.method].needs_scores
