"""
CO-BYOL: BYOL plus the alignment of every local representation with the global one (Aubret,
Teulière, Triesch, "Seeing the Whole in the Parts in Self-Supervised Representation Learning",
arXiv 2501.02860), on an RF-ResNet whose receptive field is controlled. One file, read top to bottom:

  1. configuration        command-line flags, per-size defaults, printed at start
  2. the CO-BYOL core     byol_loss, local_global_loss
  3. the model            RF-ResNet encoder, BYOL's MLP heads, the local 1x1-conv heads, EMA target
  4. the training loop    DDP, AMP, LARS, schedules, EMA, k-NN monitor, figure, checkpoint, resume

The encoder returns its pre-pool feature map F (B, C, H, W): one local representation per position.
Global path (plain BYOL): average-pool F, then an MLP (the paper's RF-ResNets have one after the
pooling; --no-pool-mlp removes it), projector, predictor; pulled towards the EMA target's projection
of the other view. Local path, as the paper's Figure 1 (an online local projector and predictor, and
an EMA target local projector): every position of F (optionally pooled to n x n) goes through the
local projector and predictor (1x1 convs), and the local loss is symmetric between the local and the
global embeddings of the two views [ours: the exact pairing]:
  - each online local prediction is pulled towards the target GLOBAL projection of the other view;
  - the online global prediction is pulled towards each target LOCAL projection of the other view;
each 2 - 2 cos, averaged over positions, the two directions averaged, the two views summed (as BYOL's
global loss). --local-loss one_way keeps the first direction only.
total = (1 - w) * global + w * local (--loss-form convex, default), or global + w * local (--loss-form
sum: the form L_g + w L_l, whose w the paper ablates in 0.2-0.5); either way w = 0 is plain BYOL.

    python co_byol.py                                 # embedded shapes data, ~50 min on 2 AVX2 CPU cores (fp32)
    python co_byol.py --local-weight 0                # plain BYOL, same code path
    torchrun --nproc_per_node=8 co_byol.py --data folder --data-path /imagenet --arch resnet50
Re-running the same command resumes from OUT_DIR/ckpt.pt (or ckpt_prev.pt if ckpt.pt is unreadable).
Exit status: 0 done, 2 bad input or data, 3 non-finite loss (the last good checkpoint is kept), 4 a
checkpoint or log could not be written, 75 stopped by SIGTERM / SIGUSR1 / Ctrl-C after writing a checkpoint (a second Ctrl-C stops at once).
"""
import argparse
import copy
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
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import device_aug
import eval_linear
import rf_resnet

# ----------------------------------------------------------------------------------------------
# 1. Configuration. Flags left unset take the default for the image size (see defaults()).

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# CO-BYOL
parser.add_argument('--local-weight', type=float, default=0.3, help='w of the local loss (see --loss-form); 0 = plain BYOL')
parser.add_argument('--loss-form', choices=('convex', 'sum'), default='convex', help='convex: (1 - w) global + w local, w in [0, 1); sum: global + w local, w >= 0')
parser.add_argument('--local-loss', choices=('symmetric', 'one_way'), default='symmetric',
                    help='symmetric: local predictions -> other view\'s target global projection AND global prediction -> other view\'s target local projections (EMA local projector); one_way: the first only')
