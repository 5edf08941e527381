"""Device choice of the generation stage: parsing, clear errors, CPU bytes unchanged, CUDA runs (gpu marker)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.generation.device import check_mixed_precision, resolve_device
from aerosynth.generation.models import load_ldm
from aerosynth.generation.sampling import SCHEDULERS, SamplingConfig, TranslationConfig, generate_set, translate_split
from aerosynth.generation.train_cli import load_stage_config
from aerosynth.generation.train_cli import main as train_cli_main
from aerosynth.generation.training import (
    Stage0Config,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    train_stage,
)
from tests.test_generation_helpers import make_training_splits

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA GPU: torch.cuda.is_available() is False (run benchmarks/gpu_check.sh on a GPU box)"
)
DOMAIN_T = "kit_munich_aerial"
FAST = SamplingConfig(steps=3, batch_size=2, shard_size=3, use_learned_tokens=True, progress=False)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiles")
    return make_training_splits(root)


@pytest.fixture(scope="module")
def model(splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("A")
    return train_stage("A", StageAConfig(steps=3, batch_size=2, progress=False), splits, out)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts and "cache" not in p.parts
    }


def _interrupt_at(step_to_stop: int):
    def on_step(step: int, losses: dict) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


# ----------------------------------------------------------------------------- parsing and errors
def test_device_strings_are_parsed(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(" CPU ") == resolve_device(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("0") == torch.device("cuda", 0) == resolve_device(0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) == resolve_device("1")
    with pytest.raises(InputError, match=r"^StageConfig.device: .*CUDA device 3 does not exist \(2 visible\)"):
        resolve_device("cuda:3", "StageConfig.device")
    for bad in ("tpu", "cuda:x", "-1", "gpu0", ""):
        with pytest.raises(InputError, match="^SamplingConfig.device: unknown device"):
            resolve_device(bad, "SamplingConfig.device")


def test_cuda_without_cuda_is_an_input_error_naming_the_field(no_cuda, splits, model, tmp_path):
    with pytest.raises(InputError, match=r"^StageConfig.device: .*torch.cuda.is_available\(\) is False"):
        resolve_device("0", "StageConfig.device")
    out = tmp_path / "never"
    with pytest.raises(InputError, match=r"^StageAConfig.device: device '0' asks for CUDA"):
        train_stage("A", StageAConfig(steps=2, batch_size=2, device="0", progress=False), splits, out)
    assert not out.exists()  # refused before any work
    with pytest.raises(InputError, match=r"^Stage0Config.device: device 'cuda'"):
        train_stage("0", Stage0Config(steps=2, device="cuda", progress=False), splits, out)
    with pytest.raises(InputError, match=r"^SamplingConfig.device: device 'cuda:0'"):
        generate_set(
            model, tmp_path / "s", "target_cars", "kit_munich_aerial", 2, config=replace(FAST, device="cuda:0")
        )
    with pytest.raises(InputError, match=r"^TranslationConfig.device"):
        translate_split(model, splits[0], tmp_path / "t", "kit_munich_aerial", config=TranslationConfig(device="0"))
    assert not (tmp_path / "s").exists()


def test_mixed_precision_is_refused_on_cpu(splits, model, tmp_path):
    """The documented rule: anything but "no" with a CPU device is an InputError (never silently ignored)."""
    assert check_mixed_precision("no", torch.device("cpu")) == "no"
    for value in ("fp16", "bf16", "FP16"):
        with pytest.raises(InputError, match="runs on CUDA only"):
            check_mixed_precision(value, torch.device("cpu"))
    with pytest.raises(InputError, match="unknown mixed precision 'fp8'"):
        check_mixed_precision("fp8", torch.device("cpu"))
    with pytest.raises(InputError, match=r"^StageBConfig.mixed_precision: fp16 autocast runs on CUDA only"):
        train_stage("B", StageBConfig(steps=2, init_model=model, mixed_precision="fp16"), splits, tmp_path / "b")
    with pytest.raises(InputError, match=r"^SamplingConfig.mixed_precision: bf16"):
        generate_set(
            model, tmp_path / "s", "target_cars", "kit_munich_aerial", 2, config=replace(FAST, mixed_precision="bf16")
        )


def test_device_and_precision_stay_out_of_the_fingerprint():
    base = StageAConfig(steps=3)
    moved = StageAConfig(steps=3, device="cuda:1", mixed_precision="bf16")
    assert base.fingerprint() == moved.fingerprint()
    assert "device" not in base.fingerprint() and "mixed_precision" not in base.fingerprint()


# ----------------------------------------------------------------------------- the CPU path is unchanged
def test_explicit_cpu_gives_the_default_bytes(splits, tmp_path):
    cfg = StageAConfig(steps=3, batch_size=2, grad_accum=2, ema_decay=0.8, progress=False)
    default = train_stage("A", cfg, splits, tmp_path / "default").parent
    explicit = train_stage("A", replace(cfg, device="cpu", mixed_precision="no"), splits, tmp_path / "cpu").parent
    assert _files(default) == _files(explicit)
    assert "runtime" not in json.loads((explicit / "stage.json").read_text())  # stage.json as before
    a = generate_set(default / "model", tmp_path / "a", "target_cars", "kit_munich_aerial", 3, 5, config=FAST)
    b = generate_set(
        default / "model", tmp_path / "b", "target_cars", "kit_munich_aerial", 3, 5, config=replace(FAST, device="cpu")
    )
    assert _files(a) == _files(b)
    header = json.loads((b / "synthetic.json").read_text())
    assert "device" not in json.dumps(header) and "mixed_precision" not in header["sampling"]


def test_checkpoint_resumes_with_an_explicit_device(model, splits, tmp_path):
    cfg = StageCConfig(steps=4, batch_size=2, ema_decay=0.9, lora_rank=2, init_model=model, progress=False)
    straight = train_stage("C", cfg, splits, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_stage("C", cfg, splits, tmp_path / "resumed", on_step=_interrupt_at(2))
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2 and state["scaler"] is None and state["world_size"] == 1
    # the device is not in the fingerprint: a run interrupted with the default resumes with device="cpu"
    resumed = train_stage("C", replace(cfg, device="cpu"), splits, tmp_path / "resumed")
    assert _files(straight.parent) == _files(resumed.parent)


# ----------------------------------------------------------------------------- entry points
def test_train_cli_reads_a_config_and_refuses_unknown_fields(splits, tmp_path, capsys):
    conf = tmp_path / "stage.yaml"
    conf.write_text("steps: 2\nbatch_size: 2\nprogress: false\ndevice: cpu\nmixed_precision: 'no'\n")
    cfg = load_stage_config("a", conf)
    assert isinstance(cfg, StageAConfig) and cfg.steps == 2 and cfg.device == "cpu"
    assert load_stage_config("B", conf, {"init_model": "m"}).init_model == Path("m")
    args = ["--stage", "A", "--config", str(conf), "--out", str(tmp_path / "out")]
    args += [a for s in splits for a in ("--split", str(s))]
    assert train_cli_main(args) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "out" / "model"
    assert load_ldm(tmp_path / "out" / "model").spec.preset == "tiny"
    conf.write_text("steps: 2\ndevise: cuda\n")
    assert train_cli_main(args) == 2
    assert "unknown field(s) devise for StageAConfig" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown training stage"):
        load_stage_config("D", None)


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parses_arguments_and_dry_runs_on_cpu(tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check_module()
    args = gpu_check.parse_args([])
    assert (args.train_steps, args.warmup, args.batch, args.sample_steps, args.precision) == (20, 3, 4, 20, "fp16")
    assert args.preset == "sd15" and not args.dry_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "never.json")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "never.json").exists()
    out = tmp_path / "dry.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["model"]["preset"] == "tiny"
    assert doc["training"]["timed_steps"] == 2 and doc["training"]["s_per_it"] > 0
    sampling = doc["sampling"]
    assert sampling["capture_on"]["images_per_s"] > 0 and sampling["capture_off"]["images_per_s"] > 0
    assert sampling["capture_overhead_ratio"] > 0 and doc["generate_set"]["images"] >= 1


# ----------------------------------------------------------------------------- CUDA (gpu marker)
@gpu
@needs_cuda
def test_training_stages_on_cuda(splits, model, tmp_path):
    # stage A in fp32 and fp16; a checkpoint written on the CPU resumes on CUDA
    a = train_stage("A", StageAConfig(steps=3, batch_size=2, device="cuda", progress=False), splits, tmp_path / "a")
    assert json.loads((a.parent / "stage.json").read_text())["runtime"]["device"] == "cuda"
    half = StageAConfig(steps=3, batch_size=2, device="0", mixed_precision="fp16", ema_decay=0.9, progress=False)
    train_stage("A", half, splits, tmp_path / "a16")
    rows = list(csv.DictReader((tmp_path / "a16" / "losses.csv").read_text().splitlines()))
    assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) for r in rows)
    cfg = StageAConfig(steps=4, batch_size=2, ema_decay=0.9, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_stage("A", cfg, splits, tmp_path / "moved", on_step=_interrupt_at(2))
    moved = train_stage("A", replace(cfg, device="cuda"), splits, tmp_path / "moved")
    cpu_model = load_ldm(moved)  # written on CUDA, loaded on the CPU
    assert next(cpu_model.unet.parameters()).device.type == "cpu"
    assert len(list(csv.DictReader((tmp_path / "moved" / "losses.csv").read_text().splitlines()))) == 4
    # stage B (attention losses under bf16 autocast, token rows trained) and C (LoRA + EMA) on CUDA
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    b_cfg = StageBConfig(steps=2, batch_size=2, init_model=model, device="cuda", mixed_precision=precision)
    b = train_stage("B", replace(b_cfg, progress=False), splits, tmp_path / "b")
    rows = list(csv.DictReader((tmp_path / "b" / "losses.csv").read_text().splitlines()))
    assert all(float(r["loss_obj"]) > 0 and np.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["metrics"]["token_embedding_change"] > 0
    c_cfg = StageCConfig(steps=2, batch_size=2, init_model=b, lora_rank=2, ema_decay=0.9, device="cuda", progress=False)
    load_ldm(train_stage("C", c_cfg, splits, tmp_path / "c"))
    s0 = train_stage("0", Stage0Config(steps=2, batch_size=2, device="cuda", progress=False), splits, tmp_path / "s0")
    assert (s0 / "autoencoder.safetensors").is_file()


@gpu
@needs_cuda
def test_sampling_on_cuda(model, splits, tmp_path):
    cuda = replace(FAST, device="cuda", save_raw_maps=True)
    a = generate_set(model, tmp_path / "a", "target_cars", "kit_munich_aerial", 3, base_seed=7, config=cuda)
    cpu = generate_set(model, tmp_path / "cpu", "target_cars", "kit_munich_aerial", 3, base_seed=7, config=FAST)
    for i in range(3):
        img, heat = read_rgb(a / "images" / f"{i:06d}.png"), read_rgb(a / "heatmaps" / f"{i:06d}.png")
        assert img.shape == heat.shape == (32, 32, 3)
        assert heat[..., 0].min() == 0 and heat[..., 0].max() == 255
        # same seeds, same model: CUDA and CPU differ only by floating-point arithmetic
        ref = read_rgb(cpu / "images" / f"{i:06d}.png")
        assert np.abs(img.astype(int) - ref.astype(int)).mean() < 4.0
    # image i depends on base_seed + i only (not on its batch), up to GPU kernel choice
    c = generate_set(model, tmp_path / "c", "target_cars", "kit_munich_aerial", 1, base_seed=9, config=cuda)
    two, zero = read_rgb(a / "images" / "000002.png"), read_rgb(c / "images" / "000000.png")
    assert np.abs(two.astype(int) - zero.astype(int)).mean() < 2.0
    for name in SCHEDULERS:
        for precision in ("no", "fp16"):
            cfg = replace(cuda, steps=4, scheduler=name, mixed_precision=precision, save_raw_maps=False)
            s = generate_set(
                model, tmp_path / f"{name}-{precision}", "target_empty", "kit_munich_aerial", 2, config=cfg
            )
            assert len(list((s / "images").iterdir())) == 2
    header = json.loads((tmp_path / "ddim-fp16" / "synthetic.json").read_text())
    assert header["sampling"]["mixed_precision"] == "fp16"
    tr = TranslationConfig(steps=4, batch_size=4, shard_size=8, keep_threshold=0.0, device="cuda", progress=False)
    out = translate_split(model, splits[0], tmp_path / "tr", "kit_munich_aerial", config=tr)
    assert (out / "labels" / "000000.txt").read_text() == (splits[0] / "labels" / "t000.txt").read_text()
