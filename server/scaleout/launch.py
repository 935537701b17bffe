"""`fitserve serve --replicas N`: deploy the Ray Serve application and serve until SIGINT/SIGTERM.

Without `--ray-address` a local Ray instance is started on loopback only (127.0.0.1 for the node, the object
store and Serve's HTTP proxy) and shut down on exit, with every process it started. With an address the
application is deployed to that cluster and deleted from it on exit; the cluster itself keeps running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from fitserve.server.scaleout.config import AutoscaleArgs, ScaleoutConfig
from fitserve.server.settings import Settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
LOOPBACK = "127.0.0.1"


def scaleout_config(
    settings: Settings,
    replicas: int,
    max_replicas: int | None = None,
    replica_settings: list[dict[str, Any]] | None = None,
) -> ScaleoutConfig:
    """The application config for `fitserve serve` settings (secrets included: the ingress checks the key).

    With `max_replicas` above `replicas` the engine deployment autoscales between the two. `replica_settings`:
    per-replica overrides by Serve rank (`replica_overrides`).
    """
    fields = settings.model_dump(mode="json", exclude_none=True, exclude={"host", "port", "log_level"})
    if settings.api_key is not None:
        fields["api_key"] = settings.api_key_value()
    autoscaling = None
    if max_replicas is not None and max_replicas > replicas:
        autoscaling = AutoscaleArgs(min_replicas=replicas, max_replicas=max_replicas)
    return ScaleoutConfig(
        settings=fields, num_replicas=replicas, autoscaling=autoscaling, replica_settings=replica_settings or []
    )


def replica_overrides(budgets: list[str] | None, max_kv_tokens: list[int] | None) -> list[dict[str, Any]]:
    """Per-replica Settings overrides from `--replica-budgets` / `--replica-max-kv-tokens` (one entry per rank).

    Raises ValueError when both lists are given with different lengths.
    """
    columns: dict[str, list[Any]] = {"memory_budget": budgets or [], "max_kv_tokens": max_kv_tokens or []}
    lengths = {len(values) for values in columns.values() if values}
    if len(lengths) > 1:
        raise ValueError("--replica-budgets and --replica-max-kv-tokens must list the same number of replicas")
    count = lengths.pop() if lengths else 0
    return [{name: values[i] for name, values in columns.items() if values} for i in range(count)]


def start_local_ray() -> str:
    """Start a Ray instance on this machine that binds and talks on 127.0.0.1 only; returns the node address.

    Raises RuntimeError (after shutting Ray down again) if the node registered any other address.
    """
    if "ray" in sys.modules:
        raise RuntimeError("start_local_ray must run before Ray is imported (Ray reads its environment on import)")
    # Ray reads this on import: with it off, the node registers on 127.0.0.1 rather than the machine's address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=False, log_to_driver=False)
    address = str(ray.nodes()[0]["NodeManagerAddress"])
    if address != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray node registered {address}, not {LOOPBACK}")
    return address


def run_replicas(
    settings: Settings,
    replicas: int,
    ray_address: str | None = None,
    max_replicas: int | None = None,
    replica_settings: list[dict[str, Any]] | None = None,
) -> int:
    """Deploy `replicas` engine replicas behind one OpenAI-compatible port; block until a signal; clean up."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    config = scaleout_config(settings, replicas, max_replicas, replica_settings)
    local = ray_address is None
    try:
        if local:
            start_local_ray()  # before anything imports ray
        import ray
        from ray import serve

        from fitserve.server.scaleout.app import build_app

        if not local:
            ray.init(address=ray_address, configure_logging=False, log_to_driver=False)
        for sig in signals:  # after ray.init, which installs a SIGTERM handler of its own that aborts the driver
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": settings.host, "port": settings.port})
        logger.info("deploying %d replicas of %s", replicas, settings.model or "the default model")
        serve.run(build_app(config.model_dump(mode="json")), name=config.app_name, route_prefix="/", blocking=False)
        logger.info("serving on http://%s:%d (%d replicas)", settings.host, settings.port, replicas)
        while not stop.wait(0.5):
            pass
        logger.info("shutdown signal: stopping the application")
        return EXIT_OK
    except Exception:
        logger.exception("the Ray Serve application failed")
        return EXIT_RUNTIME_ERROR
    finally:
        _stop(config, local)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(config: ScaleoutConfig, local: bool) -> None:
    """Local: shut Serve and Ray down (every process they started). Cluster: delete only our application."""
    if "ray" not in sys.modules:
        return
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(config.app_name)
        _kill_directory(config)
    finally:
        ray.shutdown()


def _kill_directory(config: ScaleoutConfig) -> None:
    """The directory actor is detached (it must outlive the replica that created it): end it with the app."""
    import ray

    from fitserve.server.scaleout.config import DIRECTORY_NAMESPACE

    with contextlib.suppress(ValueError):  # never created
        ray.kill(ray.get_actor(config.directory_name, namespace=DIRECTORY_NAMESPACE))