parser.add_argument('--no-pool-mlp', action='store_true', help='no MLP after the average pooling of the encoder (global representation = the mean of the map)')
parser.add_argument('--local-grid', type=int, default=0, help='adaptive-average-pool the feature map to n x n locals (0 = every position)')
parser.add_argument('--local-hidden', type=int, default=None, help='hidden channels of the local projector/predictor (default: --proj-hidden)')
# data
parser.add_argument('--data', default='shapes', help=f'one of {", ".join(data.DATASETS)}')
parser.add_argument('--data-path', default=None, help='dataset folder (for --data folder: DIR/train, DIR/val, or unlabelled images)')
parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10 into --data-path')
parser.add_argument('--img-size', type=int, default=None, help='default: 32 for shapes/CIFAR, 96 for STL-10, else 224')
parser.add_argument('--crop-min', type=float, default=None, help='smallest random-resized-crop scale of the two views')
parser.add_argument('--workers', type=int, default=None, help='data loader processes per training process')
parser.add_argument('--device-aug', action='store_true', help='keep the uint8 images on --device and augment there in batches (in-memory data)')
# model
parser.add_argument('--arch', default=None, help=f'RF-ResNet preset: {", ".join(rf_resnet.PRESETS)}')
parser.add_argument('--width', type=float, default=None, help='RF-ResNet width multiplier (1 = ResNet-50 widths)')
parser.add_argument('--proj-dim', type=int, default=None, help='output size of the projectors and predictors')
parser.add_argument('--proj-hidden', type=int, default=None, help='hidden size of the projector and predictor MLPs')
parser.add_argument('--momentum', type=float, default=None, help='target EMA momentum tau at the start (cosine to 1)')
# optimisation
parser.add_argument('--optimizer', choices=('lars', 'sgd', 'adamw'), default=None)
parser.add_argument('--epochs', type=float, default=None)
parser.add_argument('--batch-size', type=int, default=None, help='global batch size (all processes and accumulation steps)')
parser.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation micro-steps per optimizer step')
parser.add_argument('--lr', type=float, default=None, help='base learning rate for a global batch of 256 (lr = base * batch / 256)')
parser.add_argument('--min-lr', type=float, default=0.0, help='learning rate at the end of the cosine')
parser.add_argument('--warmup-epochs', type=float, default=None)
parser.add_argument('--weight-decay', type=float, default=None, help='not applied to biases and norms')
parser.add_argument('--lars-eta', type=float, default=0.001, help='LARS trust coefficient')
parser.add_argument('--clip-grad', type=float, default=0.0, help='max gradient norm (0 = off, as BYOL)')
parser.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer steps (schedules still span --epochs)')
# system
data.add_system_flags(parser, 'default: out/co_byol (out/byol with --local-weight 0)')  # --device --dtype --compile --seed --out-dir --log-every ...


EXIT_BAD_INPUT = 2  # 3 (non-finite loss), 4 (disk) and 75 (preempted) come from data.py


def die(msg, status=EXIT_BAD_INPUT):
    """One line on stderr and a non-zero exit status (2, bad input, is what argparse itself uses)."""
    for bar in list(getattr(tqdm, '_instances', ())):  # close progress bars first: the error is the last line
        bar.close()
    print(f'co_byol.py: error: {msg}', file=sys.stderr)
    sys.exit(status)


parser.error = die

# Small images (<= 64 px: the shapes data, CIFAR): a thin RF-ResNet with a 3x3 stride-1 stem (8 x 8 locals
# at 32 px), sized for short CPU runs [ours]. Large images: BYOL's own 100-epoch ImageNet configuration
# (ResNet-50, LARS, lr 0.45 x batch / 256, wd 1e-6, batch 4096, tau 0.99 -> 1, 10 warm-up epochs), for the
# 100 epochs of the CO-BYOL paper's headline result (BYOL's 1000-epoch run uses lr 0.2, wd 1.5e-6, tau 0.996).
SMALL = dict(arch='rf25_small', width=0.125, crop_min=0.2, epochs=16, batch_size=128, optimizer='lars', lr=1.0,
             weight_decay=1e-5, warmup_epochs=1, momentum=0.99, proj_hidden=1024, proj_dim=256, workers=2)
LARGE = dict(arch='resnet50', width=1.0, crop_min=0.08, epochs=100, batch_size=4096, optimizer='lars', lr=0.45,
             weight_decay=1e-6, warmup_epochs=10, momentum=0.99, proj_hidden=4096, proj_dim=256, workers=8)


def defaults(img_size):
    return SMALL if img_size <= 64 else LARGE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog's per-size defaults kept as written."""


parser.formatter_class = HelpFormatter
parser.epilog = ('flags shown as "default: None" take the default for the image size (--print-config shows them all):\n'
                 + '\n'.join(f'  {name}: ' + ', '.join(f'{k}={v}' for k, v in d.items())
                              for name, d in (('<= 64 px', SMALL), ('> 64 px', LARGE))))


