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
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
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
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--dtype', choices=data.DTYPES, default='auto',
                    help='autocast dtype (GradScaler for fp16); auto: bf16 on Ampere+ GPUs and on CPUs with native bf16, fp16 on older GPUs, else fp32')
parser.add_argument('--compile', action='store_true', help='torch.compile the model')
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--out-dir', default=None, help='default: out/co_byol (out/byol with --local-weight 0)')
parser.add_argument('--log-every', type=int, default=20, help='steps between log.jsonl lines')
parser.add_argument('--eval-every', type=int, default=None, help='steps between k-NN + figure + checkpoint (default: 4 per run)')
parser.add_argument('--ckpt-every', type=int, default=200, help='steps between checkpoints')
parser.add_argument('--skip-bad-images', action='store_true', help='skip unreadable images (named on stderr, counted in the log) instead of stopping')
parser.add_argument('--dist-timeout', type=float, default=10, help='minutes a process waits for the others before giving up')
parser.add_argument('--print-config', action='store_true', help='print the settings this command would train with (every default resolved) and exit')


EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_DISK, EXIT_PREEMPTED = 2, 3, 4, 75


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
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % (world * args.accum_steps):
        die(f'--batch-size {args.batch_size} is not divisible by {world} process(es) x {args.accum_steps} accumulation step(s)')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        die('--device cuda but no CUDA device is available (use --device cpu)')
    args.dtype, args.dtype_reason = data.resolve_dtype(args.dtype, args.device)  # recorded in the checkpoint's args
    args.out_dir = args.out_dir or os.path.join('out', 'co_byol' if args.local_weight > 0 else 'byol')
    if args.print_config:
        print(json.dumps(vars(args), indent=1))
        sys.exit(0)
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
# 4. Training: schedules, figure, checkpoint, loop

def cosine(step, total, start, end):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def lr_at(step, args):
    """Linear warm-up to lr * batch / 256, then cosine to min_lr."""
    peak, warmup = args.lr * args.batch_size / 256, int(args.warmup_epochs * args.steps_per_epoch)
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(1, args.total_steps - warmup), peak, args.min_lr)


def momentum_at(step, args):
    """Target EMA momentum: cosine from tau to 1 (BYOL: 1 - (1 - tau) (cos(pi k / K) + 1) / 2)."""
    return cosine(step, args.total_steps, args.momentum, 1.0)


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
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
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


def save_checkpoint(obj, path):
    """Never half-written: write PATH.tmp and fsync it; only then move the old checkpoint to
    ckpt_prev.pt and rename the new one into place. A failed write (disk full, read-only folder)
    is a one-line error (exit 4) that leaves the previous checkpoint as it was."""
    tmp, prev = path + '.tmp', path[:-3] + '_prev.pt'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, prev)
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        os.fsync(folder)  # the renames themselves reach the disk
        os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.isfile(tmp):
            os.remove(tmp)
        die(f'cannot write checkpoint {path}: {e}; the previous checkpoint is untouched', EXIT_DISK)


def load_checkpoint(path):
    """The newest readable checkpoint: ckpt.pt, else ckpt_prev.pt (after a crash between the two renames
    of save_checkpoint, or when ckpt.pt was truncated). None when there is none."""
    prev = path[:-3] + '_prev.pt'
    for p in (path, prev):
        if os.path.exists(p):
            try:
                ckpt = torch.load(p, map_location='cpu', weights_only=False)
            except Exception as e:  # truncated zip, garbage, ...: torch raises several types
                print(f'warning: {p} is unreadable ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); '
                      'trying the previous checkpoint', file=sys.stderr)
                continue
            if p == prev and os.path.exists(path):
                os.replace(path, path + '.corrupt')  # so that the next save does not make it ckpt_prev.pt
            return ckpt
    if os.path.exists(path) or os.path.exists(prev):
        die(f'no readable checkpoint in {os.path.dirname(path)}: move the checkpoints away or use another --out-dir')
    return None


def check_writable(folder):
    """Fail at start, not at the first checkpoint, when the output folder cannot be written."""
    probe = os.path.join(folder, f'.write_test.{os.getpid()}')  # one per process: DDP ranks check at once
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        die(f'cannot write to --out-dir {folder}: {e.strerror or e}', EXIT_DISK)


