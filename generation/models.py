"""The latent diffusion model: UNet, CLIP text encoder, offline tokenizer and an autoencoder.

Everything is built from explicit configs in code (presets ``tiny``, ``cpu`` and the
SD-1.x-sized ``sd15`` for GPUs) or loaded from a
local Stable Diffusion v1.x folder; nothing is downloaded.

Autoencoders (:class:`Codec`): the pretrained TAEF2 (a folder with ``taef2_*.pth``), an
``AutoencoderKL`` from config (random until stage 0 trains it; a stage-0 output folder loads it
trained) or the pretrained SD VAE. Images enter codecs in ``[-1, 1]``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from aerosynth.data.atomic import atomic_output_path, atomic_write_json
from aerosynth.data.errors import InputError
from aerosynth.generation import taef2
from aerosynth.generation.vocab import (
    DEFAULT_DOMAINS,
    VEHICLE_TOKEN,
    background_token,
    build_tokenizer,
    domain_words,
    learned_tokens,
)

LDM_FILE = "ldm.json"
AUTOENCODER_FILE = "autoencoder.json"


# ----------------------------------------------------------------------------- specs
@dataclass
class LDMSpec:
    """Everything needed to rebuild a model's architecture.

    Attributes:
        preset: preset name (``tiny``, ``cpu``) or ``pretrained``.
        image_size: side of the square images in pixels.
        unet: ``UNet2DConditionModel`` config (``in_channels`` is set from the autoencoder).
        text: ``CLIPTextConfig`` fields (vocabulary size and length are set from the tokenizer).
        max_length: padded prompt length in tokens.
        autoencoder_kl: ``AutoencoderKL`` config used when no autoencoder folder is given.
        domains: domain names known to the tokenizer (one background token each).
        capture_sides: sides of the cross-attention maps that sampling captures; ``None`` means
            every layer whose map side is at least half the latent side (documented default).
        seed: seed of the random initialisation.
        pretrained_dir: the Stable Diffusion folder for ``preset == "pretrained"``.
        tokens_trained: the learned tokens were trained (stage B), so prompts use them by default.
        prediction_type: what the UNet predicts, ``epsilon`` (the noise) or ``v_prediction``
            (``sqrt(a) eps - sqrt(1 - a) x0``, which stays well scaled at high noise).
        zero_terminal_snr: the noise schedule is rescaled so its last step is pure noise, as sampling
            starts (needs ``v_prediction``; inference uses trailing timestep spacing).
    """

    preset: str
    image_size: int
    unet: dict
    text: dict
    max_length: int
    autoencoder_kl: dict
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))
    capture_sides: list[int] | None = None
    seed: int = 0
    pretrained_dir: str | None = None
    tokens_trained: bool = False
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False


#: What a UNet may predict (diffusers' names).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _unet_config(sample: int, blocks: Sequence[int], attn_levels: int, heads: int, cross_dim: int, groups: int) -> dict:
    n = len(blocks)
    down = ["CrossAttnDownBlock2D"] * attn_levels + ["DownBlock2D"] * (n - attn_levels)
    return {
        "sample_size": sample,
        "block_out_channels": list(blocks),
        "layers_per_block": 1,
        "down_block_types": down,
        "up_block_types": ["UpBlock2D" if b == "DownBlock2D" else "CrossAttnUpBlock2D" for b in reversed(down)],
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,  # diffusers' legacy name for the number of heads
        "norm_num_groups": groups,
    }


def _kl_config(blocks: Sequence[int], latent_channels: int, groups: int, sample: int) -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "block_out_channels": list(blocks),
        "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
        "layers_per_block": 1,
        "norm_num_groups": groups,
        "sample_size": sample,
    }


PRESETS: dict[str, LDMSpec] = {
    # tests: 32 px images, 8x8 latents, cross-attention at 8x8 (and 4x4 in the middle block)
    "tiny": LDMSpec(
        preset="tiny",
        image_size=32,
        unet=_unet_config(8, (32, 64), 1, 2, 32, 8),
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        max_length=24,
        autoencoder_kl=_kl_config((16, 32, 32), 4, 8, 32),
    ),
    # real data on 2 cores: 128 px tiles, 16x16 latents, ~13 M parameter UNet
    "cpu": LDMSpec(
        preset="cpu",
        image_size=128,
        unet=_unet_config(16, (64, 128, 256), 2, 8, 256, 32),
        text={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
        max_length=32,
        autoencoder_kl=_kl_config((32, 64, 128, 128), 4, 16, 128),
    ),
    # Stable Diffusion 1.x architecture from config, random weights (GPU benchmarks; benchmarks/gpu_check.py):
    # 512 px, 64x64x4 latents, ~860 M parameter UNet, 768-wide 12-layer CLIP text encoder (offline vocabulary).
    # To fine-tune real Stable Diffusion weights use StageConfig.pretrained_dir instead.
    "sd15": LDMSpec(
        preset="sd15",
        image_size=512,
        unet={
            **_unet_config(64, (320, 640, 1280, 1280), 3, 8, 768, 32),
            "layers_per_block": 2,
        },
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        max_length=77,
        autoencoder_kl={**_kl_config((128, 256, 512, 512), 4, 32, 512), "layers_per_block": 2},
    ),
}


# ----------------------------------------------------------------------------- autoencoders
class Codec:
    """An autoencoder seen by the diffusion model: images ``[-1, 1]`` <-> scaled latents."""

    kind: str = "?"

    def __init__(self, module: torch.nn.Module, factor: int, latent_channels: int, scaling: float) -> None:
        self.module = module
        self.factor = factor
        self.latent_channels = latent_channels
        self.scaling = scaling

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TAEF2Codec(Codec):
    """The pretrained TAEF2 (its latents have a standard deviation of about 0.8 on aerial tiles)."""

    kind = "taef2"

    def __init__(self, weights_dir: Path) -> None:
        super().__init__(taef2.TAEF2.from_dir(weights_dir), taef2.FACTOR, taef2.LATENT_CHANNELS, 1.2)
        self.weights_dir = Path(weights_dir)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.encode((images + 1) / 2) * self.scaling

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents / self.scaling) * 2 - 1


class KLCodec(Codec):
    """A diffusers ``AutoencoderKL`` (from config, trained by stage 0, or Stable Diffusion's)."""

    kind = "kl"

    def __init__(self, vae: AutoencoderKL, scaling: float | None = None) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        scale = float(scaling if scaling is not None else vae.config.scaling_factor)
        super().__init__(vae, factor, vae.config.latent_channels, scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.encode(images).latent_dist.mode() * self.scaling

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents / self.scaling).sample.clamp(-1, 1)


def save_kl_autoencoder(codec: KLCodec, out_dir: Path, metrics: dict | None = None) -> Path:
    """Write a trained ``AutoencoderKL`` (config, weights, latent scaling) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output_path(out_dir / "autoencoder.safetensors", ".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in codec.module.state_dict().items()}, str(tmp))
    config = dict(codec.module.config)
    if "_use_default_values" in config:  # a set in diffusers: sorted, so that the same model gives the same bytes
        config["_use_default_values"] = sorted(config["_use_default_values"])
    doc = {"kind": "kl", "config": config, "scaling": codec.scaling, "metrics": metrics or {}}
    atomic_write_json(out_dir / AUTOENCODER_FILE, doc)
    return out_dir


def load_codec(autoencoder_dir: str | Path | None, kl_config: dict) -> Codec:
    """The codec of a folder: TAEF2 weights, a stage-0 output, or a fresh ``AutoencoderKL`` when ``None``.

    Raises:
        InputError: the folder holds neither TAEF2 weights nor a stage-0 autoencoder.
    """
    if autoencoder_dir is None:
        return KLCodec(AutoencoderKL(**kl_config), scaling=1.0)
    path = Path(autoencoder_dir)
    if (path / taef2.ENCODER_FILE).is_file() or (path / taef2.DECODER_FILE).is_file():
        return TAEF2Codec(path)
    doc_path = path / AUTOENCODER_FILE
    if not doc_path.is_file():
        raise InputError(path, f"not an autoencoder folder (no {taef2.ENCODER_FILE} nor {AUTOENCODER_FILE})")
    try:
        doc = json.loads(doc_path.read_text())
        config = {k: v for k, v in doc["config"].items() if not k.startswith("_")}
        vae = AutoencoderKL(**config)
        vae.load_state_dict(load_file(str(path / "autoencoder.safetensors")))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise InputError(path, f"unreadable stage-0 autoencoder ({type(exc).__name__})") from None
    return KLCodec(vae.eval().requires_grad_(False), scaling=float(doc["scaling"]))


# ----------------------------------------------------------------------------- the model
@dataclass
class LDM:
    """A latent diffusion model and what it needs to turn prompts into images.

    Attributes:
        spec: the architecture.
        unet: the noise predictor.
        text_encoder: frozen CLIP text model (only learned token rows train).
        tokenizer: its tokenizer (learned tokens are added tokens).
        codec: the autoencoder.
        autoencoder_dir: where the codec came from (``None`` for a fresh ``AutoencoderKL``).
    """

    spec: LDMSpec
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    codec: Codec
    autoencoder_dir: str | None = None

    @property
    def latent_side(self) -> int:
        return self.spec.image_size // self.codec.factor

    @property
    def domains(self) -> list[str]:
        return list(self.spec.domains)

    def check_domain(self, domain: str) -> None:
        """Raise :class:`InputError` for a domain without a background token in this model."""
        if domain not in self.spec.domains:
            raise InputError("domain", f"unknown domain {domain!r}; this model knows {sorted(self.spec.domains)}")

    def check_image_size(self, size: int) -> None:
        """Raise :class:`InputError` unless ``size`` is a positive multiple of the autoencoder factor."""
        if size <= 0 or size % self.codec.factor:
            raise InputError("image_size", f"{size} is not a multiple of the autoencoder factor {self.codec.factor}")

    def prompt(self, domain: str, with_vehicles: bool, learned: bool) -> str:
        """The training/sampling prompt.

        ``an aerial view image with [V1] cars in <bg-D> D words`` with learned tokens,
        ``an aerial view image with cars in D words`` without; the empty variants drop
        ``with ... cars``.
        """
        self.check_domain(domain)
        where = " ".join(domain_words(domain))
        if learned:
            where = f"{background_token(domain)} {where}"
        cars = f" with {VEHICLE_TOKEN} cars" if learned else " with cars"
        return f"an aerial view image{cars if with_vehicles else ''} in {where}"

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Padded token ids ``(B, max_length)``."""
        enc = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.spec.max_length, truncation=True, return_tensors="pt"
        )
        return enc.input_ids

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(B, L, D)`` for token ids (moved to the text encoder's device)."""
        return self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))[0]

    @property
    def device(self) -> torch.device:
        """The device of the UNet's weights (every component is kept on the same one)."""
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> LDM:
        """Move UNet, text encoder and autoencoder to ``device`` in place (no-op when already there)."""
        device = torch.device(device)
        for module in (self.unet, self.text_encoder, self.codec.module):
            module.to(device)
        return self

    def token_id(self, token: str) -> int:
        """Vocabulary id of a whole word or learned token.

        Raises:
            InputError: the tokenizer splits it or does not know it.
        """
        ids = self.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise InputError("token", f"{token!r} is not a single token of this model's vocabulary")
        return int(ids[0])

    def learned_token_ids(self) -> list[int]:
        """Ids of [V1] and the background tokens."""
        return [self.token_id(t) for t in learned_tokens(self.spec.domains)]

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "autoencoder": self.codec.module}


