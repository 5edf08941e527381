"""Model construction: presets, offline tokenizer, TAEF2, Stable Diffusion folder checks, save/load."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.generation.models import (
    build_ldm,
    check_sd_folder,
    load_ldm,
    load_pretrained_sd,
    save_ldm,
    token_positions,
)
from aerosynth.generation.taef2 import TAEF2
from aerosynth.generation.training import psnr
from aerosynth.generation.vocab import VEHICLE_TOKEN, background_token, build_tokenizer

torch.set_num_threads(1)


def test_tokenizer_is_deterministic_and_keeps_learned_tokens_whole():
    a, b = (
        build_tokenizer(["kit_munich_aerial", "madison_drone"]),
        build_tokenizer(["madison_drone", "kit_munich_aerial"]),
    )
    text = (
        f"an aerial view image with {VEHICLE_TOKEN} cars in {background_token('kit_munich_aerial')} kit munich aerial"
    )
    assert a(text).input_ids == b(text).input_ids
    tokens = a.convert_ids_to_tokens(a(text).input_ids)
    assert tokens[6] == VEHICLE_TOKEN and tokens[7] == "cars</w>" and tokens[9] == "<bg-kit_munich_aerial>"
    # unknown words fall back to letters instead of an unknown token
    assert a.unk_token_id not in a("zebra crossing", add_special_tokens=False).input_ids


def test_tiny_model_prompts_and_token_positions():
    ldm = build_ldm("tiny")
    prompt = ldm.prompt("kit_munich_aerial", True, True)
    assert prompt == "an aerial view image with [v1] cars in <bg-kit_munich_aerial> kit munich aerial"
    assert ldm.prompt("madison_drone", False, False) == "an aerial view image in madison drone"
    ids = ldm.token_ids([prompt, ldm.prompt("kit_munich_aerial", False, False)])
    pos = token_positions(ids, [ldm.token_id("cars"), ldm.token_id(VEHICLE_TOKEN)])
    assert pos.tolist() == [[7, 6], [-1, -1]]
    emb = ldm.encode_text(ids)
    assert emb.shape == (2, ldm.spec.max_length, ldm.unet.config.cross_attention_dim)
    with pytest.raises(InputError, match="unknown domain"):
        ldm.prompt("mars_rover", True, True)
    with pytest.raises(InputError, match="single token"):
        ldm.token_id("<bg-mars_rover>")
    with pytest.raises(InputError, match="unknown model preset"):
        build_ldm("huge")


def test_same_seed_builds_same_weights_and_save_load_roundtrip(tmp_path):
    a, b = build_ldm("tiny"), build_ldm("tiny")
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        assert torch.equal(pa, pb)
    save_ldm(a, tmp_path / "m")
    c = load_ldm(tmp_path / "m")
    for pa, pc in zip(a.unet.state_dict().values(), c.unet.state_dict().values(), strict=True):
        assert torch.equal(pa, pc)
    assert torch.equal(a.codec.module.encoder.conv_in.weight, c.codec.module.encoder.conv_in.weight)
    with pytest.raises(InputError, match="not a model folder"):
        load_ldm(tmp_path / "nothing")


def test_cpu_preset_size_is_in_range():
    ldm = build_ldm("cpu")
    n = sum(p.numel() for p in ldm.unet.parameters())
    assert 10e6 <= n <= 20e6
    assert ldm.latent_side == 16


def test_incomplete_stable_diffusion_folder_names_the_missing_part(tmp_path):
    sd = tmp_path / "sd15"
    for part, name in [("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json")]:
        (sd / part).mkdir(parents=True)
        (sd / part / name).write_text("{}")
    with pytest.raises(InputError, match="unet/ has none of diffusion_pytorch_model"):
        check_sd_folder(sd)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (sd / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (sd / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="tokenizer/ has none of vocab.json"):
        load_pretrained_sd(sd)
    with pytest.raises(InputError, match="not found"):
        load_pretrained_sd(tmp_path / "absent")


def test_local_stable_diffusion_folder_loads_offline(tmp_path):
    from diffusers import DDIMScheduler

    from aerosynth.generation.models import NOISE_SCHEDULE

    tiny = build_ldm("tiny")
    sd = tmp_path / "sd"
    tiny.unet.save_pretrained(sd / "unet")
    tiny.codec.module.save_pretrained(sd / "vae")
    tiny.text_encoder.save_pretrained(sd / "text_encoder")
    tiny.tokenizer.save_pretrained(sd / "tokenizer")
    DDIMScheduler(**NOISE_SCHEDULE).save_pretrained(sd / "scheduler")
    ldm = load_pretrained_sd(sd, image_size=32)
    assert ldm.spec.preset == "pretrained" and ldm.codec.factor == 4
    for a, b in zip(tiny.unet.state_dict().values(), ldm.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompt = ldm.prompt("kit_munich_aerial", True, True)
    assert ldm.tokenizer.convert_ids_to_tokens(ldm.token_ids([prompt])[0])[6] == VEHICLE_TOKEN
    save_ldm(ldm, tmp_path / "m")
    again = load_ldm(tmp_path / "m")
    assert again.spec.pretrained_dir == str(sd)


def test_taef2_reconstructs_a_real_tile_near_30_db(taef2_dir, aerial_root):
    model = TAEF2.from_dir(taef2_dir)
    path = sorted(glob.glob(str(aerial_root / "kit_munich_aerial" / "images" / "*")))[0]
    rgb = read_rgb(path)[:128, :128]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    ldm = build_ldm("cpu", autoencoder_dir=taef2_dir)
    with torch.no_grad():
        z = ldm.codec.encode(x)
        y = ldm.codec.decode(z)
    assert z.shape == (1, 32, 16, 16)
    assert psnr(y, x) >= 28.0
    assert isinstance(ldm.codec.module, TAEF2) and model.factor == 8


def test_taef2_bad_folder(tmp_path):
    with pytest.raises(InputError, match="TAEF2 weight file not found"):
        TAEF2.from_dir(tmp_path)
    (tmp_path / "taef2_encoder.pth").write_bytes(b"garbage")
    (tmp_path / "taef2_decoder.pth").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a TAEF2 state dict"):
        TAEF2.from_dir(tmp_path)
    with pytest.raises(InputError, match="not an autoencoder folder"):
        build_ldm("tiny", autoencoder_dir=Path(tmp_path) / "sub")


def test_image_size_must_fit_the_autoencoder():
    ldm = build_ldm("tiny")
    ldm.check_image_size(32)
    with pytest.raises(InputError, match="multiple of the autoencoder factor"):
        ldm.check_image_size(30)
    assert np.isfinite(ldm.codec.scaling)