def get_args(argv=None):
    args = parser.parse_args(argv)
    if args.data not in data.DATASETS:
        die(f"unknown dataset '{args.data}' (choose from {', '.join(data.DATASETS)})")
    if args.loss_form == 'convex' and not 0 <= args.local_weight < 1:
        die(f'--local-weight must be in [0, 1) with --loss-form convex, got {args.local_weight}')
    if args.loss_form == 'sum' and not 0 <= args.local_weight:
        die(f'--local-weight must be >= 0 with --loss-form sum, got {args.local_weight}')
    if args.local_grid < 0:
        die(f'--local-grid must be >= 0, got {args.local_grid}')
    try:
        args.img_size = args.img_size or data.default_img_size(args.data, args.data_path)
    except data.DataError as e:
        die(data.error_line(e))
    for k, v in defaults(args.img_size).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.local_hidden = args.local_hidden or args.proj_hidden
    if args.arch not in rf_resnet.PRESETS:
        die(f"unknown arch '{args.arch}' (choose from {', '.join(rf_resnet.PRESETS)})")
    if args.width <= 0:
        die(f'--width must be positive, got {args.width}')
    if not 0 < args.crop_min <= 1:
        die(f'--crop-min must be in (0, 1], got {args.crop_min}')
    side = rf_resnet.feature_size(rf_resnet.preset_args(args.arch), args.img_size)
    if side == 0:
        die(f'--img-size {args.img_size} is too small for {args.arch} (its feature map would be empty)')
    if args.local_grid > side:
        die(f'--local-grid {args.local_grid} is larger than the {side} x {side} feature map of {args.arch} at {args.img_size} px')
    if 64 < args.img_size < 224:  # e.g. STL-10 at 96 px: the large-image defaults are sized for GPUs
        print(f'note: {args.img_size} px images take the ImageNet-scale defaults ({args.arch} x {args.width:g}, batch {args.batch_size}, {args.epochs:g} epochs); for a CPU run '
              'set them smaller (--print-config lists every setting)', file=sys.stderr)
    try:
        data.check_system_flags(args, os.path.join('out', 'co_byol' if args.local_weight > 0 else 'byol'))
    except data.RunError as e:
        die(str(e))
    return args


# ----------------------------------------------------------------------------------------------
# 2. The CO-BYOL core

def byol_loss(p, z):
    """BYOL's regression loss: p (B, d) online predictions, z (B, d) target projections (no gradient).
    Mean over the batch of 2 - 2 cos(p, z) = || p/|p| - z/|z| ||^2, in fp32; in [0, 4]."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(1)).mean()


def local_global_loss(p_local, z_global):
    """Local -> global: p_local (B, d, h, w) online local predictions of one view, one per position;
    z_global (B, d) target global projections of the OTHER view (no gradient). Every position is
    pulled towards its image's global target: mean over B, h, w of 2 - 2 cos, in fp32; in [0, 4]."""
    p, z = F.normalize(p_local.float(), dim=1), F.normalize(z_global.detach().float(), dim=1)
    return (2 - 2 * torch.einsum('bdhw,bd->bhw', p, z)).mean()


def global_local_loss(p_global, z_local):
    """Global -> local: p_global (B, d) online global predictions of one view; z_local (B, d, h, w)
    target local projections of the OTHER view (no gradient). The global prediction is pulled towards
    every local target of its image: mean over B, h, w of 2 - 2 cos, in fp32; in [0, 4]."""
    p, z = F.normalize(p_global.float(), dim=1), F.normalize(z_local.detach().float(), dim=1)
    return (2 - 2 * torch.einsum('bd,bdhw->bhw', p, z)).mean()


# ----------------------------------------------------------------------------------------------
# 3. The model: online encoder + heads, EMA target (encoder + projector)

def mlp(in_dim, hidden, out_dim):
    """BYOL's projector / predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim, bias=False))


def local_mlp(in_dim, hidden, out_dim):
    """The same MLP at every position of a feature map: 1x1 convs, BatchNorm2d (statistics over B*H*W)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_dim, 1, bias=False))


def backbone_args(args):
    return rf_resnet.preset_args(args.arch, width=args.width, pool='avg' if args.no_pool_mlp else 'avg_mlp')