def token_positions(ids: torch.Tensor, token_ids: Sequence[int | None]) -> torch.Tensor:
    """Index of each token in each prompt, ``(B, K)``; ``-1`` where a prompt lacks it."""
    out = torch.full((ids.shape[0], len(token_ids)), -1, dtype=torch.long)
    for k, tid in enumerate(token_ids):
        if tid is None:
            continue
        hit = ids == tid
        found = hit.any(dim=1)
        out[found, k] = hit.float().argmax(dim=1)[found]
    return out


def _init_learned_embeddings(ldm: LDM) -> None:
    """Start [V1] from "cars" and each background token from "background" plus its domain words."""
    emb = ldm.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[ldm.token_id(VEHICLE_TOKEN)] = emb[ldm.token_id("cars")]
        for domain in ldm.spec.domains:
            rows = [ldm.token_id("background")]
            rows += [i for w in domain_words(domain) for i in ldm.tokenizer(w, add_special_tokens=False).input_ids]
            emb[ldm.token_id(background_token(domain))] = emb[rows].mean(dim=0)


def resolve_spec(preset: str | LDMSpec, domains: Sequence[str] | None = None) -> LDMSpec:
    """A copy of a preset (by name) or of a given spec, with the domain list set."""
    if isinstance(preset, LDMSpec):
        spec = copy.deepcopy(preset)
    elif preset in PRESETS:
        spec = copy.deepcopy(PRESETS[preset])
    else:
        raise InputError("preset", f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if domains is not None:
        if not domains:
            raise InputError("domains", "at least one domain is needed")
        spec = replace(spec, domains=sorted(set(domains)))
    return spec


def build_ldm(
    preset: str | LDMSpec = "tiny",
    autoencoder_dir: str | Path | None = None,
    domains: Sequence[str] | None = None,
) -> LDM:
    """Build a model from a preset or spec (random weights, seeded by ``spec.seed``).

    Args:
        preset: ``"tiny"``, ``"cpu"``, an :class:`LDMSpec`, or a Stable Diffusion folder via
            :func:`load_pretrained_sd` (``spec.preset == "pretrained"``).
        autoencoder_dir: a TAEF2 weights folder or a stage-0 output; ``None`` gives an
            ``AutoencoderKL`` from the spec's config (train it with stage 0).
        domains: domains the tokenizer knows (default: the spec's).
    """
    spec = resolve_spec(preset, domains)
    if spec.preset == "pretrained":
        return load_pretrained_sd(spec.pretrained_dir or "", spec.domains, spec.image_size, autoencoder_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        codec = load_codec(autoencoder_dir, spec.autoencoder_kl)
        if spec.image_size % codec.factor:
            raise InputError(
                "image_size", f"{spec.image_size} is not a multiple of the autoencoder factor {codec.factor}"
            )
        tokenizer = build_tokenizer(spec.domains, spec.max_length)
        text_cfg = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=spec.max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=spec.text["hidden_size"],
            **spec.text,
        )
        text_encoder = CLIPTextModel(text_cfg)
        unet_cfg = dict(spec.unet)
        unet_cfg.update(
            sample_size=spec.image_size // codec.factor,
            in_channels=codec.latent_channels,
            out_channels=codec.latent_channels,
            cross_attention_dim=spec.text["hidden_size"],
        )
        unet = UNet2DConditionModel(**unet_cfg)
    text_encoder.requires_grad_(False).eval()
    codec.module.requires_grad_(False).eval()
    ldm = LDM(spec, unet, text_encoder, tokenizer, codec, str(autoencoder_dir) if autoencoder_dir else None)
    _init_learned_embeddings(ldm)
    return ldm


# ----------------------------------------------------------------------------- Stable Diffusion
_SD_PARTS = {
    "unet": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "vae": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "text_encoder": (["config.json"], ["model.safetensors", "pytorch_model.bin"]),
    "tokenizer": ([], ["vocab.json", "tokenizer.json"]),
    "scheduler": (["scheduler_config.json"], []),
}


def check_sd_folder(path: str | Path) -> Path:
    """Raise :class:`InputError` naming the first missing part of a Stable Diffusion v1.x folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "Stable Diffusion folder not found")
    for part, (required, any_of) in _SD_PARTS.items():
        for name in required:
            if not (path / part / name).is_file():
                raise InputError(path / part / name, f"Stable Diffusion folder is incomplete: {part}/{name} missing")
        if any_of and not any((path / part / n).is_file() for n in any_of):
            raise InputError(
                path / part, f"Stable Diffusion folder is incomplete: {part}/ has none of {', '.join(any_of)}"
            )
    return path


def load_pretrained_sd(
    path: str | Path,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    image_size: int = 512,
    autoencoder_dir: str | Path | None = None,
) -> LDM:
    """Load a local Stable Diffusion v1.x folder (``local_files_only``) and add the learned tokens.

    Raises:
        InputError: the folder lacks a part (named in the message).
    """
    path = check_sd_folder(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        codec = (
            load_codec(autoencoder_dir, {})
            if autoencoder_dir
            else KLCodec(AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True))
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"unreadable Stable Diffusion folder ({str(exc).splitlines()[0][:160]})") from None
    tokenizer.add_tokens(learned_tokens(domains))
    text_encoder.resize_token_embeddings(len(tokenizer))
    text_encoder.requires_grad_(False).eval()
    codec.module.requires_grad_(False).eval()
    spec = LDMSpec(
        preset="pretrained",
        image_size=image_size,
        unet=dict(unet.config),
        text=dict(text_encoder.config.to_dict()),
        max_length=int(tokenizer.model_max_length),
        autoencoder_kl={},
        domains=sorted(set(domains)),
        pretrained_dir=str(path),
    )
    ldm = LDM(spec, unet, text_encoder, tokenizer, codec, str(autoencoder_dir) if autoencoder_dir else None)
    _init_learned_embeddings(ldm)
    return ldm


# ----------------------------------------------------------------------------- save / load
def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_ldm(ldm: LDM, out_dir: str | Path, unet_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model folder: ``ldm.json``, ``unet.safetensors``, ``text_encoder.safetensors`` (+ autoencoder).

    Args:
        ldm: the model.
        out_dir: the folder (created).
        unet_state: UNet weights to write instead of ``ldm.unet``'s (EMA or merged LoRA).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = unet_state if unet_state is not None else ldm.unet.state_dict()
    for name, sd in (("unet", state), ("text_encoder", ldm.text_encoder.state_dict())):
        with atomic_output_path(out_dir / f"{name}.safetensors", ".safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
    ae_dir = ldm.autoencoder_dir
    if ldm.codec.kind == "kl" and ldm.spec.preset != "pretrained" and ae_dir is None:
        save_kl_autoencoder(ldm.codec, out_dir / "autoencoder")  # type: ignore[arg-type]
        ae_dir = "autoencoder"
    elif ae_dir is not None and Path(ae_dir) != out_dir / "autoencoder":
        ae_dir = str(Path(ae_dir).resolve())  # an outside folder: absolute, so the model loads from anywhere
    doc = {"spec": _json_safe(asdict(ldm.spec)), "autoencoder_dir": ae_dir, "format": 1}
    atomic_write_json(out_dir / LDM_FILE, doc)
    return out_dir


def check_ldm_folder(model_dir: str | Path) -> Path:
    """Check, without building the model, that a path is a model folder written by :func:`save_ldm`.

    Args:
        model_dir: the folder given as a latent diffusion model (e.g. ``ldm/stageC/model``).

    Returns:
        The folder, unchanged.

    Raises:
        InputError: not a folder, no readable ``ldm.json`` with a spec, or a weights file missing.
    """
    model_dir = Path(model_dir)
    expected = f"not a model folder (no {LDM_FILE}; an LDM is a folder such as a run's ldm/stageC/model)"
    if not model_dir.exists():
        raise InputError(model_dir, f"not found; {expected}")
    if not model_dir.is_dir() or not (model_dir / LDM_FILE).is_file():
        raise InputError(model_dir, expected)
    try:
        doc = json.loads((model_dir / LDM_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(model_dir / LDM_FILE, f"malformed model description ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise InputError(model_dir / LDM_FILE, "malformed model description (no spec)")
    for name in ("unet", "text_encoder"):
        if not (model_dir / f"{name}.safetensors").is_file():
            raise InputError(model_dir / f"{name}.safetensors", "weights file missing from the model folder")
    return model_dir


def load_ldm(model_dir: str | Path) -> LDM:
    """Load a folder written by :func:`save_ldm` (a stage output's ``model/``).

    Raises:
        InputError: missing or unreadable files.
    """
    model_dir = Path(model_dir)
    doc_path = model_dir / LDM_FILE
    if not doc_path.is_file():
        raise InputError(model_dir, f"not a model folder (no {LDM_FILE})")
    try:
        doc = json.loads(doc_path.read_text())
        spec = LDMSpec(**doc["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(doc_path, f"malformed model description ({exc})") from None
    ae_dir = doc.get("autoencoder_dir")
    if ae_dir is not None and not Path(ae_dir).is_absolute():
        ae_dir = str(model_dir / ae_dir)
    ldm = build_ldm(spec, autoencoder_dir=ae_dir)
    for name, module in (("unet", ldm.unet), ("text_encoder", ldm.text_encoder)):
        path = model_dir / f"{name}.safetensors"
        try:
            module.load_state_dict(load_file(str(path)))
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(path, f"unreadable or mismatched weights ({type(exc).__name__})") from None
    if doc.get("autoencoder_dir") == "autoencoder":
        ldm.autoencoder_dir = None
    return ldm


# ----------------------------------------------------------------------------- noise schedule
#: Stable Diffusion v1's training noise schedule, used by the presets.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def noise_schedule(ldm: LDM) -> dict:
    """The model's training noise schedule (the SD folder's own for a pretrained model)."""
    if ldm.spec.preset == "pretrained" and ldm.spec.pretrained_dir:
        path = Path(ldm.spec.pretrained_dir) / "scheduler" / "scheduler_config.json"
        try:
            doc = json.loads(path.read_text())
            return {k: doc[k] for k in NOISE_SCHEDULE if k in doc} | {"steps_offset": doc.get("steps_offset", 1)}
        except (OSError, ValueError):
            raise InputError(path, "unreadable scheduler config") from None
    out = dict(NOISE_SCHEDULE, prediction_type=ldm.spec.prediction_type)
    if ldm.spec.zero_terminal_snr:
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out


def check_prediction(prediction_type: str, zero_terminal_snr: bool) -> None:
    """Refuse an unknown prediction type, or a zero-terminal-SNR schedule with noise prediction.

    Raises:
        InputError: either.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise InputError("prediction_type", f"unknown {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    if zero_terminal_snr and prediction_type == "epsilon":
        raise InputError("zero_terminal_snr", "a pure-noise last step has no noise to predict: use v_prediction")
