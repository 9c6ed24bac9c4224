"""CompressionConfig: defaults, resolution from the method, JSON round trip, clear errors."""

from __future__ import annotations

import pydantic
import pytest

from lookm_vllm.core import CompressionConfig, scoring_queries


def test_defaults_are_the_papers_lookm():
    config = CompressionConfig()
    assert (config.method, config.budget, config.recent_ratio) == ("lookm", 0.2, 0.1)
    assert (config.merge, config.merge_scope, config.scoring) == ("pivotal", "all", "full")
    assert config.is_active and config.needs_attention


@pytest.mark.parametrize(
    "method,merge,scoring",
    [("lookm", "pivotal", "full"), ("h2o", "none", "full"), ("snapkv", "none", "window"),
     ("streaming", "none", "full"), ("random", "none", "full"), ("none", "none", "full")],
)
def test_merge_and_scoring_resolve_from_method(method, merge, scoring):
    config = CompressionConfig(method=method)
    assert (config.merge, config.scoring) == (merge, scoring)


def test_explicit_merge_and_scoring_win():
    config = CompressionConfig(method="h2o", merge="average", scoring="window", window=8)
    assert (config.merge, config.scoring, config.window) == ("average", "window", 8)
    assert CompressionConfig(method="lookm", merge="none").merge == "none"  # "TP only"


@pytest.mark.parametrize(
    "fields",
    [{}, {"method": "snapkv", "window": 16}, {"method": "random", "seed": 7, "budget": 1},
     {"method": "lookm", "merge": "weighted", "merge_scope": "same_modality", "budget": 0.05,
      "recent_ratio": 0.0}],
)
def test_json_round_trip(fields):
    config = CompressionConfig(**fields)
    assert CompressionConfig.model_validate_json(config.model_dump_json()) == config
    assert CompressionConfig.parse(config.model_dump_json()) == config
    assert CompressionConfig.parse(config.model_dump()) == config


def test_parse_accepts_none_instance_dict_and_json():
    config = CompressionConfig(method="h2o")
    assert CompressionConfig.parse(None) == CompressionConfig()
    assert CompressionConfig.parse(config) is config
    assert CompressionConfig.parse({"method": "h2o"}) == config
    assert CompressionConfig.parse('{"method": "h2o"}') == config
    with pytest.raises(TypeError, match="JSON string"):
        CompressionConfig.parse(0.2)


def test_frozen():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        CompressionConfig().budget = 0.5


@pytest.mark.parametrize(
    "fields,field,words",
    [
        ({"budget": "0.2"}, "budget", "valid number"),
        ({"budget": True}, "budget", "valid number"),
        ({"budget": 0}, "budget", "greater than 0"),
        ({"budget": 1.5}, "budget", "less than or equal to 1"),
        ({"budget": float("nan")}, "budget", "finite number"),
        ({"recent_ratio": -0.1}, "recent_ratio", "greater than or equal to 0"),
        ({"budget": 0.1, "recent_ratio": 0.2}, "recent_ratio", "must not exceed budget"),
        ({"method": "pyramidkv"}, "method", "'lookm'"),
        ({"merge": "max"}, "merge", "'pivotal'"),
        ({"merge_scope": "text"}, "merge_scope", "'same_modality'"),
        ({"scoring": "last"}, "scoring", "'window'"),
        ({"window": 0}, "window", "greater than or equal to 1"),
        ({"seed": 1.5}, "seed", "valid integer"),
        ({"sink_tokens": -1}, "sink_tokens", "greater than or equal to 0"),
        ({"ratio": 0.2}, "ratio", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(fields, field, words):
    with pytest.raises(pydantic.ValidationError) as error:
        CompressionConfig(**fields)
    message = str(error.value)
    assert field in message and words in message
    with pytest.raises(ValueError):  # the server can catch ValueError alone
        CompressionConfig.parse(fields)


def test_bad_json_is_a_value_error():
    with pytest.raises(ValueError, match="budget"):
        CompressionConfig.parse('{"budget": 2}')
    with pytest.raises(ValueError, match="JSON"):
        CompressionConfig.parse("{budget")


@pytest.mark.parametrize(
    "fields,active",
    [({}, True), ({"method": "none"}, False), ({"budget": 1.0}, False),
     ({"method": "h2o", "budget": 0.99}, True)],
)
def test_is_active(fields, active):
    assert CompressionConfig(**fields).is_active is active


@pytest.mark.parametrize(
    "fields,prompt_len,expected",
    [
        ({}, 500, 500),
        ({"scoring": "window", "window": 16}, 500, 16),
        ({"method": "snapkv"}, 500, 32),
        ({"method": "snapkv"}, 20, 20),
        ({"method": "snapkv", "scoring": "full"}, 500, 500),
        ({"method": "h2o"}, 500, 500),
        ({"method": "streaming"}, 500, 0),
        ({"method": "random"}, 500, 0),
        ({"method": "none"}, 500, 0),
        ({"budget": 1.0}, 500, 0),
    ],
)
def test_scoring_queries(fields, prompt_len, expected):
    assert scoring_queries(CompressionConfig(**fields), prompt_len) == expected


# Budgets as token counts ------------------------------------------------------------------------


def test_max_kv_tokens_replaces_the_budget():
    config = CompressionConfig(max_kv_tokens=256)
    assert (config.budget, config.max_kv_tokens) == (None, 256)
    assert config.is_active
    assert CompressionConfig().max_kv_tokens is None
    # a dumped token-budget config (budget null) validates back to itself: the server rewrites
    # the request's config to JSON before vLLM sees it
    assert CompressionConfig.model_validate_json(config.model_dump_json()) == config
    assert CompressionConfig.parse(config.model_dump()) == config
    # recent_ratio is not bounded by a fraction: the window is clamped to the cap instead
    assert CompressionConfig(max_kv_tokens=10, recent_ratio=0.5).recent_ratio == 0.5


def test_budget_and_max_kv_tokens_are_exclusive():
    for fields in ({"budget": 0.2, "max_kv_tokens": 100}, {"budget": 1.0, "max_kv_tokens": 1}):
        with pytest.raises(pydantic.ValidationError) as error:
            CompressionConfig(**fields)
        assert "budget" in str(error.value) and "max_kv_tokens" in str(error.value)
        assert "not both" in str(error.value)
    # an explicit null is "not given"
    assert CompressionConfig(budget=None, max_kv_tokens=8).max_kv_tokens == 8
    assert CompressionConfig(budget=0.3, max_kv_tokens=None).budget == 0.3


@pytest.mark.parametrize(
    "value,words",
    [(0, "greater than or equal to 1"), (-5, "greater than or equal to 1"),
     ("64", "valid integer"), (64.0, "valid integer"), (True, "valid integer")],
)
def test_bad_max_kv_tokens_is_rejected_naming_the_field(value, words):
    with pytest.raises(pydantic.ValidationError) as error:
        CompressionConfig(max_kv_tokens=value)
    assert "max_kv_tokens" in str(error.value) and words in str(error.value)
