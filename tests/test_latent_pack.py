"""Latent packs: quantisation bound, thinning, and stages A/B trained from a pack as from the tiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256
from aerosynth.generation.latent_pack import dequantise, quantise, read_latent_pack, thin_groups, write_latent_pack
from aerosynth.generation.models import build_ldm
from aerosynth.generation.training import StageAConfig, StageBConfig, load_tiles, train_stage
from tests.test_generation_helpers import make_training_splits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiles")
    return make_training_splits(root, n_source=12)


@pytest.fixture(scope="module")
def pack(splits, tmp_path_factory) -> Path:
    return write_latent_pack(splits, tmp_path_factory.mktemp("pack") / "pack.npz", preset="tiny")


def _first_loss(stage_dir: Path) -> float:
    return float(next(csv.DictReader((stage_dir / "losses.csv").read_text().splitlines()))["loss"])


def test_quantisation_error_is_within_half_a_code_per_channel():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 1, (20, 3, 4, 4)).astype(np.float32))
    x[:, 1] *= 10  # channels keep their own range
    codes, low, high = quantise(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    err = (dequantise(codes, low, high) - x).abs().amax(dim=(0, 2, 3)).numpy()
    assert np.all(err <= (high - low) / 510 + 1e-6)
    assert err[1] > err[0]  # the wide channel has the coarser step


def test_thinning_caps_each_group_and_keeps_small_ones():
    domains = ["a"] * 10 + ["b"] * 3
    flags = [True] * 6 + [False] * 4 + [True] * 3
    keep = thin_groups(domains, flags, 3)
    kept = [(domains[i], flags[i]) for i in keep]
    assert kept.count(("a", True)) == 3 and kept.count(("a", False)) == 3 and kept.count(("b", True)) == 3
    assert keep[0] == 0 and 5 in keep  # evenly spaced: first and last of the large group
    assert thin_groups(domains, flags, None) == list(range(13))
    with pytest.raises(InputError):
        thin_groups(domains, flags, 0)


def test_pack_holds_the_tiles_latents_and_weak_flags(splits, pack):
    p = read_latent_pack(pack)
    ldm = build_ldm("tiny")
    tiles = load_tiles(splits, ldm.spec.image_size)
    assert p.names == tiles.names and p.domains == tiles.domains and p.has_vehicle == tiles.has_vehicle
    with torch.no_grad():
        direct = ldm.codec.encode(tiles.images)
    span = (direct.amax(dim=(0, 2, 3)) - direct.amin(dim=(0, 2, 3)))[None, :, None, None]
    assert torch.all((p.latents - direct).abs() <= span / 510 + 1e-5)
    assert p.codec == ldm.codec.kind and p.image_size == ldm.spec.image_size


def test_stage_a_from_a_pack_matches_training_from_the_tiles(splits, pack, tmp_path):
    cfg = StageAConfig(steps=3, batch_size=4, progress=False)
    from_tiles = train_stage("A", cfg, splits, tmp_path / "tiles")
    from_pack = train_stage("A", cfg, [], tmp_path / "pack", latent_pack=pack)
    # same tiles, same draws: the first loss differs only by the quantisation of the latents
    assert _first_loss(tmp_path / "pack") == pytest.approx(_first_loss(tmp_path / "tiles"), rel=2e-2)
    metrics = json.loads((tmp_path / "pack" / "stage.json").read_text())["metrics"]
    assert metrics["tiles"] == 20 and metrics["latent_pack"]["sha256"] == file_sha256(pack)
    assert (from_pack / "unet.safetensors").is_file() and (from_tiles / "unet.safetensors").is_file()
    # a finished stage is reused for the same pack and retrained for another one
    stamp = (tmp_path / "pack" / "stage.json").stat().st_mtime_ns
    train_stage("A", cfg, [], tmp_path / "pack", latent_pack=pack)
    assert (tmp_path / "pack" / "stage.json").stat().st_mtime_ns == stamp
    other = write_latent_pack(splits[:1], tmp_path / "other.npz", preset="tiny")
    train_stage("A", cfg, [], tmp_path / "pack", latent_pack=other)
    assert json.loads((tmp_path / "pack" / "stage.json").read_text())["metrics"]["tiles"] == 12

    # stage B reads the domains from the pack and trains its tokens
    model_b = train_stage(
        "B",
        StageBConfig(steps=2, batch_size=4, progress=False, init_model=from_pack),
        [],
        tmp_path / "b",
        latent_pack=pack,
    )
    doc = json.loads((tmp_path / "b" / "stage.json").read_text())
    assert doc["metrics"]["token_embedding_change"] > 0
    assert json.loads((model_b / "ldm.json").read_text())["spec"]["tokens_trained"] is True


def test_pack_errors(splits, pack, tmp_path):
    with pytest.raises(InputError, match="latent pack not found"):
        train_stage("A", StageAConfig(steps=1, progress=False), [], tmp_path / "a", latent_pack=tmp_path / "no.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a pack")
    with pytest.raises(InputError, match="not a latent pack"):
        read_latent_pack(bad)
    with pytest.raises(InputError, match="stage 0"):
        train_stage("0", StageAConfig(steps=1, progress=False), splits, tmp_path / "s0", latent_pack=pack)
    # a pack of another autoencoder / latent shape is refused, naming both sides
    with pytest.raises(InputError, match="latent pack (holds latents|encoded with)"):
        train_stage("A", StageAConfig(preset="cpu", steps=1, progress=False), [], tmp_path / "c", latent_pack=pack)
    with pytest.raises(InputError, match="no training split"):
        train_stage("A", StageAConfig(steps=1, progress=False), [], tmp_path / "d")
