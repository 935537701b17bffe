"""Heterogeneous replicas: per-replica settings by Serve rank (`--replica-budgets`, `--replica-max-kv-tokens`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fitserve.server.cli import build_parser
from fitserve.server.scaleout.config import ScaleoutConfig
from fitserve.server.scaleout.launch import replica_overrides, scaleout_config
from fitserve.server.settings import Settings


def test_each_rank_plans_with_its_own_budget_and_the_shared_settings() -> None:
    config = ScaleoutConfig(
        settings={"memory_budget": "1GiB", "max_batch_size": 8},
        num_replicas=3,
        replica_settings=[{"memory_budget": "600MiB", "max_kv_tokens": 512}, {"max_kv_tokens": 1536}],
    )
    first, second, third = (config.replica_engine_settings(rank) for rank in range(3))
    assert (first.memory_budget, first.max_kv_tokens, first.max_batch_size) == ("600MiB", 512, 8)
    assert (second.memory_budget, second.max_kv_tokens, second.max_batch_size) == ("1GiB", 1536, 8)
    assert third == first  # ranks beyond the list wrap around
    assert config.replica_engine_settings(None) == config.engine_settings()  # no rank: the shared settings
    plain = ScaleoutConfig(settings={"memory_budget": "1GiB"})
    assert plain.replica_engine_settings(1) == plain.engine_settings()


def test_a_misspelt_replica_setting_is_refused() -> None:
    with pytest.raises(ValidationError, match="memory_budgett"):
        ScaleoutConfig(replica_settings=[{"memory_budgett": "1GiB"}])


def test_cli_lists_become_one_override_per_replica() -> None:
    assert replica_overrides(["600MiB", "1.2GiB"], None) == [{"memory_budget": "600MiB"}, {"memory_budget": "1.2GiB"}]
    assert replica_overrides(["1GiB", "2GiB"], [512, 1536]) == [
        {"memory_budget": "1GiB", "max_kv_tokens": 512},
        {"memory_budget": "2GiB", "max_kv_tokens": 1536},
    ]
    assert replica_overrides(None, None) == []
    with pytest.raises(ValueError, match="same number"):
        replica_overrides(["1GiB"], [512, 1536])
    config = scaleout_config(Settings(memory_budget="1GiB"), 2, replica_settings=replica_overrides(None, [512, 1536]))
    round_trip = ScaleoutConfig.model_validate(config.model_dump(mode="json"))
    assert [round_trip.replica_engine_settings(rank).max_kv_tokens for rank in (0, 1)] == [512, 1536]


def test_serve_parses_the_per_replica_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--replica-budgets", "600MiB, 1.2GiB", "--replica-max-kv-tokens", "512,1536"]
    )
    assert args.replica_budgets == ["600MiB", "1.2GiB"] and args.replica_max_kv_tokens == [512, 1536]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--replica-max-kv-tokens", "512,lots"])
