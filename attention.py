"""
Attention maps of a ViT, as DINO shows them: for a few validation images, how much the class token
attends to each patch in the last block, one map per head and their mean, written as one PNG (PIL,
no plotting library). Any ViT: a checkpoint of dilemma.py, or timm / DINO / MoCo v3 weights.

    python attention.py out/dino/ckpt.pt                                   # -> out/dino/attention.png
    python attention.py dino_deitsmall16_pretrain.pth --data folder --data-path DIR --out attention.png
    python attention.py mocov3_vit_small.pth.tar --num-heads 12 --data folder --data-path DIR
    python attention.py --random-init --out attention_random.png           # an untrained vit_mini/4

Each map is the softmax row of the class token's query over the patch tokens' keys (its weight on
itself left out, as DINO's figures do), scaled to its own minimum and maximum (dark: least, bright:
most). The last line printed is one JSON object.
"""
import argparse
import json
import os
import sys

import torch
from PIL import Image, ImageDraw

import data
import eval_linear
import vit


@torch.no_grad()
def class_token_attention(model, images):
    """(N, C, H, W) images -> (N, heads, 1 + L): the last block's attention weights of the class token
    (query) over every token (keys: the class token, then the L patches, row-major). They are not
    returned by the fused attention kernel, so they are recomputed from the input of the last
    attention layer, caught by a hook on the same forward pass."""
    attn = model.blocks[-1].attn
    caught = []
    hook = attn.register_forward_pre_hook(lambda module, inputs: caught.append(inputs[0]))
    try:
        model(images)
    finally:
        hook.remove()
    x = caught[-1]  # (N, T, D): the normalised tokens entering the last attention
    N, T, D = x.shape
    q, k, _ = attn.qkv(x).view(N, T, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    scores = q[:, :, :1] @ k.transpose(-2, -1) * (D // attn.num_heads) ** -0.5  # (N, heads, 1, T)
    return scores.float().softmax(-1)[:, :, 0]


# Anchors of a perceptually ordered dark-to-bright colour map (black, purple, red, orange, pale yellow).
COLOURS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32)


def colourise(values):
    """(h, w) values in [0, 1] -> (h, w, 3) uint8, linear between the anchors of COLOURS."""
    pos = values.clamp(0, 1) * (len(COLOURS) - 1)
    lo = pos.floor().long().clamp(max=len(COLOURS) - 2)
    t = (pos - lo)[..., None]
    return ((1 - t) * COLOURS[lo] + t * COLOURS[lo + 1]).round().byte()


def save_figure(images, attention, grid, path, title):
    """images (N, 3, H, W) normalised, attention (N, heads, 1 + L) -> a PNG: one row per image, the
    image, then each head's map over the patch grid (grid_h, grid_w), then their mean."""
    N, heads, _ = attention.shape
    maps = attention[:, :, 1:].reshape(N, heads, *grid)
    maps = torch.cat([maps, maps.mean(1, keepdim=True)], 1)  # the mean of the heads' maps, last
    lo, hi = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    H = images.shape[2]
    scale = max(1, 96 // H)  # 32 px images are drawn at 96 px, so single patches are visible
    cell, pad, top = H * scale, 6, 40
    pixels = (eval_linear.to_pixels(images.float().cpu()).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    fig = Image.new('RGB', ((heads + 2) * (cell + pad) + pad, top + N * (cell + pad)), 'white')
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 4), title, fill='black')
    for j, name in enumerate(['input'] + [f'head {h + 1}' for h in range(heads)] + ['mean']):
        draw.text((pad + j * (cell + pad), 22), name, fill='black')
    for i in range(N):
        y0 = top + i * (cell + pad)
        fig.paste(Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST), (pad, y0))
        for j in range(heads + 1):  # nearest: one flat square per patch, what the model attends to
            heat = Image.fromarray(colourise(maps[i, j]).numpy()).resize((cell, cell), Image.NEAREST)
            fig.paste(heat, (pad + (j + 1) * (cell + pad), y0))
    fig.save(path)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('ckpt', nargs='?', help='ckpt.pt of dilemma.py, or timm / DINO / MoCo v3 ViT weights')
    p.add_argument('--random-init', action='store_true', help='an untrained ViT (--model, --pos-embed)')
    p.add_argument('--model', default='vit_mini/4', help=f'ViT preset for --random-init: {", ".join(vit.PRESETS)}')
    p.add_argument('--pos-embed', choices=('learned', 'sincos'), default='sincos', help='positional embedding for --random-init')
    p.add_argument('--num-heads', type=int, default=None, help='heads of a ViT from published weights (not stored in them; default embed_dim / 64)')
    p.add_argument('--data', default=None, help=f'one of {", ".join(data.DATASETS)} (default: the checkpoint\'s, else shapes)')
    p.add_argument('--data-path', default=None, help='dataset folder (ImageFolder tree with val/ for --data folder)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10')
    p.add_argument('--img-size', type=int, default=None, help='default: the model\'s (positional embeddings are interpolated to another size)')
    p.add_argument('--images', type=int, default=6, help='the first N validation images')
    p.add_argument('--out', default=None, help='PNG to write (default: attention.png beside the checkpoint, or in the current folder)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.error = lambda msg: die(msg)
    return p.parse_args(argv)


def die(msg):
    print(f'attention.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = get_args(argv)
    if args.random_init == bool(args.ckpt):
        die('give either a checkpoint path or --random-init')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        die('--device cuda but no CUDA device is available (use --device cpu)')
    if args.images < 1:
        die(f'--images must be at least 1, got {args.images}')
    train_args = {}
    if args.ckpt:
        backbone, ckpt = eval_linear.load_checkpoint(args.ckpt, args.num_heads)
        if ckpt['backbone_kind'] != 'vit':
            die(f"{args.ckpt} holds a {ckpt['backbone_kind']}, not a ViT: attention maps need a ViT")
        backbone_args, train_args, step = ckpt['backbone_args'], ckpt.get('args', {}), ckpt.get('step')
        source = f'{args.ckpt} ({step})' if isinstance(step, str) else f'{args.ckpt} (step {step})'
    elif args.model not in vit.PRESETS:
        die(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
    else:
        backbone_args, source = vit.preset_args(args.model, pos_embed=args.pos_embed), f'{args.model} random init'
        backbone = vit.VisionTransformer(**backbone_args)
    args.data = args.data or train_args.get('data', 'shapes')
    if args.data_path is None and args.data == train_args.get('data'):
        args.data_path = train_args.get('data_path')
    img_size = args.img_size or backbone_args['img_size']
    if img_size % backbone_args['patch_size']:
        die(f"image size {img_size} is not divisible by the patch size {backbone_args['patch_size']}")
    val_set = data.build_dataset(args.data, args.data_path, 'val', data.eval_transform(img_size), args.download)
    if val_set is None:
        die(f'{args.data} at {args.data_path} has no val/ folder')
    n = min(args.images, len(val_set))
    images = torch.stack([val_set[i][0] for i in range(n)]).to(args.device)
    backbone.to(args.device).eval()
    attention = class_token_attention(backbone, images).cpu()
    grid = (img_size // backbone_args['patch_size'],) * 2
    out = args.out or os.path.join(os.path.dirname(args.ckpt) if args.ckpt else '.', 'attention.png')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    save_figure(images, attention, grid, out, f'{source}: class-token attention, last block, {args.data} val')
    # How peaked each head is: the share of its attention on its top 10% of patches (0.1 = uniform).
    patches = attention[:, :, 1:] / attention[:, :, 1:].sum(-1, keepdim=True)
    top = patches.topk(max(1, patches.shape[-1] // 10), dim=-1).values.sum(-1).mean(0)
    print(f'wrote {out}: {n} images x {attention.shape[1]} heads + mean, {grid[0]} x {grid[1]} patches, from {source}')
    print(json.dumps({'out': out, 'images': n, 'heads': attention.shape[1], 'grid': list(grid),
                      'top10_share_per_head': [round(v, 4) for v in top.tolist()], 'source': source}))


if __name__ == '__main__':
    try:
        main()
    except data.DataError as e:
        die(data.error_line(e))