def sync_batchnorm(model):
    """Every BatchNorm of the model (encoders, heads, the pooling MLP, the targets) computes its
    statistics over the global batch, as BYOL does (SyncBatchNorm needs CUDA under DDP)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class CoBYOL(nn.Module):
    HEADS = ('projector', 'predictor', 'local_projector', 'local_predictor', 'target_projector', 'target_local_projector')

    def __init__(self, args):
        super().__init__()
        self.encoder = rf_resnet.RFResNet(**backbone_args(args))  # with the MLP after average pooling
        D = self.encoder.out_dim
        self.projector = mlp(D, args.proj_hidden, args.proj_dim)
        self.predictor = mlp(args.proj_dim, args.proj_hidden, args.proj_dim)
        self.local_weight, self.local_grid = args.local_weight, args.local_grid
        self.loss_form, self.symmetric = args.loss_form, args.local_loss == 'symmetric'
        # w = 0: no local heads, so DDP has no unused parameters
        self.local_projector = self.local_predictor = self.target_local_projector = None
        if self.local_weight > 0:
            self.local_projector = local_mlp(D, args.local_hidden, args.proj_dim)
            self.local_predictor = local_mlp(args.proj_dim, args.local_hidden, args.proj_dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # updated by EMA only
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if self.local_weight > 0 and self.symmetric:
            self.target_local_projector = copy.deepcopy(self.local_projector).requires_grad_(False)

    def ema_pairs(self):
        pairs = [(self.target_encoder, self.encoder), (self.target_projector, self.projector)]
        if self.target_local_projector is not None:
            pairs.append((self.target_local_projector, self.local_projector))
        return pairs

    def local_map(self, fmap):
        """(B, C, H, W) -> (B, C, n, n): the locals (pooled to n x n with --local-grid)."""
        return F.adaptive_avg_pool2d(fmap, self.local_grid) if self.local_grid else fmap

    def local_predictions(self, fmap):
        """(B, C, H, W) feature map -> (B, d, n, n) online local predictions (n = H without --local-grid)."""
        return self.local_predictor(self.local_projector(self.local_map(fmap)))

    def combine(self, global_loss, local_loss):
        if self.loss_form == 'sum':
            return global_loss + self.local_weight * local_loss
        return (1 - self.local_weight) * global_loss + self.local_weight * local_loss

    def forward(self, views):
        """Two views (B, 3, H, W) -> {'loss', 'global', 'local'} (fp32 scalars; the last two detached).
        Each view goes through the networks on its own, as in BYOL (batch-norm statistics per view)."""
        fmaps = [self.encoder(x) for x in views]  # the local representations
        preds = [self.predictor(self.projector(self.encoder.pooled(f))) for f in fmaps]
        with torch.no_grad():
            target_maps = [self.target_encoder(x) for x in views]
            targets = [self.target_projector(self.target_encoder.pooled(f)) for f in target_maps]
        global_loss = byol_loss(preds[0], targets[1]) + byol_loss(preds[1], targets[0])  # symmetrised (summed) as BYOL
        if self.local_weight == 0:  # plain BYOL
            return {'loss': global_loss, 'global': global_loss.detach(), 'local': torch.zeros_like(global_loss)}
        local = [self.local_predictions(f) for f in fmaps]
        to_global = [local_global_loss(local[v], targets[1 - v]) for v in (0, 1)]
        if self.symmetric:
            with torch.no_grad():
                target_local = [self.target_local_projector(self.local_map(f)) for f in target_maps]
            to_local = [global_local_loss(preds[v], target_local[1 - v]) for v in (0, 1)]
            local_loss = sum((a + b) / 2 for a, b in zip(to_global, to_local))
        else:
            local_loss = sum(to_global)
        return {'loss': self.combine(global_loss, local_loss), 'global': global_loss.detach(), 'local': local_loss.detach()}


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each tensor is rescaled by the trust ratio
    eta * ||w|| / ||g + wd * w|| (You et al. 2017). As in BYOL, groups with lars=False (biases and
    norms) get neither weight decay nor the ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group['weight_decay'])
                if group['lars']:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), group['eta'] * w_norm / u_norm, 1.0)
                    update.mul_(ratio)
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                buf.mul_(group['momentum']).add_(update)
                p.add_(buf, alpha=-group['lr'])


def build_optimizer(model, args):
    """No weight decay (and no LARS trust ratio) on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]
    if args.optimizer == 'lars':
        groups[1]['lars'] = False
        return LARS(groups, lr=args.lr, weight_decay=args.weight_decay, eta=args.lars_eta)
    if args.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # CUDA and CPU


# ----------------------------------------------------------------------------------------------
# 4. Training: schedules, one optimizer step, the figure, the loop

