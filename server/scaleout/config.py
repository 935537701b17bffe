"""The Ray Serve application's configuration: one JSON-serialisable model, the `args` of a Serve config file."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitserve.server.scaleout.autoscale import AutoscaleConfig
from fitserve.server.settings import Settings

APP_NAME = "fitserve"
DIRECTORY_NAMESPACE = "fitserve"


class RouterKind(enum.StrEnum):
    """Which request router the engine deployment uses."""

    MEMORY = "memory"  # fitserve's: most free KV tokens for the request
    DEFAULT = "default"  # Ray Serve's power-of-two-choices on queue length (the benchmark's baseline)


class AutoscaleArgs(BaseModel):
    """Autoscaling on KV usage and waiting requests (see `autoscale.KvAutoscaler`)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=2, ge=1)
    kv_usage_high: float = Field(default=0.9, gt=0, le=1)
    kv_usage_low: float = Field(default=0.1, ge=0, lt=1)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=15.0, ge=0)

    def to_config(self) -> AutoscaleConfig:
        """The policy's own config (validates min <= max and the thresholds)."""
        return AutoscaleConfig(**self.model_dump())


class ScaleoutConfig(BaseModel):
    """Everything the application needs: the engine settings every replica plans with, and the replica layout."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="`fitserve serve` settings (Settings fields) for the ingress and replicas"
    )
    num_replicas: int = Field(default=2, ge=1, description="engine replicas (ignored when autoscaling is set)")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per engine replica (its torch threads)")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica; a fraction plans inside that share")
    max_ongoing_requests: int = Field(default=256, ge=1, description="requests Serve sends one replica at once")
    routing_stats_period_s: float = Field(default=1.0, gt=0, description="how often replicas report their KV state")
    router_max_hold_s: float = Field(
        default=0.0,
        ge=0,
        description="late binding: the memory-aware router holds a request while no replica has its KV tokens free, "
        "up to this long, in one queue for all replicas; 0 (default) sends every request at once (measured no better "
        "on CPU replicas sharing cores, docs/scaling.md)",
    )
    replica_settings: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per-replica Settings overrides (e.g. memory_budget), by Serve replica rank modulo the list",
    )
    router: RouterKind = RouterKind.MEMORY
    autoscaling: AutoscaleArgs | None = None
    app_name: str = APP_NAME

    def engine_settings(self) -> Settings:
        """The Settings each replica (and the ingress: api key, limits) starts from."""
        return Settings(**self.settings)

    @field_validator("replica_settings")
    @classmethod
    def _known_fields(cls, overrides: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every override names a Settings field (Settings itself ignores unknown keys: a typo would pass)."""
        for override in overrides:
            unknown = sorted(set(override) - set(Settings.model_fields))
            if unknown:
                raise ValueError(f"replica_settings: not Settings fields: {', '.join(unknown)}")
        return overrides

    def replica_engine_settings(self, rank: int | None) -> Settings:
        """The Settings the replica of Serve rank `rank` plans with: the shared ones and its own overrides.

        Ranks run 0..N-1 and a replacement takes the rank of the replica it replaces, so a budget class keeps its
        share of the replicas; ranks beyond the list wrap around. No rank (or no list): the shared settings.
        """
        if rank is None or not self.replica_settings:
            return self.engine_settings()
        return Settings(**{**self.settings, **self.replica_settings[rank % len(self.replica_settings)]})

    @property
    def directory_name(self) -> str:
        """Name of the app's directory actor (replica metric targets, autoscaler decisions)."""
        return f"{self.app_name}-directory"
