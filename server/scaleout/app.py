"""`build_app`: the Ray Serve application of fitserve (the import path of deploy/ray/serve-config.yaml).

    serve run fitserve.server.scaleout.app:build_app settings.model=/models/x num_replicas=2

builds an `Ingress` deployment in front of an `EngineReplica` deployment whose handle routes with the
memory-aware router and, when `autoscaling` is set, scales with the KV-usage policy.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from fitserve.server.scaleout.config import RouterKind, ScaleoutConfig
from fitserve.server.scaleout.ingress import Ingress
from fitserve.server.scaleout.replica import EngineReplica

ROUTER_CLASS = "fitserve.server.scaleout.router:MemoryAwareRouter"
POLICY_CLASS = "fitserve.server.scaleout.policy:KvAutoscalingPolicy"


def build_app(args: dict[str, Any]) -> Application:
    """The application for `args` (a `ScaleoutConfig` as a dict: Serve config `args`, or the CLI)."""
    config = ScaleoutConfig.model_validate(args)
    payload = config.model_dump(mode="json")
    replica = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
        request_router_config=router_config(config),
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=config.engine_settings().shutdown_timeout_s,
        **replica_count(config),
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * config.max_ongoing_requests,
    )
    return ingress.bind(replica.bind(payload), payload)


def router_config(config: ScaleoutConfig) -> RequestRouterConfig:
    """The memory-aware router (or Ray's default, for comparisons), with fast routing-stats reports."""
    kwargs: dict[str, Any] = {
        "request_routing_stats_period_s": config.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 5 * config.routing_stats_period_s),
    }
    if config.router is RouterKind.MEMORY:
        kwargs["request_router_class"] = ROUTER_CLASS
        kwargs["request_router_kwargs"] = {"max_hold_s": config.router_max_hold_s}
    return RequestRouterConfig(**kwargs)


def replica_count(config: ScaleoutConfig) -> dict[str, Any]:
    """`num_replicas`, or an autoscaling config driven by the KV-usage policy."""
    if config.autoscaling is None:
        return {"num_replicas": config.num_replicas}
    scaling = config.autoscaling
    scaling.to_config()  # validate min <= max and the thresholds before Ray sees them
    return {
        "autoscaling_config": AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=scaling.min_replicas,
            metrics_interval_s=1.0,
            look_back_period_s=2.0,
            upscale_delay_s=0.0,  # the policy applies its own delays
            downscale_delay_s=0.0,
            policy=AutoscalingPolicy(
                policy_function=POLICY_CLASS,
                policy_kwargs={"directory_name": config.directory_name, **scaling.model_dump()},
            ),
        )
    }
