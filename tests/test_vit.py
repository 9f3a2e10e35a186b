import math

import pytest
import torch
import torch.nn.functional as F

import vit


def tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return vit.VisionTransformer(**args).eval()


def random_keep(N, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, L, generator=g).argsort(1)[:, :K]


def test_shapes_dense_and_sparse():
    m, x = tiny(), torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 1 + 16, 32)
    assert m(x, keep_idx=random_keep(3, 16, 5)).shape == (3, 1 + 5, 32)


def test_keeping_own_positions_changes_nothing():
    m, x = tiny(), torch.randn(4, 3, 32, 32)
    all_idx = torch.arange(16).expand(4, -1)
    torch.testing.assert_close(m(x, keep_idx=all_idx), m(x))
    torch.testing.assert_close(m(x, pos_idx=all_idx), m(x))
    keep = random_keep(4, 16, 6)
    torch.testing.assert_close(m(x, keep_idx=keep, pos_idx=keep), m(x, keep_idx=keep))


def test_sparse_tokens_are_the_gathered_patches_and_follow_their_positions():
    """Tokens in any order with their own positions give the same tokens (permuted) and class token:
    the encoder sees content + position, not the order of the sequence."""
    m, x = tiny(), torch.randn(2, 3, 32, 32)
    keep = random_keep(2, 16, 7)
    perm = torch.randperm(7)
    out, out_perm = m(x, keep_idx=keep), m(x, keep_idx=keep[:, perm])
    torch.testing.assert_close(out_perm[:, 0], out[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_perm[:, 1:], out[:, 1:][:, perm], rtol=1e-4, atol=1e-5)


def test_other_positions_change_the_output():
    m, x = tiny(), torch.randn(2, 3, 32, 32)
    keep = random_keep(2, 16, 6)
    pos = keep.clone()
    pos[0, 2] = (keep[0, 2] + 1) % 16  # one token of the first image gets another position
    out, out_wrong = m(x, keep_idx=keep), m(x, keep_idx=keep, pos_idx=pos)
    assert not torch.allclose(out[0, 3], out_wrong[0, 3], atol=1e-4)  # the token itself
    assert not torch.allclose(out[0, 0], out_wrong[0, 0], atol=1e-4)  # and, through attention, the class token
    torch.testing.assert_close(out[1], out_wrong[1])  # the other image is untouched


def test_batch_elements_are_independent():
    """Per-image keep/pos indices must be gathered per image (the official fork failed for batch > 1)."""
    m, x = tiny(), torch.randn(3, 3, 32, 32)
    keep = random_keep(3, 16, 5)
    pos = keep.flip(1)
    batched = m(x, keep_idx=keep, pos_idx=pos)
    for i in range(3):
        torch.testing.assert_close(batched[i], m(x[i:i + 1], keep_idx=keep[i:i + 1], pos_idx=pos[i:i + 1])[0],
                                   rtol=1e-4, atol=1e-5)


def test_attention_matches_naive_softmax_attention():
    attn = vit.Attention(32, 4)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)


def test_sincos_embedding_is_fixed_and_interpolates():
    m = tiny(pos_embed='sincos')
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], vit.sincos_pos_embed(32, 4, 4))
    rows = vit.sincos_pos_embed(32, 4, 4).view(4, 4, 32)
    assert torch.allclose(rows[0, 1, 16:], rows[0, 2, 16:])  # second half encodes the row only
    assert not torch.allclose(rows[0, 1, :16], rows[0, 2, :16])
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 32)  # smaller crops (DINO's local views)
    # a 2 x 2 crop spans the whole 4 x 4 grid (cell centres 0.5 and 2.5), not its top-left corner
    half = m.pos_embed_for(2, 2).view(2, 2, 32)
    assert abs(half[0, 0, 0].item() - math.sin(0.5)) < 1e-6 and abs(half[0, 1, 0].item() - math.sin(2.5)) < 1e-6  # channel 0: sin(x)
    assert not torch.allclose(half[1, 1], rows[1, 1])
    torch.testing.assert_close(m.pos_embed_for(4, 4), m.pos_embed[0])
    learned = tiny()
    assert learned.pos_embed_for(2, 2).shape == (4, 32)
    assert learned(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 32)


def test_drop_path_only_in_training():
    m, x = tiny(drop_path_rate=0.5), torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


def test_state_dict_round_trip_through_preset_args():
    args = vit.preset_args('vit_mini/4', depth=2)
    a = vit.VisionTransformer(**args).eval()
    b = vit.VisionTransformer(**args).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ValueError, match='unknown model'):
        vit.preset_args('vit_huge/3')


def test_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match='not divisible'):
        vit.VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match='not divisible'):
        tiny()(torch.randn(1, 3, 30, 30))


def timm_style_state_dict(model, prefix='module.'):
    """What timm / DINO files hold: pos_embed (1, 1 + L, D) with a slot for the class token, a head."""
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    D = model.embed_dim
    sd[prefix + 'pos_embed'] = torch.randn(1, 1 + model.grid ** 2, D)
    sd[prefix + 'cls_token'] = torch.randn(1, 1, D)
    sd[prefix + 'head.weight'], sd[prefix + 'head.bias'] = torch.randn(10, D), torch.randn(10)
    return sd


def test_loads_timm_named_state_dict_and_computes_timms_forward():
    source = tiny()
    sd = timm_style_state_dict(source)
    m = tiny()
    assert vit.load_pretrained(m, {'state_dict': sd}) == []
    # timm's forward: class token and patches both get their slot of pos_embed, then the blocks.
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.cat([sd['module.cls_token'].expand(2, -1, -1), source.patch_embed(x)], 1) + sd['module.pos_embed']
    for block in source.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(m(x), source.norm(tokens), rtol=1e-4, atol=1e-5)


def test_loading_interpolates_positions_to_another_grid():
    source = tiny(img_size=64)  # 8 x 8 grid
    m = tiny()  # 4 x 4 grid
    vit.load_pretrained(m, timm_style_state_dict(source, prefix='backbone.'))
    assert m.pos_embed.shape == (1, 16, 32)
    with pytest.raises(ValueError, match='does not know'):
        vit.load_pretrained(m, {'blocks.0.extra.weight': torch.zeros(1)})
