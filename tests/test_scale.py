"""Scale-out: synthesis shards mapped over a 2-worker Dask LocalCluster give the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prefect import flow

from aerosynth.flows.scale import map_shards, task_runner
from aerosynth.generation.sampling import SamplingConfig, generate_set
from aerosynth.generation.training import StageAConfig, train_stage
from tests.test_generation_helpers import make_split

pytestmark = pytest.mark.slow

CFG = SamplingConfig(steps=3, batch_size=2, shard_size=2, progress=False)


def _files(set_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(set_dir)): p.read_bytes() for p in sorted(set_dir.rglob("*")) if p.is_file()}


def test_dask_shards_equal_sequential_run(prefect_harness, tmp_path):
    torch.set_num_threads(1)
    source = make_split(tmp_path, "source-train", "madison_drone", weak=False)
    target = make_split(tmp_path, "target-train", "kit_munich_aerial", seed=1)
    model = train_stage("A", StageAConfig(steps=2, batch_size=2, progress=False), [source, target], tmp_path / "A")
    sequential = generate_set(model, tmp_path / "seq", "target_cars", "kit_munich_aerial", 5, base_seed=3, config=CFG)

    @flow(task_runner=task_runner("dask", workers=2))
    def sharded() -> None:
        args = {"set_name": "target_cars", "domain": "kit_munich_aerial", "count": 5, "base_seed": 3}
        map_shards("set", model, tmp_path / "dask", 3, args, CFG, 1)

    sharded()
    assert len(list((tmp_path / "dask" / "shards").glob("*.json"))) == 3
    # closing the stage finds every shard done and writes nothing new
    generate_set(model, tmp_path / "dask", "target_cars", "kit_munich_aerial", 5, base_seed=3, config=CFG)
    assert _files(tmp_path / "dask") == _files(sequential)