STOP_SIGNALS = []  # names of SIGTERM / SIGUSR1 / SIGINT received: finish the step, checkpoint, exit 75


def request_stop(signum, frame):
    if signum == signal.SIGINT and STOP_SIGNALS:  # a second Ctrl-C: stop now, without a checkpoint
        raise KeyboardInterrupt
    STOP_SIGNALS.append(signal.Signals(signum).name)


def nonfinite_message(step, names, values):
    bad = [f'{name} is {v}' for name, v in zip(names, values) if not math.isfinite(v)]
    return f'non-finite loss at step {step} ({", ".join(bad) or "total loss"})'


# Flags that do not change what is trained: a run may resume with other values of these.
RUN_PLUMBING = {'out_dir', 'log_every', 'eval_every', 'ckpt_every', 'workers', 'device', 'dtype', 'dtype_reason', 'compile',
                'max_steps', 'dist_timeout', 'skip_bad_images', 'download', 'steps_per_epoch', 'total_steps'}


def changed_flags(saved, args):
    """'--flag saved -> now' for every flag that changes the model or the training and differs from the
    checkpoint's run (flags it did not have count as changed)."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in vars(args).items()
            if k not in RUN_PLUMBING and saved.get(k, '(unset)') != v]


def rng_state(device):
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device.startswith('cuda') else None}


def main(argv=None):
    args = get_args(argv)
    check_writable(args.out_dir)
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    if ddp:
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo', timeout=timedelta(minutes=args.dist_timeout))
        if args.device.startswith('cuda'):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
    rank, world = data.dist_info()
    master = rank == 0
    torch.manual_seed(args.seed)  # same initial weights on every process (DDP also broadcasts them)
    device_type = 'cuda' if args.device.startswith('cuda') else 'cpu'
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data: pretraining views, and (when labels exist) the k-NN monitor's train/val splits.
    views_tf = data.two_views(args.img_size, args.crop_min)
    train_set = data.build_dataset(args.data, args.data_path, 'pretrain', views_tf, args.download, args.seed, args.skip_bad_images)
    micro_batch = args.batch_size // (world * args.accum_steps)
    device_views = None  # --device-aug: uint8 images kept on the device, augmented there in batches
    if args.device_aug:
        device_views = data.DeviceViews(data.in_memory_images(train_set).to(args.device), train_set.transform.specs)
    loader = data.make_loader(train_set, micro_batch, train=True, seed=args.seed, workers=args.workers, device=args.device)
    args.steps_per_epoch = max(1, loader.sampler.batches_per_epoch() // args.accum_steps)
    args.total_steps = int(args.epochs * args.steps_per_epoch)
    max_steps = min(args.total_steps, args.max_steps or args.total_steps)
    args.eval_every = args.eval_every or math.ceil(args.total_steps / 4)
    knn_sets = [data.build_dataset(args.data, args.data_path, s, data.eval_transform(args.img_size), args.download, args.seed,
                                   args.skip_bad_images) for s in ('train', 'val')]
    knn_loaders = None
    if knn_sets[1] is not None and knn_sets[0].classes:
        knn_loaders = [data.make_loader(s, 256, train=False, workers=args.workers, device=args.device) for s in knn_sets]
        figure_images = torch.stack([knn_sets[1][i][0] for i in range(min(6, len(knn_sets[1])))]).to(args.device)

    model = CoBYOL(args).to(args.device, memory_format=torch.channels_last)
    if ddp and device_type == 'cuda':  # every BN over the global batch, as BYOL (SyncBatchNorm needs a GPU)
        model = sync_batchnorm(model)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'fp16')
    dtype = data.TORCH_DTYPES[args.dtype]
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    # Resume: re-running the same command continues from OUT_DIR/ckpt.pt.
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.jsonl')
    step = 0
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None:
        changed = changed_flags(ckpt['args'], args)
        if changed:  # a run resumes only itself
            die(f"{ckpt_path} is another run ({', '.join(changed)}): use another --out-dir, or the same flags to resume")
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step = ckpt['step']
        rng = ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0]
        torch.set_rng_state(rng['torch'])
        if rng['cuda'] is not None and device_type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'])
        if master and os.path.exists(log_path):  # forget log lines of steps that will be redone
            lines = [line for line in open(log_path) if json.loads(line)['step'] <= step]
            open(log_path, 'w').writelines(lines)
    else:
        torch.manual_seed(args.seed + rank)
    raw = model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.device] if device_type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model)

    if master:
        side = rf_resnet.feature_size(backbone_args(args), args.img_size)
        n_local = args.local_grid or side
        form = 'plain BYOL' if args.local_weight == 0 else f'{args.local_loss} local loss, {args.loss_form} form'
        print(f'CO-BYOL (w={args.local_weight}, {form}, {"no " if args.no_pool_mlp else ""}MLP after pooling, {n_local} x {n_local} locals) '
              f'on {args.data} at {args.img_size} px, {args.arch} x {args.width} (RF {rf_resnet.receptive_field(backbone_args(args))} px, '
              f'{side} x {side} map), {sum(q.numel() for q in raw.parameters() if q.requires_grad) / 1e6:.1f}M trainable parameters, '
              f'{world} process(es) on {args.device}, {args.dtype} ({args.dtype_reason})')
        print(f'global batch {args.batch_size} ({micro_batch} per process x {world} x {args.accum_steps} accumulation), '
              f'{args.optimizer} lr {args.lr} x {args.batch_size}/256 = {args.lr * args.batch_size / 256:.3g}, '
              f'{args.total_steps} steps ({args.epochs} epochs of {args.steps_per_epoch}), resuming at step {step}')
        print('config: ' + json.dumps(vars(args)))

    saved_step = step  # the last good checkpoint

    def stop_if_diverged():
        """Exit 3, naming the step and the loss term, once a loss has gone non-finite (one host sync)."""
        bad_step = int(first_bad.item())
        if bad_step >= 0:
            die(nonfinite_message(bad_step, ('global_loss', 'local_loss'), bad_terms.tolist())
                + f'; {ckpt_path} (step {saved_step}) is the last good checkpoint', EXIT_NONFINITE)

    def checkpoint():
        nonlocal saved_step
        stop_if_diverged()  # never overwrite the last good state with a diverged one
        if not torch.stack([torch.isfinite(p).all() for p in raw.parameters()]).all():  # diverged, loss not yet
            die(f'non-finite parameters after step {step}; {ckpt_path} (step {saved_step}) is the last good checkpoint',
                EXIT_NONFINITE)
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng_state(args.device))
        else:
            rngs = [rng_state(args.device)]
        if master:
            save_checkpoint({'backbone': raw.encoder.state_dict(), 'backbone_kind': 'rf_resnet', 'backbone_args': backbone_args(args),
                             'args': vars(args), 'step': step, 'model': raw.state_dict(), 'optimizer': optimizer.state_dict(),
                             'scaler': scaler.state_dict(), 'rng': rngs}, ckpt_path)
        saved_step = step

    def evaluate():
        result = {}
        if knn_loaders is not None:
            result['knn_top1'], result['knn_top5'] = eval_linear.knn_monitor(
                raw.encoder, 'rf_resnet', *knn_loaders, args.device, len(knn_sets[0].classes), dtype)
            if master:
                save_figure(raw, figure_images, os.path.join(args.out_dir, f'agreement_{step:06d}.png'), step)
        if master and result:
            with open(log_path, 'a') as f:
                f.write(json.dumps({'step': step, **result}) + '\n')
        return result

    def micro_batches():
        """Endless micro-batches, starting where step `step` starts (mid-epoch on resume)."""
        epoch, start = divmod(step * args.accum_steps, loader.sampler.batches_per_epoch())
        while True:
            loader.sampler.set_epoch(epoch, start)
            if device_views is not None:  # the sampler's (index, seed) pairs, augmented on the device
                for items in loader.batch_sampler:
                    views = device_views(torch.tensor([i for i, _ in items]), items[0][1])
                    yield [v.contiguous(memory_format=torch.channels_last) for v in views]
            else:
                for views, _ in loader:
                    yield [v.to(args.device, non_blocking=True, memory_format=torch.channels_last) for v in views]
            epoch, start = epoch + 1, 0

    batches = micro_batches()
    running = torch.zeros(3, device=args.device)  # loss, global, local: summed on device, synced at logging
    first_bad = torch.full((), -1, device=args.device)  # first step with a non-finite loss, if any (checked at logging)
    bad_terms = torch.zeros(2, device=args.device)  # global and local loss at that step
    pbar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
    t_log, steps_since_log = time.time(), 0
    model.train()
    while step < max_steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(args.accum_steps):
            views = next(batches)
            sync = micro == args.accum_steps - 1  # DDP all-reduces gradients on the last micro-step only
            with (nullcontext() if sync or not ddp else model.no_sync()), autocast:
                out = model(views)
            scaler.scale(out['loss'] / args.accum_steps).backward()
            running += torch.stack([out['loss'].detach(), out['global'], out['local']]) / args.accum_steps
            new_bad = (first_bad < 0) & ~torch.isfinite(out['loss'].detach())
            bad_terms = torch.where(new_bad, torch.stack([out['global'], out['local']]).float(), bad_terms)
            first_bad = torch.where(new_bad, step, first_bad)
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        m = momentum_at(step, args)  # target <- m * target + (1 - m) * online
        with torch.no_grad():
            for target, online in raw.ema_pairs():
                torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)
        step += 1
        steps_since_log += 1
        pbar.update(1)

        last = step == max_steps
        if step % args.log_every == 0 or last:
            stop_if_diverged()
            if ddp:
                dist.all_reduce(running)
                running /= world
            loss, global_loss, local_loss = (running / steps_since_log).tolist()
            dt = time.time() - t_log
            record = {'step': step, 'loss': loss, 'global_loss': global_loss, 'lr': lr, 'momentum': m,
                      'images_per_s': steps_since_log * args.batch_size / dt}
            if args.local_weight > 0:
                record['local_loss'] = local_loss
            if args.skip_bad_images:  # reads of unreadable images so far, all processes (this session)
                counter = getattr(train_set, 'skipped', None)  # only image folders can hold broken files
                skipped = torch.tensor(float(counter.value if counter is not None else 0), device=args.device)
                if ddp:
                    dist.all_reduce(skipped)
                record['skipped_images'] = int(skipped.item())
            if master:
                with open(log_path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                pbar.set_postfix(loss=f'{loss:.3f}', ips=f"{record['images_per_s']:.0f}")
            running.zero_()
            t_log, steps_since_log = time.time(), 0
        t_pause = time.time()  # evaluation and checkpoint time is left out of images/s
        if step % args.eval_every == 0 and not last:
            result = evaluate()
            if master and result:
                pbar.write(f"step {step}: k-NN top-1 {result['knn_top1']:.2f}")
        if step % args.ckpt_every == 0 or step % args.eval_every == 0 or last:
            checkpoint()
        # Preemption: one process alone checks every step; under DDP the processes agree at log steps.
        stop = bool(STOP_SIGNALS)
        if ddp and step % args.log_every == 0:
            flag = torch.tensor(float(stop), device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        elif ddp:
            stop = False
        if stop and not last:
            if saved_step != step:
                checkpoint()
            pbar.close()
            print(f"{', '.join(STOP_SIGNALS) or 'a stop signal (on another process)'} at step {step}: {ckpt_path} written; "
                  'exiting with status 75, re-run the same command to continue', file=sys.stderr)
            if ddp:
                dist.destroy_process_group()
            sys.exit(EXIT_PREEMPTED)
        t_log += time.time() - t_pause
    pbar.close()
    result = evaluate()
    if master and result:
        print(f"final k-NN top-1 {result['knn_top1']:.2f} (top-5 {result['knn_top5']:.2f}) at step {step}")
    if ddp:
        dist.destroy_process_group()
    return result


if __name__ == '__main__':
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # schedulers' warnings before a kill; Ctrl-C
        signal.signal(sig, request_stop)
    try:
        main()
    except data.DataError as e:
        die(data.error_line(e))
    except OSError as e:  # writing the log or a figure: disk full, folder removed, ...
        die(f'{e.__class__.__name__}: {e}', EXIT_DISK)
