"""
Fine-tune a pretrained backbone end to end on a labelled dataset and report its top-1: the MAE / DeiT
fine-tuning recipe, scaled down. It is how MAE users judge a backbone, and what DILEMMA reports for MAE.

    python finetune.py out/dino/ckpt.pt                 # on the data the checkpoint was trained on
    python finetune.py --random-init                    # the floor: the same ViT (vit_mini/4) from scratch, same recipe
    torchrun --nproc_per_node=2 finetune.py out/mae/ckpt.pt            # DDP: gloo on CPU, nccl on GPU
    python finetune.py dino_deitsmall16_pretrain.pth --data folder --data-path DIR   # timm / DINO / MoCo v3 weights

The recipe (MAE's ViT fine-tuning; every value a flag): AdamW, lr = --lr x batch / 256, linear
warm-up then cosine to --min-lr; layer-wise lr decay (the head and final norm get the lr, block i of
depth d gets lr x decay^(d - i), the patch embedding, class token and positions lr x decay^(d + 1));
stochastic depth (--drop-path); label smoothing; RandAugment (torchvision, 2 ops of magnitude 9) after
a random resized crop and a flip; random erasing; mixup / cutmix optional (MAE uses 0.8 / 1.0; off by
default here: on a run of a few epochs they slow learning more than they regularise). No weight decay
on biases, norms, the class token and positional embeddings. Classifier: a linear layer on the class
token (--pool cls, as DeiT and DINO) or on the mean patch token (--pool avg, as MAE), after the
backbone's final norm. RF-ResNet checkpoints fine-tune too (their pooled features; no layer decay and
no drop path). Defaults for <= 64 px images are sized for a CPU run [ours]; the paper-scale values are
in the README. The top-1 is that of the last epoch (no choice of the best epoch on the val set). The
last line printed is one JSON object. Nothing is saved: this is an evaluation.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

import data
import eval_linear
import vit

# ----------------------------------------------------------------------------------------------
# Model and optimiser


class Classifier(nn.Module):
    """Backbone + linear head: images (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, backbone, kind, num_classes, pool='cls'):
        super().__init__()
        self.backbone, self.kind, self.pool = backbone, kind, pool
        dim = backbone.embed_dim if kind == 'vit' else backbone.out_dim
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: the head starts near zero
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(eval_linear.features(self.backbone, self.kind, x, self.pool))


def layer_id(name, depth):
    """Depth of a ViT parameter for layer-wise lr decay: 0 for the patch embedding, class token and
    positions, i + 1 for block i, depth + 1 for the final norm and the head."""
    name = name.removeprefix('backbone.')
    if name.startswith(('patch_embed', 'cls_token', 'pos_embed')):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups: one per (layer, decayed or not), each with 'lr_scale' = layer_decay^(depth + 1 -
    layer) (1 for every parameter of a non-ViT). No weight decay on biases, norms, the class token and
    positional embeddings. Frozen parameters (sin-cos positions) are left out."""
    depth = len(model.backbone.blocks) if model.kind == 'vit' else 0
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(('cls_token', 'pos_embed'))
        layer = layer_id(name, depth) if model.kind == 'vit' else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if model.kind == 'vit' else 1.0
            groups[key] = {'params': [], 'weight_decay': 0.0 if no_decay else weight_decay, 'lr_scale': scale}
        groups[key]['params'].append(param)
    return list(groups.values())


def lr_at(step, total, warmup, peak, end):
    """Linear warm-up to `peak`, then cosine to `end`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------
# Data: augmentation, mixup / cutmix, soft-target loss

def train_transform(size, crop_min, randaug_ops, randaug_magnitude, erase_prob):
    """DeiT / MAE's training augmentation: random resized crop, flip, RandAugment, random erasing."""
    ops = [T.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip()]
    if randaug_ops > 0:
        ops.append(T.RandAugment(randaug_ops, randaug_magnitude))
    ops += [T.ToTensor(), T.Normalize(data.MEAN, data.STD)]
    if erase_prob > 0:
        ops.append(T.RandomErasing(erase_prob, value=0))  # 0: the mean colour after normalisation
    return T.Compose(ops)


