"""Cross-attention capture: a diffusers attention processor and the attention losses.

:class:`CaptureAttnProcessor` replaces the processor of every cross-attention layer
(``attn2``). It computes the attention probabilities with ``attn.get_attention_scores`` and,
for the chosen token positions of the conditional rows of the batch:

* in sampling, adds their head-averaged maps to a running sum at one fixed resolution
  (bilinear resize of the layers at other resolutions), so memory does not grow with the
  number of layers or steps; which layers count is set by ``sides`` (map side in latent cells);
* in training, keeps every layer's maps with their graph for :func:`object_loss` and
  :func:`background_loss`.

When a layer has nothing to capture it uses ``scaled_dot_product_attention`` like diffusers'
default processor. Self-attention layers keep their own processor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

EPS = 1e-8


class AttentionStore:
    """What the capture processors write to.

    Args:
        positions: ``(B, K)`` token index per conditional prompt and captured token (``-1``: absent).
        latent_hw: latent height and width of the current batch (to place maps in space).
        sides: map sides (in cells) to accumulate in sampling; ``None`` accumulates every layer.
        accumulate_side: side of the running sum; ``None`` uses the largest captured side.
        conditional_half: the batch is ``[unconditional; conditional]`` (classifier-free
            guidance) and only the second half is captured.
        keep_layer_maps: keep each layer's ``(B, K, h*w)`` maps with grad (training).
    """

    def __init__(
        self,
        positions: torch.Tensor,
        latent_hw: tuple[int, int],
        sides: set[int] | None = None,
        accumulate_side: int | None = None,
        conditional_half: bool = False,
        keep_layer_maps: bool = False,
    ) -> None:
        self.positions = positions.long()
        self.latent_hw = latent_hw
        self.sides = set(sides) if sides is not None else None
        self.accumulate_side = accumulate_side or (max(self.sides) if self.sides else max(latent_hw))
        self.conditional_half = conditional_half
        self.keep_layer_maps = keep_layer_maps
        self.running: torch.Tensor | None = None
        self.count = 0
        self.layer_maps: list[torch.Tensor] = []
        self.layer_sides: list[tuple[int, int]] = []
        self.active = True

    # ------------------------------------------------------------------ queries
    def map_shape(self, n_query: int) -> tuple[int, int]:
        """Height and width of a layer's map from its number of query positions."""
        h, w = self.latent_hw
        factor = math.sqrt(h * w / n_query)
        return max(1, round(h / factor)), max(1, round(w / factor))

    def wants(self, n_query: int) -> bool:
        """Whether a layer with ``n_query`` positions is captured."""
        if not self.active:
            return False
        if self.keep_layer_maps:
            return True
        mh, mw = self.map_shape(n_query)
        return self.sides is None or max(mh, mw) in self.sides

    def reset(self) -> None:
        """Forget everything captured (keep positions and settings)."""
        self.running = None
        self.count = 0
        self.layer_maps = []
        self.layer_sides = []

    # ------------------------------------------------------------------ recording
    def record(self, probs: torch.Tensor, heads: int) -> None:
        """Take ``(B*heads, Nq, Nk)`` attention probabilities of one cross-attention layer."""
        bh, n_query, n_key = probs.shape
        batch = bh // heads
        probs = probs.view(batch, heads, n_query, n_key)
        if self.conditional_half:
            probs = probs[batch // 2 :]
        pos = self.positions.to(probs.device)
        k = pos.shape[1]
        index = pos.clamp(min=0)[:, None, None, :].expand(probs.shape[0], heads, n_query, k)
        maps = probs.gather(3, index).mean(dim=1)  # (B, Nq, K)
        maps = maps * (pos >= 0)[:, None, :].to(maps.dtype)
        maps = maps.transpose(1, 2)  # (B, K, Nq)
        mh, mw = self.map_shape(n_query)
        if self.keep_layer_maps:
            self.layer_maps.append(maps.float())  # losses in fp32 even under fp16/bf16 autocast
            self.layer_sides.append((mh, mw))
            return
        with torch.no_grad():
            spatial = maps.reshape(maps.shape[0], k, mh, mw).float()
            side = self.accumulate_side
            target = (side, side) if mh == mw else (side * mh // max(mh, mw), side * mw // max(mh, mw))
            if (mh, mw) != target:
                spatial = F.interpolate(spatial, size=target, mode="bilinear", align_corners=False)
            if self.running is None:
                self.running = spatial.clone()
            else:
                self.running += spatial
            self.count += 1

    def mean_maps(self) -> torch.Tensor:
        """The accumulated maps ``(B, K, S, S)`` averaged over layers and steps (heads already averaged)."""
        if self.running is None or self.count == 0:
            raise RuntimeError("no cross-attention map was captured (no layer at the requested sides?)")
        return self.running / self.count


class CaptureAttnProcessor:
    """Attention processor that computes probabilities explicitly and records cross-attention maps."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        if is_cross and self.store.wants(query.shape[1]):
            probs = attn.get_attention_scores(query, key, attention_mask)
            self.store.record(probs, attn.heads)
            hidden_states = torch.bmm(probs, value)
        elif attention_mask is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        else:
            hidden_states = torch.bmm(attn.get_attention_scores(query, key, attention_mask), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def capturing(unet: torch.nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install :class:`CaptureAttnProcessor` on every cross-attention layer for the block."""
    original = dict(unet.attn_processors)
    processor = CaptureAttnProcessor(store)
    unet.set_attn_processor({n: processor if ".attn2." in n else p for n, p in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def cross_attention_sides(unet: torch.nn.Module, latent_side: int) -> list[int]:
    """Map sides of the UNet's cross-attention layers for a square latent (largest first)."""
    sides: list[int] = []
    n_down = len(unet.config.block_out_channels) - 1
    for level, block in enumerate(unet.config.down_block_types):
        if "CrossAttn" in block:
            sides.append(latent_side // 2**level)
    if "CrossAttn" in str(unet.config.mid_block_type):
        sides.append(latent_side // 2**n_down)
    return sorted(set(sides), reverse=True)


def default_capture_sides(unet: torch.nn.Module, latent_side: int) -> set[int]:
    """Sampling default: cross-attention layers whose maps are at least half the latent side."""
    return {s for s in cross_attention_sides(unet, latent_side) if 2 * s >= latent_side}


# ----------------------------------------------------------------------------- losses
def as_distribution(maps: torch.Tensor) -> torch.Tensor:
    """Normalise non-negative maps ``(..., N)`` to sum to one over the last axis."""
    maps = maps.clamp(min=0)
    return maps / (maps.sum(dim=-1, keepdim=True) + EPS)


def map_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ``0.5 * sum |p - q|`` per row of two distributions ``(B, N)``.

    0 when equal, 1 when disjoint, resolution-free: on the scale of the denoising loss (``N * ||p - q||^2``,
    used before, started at 10-20 and dwarfed it at weight 1).
    """
    return 0.5 * (pred - target).abs().sum(dim=-1)


def object_loss(v1_map: torch.Tensor, cars_map: torch.Tensor, detach_target: bool = True) -> torch.Tensor:
    """L_obj of one layer: the [V1] map should match the "cars" map (both as distributions); ``(B,)``."""
    target = cars_map.detach() if detach_target else cars_map
    return map_distance(as_distribution(v1_map), as_distribution(target))


def background_loss(bg_map: torch.Tensor, cars_map: torch.Tensor, detach_target: bool = True) -> torch.Tensor:
    """L_bg of one layer: the background-token map should match ``1 - cars`` (cars scaled to max 1); ``(B,)``."""
    cars = cars_map.detach() if detach_target else cars_map
    cars = cars.clamp(min=0)
    inverse = 1 - cars / (cars.amax(dim=-1, keepdim=True) + EPS)
    return map_distance(as_distribution(bg_map), as_distribution(inverse))


def attention_losses(
    store: AttentionStore, cars: int = 0, v1: int = 1, bg: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_obj and L_bg averaged over every recorded layer and over prompts that have all three tokens."""
    if not store.layer_maps:
        raise RuntimeError("no cross-attention maps were recorded")
    valid = (store.positions[:, [cars, v1, bg]] >= 0).all(dim=1)
    if not bool(valid.any()):
        zero = store.layer_maps[0].sum() * 0
        return zero, zero
    obj = torch.stack([object_loss(m[:, v1], m[:, cars])[valid].mean() for m in store.layer_maps]).mean()
    back = torch.stack([background_loss(m[:, bg], m[:, cars])[valid].mean() for m in store.layer_maps]).mean()
    return obj, back


# ----------------------------------------------------------------------------- box supervision
BOX_LOSS_FORMS = ("l1", "bce")


def pool_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Box masks ``(B, S, S)`` (fraction of each cell covered) brought to a layer's ``(h, w)``, flattened."""
    x = masks[:, None].float()
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, size)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.flatten(1)


def box_map_loss(token_map: torch.Tensor, target: torch.Tensor, form: str = "l1") -> torch.Tensor:
    """One token's maps ``(B, N)`` against box masks ``(B, N)`` in ``[0, 1]``; ``(B,)``.

    ``l1``: total-variation distance of the two normalised as distributions (where, not how much);
    ``bce``: per-pixel binary cross-entropy of the token's attention probability against the mask.
    """
    if form == "l1":
        return map_distance(as_distribution(token_map), as_distribution(target))
    if form == "bce":
        p = token_map.clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(p, target.clamp(0, 1), reduction="none").mean(dim=-1)
    raise ValueError(f"unknown box loss form {form!r} ({', '.join(BOX_LOSS_FORMS)})")


def empty_attention_loss(store: AttentionStore, cars: int = 0) -> torch.Tensor:
    """The "cars" attention of tiles flagged empty, pushed to zero: mean ``-log(1 - p)`` over layers and cells.

    Args:
        store: a training store (``keep_layer_maps=True``) of a pass with the vehicle prompt.
        cars: index of the "cars" token among the captured ones.
    """
    if not store.layer_maps:
        raise RuntimeError("no cross-attention maps were recorded")
    per_layer = []
    for maps in store.layer_maps:
        p = maps[:, cars].float().clamp(0, 1 - 1e-6)
        per_layer.append(-torch.log1p(-p).mean())
    return torch.stack(per_layer).mean()


def present_attention_loss(
    store: AttentionStore, valid: torch.Tensor, cars: int = 0, area_fraction: float = 1 / 64
) -> torch.Tensor:
    """Tiles flagged "vehicle" without boxes: the strongest "cars" attention pulled toward one.

    Multiple-instance style: per layer, ``-log`` of the mean of the top ``area_fraction`` of the cells
    (at least one; about a car's share of a 128 px tile), averaged over layers and valid rows.

    Args:
        store: a training store (``keep_layer_maps=True``).
        valid: ``(B,)`` rows that take part (flagged, unboxed, conditioning kept).
        cars: index of the "cars" token among the captured ones.
        area_fraction: share of the cells whose attention is pulled up.
    """
    if not store.layer_maps:
        raise RuntimeError("no cross-attention maps were recorded")
    if not bool(valid.any()):
        return store.layer_maps[0].sum() * 0
    per_layer = []
    for maps in store.layer_maps:
        p = maps[valid.to(maps.device), cars].float()
        k = max(1, int(round(p.shape[-1] * area_fraction)))
        top = p.topk(k, dim=-1).values.mean(dim=-1).clamp(1e-6, 1.0)
        per_layer.append(-torch.log(top).mean())
    return torch.stack(per_layer).mean()


def box_attention_loss(
    store: AttentionStore,
    masks: torch.Tensor,
    valid: torch.Tensor,
    form: str = "l1",
    learned_tokens: bool = False,
    cars: int = 0,
    v1: int = 1,
    bg: int = 2,
) -> torch.Tensor:
    """Box supervision of the cross-attention maps, averaged over every recorded layer and valid row.

    The "cars" map (and with ``learned_tokens`` the [V1] map) is pulled toward the tile's box mask at the
    layer's resolution, the background token toward its complement.

    Args:
        store: a training store (``keep_layer_maps=True``).
        masks: ``(B, S, S)`` fraction of each cell covered by a vehicle box.
        valid: ``(B,)`` rows that take part (labelled tiles with vehicles, conditioning kept).
        form: ``l1`` or ``bce`` (see :func:`box_map_loss`).
        learned_tokens: also supervise [V1] and the background token (stages B, C).
    """
    if not store.layer_maps:
        raise RuntimeError("no cross-attention maps were recorded")
    if not bool(valid.any()):
        return store.layer_maps[0].sum() * 0
    masks = masks.to(store.layer_maps[0].device)
    per_layer = []
    for maps, size in zip(store.layer_maps, store.layer_sides, strict=True):
        target = pool_masks(masks, size)[valid]
        m = maps[valid]
        terms = [box_map_loss(m[:, cars], target, form)]
        if learned_tokens:
            terms += [box_map_loss(m[:, v1], target, form), box_map_loss(m[:, bg], 1 - target, form)]
        per_layer.append(torch.stack(terms).mean(dim=0).mean())
    return torch.stack(per_layer).mean()
