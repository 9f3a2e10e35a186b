"""
A Vision Transformer that can run on a subset of its patch tokens and be told, per token, which
position's embedding to add. Both DILEMMA (sparse inputs with some positions deliberately wrong) and
MAE (visible tokens only) need exactly that, so it lives here, once:

    tokens = model(images, keep_idx=keep_idx, pos_idx=pos_idx)   # (N, 1 + K, D), class token first

Parameter names follow timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj,
blocks.0.attn.qkv, ...) so that `load_pretrained` can read timm / DINO / MoCo v3 checkpoints.
One difference: our pos_embed has no slot for the class token (the class token carries no position);
the loader folds that slot into cls_token.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> constructor arguments. "/16" presets are for 224 px images, "/4" for 32 px (CIFAR, shapes).
PRESETS = {
    'vit_tiny/16': dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small/16': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base/16': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_tiny/4': dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    'vit_small/4': dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6),
    'vit_mini/4': dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),  # CPU runs
    'vit_micro/4': dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2),  # tests, smoke runs
}


def preset_args(name, **overrides):
    """Constructor arguments of a preset (what a checkpoint stores as `backbone_args`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(PRESETS)})")
    return {**PRESETS[name], **overrides}


def sincos_pos_embed(dim, grid_h, grid_w, span=None):
    """Fixed 2-D sine-cosine embedding (MoCo v3 / MAE): half the channels encode the row, half the
    column, each with sin and cos at geometric frequencies. Returns (grid_h * grid_w, dim).
    Coordinates are 0, 1, ..., grid - 1; with `span` (the model's own grid) a grid of another size is
    spread over the same range (cell centres), as DINO interpolates learned embeddings for its crops."""
    assert dim % 4 == 0, 'sin-cos positional embedding needs a width divisible by 4'
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = [torch.arange(g, dtype=torch.float64) if span is None else (torch.arange(g, dtype=torch.float64) + 0.5) * span / g - 0.5
              for g in (grid_h, grid_w)]
    ys, xs = torch.meshgrid(*coords, indexing='ij')
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """(N, C, H, W) -> (N, L, D) with L = (H / p) * (W / p), row-major."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernel (flash / memory-efficient) where available
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop a residual branch for whole samples, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path_rate=0.0, pos_embed='learned'):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not divisible by the patch size {patch_size}')
        if pos_embed not in ('learned', 'sincos'):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', not '{pos_embed}'")
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # One embedding per patch location, none for the class token: (1, L, D).
        if pos_embed == 'sincos':
            self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid, self.grid)[None],
                                          requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2, embed_dim) * 0.02)
        self.sincos = pos_embed == 'sincos'
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks are dropped more often
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.proj.weight.data  # as in MAE / MoCo v3: the patch projection is a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid_h, grid_w):
        """Positional embeddings for a grid_h x grid_w patch grid: (L, D). Other grids than the one the
        model was built for (DINO's small crops, other resolutions) are interpolated (learned) or
        recomputed (sin-cos)."""
        if grid_h == grid_w == self.grid:
            return self.pos_embed[0]
        if self.sincos:
            return sincos_pos_embed(self.embed_dim, grid_h, grid_w, span=self.grid).to(self.pos_embed)
        grid = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode='bicubic', align_corners=False)
        return grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, x, keep_idx=None, pos_idx=None):
        """
        x:        (N, C, H, W) images.
        keep_idx: (N, K) indices in [0, L) of the patch tokens that enter the encoder (None = all L).
        pos_idx:  (N, K) index of the position whose embedding each kept token receives
                  (None = its own, i.e. keep_idx).
        returns   (N, 1 + K, D) final-normalised tokens, class token first.
        """
        N, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f'input {H}x{W} is not divisible by the patch size {self.patch_size}')
        pos = self.pos_embed_for(H // self.patch_size, W // self.patch_size)  # (L, D)
        tokens = self.patch_embed(x)  # (N, L, D)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        if pos_idx is None:
            pos_idx = keep_idx
        # The patch content is always the true patch; only the added embedding may come from elsewhere.
        tokens = tokens + (pos[None] if pos_idx is None else pos[pos_idx])
        x = torch.cat([self.cls_token.expand(N, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def vit(name, **overrides):
    return VisionTransformer(**preset_args(name, **overrides))


def strip_keys(state_dict):
    """The backbone's weights of a timm / DINO / MoCo v3 file under our names: unnested, wrapper
    prefixes (module., backbone., base_encoder., encoder.) stripped, heads and decoders dropped."""
    for key in ('state_dict', 'model', 'teacher', 'backbone'):  # checkpoint files nest the weights
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    prefixes = ('module.', 'backbone.', 'base_encoder.', 'encoder.')
    out = {}
    for k, v in state_dict.items():
        if k.startswith('module.momentum_encoder') or k.startswith('momentum_encoder'):
            continue  # MoCo v3 files hold both encoders; the base encoder is the one evaluated
        while k.startswith(prefixes):
            k = k.split('.', 1)[1]
        if k.startswith(('head', 'fc.', 'fc_norm', 'decoder', 'mask_token')):
            continue  # classifier heads, MAE's decoder: not part of the backbone
        out[k] = v
    return out


def infer_args(state_dict, num_heads=None):
    """Constructor arguments of the ViT a timm / DINO / MoCo v3 state dict was saved from. The number
    of heads is not in the weights: `num_heads`, else embed_dim / 64 (DeiT, DINO, timm; MoCo v3's
    ViT-S has 12, not 6)."""
    sd = strip_keys(state_dict)
    if 'patch_embed.proj.weight' not in sd or 'blocks.0.mlp.fc1.weight' not in sd:
        raise ValueError('not the state dict of a ViT (no patch_embed.proj.weight / blocks.0.mlp.fc1.weight)')
    D, _, P, _ = sd['patch_embed.proj.weight'].shape
    L = sd['pos_embed'].shape[1]
    grid = math.isqrt(L - 1) if math.isqrt(L - 1) ** 2 == L - 1 and math.isqrt(L) ** 2 != L else math.isqrt(L)
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    return dict(img_size=grid * P, patch_size=P, embed_dim=D, depth=depth, num_heads=num_heads or max(1, D // 64),
                mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D, pos_embed='learned')


def convert_state_dict(state_dict, model):
    """Map a timm / DINO / MoCo v3 ViT state dict onto our names and shapes.

    Strips wrapper prefixes and heads (strip_keys), folds the class token's positional embedding (timm
    keeps pos_embed as (1, 1 + L, D)) into cls_token, and interpolates the patch embeddings to this
    model's grid."""
    out = strip_keys(state_dict)
    pos = out.get('pos_embed')
    if pos is not None:
        L_ckpt = pos.shape[1]
        if math.isqrt(L_ckpt - 1) ** 2 == L_ckpt - 1 and math.isqrt(L_ckpt) ** 2 != L_ckpt:
            out['cls_token'] = out['cls_token'] + pos[:, :1]  # the class token's position, folded in
            pos = pos[:, 1:]
        g = math.isqrt(pos.shape[1])
        if g != model.grid:
            grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(model.grid, model.grid), mode='bicubic', align_corners=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, model.grid ** 2, -1)
        out['pos_embed'] = pos
    return out


def load_pretrained(model, state_dict):
    """Load a timm / DINO / MoCo v3 / our own ViT state dict into `model`. Returns the keys of the
    model that the file did not provide (empty when everything was found)."""
    missing, unexpected = model.load_state_dict(convert_state_dict(state_dict, model), strict=False)
    if unexpected:
        raise ValueError(f'state dict has keys this ViT does not know: {unexpected[:5]}')
    return missing