def cosine(step, total, start, end):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def lr_at(step, total_steps, peak, warmup_steps, min_lr):
    """Linear warm-up to the peak, then cosine to min_lr."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, max(1, total_steps - warmup_steps), peak, min_lr)


def schedule(step, total_steps, steps_per_epoch, args):
    """lr (linear scaling: lr x batch / 256; warm-up, cosine) and the target's EMA momentum tau
    (BYOL: 1 - (1 - tau) (cos(pi k / K) + 1) / 2, i.e. cosine from tau to 1) at `step`."""
    return dict(lr=lr_at(step, total_steps, args.lr * args.batch_size / 256, int(args.warmup_epochs * steps_per_epoch), args.min_lr),
                momentum=cosine(step, total_steps, args.momentum, 1.0))


STATS = ('loss', 'global_loss', 'local_loss')


def train_step(model, batches, optimizer, scaler, autocast, sched, args):
    """One optimizer step on args.accum_steps micro-batches drawn from `batches`: forward, backward
    (DDP all-reduces gradients on the last micro-step only), clip, step, then the target's EMA.
    Returns the mean over micro-steps of STATS, a (3,) fp32 tensor left on the device (no sync)."""
    inner = getattr(model, '_orig_mod', model)  # under torch.compile
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    raw = inner.module if ddp else inner
    for group in optimizer.param_groups:
        group['lr'] = sched['lr']
    stats = torch.zeros(len(STATS), device=optimizer.param_groups[0]['params'][0].device)
    for micro in range(args.accum_steps):
        views = next(batches)
        with (inner.no_sync() if ddp and micro < args.accum_steps - 1 else nullcontext()), autocast:
            out = model(views)
        scaler.scale(out['loss'] / args.accum_steps).backward()
        stats += torch.stack([out['loss'].detach(), out['global'], out['local']]).float() / args.accum_steps
    if args.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # target <- tau * target + (1 - tau) * online
        for target, online in raw.ema_pairs():
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - sched['momentum'])
    return stats


def font_of_size(size):
    """PIL's default font at `size` px (Pillow >= 10.1); older Pillow only has a fixed small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def colour_ramp(v):
    """cos in [-1, 1] -> RGB: blue (-1), white (0), red (+1)."""
    v = max(-1.0, min(1.0, v))
    far = (59, 76, 192) if v < 0 else (180, 4, 38)
    return tuple(round(255 + (c - 255) * abs(v)) for c in far)


@torch.no_grad()
def save_figure(model, images, path, step):
    """For a few validation images: the image, and a heat map of cos(local prediction at each position,
    the image's global target projection), in eval mode. Without local heads (w = 0) the global projector
    and predictor are applied at each position instead (eval-mode BN is the same affine map everywhere)."""
    was_training = model.training
    model.eval()
    fmap = model.encoder(images).float()
    target = F.normalize(model.target_projector(model.target_encoder.pooled(model.target_encoder(images).float())), dim=1)
    online = F.normalize(model.predictor(model.projector(model.encoder.pooled(fmap))), dim=1)
    if model.local_projector is not None:
        local = model.local_predictions(fmap)
    else:
        B, C, H, W = fmap.shape
        local = model.predictor(model.projector(fmap.permute(0, 2, 3, 1).reshape(-1, C))).reshape(B, H, W, -1).permute(0, 3, 1, 2)
    cos = torch.einsum('bdhw,bd->bhw', F.normalize(local, dim=1), target).cpu()
    global_cos = (online * target).sum(1).cpu()
    model.train(was_training)

    pixels = (images.float().cpu() * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]).clamp(0, 1)
    pixels = (pixels * 255).byte().permute(0, 2, 3, 1).numpy()
    font, small = font_of_size(15), font_of_size(12)
    n, g = len(images), cos.shape[-1]
    cell, pad, cols, top, caption = 160, 12, 2, 62, 22
    rows = math.ceil(n / cols)
    fig = Image.new('RGB', (cols * (2 * cell + 3 * pad), top + rows * (cell + caption + pad) + 50), 'white')
    draw = ImageDraw.Draw(fig)
    heads = 'local heads' if model.local_projector is not None else 'w = 0, no local heads: global heads at each position'
    draw.text((pad, 6), f'step {step}: cos(local prediction at each of the {g} x {g} positions, '
              'global target projection of the same image)', fill='black', font=font)
    draw.text((pad, 28), f'({heads}; eval mode)', fill='black', font=small)
    for i in range(n):
        x0, y0 = pad + (i % cols) * (2 * cell + 3 * pad), top + (i // cols) * (cell + caption + pad)
        fig.paste(Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST), (x0, y0))
        hx, side = x0 + cell + pad, cell / g
        for r in range(g):
            for c in range(g):
                v = cos[i, r, c].item()
                box = (hx + round(c * side), y0 + round(r * side), hx + round((c + 1) * side) - 1, y0 + round((r + 1) * side) - 1)
                draw.rectangle(box, fill=colour_ramp(v))
                if g <= 8:
                    draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f'{v:.2f}', fill='black', font=small, anchor='mm')
        draw.text((x0, y0 + cell + 3), f'mean local cos {cos[i].mean():.2f}   global (online pred.) cos {global_cos[i]:.2f}',
                  fill='black', font=small)
    y = fig.height - 38  # colour bar
    for k in range(200):
        draw.line((pad + 40 + k, y, pad + 40 + k, y + 14), fill=colour_ramp(k / 99.5 - 1))
    for v, x in ((-1, pad + 40), (0, pad + 140), (1, pad + 240)):
        draw.text((x, y + 24), f'{v:+d}' if v else '0', fill='black', font=small, anchor='mm')
    draw.text((pad + 260, y + 7), 'cos: blue -1, white 0, red +1', fill='black', font=small, anchor='lm')
    fig.save(path)


