"""Training stages 0, A, B, C on a fixed tiny set: losses, tokens, resume, checkpoints."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aerosynth.data.errors import InputError
from aerosynth.generation.models import load_ldm
from aerosynth.generation.training import (
    Stage0Config,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    train_stage,
)
from aerosynth.generation.vocab import VEHICLE_TOKEN, background_token
from tests.test_generation_helpers import make_training_splits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiles")
    return make_training_splits(root)


@pytest.fixture(scope="module")
def stage_a(splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stageA")
    return train_stage("A", StageAConfig(steps=40, batch_size=4, learning_rate=1e-3, progress=False), splits, out)


def _losses(stage_dir: Path) -> list[dict]:
    return list(csv.DictReader((stage_dir / "losses.csv").read_text().splitlines()))


def _token_rows(model_dir: Path) -> torch.Tensor:
    ldm = load_ldm(model_dir)
    rows = [ldm.token_id(VEHICLE_TOKEN)] + [ldm.token_id(background_token(d)) for d in ldm.domains]
    return ldm.text_encoder.get_input_embeddings().weight[rows].detach().clone()


def test_stage0_trains_autoencoder_and_reports_heldout_psnr(splits, tmp_path):
    out = train_stage("0", Stage0Config(steps=15, batch_size=4, progress=False), splits, tmp_path / "s0")
    metrics = json.loads((tmp_path / "s0" / "stage.json").read_text())["metrics"]
    assert metrics["heldout_tiles"] == 1 and metrics["train_tiles"] == 15
    assert 5.0 < metrics["psnr_heldout_db"] < 60.0
    rows = _losses(tmp_path / "s0")
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # the trained autoencoder is a valid autoencoder_dir for stage A
    model = train_stage(
        "A", StageAConfig(steps=2, batch_size=2, autoencoder_dir=out, progress=False), splits, tmp_path / "a"
    )
    assert load_ldm(model).codec.scaling == pytest.approx(metrics["latent_scaling"])


def test_stage_a_loss_is_finite_and_lower_at_the_end(stage_a):
    rows = _losses(stage_a.parent)
    values = [float(r["loss"]) for r in rows]
    assert len(values) == 40 and all(v == v and v < 1e3 for v in values)
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10
    assert all(float(r["loss_obj"]) == 0 for r in rows)


def test_stage_b_moves_tokens_only_and_stage_c_the_unet_only(stage_a, splits, tmp_path):
    before = _token_rows(stage_a)
    b = train_stage(
        "B", StageBConfig(steps=6, batch_size=4, init_model=stage_a, progress=False), splits, tmp_path / "b"
    )
    after_b = _token_rows(b)
    assert (after_b - before).norm(dim=1).min() > 0  # [V1] and both background tokens moved
    rows = _losses(tmp_path / "b")
    assert all(float(r["loss_obj"]) > 0 and float(r["loss_bg"]) > 0 for r in rows)
    # the tiles stage A encoded are not encoded again: its latent cache is linked, not rebuilt
    cache_a, cache_b = (d.parent / "cache" / "latents.pt" for d in (stage_a, b))
    assert os.stat(cache_b).st_ino == os.stat(cache_a).st_ino
    # by default stage B leaves stage A's UNet byte for byte; asked to, it trains it as well
    assert (b / "unet.safetensors").read_bytes() == (stage_a / "unet.safetensors").read_bytes()
    both = train_stage(
        "B",
        StageBConfig(steps=2, batch_size=4, init_model=stage_a, train_unet=True, progress=False),
        splits,
        tmp_path / "b-unet",
    )
    assert (both / "unet.safetensors").read_bytes() != (stage_a / "unet.safetensors").read_bytes()
    with pytest.raises(InputError, match="train_unet"):
        train_stage("C", StageCConfig(steps=2, init_model=b, train_unet=False, progress=False), splits, tmp_path / "x")
    c_cfg = StageCConfig(steps=4, batch_size=4, init_model=b, lora_rank=4, ema_decay=0.9, progress=False)
    c = train_stage("C", c_cfg, splits, tmp_path / "c")
    assert torch.equal(_token_rows(c), after_b)
    unet_b, unet_c = load_file(str(b / "unet.safetensors")), load_file(str(c / "unet.safetensors"))
    assert unet_b.keys() == unet_c.keys()  # LoRA merged back into plain diffusers names
    assert any(not torch.equal(unet_b[k], unet_c[k]) for k in unet_b)


def test_resume_after_sigint_equals_uninterrupted_run(stage_a, splits, tmp_path):
    cfg = StageBConfig(
        steps=6, batch_size=2, grad_accum=2, ema_decay=0.8, checkpoint_every=100, init_model=stage_a, progress=False
    )
    straight = train_stage("B", cfg, splits, tmp_path / "straight")

    def interrupt(step: int, losses: dict) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_stage("B", cfg, splits, tmp_path / "resumed", on_step=interrupt)
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").is_file()
    assert len(_losses(tmp_path / "resumed")) == 3
    resumed = train_stage("B", cfg, splits, tmp_path / "resumed", resume=True)
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes()
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    # a finished stage with the same config is not trained again
    assert train_stage("B", cfg, splits, tmp_path / "resumed") == resumed


def test_bad_checkpoint_and_bad_inputs(stage_a, splits, tmp_path):
    out = tmp_path / "bad"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    cfg = StageAConfig(steps=2, batch_size=2, progress=False)
    with pytest.raises(InputError, match="corrupt or unreadable checkpoint"):
        train_stage("A", cfg, splits, out)
    train_stage("A", cfg, splits, out, resume=False)  # starting over ignores it
    with pytest.raises(InputError, match="unknown training stage"):
        train_stage("D", cfg, splits, tmp_path / "d")
    with pytest.raises(InputError, match="previous stage"):
        train_stage("B", StageBConfig(steps=2, progress=False), splits, tmp_path / "b")
    with pytest.raises(InputError, match="not a tile split"):
        train_stage("A", cfg, [tmp_path], tmp_path / "e")
    changed = StageAConfig(steps=4, batch_size=2, learning_rate=0.5, progress=False, checkpoint_every=1)
    (out / "stage.json").unlink()
    with pytest.raises(InputError, match="different config"):
        train_stage("A", changed, splits, out)
