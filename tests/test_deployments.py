"""Deployments: the three flows register on a Prefect server with their schedules and parameters."""

from __future__ import annotations

import asyncio

from aerosynth.flows.config import load_config
from aerosynth.flows.deployments import build_deployments


def test_deployments_register_with_schedules(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    deployments = build_deployments(
        load_config(preset="demo"),
        tmp_path / "watch",
        tmp_path / "registry",
        adapt_cron="0 2 * * 0",
        retrain_cron="30 3 * * *",
    )
    for d in deployments:
        d.apply()

    async def read():
        async with get_client() as client:
            return {
                name: await client.read_deployment_by_name(name)
                for name in ("adapt/adapt", "retrain/retrain", "request/request")
            }

    found = asyncio.run(read())
    crons = {k: [s.schedule.cron for s in v.schedules] for k, v in found.items()}
    assert crons == {"adapt/adapt": ["0 2 * * 0"], "retrain/retrain": ["30 3 * * *"], "request/request": []}
    assert found["adapt/adapt"].parameters["config"]["name"] == "demo"
    assert found["retrain/retrain"].parameters["watch"] == str(tmp_path / "watch")


def test_serve_needs_watch_and_registry_together(capsys):
    from aerosynth.flows.cli import main

    assert main(["serve", "--watch", "incoming"]) == 2
    assert "--watch/--registry" in capsys.readouterr().err