def save(model, optimizer, scaler, args, step, path, ddp):
    """The run's checkpoint (master writes it; every process's RNG goes in). `backbone` + `backbone_args`
    are what eval_linear.py reads; `args` is how a re-run knows it is the same run."""
    rngs = data.rng_states(args.device, ddp)
    if data.dist_info()[0] == 0:
        data.save_checkpoint({'backbone': model.encoder.state_dict(), 'backbone_kind': 'rf_resnet',
                              'backbone_args': backbone_args(args), 'args': vars(args), 'step': step, 'model': model.state_dict(),
                              'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'rng': rngs}, path)


def evaluate(model, knn, args, step, dtype, master):
    """k-NN top-1/top-5 of the online encoder on the held-out split, the agreement figure, a log line."""
    knn_loaders, num_classes, figure_images = knn
    top1, top5 = eval_linear.knn_monitor(model.encoder, 'rf_resnet', *knn_loaders, args.device, num_classes, dtype)
    if master:
        save_figure(model, figure_images, os.path.join(args.out_dir, f'agreement_{step:06d}.png'), step)
        with open(os.path.join(args.out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps({'step': step, 'knn_top1': top1, 'knn_top5': top5}) + '\n')
    return top1, top5


def main(argv=None):
    args = get_args(argv)
    data.check_writable(args.out_dir)
    ddp, rank, world, args.device = data.init_distributed(args.device, args.dist_timeout)
    master, device_type = rank == 0, 'cuda' if args.device.startswith('cuda') else 'cpu'
    torch.manual_seed(args.seed)  # same initial weights on every process (DDP also broadcasts them)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data: the two views and, when the data has labels, the k-NN monitor's splits
    train_set = data.build_dataset(args.data, args.data_path, 'pretrain', data.two_views(args.img_size, args.crop_min),
                                   args.download, args.seed, args.skip_bad_images)
    micro_batch = args.batch_size // (world * args.accum_steps)
    loader = data.make_loader(train_set, micro_batch, train=True, seed=args.seed, workers=args.workers, device=args.device)
    device_views = None  # --device-aug: uint8 images kept on the device, augmented there in batches
    if args.device_aug:
        device_views = device_aug.DeviceViews(data.in_memory_images(train_set).to(args.device), train_set.transform.specs)
    steps_per_epoch = max(1, loader.sampler.batches_per_epoch() // args.accum_steps)
    total_steps = int(args.epochs * steps_per_epoch)
    max_steps, eval_every = min(total_steps, args.max_steps or total_steps), args.eval_every or math.ceil(total_steps / 4)
    knn = data.knn_splits(args)  # None without labels

    # ---- model, optimizer, precision; resume when OUT_DIR holds this run's checkpoint
    model = CoBYOL(args).to(args.device, memory_format=torch.channels_last)
    if ddp and device_type == 'cuda':  # every BN over the global batch, as BYOL (SyncBatchNorm needs a GPU)
        model = sync_batchnorm(model)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'fp16')
    dtype = data.TORCH_DTYPES[args.dtype]
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.jsonl')
    step = start = data.resume(ckpt_path, args, model, optimizer, scaler, log_path)
    if step == 0:
        torch.manual_seed(args.seed + rank)
    raw = model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.device] if device_type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model)
    if master:
        # wall times depend on it: OMP_NUM_THREADS if set, else 1 per process under torchrun, else the cores
        threads = f' ({torch.get_num_threads()} thread(s) each)' if args.device == 'cpu' else ''
        side = rf_resnet.feature_size(backbone_args(args), args.img_size)
        form = 'plain BYOL' if args.local_weight == 0 else f'{args.local_loss} local loss, {args.loss_form} form'
        print(f'CO-BYOL (w={args.local_weight}, {form}, {"no " if args.no_pool_mlp else ""}MLP after pooling, '
              f'{args.local_grid or side} x {args.local_grid or side} locals) on {args.data} at {args.img_size} px, {args.arch} x '
              f'{args.width} (RF {rf_resnet.receptive_field(backbone_args(args))} px, {side} x {side} map), '
              f'{sum(q.numel() for q in raw.parameters() if q.requires_grad) / 1e6:.1f}M trainable parameters, '
              f'{world} process(es) on {args.device}{threads}, {args.dtype} ({args.dtype_reason})')
        print(f'global batch {args.batch_size} ({micro_batch} per process x {world} x {args.accum_steps} accumulation), '
              f'{args.optimizer} lr {args.lr} x {args.batch_size}/256 = {args.lr * args.batch_size / 256:.3g}, '
              f'{total_steps} steps ({args.epochs} epochs of {steps_per_epoch}), '
              f'{f"resuming at step {step}" if step else "starting at step 0 (no checkpoint in --out-dir)"}')
        print(f'config: {json.dumps(vars(args))}')
        if knn is None:
            print('the data has no labels: no k-NN monitor and no agreement figure, only the loss in log.jsonl')

    # ---- the loop: evaluate and save at the top (at last_step too, so nothing follows the loop), then one step
    batches = data.micro_batches(loader, step, args.accum_steps, args.device, device_views, channels_last=True)
    running = torch.zeros(len(STATS), device=args.device)  # summed on the device, synced at log steps
    saved_step, logged_step, t_log = step, step, time.time()
    pbar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    while True:
        last_step = step == max_steps
        stop = not last_step and data.should_stop(step, args.log_every, args.device, ddp)  # preemption
        t_pause = time.time()  # evaluation and checkpoint time is left out of images/s
        if knn is not None and (last_step or step % eval_every == 0) and (step > start or last_step):
            top1, top5 = evaluate(raw, knn, args, step, dtype, master)
            if master:
                pbar.write(f'final k-NN top-1 {top1:.2f} (top-5 {top5:.2f}) at step {step}' if last_step else
                           f'step {step}: k-NN top-1 {top1:.2f}')
        if step > saved_step and (step % args.ckpt_every == 0 or step % eval_every == 0 or last_step or stop):
            data.check_finite(running, STATS, logged_step + 1, step, ckpt_path, saved_step, raw)  # never save a diverged run
            save(raw, optimizer, scaler, args, step, ckpt_path, ddp)
            saved_step = step
        t_log += time.time() - t_pause
        if last_step or stop:
            break

        sched = schedule(step, total_steps, steps_per_epoch, args)
        running += train_step(model, batches, optimizer, scaler, autocast, sched, args)
        step += 1
        pbar.update(1)
        if step % args.log_every == 0 or step == max_steps:
            if ddp:
                dist.all_reduce(running)
                running /= world
            data.check_finite(running, STATS, logged_step + 1, step, ckpt_path, saved_step)
            means = (running / (step - logged_step)).tolist()
            record = {'step': step, 'loss': means[0], 'global_loss': means[1], **({'local_loss': means[2]} if args.local_weight else {}),
                      'lr': sched['lr'], 'momentum': sched['momentum'], 'images_per_s': (step - logged_step) * args.batch_size / (time.time() - t_log)}
            if args.skip_bad_images:
                record['skipped_images'] = data.skipped_images(train_set, args.device, ddp)
            if master:
                with open(log_path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                pbar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['images_per_s']:.0f}")
            running.zero_()
            logged_step, t_log = step, time.time()
    pbar.close()
    if ddp:
        dist.destroy_process_group()
    if not stop:
        return {'knn_top1': top1, 'knn_top5': top5} if knn is not None else {}
    data.exit_preempted(step, ckpt_path)  # status 75


if __name__ == '__main__':
    data.run_script(main, die)