def soft_targets(y, num_classes, smoothing):
    """(N,) labels -> (N, num_classes) smoothed one-hot targets."""
    return F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def mix(x, targets, mixup_alpha, cutmix_alpha):
    """Mixup or cutmix (half the batches each when both are on) of a batch with itself reversed, one
    lambda ~ Beta(alpha, alpha) per batch, as timm does for DeiT / MAE. Cutmix pastes a box of area
    (1 - lambda) and corrects lambda to the box's real area once clipped to the image. Returns the
    mixed images and targets (N, num_classes)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    if use_cutmix:
        H, W = x.shape[2:]
        h, w = round(H * math.sqrt(1 - lam)), round(W * math.sqrt(1 - lam))
        cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h - h // 2, H), max(cx - w // 2, 0), min(cx + w - w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * targets + (1 - lam) * targets.flip(0)


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 and top-5 (%) on an evaluation loader, summed over all processes."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for images, y in loader:
        images, y = images.to(device, non_blocking=True), y.to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        counts += torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(len(y), device=device)]).float()
    if data.dist_info()[1] > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# ----------------------------------------------------------------------------------------------
# Command line

SMALL = dict(epochs=2, batch_size=128, lr=1e-3, warmup_epochs=0.2, crop_min=0.4)  # <= 64 px, a CPU run [ours]
LARGE = dict(epochs=100, batch_size=1024, lr=5e-4, warmup_epochs=5, crop_min=0.08)  # MAE's ViT-B fine-tuning


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('ckpt', nargs='?', help='ckpt.pt of dilemma.py / co_byol.py, or timm / DINO / MoCo v3 ViT weights')
    p.add_argument('--random-init', action='store_true', help='fine-tune an untrained backbone (the floor)')
    p.add_argument('--model', default='vit_mini/4', help=f'ViT preset for --random-init: {", ".join(vit.PRESETS)}')
    p.add_argument('--pos-embed', choices=('learned', 'sincos'), default='sincos', help='positional embedding for --random-init')
    p.add_argument('--num-heads', type=int, default=None, help='heads of a ViT from published weights (default embed_dim / 64)')
    p.add_argument('--data', default=None, help=f'one of {", ".join(data.DATASETS)} (default: the checkpoint\'s, else shapes)')
    p.add_argument('--data-path', default=None, help='dataset folder (ImageFolder tree with train/ and val/ for --data folder)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10')
    p.add_argument('--img-size', type=int, default=None, help='default: the checkpoint\'s, else what the data suggests')
    p.add_argument('--pool', choices=('cls', 'avg'), default='cls', help='ViT feature for the head: class token or mean patch token')
    p.add_argument('--epochs', type=float, default=None, help=f'default {SMALL["epochs"]} at <= 64 px, else {LARGE["epochs"]}')
    p.add_argument('--batch-size', type=int, default=None, help=f'global; default {SMALL["batch_size"]} at <= 64 px, else {LARGE["batch_size"]}')
    p.add_argument('--lr', type=float, default=None, help=f'base lr, x batch / 256; default {SMALL["lr"]} at <= 64 px, else {LARGE["lr"]} (MAE)')
    p.add_argument('--min-lr', type=float, default=1e-6)
    p.add_argument('--warmup-epochs', type=float, default=None, help=f'default {SMALL["warmup_epochs"]} at <= 64 px, else {LARGE["warmup_epochs"]}')
    p.add_argument('--layer-decay', type=float, default=0.65, help='layer-wise lr decay (MAE ViT-B: 0.65, ViT-L: 0.75; 1 = none)')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate of the last block (ViTs)')
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--mixup', type=float, default=0.0, help='mixup Beta alpha (MAE: 0.8; 0 = off)')
    p.add_argument('--cutmix', type=float, default=0.0, help='cutmix Beta alpha (MAE: 1.0; 0 = off)')
    p.add_argument('--randaug-ops', type=int, default=2, help='RandAugment operations per image (0 = off)')
    p.add_argument('--randaug-magnitude', type=int, default=9)
    p.add_argument('--erase-prob', type=float, default=0.25, help='random erasing probability')
    p.add_argument('--crop-min', type=float, default=None, help=f'random resized crop scale; default {SMALL["crop_min"]} at <= 64 px, else {LARGE["crop_min"]}')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=data.DTYPES, default='auto', help='autocast (GradScaler for fp16); auto: bf16 on Ampere+ GPUs and on CPUs with native bf16, fp16 on older GPUs, else fp32')
    p.add_argument('--seed', type=int, default=0)
    p.error = lambda msg: die(msg)
    return p.parse_args(argv)


def die(msg):
    print(f'finetune.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def build(args):
    """The backbone to fine-tune (from the checkpoint, or untrained) with drop path set. Returns
    (backbone, kind, backbone_args, training args of the checkpoint, where it came from)."""
    if args.random_init == bool(args.ckpt):
        die('give either a checkpoint path or --random-init')
    if args.ckpt:
        loaded, ckpt = eval_linear.load_checkpoint(args.ckpt, args.num_heads)
        kind, backbone_args, train_args, step = ckpt['backbone_kind'], ckpt['backbone_args'], ckpt.get('args', {}), ckpt.get('step')
        source = f'{args.ckpt} ({step})' if isinstance(step, str) else f'{args.ckpt} (step {step})'
    elif args.model not in vit.PRESETS:
        die(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
    else:
        loaded, kind, train_args, source = None, 'vit', {}, f'{args.model} random init'
        img = args.img_size or data.default_img_size(args.data or 'shapes', args.data_path)
        backbone_args = vit.preset_args(args.model, img_size=img, pos_embed=args.pos_embed)
    if kind == 'vit':  # rebuilt with stochastic depth, then given the checkpoint's weights
        backbone_args = {**backbone_args, 'drop_path_rate': args.drop_path}
    backbone = eval_linear.build_backbone(kind, backbone_args)
    if loaded is not None:
        backbone.load_state_dict(loaded.state_dict())
    return backbone, kind, backbone_args, train_args, source


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    if ddp:
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
        if args.device.startswith('cuda'):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(args.device)
    rank, world = data.dist_info()
    master = rank == 0
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        die('--device cuda but no CUDA device is available (use --device cpu)')
    args.dtype, args.dtype_reason = data.resolve_dtype(args.dtype, args.device)
    device_type = 'cuda' if args.device.startswith('cuda') else 'cpu'
    torch.manual_seed(args.seed)  # the same head on every process (DDP also broadcasts it)

    backbone, kind, backbone_args, train_args, source = build(args)
    img_size = eval_linear.data_and_size(args, kind, backbone_args, train_args)
    for name, value in (SMALL if img_size <= 64 else LARGE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size % world:
        die(f'--batch-size {args.batch_size} is not divisible by the {world} processes')
    if not 0 < args.layer_decay <= 1 or not 0 <= args.drop_path < 1 or not 0 <= args.smoothing < 1 or not 0 < args.crop_min <= 1:
        die('--layer-decay must be in (0, 1], --drop-path and --smoothing in [0, 1), --crop-min in (0, 1]')

    train_set = data.build_dataset(args.data, args.data_path, 'train', train_transform(
        img_size, args.crop_min, args.randaug_ops, args.randaug_magnitude, args.erase_prob), args.download, args.seed)
    val_set = data.build_dataset(args.data, args.data_path, 'val', data.eval_transform(img_size), args.download)
    if val_set is None or not train_set.classes:
        die(f'{args.data} at {args.data_path} needs labelled train/ and val/ folders for fine-tuning')
    num_classes = len(train_set.classes)
    micro_batch = args.batch_size // world
    loader = data.make_loader(train_set, micro_batch, train=True, seed=args.seed, workers=args.workers, device=args.device)
    val_loader = data.make_loader(val_set, 256, train=False, workers=args.workers, device=args.device)
    steps_per_epoch = loader.sampler.batches_per_epoch()
    total, warmup = max(1, round(args.epochs * steps_per_epoch)), round(args.warmup_epochs * steps_per_epoch)

    model = Classifier(backbone, kind, num_classes, args.pool).to(args.device)
    if ddp and device_type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # RF-ResNets' BatchNorm over the global batch
    raw = model
    groups = param_groups(raw, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'fp16')
    dtype = data.TORCH_DTYPES[args.dtype]
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed + rank)  # different drop paths and mixes on each process
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.device] if device_type == 'cuda' else None)
    peak = args.lr * args.batch_size / 256
    if master:
        print(f'fine-tuning {kind} from {source} on {args.data} at {img_size} px: {len(train_set)} train / {len(val_set)} val '
              f'images, {num_classes} classes; {sum(q.numel() for q in raw.parameters() if q.requires_grad) / 1e6:.2f}M '
              f'parameters, {world} process(es) on {args.device}, {args.dtype} ({args.dtype_reason})')
        print(f'global batch {args.batch_size}, lr {args.lr} x {args.batch_size}/256 = {peak:.3g}, layer decay {args.layer_decay}, '
              f'{total} steps ({args.epochs:g} epochs of {steps_per_epoch}, {warmup} warm-up)')

    step, epoch, history = 0, 0, []
    pbar = tqdm(total=total, disable=not master, dynamic_ncols=True)
    model.train()
    while step < total:
        loader.sampler.set_epoch(epoch)
        running, seen = torch.zeros((), device=args.device), 0
        for images, y in loader:
            lr = lr_at(step, total, warmup, peak, args.min_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_scale']
            images, y = images.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            images, targets = mix(images, soft_targets(y, num_classes, args.smoothing), args.mixup, args.cutmix)
            with autocast:
                logits = model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()  # in fp32
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach()
            seen += 1
            step += 1
            pbar.update(1)
            if step >= total:
                break
        epoch += 1
        if not math.isfinite(running.item()):
            die(f'non-finite loss in epoch {epoch}: lower --lr')
        top1, top5 = evaluate(model, val_loader, args.device, dtype)
        history.append(round(top1, 2))
        if master:
            pbar.write(f'epoch {epoch}: train loss {running.item() / max(1, seen):.4f}, val top-1 {top1:.2f}')
    pbar.close()

    results = {'top1': top1, 'top5': top5, 'top1_per_epoch': history, 'steps': step, 'seconds': round(time.time() - t0, 1)}
    if master:
        print(f'fine-tuned top-1 {top1:.2f} (top-5 {top5:.2f}) after {args.epochs:g} epochs, {results["seconds"]:.0f} s')
        settings = {k: v for k, v in vars(args).items()}
        settings.update(kind=kind, backbone_args=backbone_args, img_size=img_size, world_size=world, source=source)
        print(json.dumps({'results': results, 'settings': settings}))
    if ddp:
        dist.destroy_process_group()
    return results


if __name__ == '__main__':
    try:
        main()
    except data.DataError as e:
        die(data.error_line(e))
