"""Deployments: the three flows registered with schedules on a Prefect server (``aerosynth serve``).

``adapt`` runs on a cron schedule (weekly by default) with the config it was served with;
``retrain`` watches a folder on a cron schedule (nightly by default) and promotes a better
detector into the registry; ``request`` has no schedule: analysts trigger it from the UI or
with ``prefect deployment run 'request/request'`` and parameters.

Start a local server first (loopback only)::

    prefect server start --host 127.0.0.1 --port 4200     # UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    aerosynth serve --config my.yaml --watch incoming/ --registry registry/
"""

from __future__ import annotations

from pathlib import Path

from aerosynth.flows.adapt import adapt_flow
from aerosynth.flows.config import AdaptConfig
from aerosynth.flows.request import request_flow
from aerosynth.flows.retrain import retrain_flow


def build_deployments(
    config: AdaptConfig,
    watch: Path | None = None,
    registry: Path | None = None,
    adapt_cron: str = "0 2 * * 0",
    retrain_cron: str = "0 3 * * *",
    timezone: str = "UTC",
) -> list:
    """The runner deployments of the three flows (not yet served)."""
    from prefect.schedules import Cron

    doc = config.model_dump(mode="json")
    deployments = [
        adapt_flow.to_deployment(
            name="adapt",
            schedule=Cron(adapt_cron, timezone=timezone),
            parameters={"config": doc},
            description="Re-run the whole adapt job with the served config.",
            tags=["aerosynth"],
        ),
        request_flow.to_deployment(
            name="request", description="Labelled tiles in a domain's style, on demand.", tags=["aerosynth"]
        ),
    ]
    if watch is not None and registry is not None:
        deployments.append(
            retrain_flow.to_deployment(
                name="retrain",
                schedule=Cron(retrain_cron, timezone=timezone),
                parameters={"registry": str(registry), "watch": str(watch), "config": doc},
                description="Retrain on new imagery in the watched folder; promote only if AP50 is not worse.",
                tags=["aerosynth"],
            )
        )
    return deployments


def serve_deployments(deployments: list) -> None:
    """Serve until interrupted (a blocking call: the process runs the scheduled flows)."""
    from prefect import serve

    serve(*deployments)
