"""Box-supervised cross-attention, conditioning dropout and trained text embeddings (stages A-C)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.errors import InputError
from aerosynth.generation.attention import (
    AttentionStore,
    box_attention_loss,
    box_map_loss,
    empty_attention_loss,
    pool_masks,
    present_attention_loss,
)
from aerosynth.generation.latent_pack import read_latent_pack, write_latent_pack
from aerosynth.generation.training import (
    MASK_SIDE,
    StageAConfig,
    StageBConfig,
    box_mask,
    load_tiles,
    sample_timesteps,
    train_stage,
)
from tests.test_generation_helpers import make_training_splits

torch.set_num_threads(1)
FAST = {"steps": 12, "batch_size": 4, "learning_rate": 1e-3, "progress": False, "checkpoint_every": 6}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> list[Path]:
    return make_training_splits(tmp_path_factory.mktemp("tiles"))


def _losses(stage_dir: Path) -> list[dict]:
    return list(csv.DictReader((stage_dir / "losses.csv").read_text().splitlines()))


def test_box_mask_is_the_covered_fraction_per_cell():
    mask = box_mask(np.array([[0, 0, 64, 32]]), 128, 128, side=4)
    assert mask.shape == (4, 4) and mask.dtype == np.uint8
    assert (mask[0, :2] == 255).all() and (mask[1:] == 0).all() and (mask[0, 2:] == 0).all()
    half = box_mask(np.array([[0, 0, 16, 32]]), 128, 128, side=4)  # half of the first cell
    assert 120 <= half[0, 0] <= 135
    assert not box_mask(np.zeros((0, 4)), 128, 128).any()


def test_box_map_loss_is_zero_on_the_mask_and_grows_away_from_it():
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    on = mask / 4
    off = torch.roll(on, 8, dims=1)
    assert torch.allclose(box_map_loss(on, mask, "l1"), torch.zeros(2), atol=1e-6)
    assert torch.allclose(box_map_loss(off, mask, "l1"), torch.ones(2), atol=1e-6)  # disjoint: total variation 1
    assert (box_map_loss(mask.clamp(0.01, 0.99), mask, "bce") < box_map_loss(1 - mask, mask, "bce")).all()
    with pytest.raises(ValueError):
        box_map_loss(on, mask, "l2")


def test_box_attention_loss_uses_valid_rows_every_layer_and_learned_tokens():
    masks = torch.zeros(2, 8, 8)
    masks[:, :4, :4] = 1
    store = AttentionStore(torch.tensor([[3, 4, 5], [3, 4, 5]]), (8, 8), keep_layer_maps=True)
    for side in (8, 4):
        target = pool_masks(masks, (side, side))
        maps = torch.stack([target, target, 1 - target], dim=1).requires_grad_(True)  # cars, v1, bg all right
        store.layer_maps.append(maps)
        store.layer_sides.append((side, side))
    valid = torch.tensor([True, False])
    assert float(box_attention_loss(store, masks, valid, learned_tokens=True).detach()) < 1e-6
    store.layer_maps[0] = torch.rand(2, 3, 64, requires_grad=True)
    loss = box_attention_loss(store, masks, valid, learned_tokens=True)
    assert float(loss.detach()) > 0.05
    loss.backward()
    assert store.layer_maps[0].grad[1].abs().sum() == 0  # an invalid row takes no gradient
    assert float(box_attention_loss(store, masks, torch.tensor([False, False])).detach()) == 0


def test_source_tiles_carry_box_masks_target_tiles_none(splits):
    tiles = load_tiles(splits, 32)
    source = [i for i, n in enumerate(tiles.names) if n.startswith("source-train/")]
    target = [i for i, n in enumerate(tiles.names) if n.startswith("target-train/")]
    assert tiles.box_masks.shape == (len(tiles.names), MASK_SIDE, MASK_SIDE)
    assert all(tiles.has_boxes[i] == tiles.has_vehicle[i] for i in source) and any(tiles.has_boxes)
    assert not any(tiles.has_boxes[i] for i in target) and not tiles.box_masks[target].any()
    assert all(bool(tiles.box_masks[i].any()) == tiles.has_boxes[i] for i in source)


def test_stage_a_trains_the_box_loss_dropout_and_text_embeddings(splits, tmp_path):
    on = train_stage("A", StageAConfig(**FAST), splits, tmp_path / "on")
    rows = _losses(tmp_path / "on")
    assert all(float(r["loss_box"]) >= 0 for r in rows) and any(float(r["loss_box"]) > 0 for r in rows)
    record = json.loads((tmp_path / "on" / "stage.json").read_text())
    assert record["metrics"]["tiles_with_boxes"] == 4
    gap = record["metrics"]["conditioning_gap"]
    assert set(gap) == {"t0.1", "t0.3", "t0.5", "t0.7", "t0.9", "mean"} and gap["mean"] > 0
    assert record["config"]["lambda_box"] == 1.0 and record["config"]["cond_dropout"] == 0.1

    off = train_stage(
        "A", StageAConfig(**FAST, lambda_box=0.0, cond_dropout=0.0, train_text="none"), splits, tmp_path / "off"
    )
    assert all(float(r["loss_box"]) == 0 for r in _losses(tmp_path / "off"))
    # stage A with train_text moved the embeddings of the prompt words; without it they stay the built ones
    from aerosynth.generation.models import load_ldm

    emb_on = load_ldm(on).text_encoder.get_input_embeddings().weight
    emb_off = load_ldm(off).text_encoder.get_input_embeddings().weight
    cars = load_ldm(on).token_id("cars")
    assert not torch.equal(emb_on[cars], emb_off[cars])

    # the box loss and the stage-B tokens together
    b = train_stage("B", StageBConfig(**FAST, init_model=on), splits, tmp_path / "b")
    assert any(float(r["loss_box"]) > 0 for r in _losses(tmp_path / "b"))
    assert (b / "unet.safetensors").is_file()


def test_empty_attention_loss_is_zero_without_cars_attention_and_grows_with_it():
    store = AttentionStore(torch.tensor([[3, 4, 5]]), (8, 8), keep_layer_maps=True)
    store.layer_maps.append(torch.zeros(1, 3, 64, requires_grad=True))
    assert float(empty_attention_loss(store).detach()) == 0
    store.layer_maps[0] = torch.full((1, 3, 64), 0.5, requires_grad=True)
    loss = empty_attention_loss(store)
    assert float(loss.detach()) == pytest.approx(np.log(2), rel=1e-5)
    loss.backward()
    assert store.layer_maps[0].grad[0, 0].abs().sum() > 0 and store.layer_maps[0].grad[0, 1:].abs().sum() == 0


def test_present_attention_loss_pulls_up_the_strongest_cells_of_valid_rows():
    store = AttentionStore(torch.tensor([[3, 4, 5], [3, 4, 5]]), (8, 8), keep_layer_maps=True)
    peaked = torch.zeros(2, 3, 64)
    peaked[:, 0, 10] = 1.0  # one cell (1/64 of the map) fully on "cars"
    store.layer_maps.append(peaked.requires_grad_(True))
    valid = torch.tensor([True, False])
    assert float(present_attention_loss(store, valid).detach()) == pytest.approx(0.0, abs=1e-5)
    flat = torch.full((2, 3, 64), 0.1, requires_grad=True)
    store.layer_maps[0] = flat
    loss = present_attention_loss(store, valid)
    assert float(loss.detach()) == pytest.approx(-np.log(0.1), rel=1e-4)
    loss.backward()
    assert flat.grad[0, 0].abs().sum() > 0 and flat.grad[1].abs().sum() == 0
    assert float(present_attention_loss(store, torch.tensor([False, False])).detach()) == 0


def test_stage_a_pushes_cars_attention_off_tiles_flagged_empty(splits, tmp_path):
    """lambda_empty is logged and changes the weights (the poisoning test below runs with it on)."""
    cfg = StageAConfig(**FAST, lambda_empty=1.0)
    first = train_stage("A", cfg, splits, tmp_path / "empty")
    rows = _losses(tmp_path / "empty")
    assert any(float(r["loss_empty"]) > 0 for r in rows) and all(r["loss_present"] == "" for r in rows)
    assert json.loads((tmp_path / "empty" / "stage.json").read_text())["config"]["lambda_empty"] == 1.0
    plain = train_stage("A", StageAConfig(**FAST), splits, tmp_path / "plain")
    assert (first / "unet.safetensors").read_bytes() != (plain / "unet.safetensors").read_bytes()
    assert all(r["loss_empty"] == "" for r in _losses(tmp_path / "plain"))
    with pytest.raises(InputError, match="lambda_empty"):
        train_stage("A", StageAConfig(**FAST, lambda_empty=-1.0), splits, tmp_path / "bad")
    # the other half of the weak label: flagged target tiles pull their strongest cars attention up
    both = train_stage("A", StageAConfig(**FAST, lambda_empty=1.0, lambda_present=1.0), splits, tmp_path / "both")
    assert any(float(r["loss_present"]) > 0 for r in _losses(tmp_path / "both"))
    assert (both / "unet.safetensors").read_bytes() != (first / "unet.safetensors").read_bytes()


def test_poisoned_target_labels_change_no_trained_byte(splits, tmp_path):
    """Target boxes never reach training: labels planted under evaluation/ leave the weights identical.

    The flag losses are on: they read target flags, never target boxes.
    """
    cfg = StageAConfig(**FAST, lambda_empty=1.0, lambda_present=1.0)
    first = train_stage("A", cfg, splits, tmp_path / "clean")
    root = splits[1].parent
    poison = root / "evaluation" / "target-train" / "labels"
    poison.mkdir(parents=True)
    for image in (splits[1] / "images").glob("*.png"):
        (poison / f"{image.stem}.txt").write_text("0 0.5 0.5 0.9 0.9\n")
    (splits[1] / "labels").mkdir()
    for image in (splits[1] / "images").glob("*.png"):
        (splits[1] / "labels" / f"{image.stem}.txt").write_text("0 0.2 0.2 0.3 0.3\n")
    try:
        second = train_stage("A", cfg, splits, tmp_path / "poisoned")
        for name in ("unet.safetensors", "text_encoder.safetensors"):
            assert (first / name).read_bytes() == (second / name).read_bytes()
    finally:
        import shutil

        shutil.rmtree(root / "evaluation")
        shutil.rmtree(splits[1] / "labels")


def test_latent_pack_carries_the_source_box_masks(splits, tmp_path):
    pack = read_latent_pack(write_latent_pack(splits, tmp_path / "p.npz", "tiny"))
    tiles = load_tiles(splits, 32)
    assert pack.box_masks is not None and torch.equal(pack.box_masks, tiles.box_masks)
    assert pack.has_boxes == tiles.has_boxes


def test_bad_box_settings_are_named(splits, tmp_path):
    for field, value in (("box_loss", "l2"), ("box_max_timestep", 0.0), ("cond_dropout", 1.0), ("train_text", "x")):
        with pytest.raises(InputError, match=field):
            train_stage("A", StageAConfig(**FAST, **{field: value}), splits, tmp_path / field)


def test_high_noise_timestep_sampling_shifts_the_budget_and_is_recorded(splits, tmp_path):
    gen = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, "uniform", gen).float()
    high = sample_timesteps(20000, 1000, "high", gen).float()
    assert high.min() >= 0 and high.max() <= 999
    assert abs(float(uniform.mean()) - 499.5) < 10 and abs(float(high.mean()) - 666.7) < 10
    assert float((high >= 800).float().mean()) > 1.5 * float((uniform >= 800).float().mean())
    train_stage("A", StageAConfig(**FAST, timestep_sampling="high"), splits, tmp_path / "high")
    record = json.loads((tmp_path / "high" / "stage.json").read_text())
    assert record["config"]["timestep_sampling"] == "high"
    assert set(record["metrics"]["denoising_error"]) == {"t0.1", "t0.3", "t0.5", "t0.7", "t0.9"}
    with pytest.raises(InputError, match="timestep_sampling"):
        train_stage("A", StageAConfig(**FAST, timestep_sampling="late"), splits, tmp_path / "bad")


def test_new_models_predict_velocity_on_a_zero_terminal_snr_schedule_and_keep_it(splits, tmp_path):
    from diffusers import DDPMScheduler

    from aerosynth.generation.models import load_ldm, noise_schedule
    from aerosynth.generation.sampling import SamplingConfig, generate_set, make_scheduler
    from aerosynth.generation.training import predicted_clean, snr_weight

    model = train_stage("A", StageAConfig(**FAST), splits, tmp_path / "v")  # the defaults
    ldm = load_ldm(model)
    assert (ldm.spec.prediction_type, ldm.spec.zero_terminal_snr) == ("v_prediction", True)
    schedule = DDPMScheduler(**noise_schedule(ldm))
    assert float(schedule.alphas_cumprod[-1]) < 1e-6  # the last training step is pure noise
    # the velocity target and the clean latent it implies invert each other at every level
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 300, 700, 998])
    velocity = schedule.get_velocity(x0, eps, t)
    assert torch.allclose(predicted_clean(schedule, schedule.add_noise(x0, eps, t), velocity, t), x0, atol=1e-4)
    # min-SNR keeps full weight at pure noise for velocity, and caps low noise as for noise prediction
    snr = torch.tensor([0.0, 1.0, 100.0])
    assert torch.allclose(snr_weight(snr, 5.0, velocity=True), torch.tensor([1.0, 1.0, 5.0 / 101]))
    assert torch.allclose(snr_weight(snr[1:], 5.0, velocity=False), torch.tensor([1.0, 0.05]))
    record = json.loads((tmp_path / "v" / "stage.json").read_text())
    assert record["config"]["prediction_type"] == "v_prediction" and record["config"]["zero_terminal_snr"]
    assert all(np.isfinite(e) for e in record["metrics"]["denoising_error"].values())
    scheduler = make_scheduler(ldm, "ddim")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(InputError, match="pndm"):
        make_scheduler(ldm, "pndm")
    out = generate_set(ldm, tmp_path / "set", "target_cars", ldm.spec.domains[0], 2, config=SamplingConfig(steps=4))
    assert len(sorted(out.rglob("*.png"))) >= 2
    with pytest.raises(InputError, match="zero_terminal_snr"):
        train_stage("A", StageAConfig(**FAST, prediction_type="epsilon"), splits, tmp_path / "eps")
    with pytest.raises(InputError, match="prediction_type"):
        train_stage("A", StageAConfig(**FAST, prediction_type="x0"), splits, tmp_path / "x0")
