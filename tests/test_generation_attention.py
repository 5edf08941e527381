"""Cross-attention capture and the attention losses."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from aerosynth.generation.attention import (
    AttentionStore,
    CaptureAttnProcessor,
    attention_losses,
    background_loss,
    capturing,
    default_capture_sides,
    object_loss,
)
from aerosynth.generation.models import build_ldm, token_positions

torch.set_num_threads(1)


def _planted_attention(side: int = 8, dim: int = 8):
    """An attention layer whose queries in a planted square attend to token 3 only."""
    attn = Attention(query_dim=dim, cross_attention_dim=dim, heads=2, dim_head=dim // 2, bias=False)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(dim))
        attn.to_k.weight.copy_(torch.eye(dim))
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[2:5, 3:7] = True
    hidden = torch.zeros(1, side * side, dim)
    hidden[0, mask.flatten()] = 6.0
    context = torch.zeros(1, 5, dim)
    context[0, 3] = 6.0
    return attn, hidden, context, mask


def test_planted_pattern_is_recovered_and_output_unchanged():
    attn, hidden, context, mask = _planted_attention()
    reference = AttnProcessor()(attn, hidden, context)
    store = AttentionStore(torch.tensor([[3, 1]]), (8, 8))
    out = CaptureAttnProcessor(store)(attn, hidden, context)
    assert torch.allclose(out, reference, atol=1e-6)
    maps = store.mean_maps()[0]
    assert maps.shape == (2, 8, 8)
    token3 = (maps[0] - maps[0].min()) / (maps[0].max() - maps[0].min())
    assert torch.equal(token3 > 0.5, mask)
    assert maps[1][mask].max() < maps[1][~mask].min()  # token 1 loses attention where token 3 wins


def test_conditional_half_only_and_absent_tokens_are_zero():
    attn, hidden, context, mask = _planted_attention()
    uncond_hidden = torch.zeros_like(hidden)
    batch_hidden = torch.cat([uncond_hidden, hidden])
    batch_context = torch.cat([torch.zeros_like(context), context])
    store = AttentionStore(torch.tensor([[3, -1]]), (8, 8), conditional_half=True)
    CaptureAttnProcessor(store)(attn, batch_hidden, batch_context)
    maps = store.mean_maps()
    assert maps.shape == (1, 2, 8, 8)
    assert torch.equal((maps[0, 0] > maps[0, 0].mean()), mask)
    assert float(maps[0, 1].abs().max()) == 0.0


def test_losses_zero_for_identical_maps_and_positive_otherwise():
    cars = torch.rand(3, 64)
    assert torch.allclose(object_loss(cars.clone() * 5, cars), torch.zeros(3), atol=1e-6)  # scale-free
    assert (object_loss(torch.rand(3, 64), cars) > 0).all()
    inverse = 1 - cars / cars.amax(dim=1, keepdim=True)
    assert torch.allclose(background_loss(inverse, cars), torch.zeros(3), atol=1e-6)
    assert (background_loss(cars, cars) > 0).all()
    v1 = torch.rand(3, 64, requires_grad=True)
    object_loss(v1, cars).sum().backward()
    assert v1.grad is not None and v1.grad.abs().sum() > 0


def test_unet_capture_keeps_outputs_and_memory_fixed():
    ldm = build_ldm("tiny")
    prompt = ldm.prompt("kit_munich_aerial", True, True)
    ids = ldm.token_ids([prompt] * 2)
    pos = token_positions(ids, [ldm.token_id("cars"), ldm.token_id("[v1]"), ldm.token_id("<bg-kit_munich_aerial>")])
    context = ldm.encode_text(ids).detach()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        reference = ldm.unet(x, t, context).sample
        sides = default_capture_sides(ldm.unet, 8)
        assert sides == {8, 4}
        store = AttentionStore(pos, (8, 8), sides)
        with capturing(ldm.unet, store):
            out = ldm.unet(x, t, context).sample
            first = store.running.clone()
            for _ in range(3):
                ldm.unet(x, t, context)
    assert torch.allclose(out, reference, atol=1e-5)
    assert store.running.shape == first.shape == (2, 3, 8, 8)  # fixed size however many steps
    assert store.count == 4 * 4  # 4 cross-attention layers (8x8 down, 4x4 mid, 2 x 8x8 up) x 4 calls
    assert torch.allclose(store.mean_maps(), first / 4, atol=1e-6)
    assert all(
        ".attn2." not in n or type(p).__name__ != "CaptureAttnProcessor" for n, p in ldm.unet.attn_processors.items()
    )


def test_training_capture_keeps_graph_for_losses():
    ldm = build_ldm("tiny")
    ids = ldm.token_ids([ldm.prompt("madison_drone", True, True)])
    pos = token_positions(ids, [ldm.token_id("cars"), ldm.token_id("[v1]"), ldm.token_id("<bg-madison_drone>")])
    store = AttentionStore(pos, (8, 8), keep_layer_maps=True)
    with capturing(ldm.unet, store):
        ldm.unet(torch.randn(1, 4, 8, 8), torch.tensor([100]), ldm.encode_text(ids).detach())
    assert len(store.layer_maps) == 4 and store.running is None
    l_obj, l_bg = attention_losses(store)
    (l_obj + l_bg).backward()
    grads = [p.grad for n, p in ldm.unet.named_parameters() if "attn2.to_k" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
