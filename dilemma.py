"""
DILEMMA: Detection of Incorrect Location EMbeddings with MAsked inputs (Sameni, Jenni, Favaro,
AAAI 2023), on top of MoCo v3, DINO, SimCLR and MAE. One file, read top to bottom:

  1. configuration         command-line flags, per-method defaults, printed at start
  2. the DILEMMA core      corrupt_positions, detection_loss, DilemmaEncoder
  3. the four methods      their heads and losses; each returns a dict of losses
  4. the training loop     DDP, AMP, schedules, EMA, k-NN monitor, figure, checkpoint, resume

Per image and view, the student sees a sparse input (a random subset of its patch tokens; the rest
are removed, not masked), and each kept token gets, with probability p, the positional embedding of
another location. A linear head on the output patch tokens detects the misplaced ones (BCE). The same
sparse, corrupted pass gives the class token for the method's own loss; teachers see dense clean views.

    python dilemma.py --method dino                                  # embedded shapes data, ~16 min on 2 CPU cores (fp32, AVX2)
    python dilemma.py --method dino --dilemma-prob 0 --drop-ratio 0  # the plain method (MAE: --dilemma-prob 0)
    torchrun --nproc_per_node=8 dilemma.py --method mocov3 --data folder --data-path /imagenet --model vit_small/16
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
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import device_aug
import eval_linear
import vit

# ----------------------------------------------------------------------------------------------
# 1. Configuration. Flags left unset take the method's default for the image size (see defaults()).

METHODS = ('mocov3', 'dino', 'simclr', 'mae')
parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument('--method', choices=METHODS, default='dino')
# DILEMMA
parser.add_argument('--drop-ratio', type=float, default=None,
                    help='fraction of patch tokens removed from the student input (MAE: its mask ratio); default 0.75, 0.5 for 32 px non-MAE runs')
parser.add_argument('--dilemma-prob', type=float, default=0.2, help='probability p that a kept token gets a wrong position (0 = no detection loss)')
parser.add_argument('--dilemma-weight', type=float, default=1.0, help='lambda: weight of the detection loss')
# data
parser.add_argument('--data', default='shapes', help=f'one of {", ".join(data.DATASETS)}')
parser.add_argument('--data-path', default=None, help='dataset folder (for --data folder: DIR/train, DIR/val, or unlabelled images)')
parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10 into --data-path')
parser.add_argument('--img-size', type=int, default=None, help='default: 32 for shapes/CIFAR, 96 for STL-10, else 224')
parser.add_argument('--crop-min', type=float, default=None, help='smallest random-resized-crop scale (DINO: of its global crops)')
parser.add_argument('--local-crops', type=int, default=None, help='DINO: number of local crops')
parser.add_argument('--local-size', type=int, default=None, help='DINO: local crop size in px')
parser.add_argument('--local-drop-ratio', type=float, default=None,
                    help='DINO: fraction of a local crop\'s tokens removed (local crops are never corrupted)')
parser.add_argument('--workers', type=int, default=None, help='data loader processes per training process')
parser.add_argument('--device-aug', action='store_true', help='keep the uint8 images on --device and augment there in batches (in-memory data)')
# model
parser.add_argument('--model', default=None, help=f'ViT preset: {", ".join(vit.PRESETS)}')
parser.add_argument('--pos-embed', choices=('learned', 'sincos'), default=None)
parser.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate of the student')
parser.add_argument('--proj-dim', type=int, default=None, help='output size of projector/predictor (DINO: bottleneck)')
parser.add_argument('--proj-hidden', type=int, default=None, help='hidden size of projector/predictor/DINO head')
parser.add_argument('--out-dim', type=int, default=None, help='DINO: number of prototypes')
parser.add_argument('--temperature', type=float, default=None, help='MoCo v3 / SimCLR softmax temperature; DINO student temperature')
parser.add_argument('--teacher-temp', type=float, default=None, help='DINO: final teacher temperature (warm-up from 0.04)')
parser.add_argument('--teacher-temp-epochs', type=float, default=None, help='DINO: epochs of teacher-temperature warm-up')
parser.add_argument('--center-momentum', type=float, default=0.9, help='DINO: EMA of the teacher-output centre')
parser.add_argument('--freeze-last-layer', type=float, default=None, help='DINO: epochs during which the last layer is not updated')
parser.add_argument('--momentum', type=float, default=None, help='MoCo v3 / DINO: teacher EMA momentum at the start (cosine to 1)')
parser.add_argument('--decoder-dim', type=int, default=None, help='MAE decoder width')
parser.add_argument('--decoder-depth', type=int, default=None, help='MAE decoder blocks')
parser.add_argument('--no-norm-pix-loss', action='store_true', help='MAE: reconstruct raw instead of per-patch normalised pixels')
# optimisation
parser.add_argument('--epochs', type=float, default=None)
parser.add_argument('--batch-size', type=int, default=None, help='global batch size (all processes and accumulation steps)')
parser.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation micro-steps per optimizer step')
parser.add_argument('--lr', type=float, default=None, help='base learning rate for a global batch of 256 (lr = base * batch / 256)')
parser.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end of the cosine')
parser.add_argument('--warmup-epochs', type=float, default=None)
parser.add_argument('--weight-decay', type=float, default=None)
parser.add_argument('--weight-decay-end', type=float, default=None, help='weight decay at the end of its cosine (DINO)')
parser.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (0 = off)')
parser.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer steps (schedules still span --epochs)')
# system
data.add_system_flags(parser, 'default: out/METHOD (out/METHOD-baseline with DILEMMA off)')  # --device --dtype --compile --seed --out-dir --log-every ...


EXIT_BAD_INPUT = 2  # 3 (non-finite loss), 4 (disk) and 75 (preempted) come from data.py


def die(msg, status=EXIT_BAD_INPUT):
    """One line on stderr and a non-zero exit status (2, bad input, is what argparse itself uses)."""
    for bar in list(getattr(tqdm, '_instances', ())):  # close progress bars first: the error is the last line
        bar.close()
    print(f'dilemma.py: error: {msg}', file=sys.stderr)
    sys.exit(status)


parser.error = die


# Defaults per method, for small images (<= 64 px: the shapes data, CIFAR; sized for CPU runs: DINO took
# 16.5 min in fp32 on 2 AVX2 cores, the others' step times are in BENCHMARKS.md) and for large ones (the
# papers' ViT-S/16 ImageNet recipes). Small
# runs use fixed sin-cos positions for every method: with learned ones the model first has to learn what
# a position is, and on the shapes data detection then did not start within 1000 steps.
# Small runs keep half the tokens [ours]: of 64 tokens at 32 px, keeping 16 (drop 0.75) made detection
# learn more slowly than keeping 32 in the ablation (RESULTS.md); MAE keeps its own 0.75 mask ratio.
SMALL = dict(model='vit_mini/4', pos_embed='sincos', drop_path=0.0, crop_min=0.2, epochs=8, batch_size=128, drop_ratio=0.5,
             warmup_epochs=1, clip_grad=3.0, workers=2, proj_dim=256, proj_hidden=1024, momentum=0.99)
LARGE = dict(model='vit_small/16', pos_embed='learned', drop_path=0.1, crop_min=0.08, epochs=100, batch_size=1024, drop_ratio=0.75,
             warmup_epochs=10, clip_grad=3.0, workers=8, proj_dim=256, proj_hidden=4096, momentum=0.99)
METHOD_DEFAULTS = {
    # MoCo v3 (ViT): AdamW, lr 1.5e-4 x batch/256, wd 0.1, T = 0.2, fixed sin-cos positions, momentum 0.99 -> 1
    'mocov3': (dict(lr=5e-4, weight_decay=0.1, temperature=0.2, epochs=10),
               dict(pos_embed='sincos', lr=1.5e-4, weight_decay=0.1, temperature=0.2, drop_path=0.0)),
    # DINO (ViT-S): lr 5e-4, wd 0.04 -> 0.4, teacher temperature 0.04 -> 0.07 over 30 epochs, 2 global +
    # 8 local 96 px crops, 65536 prototypes, momentum 0.996 -> 1, last layer frozen for the first epoch
    # Small runs [ours]: two dense, uncorrupted 16 px local crops; batch 64 and 3 epochs so that the run fits
    # ~15 min on 2 AVX2 cores; peak lr 2.5e-4 (1e-3 x 64/256), the peak of the earlier 128-image default.
    # With these, detection learns on the shapes data under DINO's 40-100% global crops (RESULTS.md).
    'dino': (dict(lr=1e-3, weight_decay=0.04, weight_decay_end=0.4, temperature=0.1, teacher_temp=0.04,
                  teacher_temp_epochs=0, out_dim=4096, local_crops=2, local_size=16, freeze_last_layer=0, epochs=3,
                  batch_size=64, crop_min=0.4, warmup_epochs=0.5),
             dict(lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, temperature=0.1, teacher_temp=0.07,
                  teacher_temp_epochs=30, out_dim=65536, proj_hidden=2048, local_crops=8, local_size=96,
                  freeze_last_layer=1, momentum=0.996, crop_min=0.4)),
    # SimCLR's NT-Xent on a ViT, optimised as MoCo v3; T = 0.1 for large batches, 0.2 for small ones
    'simclr': (dict(lr=5e-4, weight_decay=0.1, temperature=0.2, epochs=16),
               dict(lr=5e-4, weight_decay=0.1, temperature=0.1, batch_size=4096)),
    # MAE: AdamW betas (0.9, 0.95), lr 1.5e-4, wd 0.05, norm-pix loss, crop+flip only, 8-block decoder
    'mae': (dict(lr=1e-3, weight_decay=0.05, decoder_dim=128, decoder_depth=2, epochs=20, drop_ratio=0.75),
            dict(pos_embed='sincos', lr=1.5e-4, weight_decay=0.05, decoder_dim=512, decoder_depth=8,
                 batch_size=4096, epochs=800, warmup_epochs=40, crop_min=0.2)),
}


def defaults(method, img_size):
    small = img_size <= 64
    return {**(SMALL if small else LARGE), **METHOD_DEFAULTS[method][0 if small else 1]}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog's table of per-method defaults kept as written."""


def defaults_epilog():
    """What the flags shown as 'default: None' above become, per method and image size."""
    lines = ['flags shown as "default: None" take the method\'s default for the image size (--print-config shows them all):']
    for method in METHODS:
        for size in (32, 224):
            settings = ', '.join(f'{k}={v}' for k, v in defaults(method, size).items())
            lines.append(f'  {method} at {"<= 64" if size == 32 else "> 64"} px: {settings}')
    return '\n'.join(lines)


parser.epilog, parser.formatter_class = defaults_epilog(), HelpFormatter


def get_args(argv=None):
    args = parser.parse_args(argv)
    if args.data not in data.DATASETS:
        die(f"unknown dataset '{args.data}' (choose from {', '.join(data.DATASETS)})")
    if not 0 <= args.dilemma_prob <= 1:
        die(f'--dilemma-prob must be in [0, 1], got {args.dilemma_prob}')
    try:
        args.img_size = args.img_size or data.default_img_size(args.data, args.data_path)
    except data.DataError as e:
        die(data.error_line(e))
    for k, v in defaults(args.method, args.img_size).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not 0 <= args.drop_ratio < 1:
        die(f'--drop-ratio must be in [0, 1), got {args.drop_ratio}')
    if args.method == 'mae' and args.drop_ratio == 0:
        die("MAE's mask ratio is --drop-ratio and must be > 0; plain MAE is --dilemma-prob 0")
    if args.local_drop_ratio is None:  # [ours] at 32 px a 16 px local crop has 16 tokens: keep them all
        args.local_drop_ratio = 0.0 if args.img_size <= 64 else args.drop_ratio
    if not 0 <= args.local_drop_ratio < 1:
        die(f'--local-drop-ratio must be in [0, 1), got {args.local_drop_ratio}')
    if args.model not in vit.PRESETS:
        die(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
    patch = vit.PRESETS[args.model]['patch_size']
    for name, size in (('--img-size', args.img_size), ('--local-size', args.local_size)):
        if size is not None and size % patch:
            die(f'{name} {size} is not divisible by the patch size {patch} of {args.model}')
    dilemma_on = args.dilemma_prob > 0 or (args.drop_ratio > 0 and args.method != 'mae')
    if 64 < args.img_size < 224:  # e.g. STL-10 at 96 px: the large-image defaults are sized for GPUs
        print(f'note: {args.img_size} px images take the ImageNet-scale defaults ({args.model}, batch {args.batch_size}, {args.epochs:g} epochs); for a CPU run '
              'set them smaller (--print-config lists every setting)', file=sys.stderr)
    try:
        data.check_system_flags(args, os.path.join('out', args.method if dilemma_on else f'{args.method}-baseline'))
    except data.RunError as e:
        die(str(e))
    return args


# ----------------------------------------------------------------------------------------------
# 2. The DILEMMA core

def corrupt_positions(N, L, drop_ratio, prob, device):
    """Choose, per image, the kept tokens, which of them get a wrong position, and that position.

    Returns keep_idx (N, K): kept patch indices, K = round(L * (1 - drop_ratio)) (a uniformly random
    subset: argsort of noise, as MAE masks); pos_idx (N, K): the position whose embedding each kept
    token receives; labels (N, K) float: 1 where pos_idx != keep_idx (Binomial(K, p) per image).
    Wrong positions are never the token's own. When K <= L/2 they are distinct dropped locations, so
    no two input tokens share an embedding (the task cannot be solved by spotting duplicates); when
    K > L/2 (dense inputs) they are uniform over the L - 1 other locations [our choice].
    """
    K = max(1, round(L * (1 - drop_ratio)))
    if K == L:  # nothing dropped: keep every token in place (no need to shuffle)
        keep_idx, dropped = torch.arange(L, device=device).expand(N, L), None
    else:
        order = torch.rand(N, L, device=device).argsort(dim=1)  # a random permutation per image
        keep_idx, dropped = order[:, :K], order[:, K:]
    corrupted = torch.rand(N, K, device=device) < prob
    if K <= L - K:
        wrong = dropped[:, :K]  # the permutation's next K entries: distinct, random, all dropped
    else:
        r = torch.randint(0, L - 1, (N, K), device=device)
        wrong = r + (r >= keep_idx).long()  # uniform over the L - 1 locations other than its own
    pos_idx = torch.where(corrupted, wrong, keep_idx)
    return keep_idx, pos_idx, corrupted.float()


def auroc(scores, labels):
    """Area under the ROC curve of scores (N, K) for binary labels (N, K): the probability that a random
    misplaced token scores above a random correct one. Unlike accuracy at a base rate of p = 0.2, it moves
    as soon as the head ranks tokens better than chance (0.5). 0.5 when a class is absent."""
    s, y = scores.flatten().float(), labels.flatten().float()
    ranks = s.argsort().argsort().float() + 1  # logits are continuous: ties are negligible
    pos, neg = y.sum(), y.numel() - y.sum()
    value = ((ranks * y).sum() - pos * (pos + 1) / 2) / (pos * neg).clamp(min=1)
    return torch.where(pos * neg > 0, value, torch.full_like(value, 0.5))


def detection_loss(head, tokens, labels):
    """tokens (N, 1 + K, D) final-normalised encoder output, labels (N, K) with 1 = wrong position.
    One linear layer shared over tokens gives a logit per patch token (the class token is not scored);
    BCE averaged over all kept tokens, no class weighting. Returns (loss, accuracy, AUROC), fp32 scalars."""
    logits = head(tokens[:, 1:]).squeeze(-1).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    return loss, ((logits > 0).float() == labels).float().mean(), auroc(logits.detach(), labels)


def base_rate_entropy(p):
    """H(p) in nats: the BCE of a head that has learned only the base rate. Loss below it = information found."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def trains_detection(args):
    """Whether the run has a detection head with a loss on it (p > 0 and lambda > 0)."""
    return args.dilemma_prob > 0 and args.dilemma_weight > 0


class DilemmaEncoder(nn.Module):
    """The student ViT with DILEMMA: one sparse, corrupted pass serves the method (tokens) and the
    detection loss. With drop_ratio = 0 and p = 0 it is the plain dense ViT, untouched."""

    def __init__(self, backbone, drop_ratio, prob, weight):
        super().__init__()
        self.backbone, self.drop_ratio, self.prob = backbone, drop_ratio, prob
        self.detect = nn.Linear(backbone.embed_dim, 1) if prob > 0 and weight > 0 else None

    def forward(self, x, drop_ratio=None, prob=None):
        """x (N, C, H, W) -> tokens (N, 1 + K, D), keep_idx (N, K) or None, (loss, acc, AUROC) or None.
        drop_ratio / prob override the encoder's own (DINO's local crops: their own ratio, no corruption)."""
        drop_ratio = self.drop_ratio if drop_ratio is None else drop_ratio
        prob = self.prob if prob is None else prob
        if drop_ratio == 0 and prob == 0:
            return self.backbone(x), None, None
        L = (x.shape[-2] // self.backbone.patch_size) * (x.shape[-1] // self.backbone.patch_size)
        keep_idx, pos_idx, labels = corrupt_positions(x.shape[0], L, drop_ratio, prob, x.device)
        tokens = self.backbone(x, keep_idx, pos_idx)
        det = detection_loss(self.detect, tokens, labels) if self.detect is not None and prob > 0 else None
        return tokens, keep_idx, det


# ----------------------------------------------------------------------------------------------
# 3. The methods. Each forward(views, teacher_temp) returns (its own loss, the detection result or None);
#    teacher_temp is DINO's, the others ignore it.

def mlp(in_dim, hidden, out_dim, layers, last_bn):
    """MoCo v3 / SimCLR projector: Linear-BN-ReLU blocks, then Linear (+ BN without affine)."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out_dim, bias=False))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


def make_teacher(backbone):
    """A frozen copy of the student ViT, updated only by EMA, without stochastic depth."""
    teacher = copy.deepcopy(backbone).requires_grad_(False)
    for block in teacher.blocks:
        block.drop_path_rate = 0.0
    return teacher


def all_gather_nograd(x):
    """Concatenate x from all processes, rank order (no gradient: MoCo v3's keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for the local slice, so that the
    DDP-averaged gradient equals the single-process gradient on the global batch (SimCLR)."""

    @staticmethod
    def forward(ctx, x):
        return all_gather_nograd(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    return x if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 else GatherWithGrad.apply(x)


def contrastive_loss(q, k, temperature):
    """MoCo v3 InfoNCE: queries q (N, d) against keys k (N, d) gathered from all processes; the positive
    of query i is key i of this process. Scaled by 2T as in MoCo v3."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = all_gather_nograd(k)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    with torch.autocast(q.device.type, enabled=False):  # similarities in fp32
        logits = q @ k.T / temperature
    return F.cross_entropy(logits, labels) * 2 * temperature


def nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent: 2N embeddings per process, negatives gathered from all processes (with their
    gradient); the positive of z1[i] is z2[i] and vice versa; self-similarity is excluded."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, d)
    n = z1.shape[0]
    everyone = gather_with_grad(z)  # (W * 2N, d), process r's block at r * 2N
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    own = torch.arange(2 * n, device=z.device) + 2 * n * rank
    with torch.autocast(z.device.type, enabled=False):  # similarities in fp32
        logits = z @ everyone.T / temperature
    logits = logits.masked_fill(F.one_hot(own, logits.shape[1]).bool(), float('-inf'))  # not itself
    positives = torch.cat([own[n:], own[:n]])
    return F.cross_entropy(logits, positives)


class MoCoV3(nn.Module):
    def __init__(self, student, args):
        super().__init__()
        D = student.backbone.embed_dim
        self.student = student
        self.projector = mlp(D, args.proj_hidden, args.proj_dim, 3, last_bn=True)
        self.predictor = mlp(args.proj_dim, args.proj_hidden, args.proj_dim, 2, last_bn=True)  # MoCo v3's ViT predictor ends in BN
        self.teacher = make_teacher(student.backbone)  # momentum encoder
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature = args.temperature

    def ema_pairs(self):
        return [(self.teacher, self.student.backbone), (self.teacher_projector, self.projector)]

    def forward(self, views, teacher_temp=None):
        x1, x2 = views
        tokens, _, det = self.student(torch.cat([x1, x2]))  # both views in one sparse, corrupted pass
        q1, q2 = (self.predictor(self.projector(c)) for c in tokens[:, 0].chunk(2))
        with torch.no_grad():  # momentum encoder: dense, clean
            k1, k2 = (self.teacher_projector(c) for c in self.teacher(torch.cat([x1, x2]))[:, 0].chunk(2))
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return loss, det


class DINOHead(nn.Module):
    """DINO's head: 3-layer MLP (GELU) to a bottleneck, l2-normalise, weight-normalised last layer
    (its norm fixed to 1: the prototypes are unit vectors)."""

    def __init__(self, in_dim, hidden, bottleneck, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class DINO(nn.Module):
    def __init__(self, student, args):
        super().__init__()
        self.student = student
        self.head = DINOHead(student.backbone.embed_dim, args.proj_hidden, args.proj_dim, args.out_dim)
        self.teacher = make_teacher(student.backbone)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer('center', torch.zeros(1, args.out_dim))
        self.student_temp, self.center_momentum = args.temperature, args.center_momentum
        self.local_drop_ratio = args.local_drop_ratio

    def ema_pairs(self):
        return [(self.teacher, self.student.backbone), (self.teacher_head, self.head)]

    def forward(self, views, teacher_temp=0.04):  # the teacher temperature of this step (schedule())
        globals_, locals_ = torch.cat(views[:2]), views[2:]
        with torch.no_grad():  # teacher: the two global crops, dense and clean
            t = self.teacher_head(self.teacher(globals_)[:, 0]).float()
        g_tokens, _, g_det = self.student(globals_)
        s = [self.head(g_tokens[:, 0])]
        if locals_:  # local crops: their own drop ratio, never corrupted, no detection loss [ours]
            l_tokens, _, _ = self.student(torch.cat(locals_), drop_ratio=self.local_drop_ratio, prob=0)
            s.append(self.head(l_tokens[:, 0]))
        s = torch.cat(s).float()
        # Cross-entropy between every teacher global view and every other student view.
        t_probs = F.softmax((t - self.center) / teacher_temp, dim=-1).chunk(2)
        s_logp = F.log_softmax(s / self.student_temp, dim=-1).chunk(2 + len(locals_))
        terms = [-(tp * sl).sum(-1).mean() for i, tp in enumerate(t_probs) for j, sl in enumerate(s_logp) if i != j]
        loss = sum(terms) / len(terms)
        with torch.no_grad():  # centre: EMA of the teacher outputs' batch mean, all-reduced over processes
            batch_sum = t.sum(0, keepdim=True)
            count = torch.tensor([float(t.shape[0])], device=t.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch_sum)
                dist.all_reduce(count)
            self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
        return loss, g_det


class SimCLR(nn.Module):
    def __init__(self, student, args):
        super().__init__()
        self.student = student
        self.projector = mlp(student.backbone.embed_dim, args.proj_hidden, args.proj_dim, 3, last_bn=True)
        self.temperature = args.temperature

    def forward(self, views, teacher_temp=None):
        tokens, _, det = self.student(torch.cat(views))  # both views sparse and corrupted
        z1, z2 = (self.projector(c) for c in tokens[:, 0].chunk(2))
        return nt_xent(z1, z2, self.temperature), det


class MAE(nn.Module):
    """MAE: the kept tokens are MAE's visible ones (some at wrong positions in the encoder); the
    decoder puts each at its TRUE position, adds mask tokens elsewhere, and reconstructs the masked
    patches (per-patch normalised pixels)."""

    def __init__(self, student, args):
        super().__init__()
        enc, D = student.backbone, student.backbone.embed_dim
        self.student, self.patch, self.norm_pix = student, enc.patch_size, not args.no_norm_pix_loss
        self.decoder_embed = nn.Linear(D, args.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, args.decoder_dim))
        self.register_buffer('decoder_pos', vit.sincos_pos_embed(args.decoder_dim, enc.grid, enc.grid))
        heads = max(1, args.decoder_dim // 32)
        self.decoder_blocks = nn.ModuleList(vit.Block(args.decoder_dim, heads, 4.0, 0.0) for _ in range(args.decoder_depth))
        self.decoder_norm = nn.LayerNorm(args.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(args.decoder_dim, self.patch ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, x):
        """(N, 3, H, W) -> (N, L, p * p * 3), patches in row-major order."""
        N, C, H, W = x.shape
        P = self.patch
        return x.reshape(N, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1).reshape(N, (H // P) * (W // P), P * P * C)

    def forward(self, views, teacher_temp=None):
        x = views[0]
        tokens, keep_idx, det = self.student(x)
        y = self.decoder_embed(tokens)  # (N, 1 + K, Dd)
        N, L = x.shape[0], self.decoder_pos.shape[0]
        full = self.mask_token.to(y.dtype).expand(N, L, -1).clone()
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, y.shape[-1]), y[:, 1:])  # true positions
        y = torch.cat([y[:, :1], full + self.decoder_pos], dim=1)
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:].float()  # (N, L, p*p*3)
        target = self.patchify(x).float()
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(N, L, device=x.device).scatter_(1, keep_idx, 0.0)
        loss = (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()
        return loss, det


def build_model(args):
    backbone = vit.vit(args.model, img_size=args.img_size, pos_embed=args.pos_embed, drop_path_rate=args.drop_path)
    student = DilemmaEncoder(backbone, args.drop_ratio, args.dilemma_prob, args.dilemma_weight)
    return {'mocov3': MoCoV3, 'dino': DINO, 'simclr': SimCLR, 'mae': MAE}[args.method](student, args)


def eval_backbone(model):
    """The encoder a checkpoint is evaluated with: DINO's teacher (as DINO reports), else the student."""
    return model.teacher if isinstance(model, DINO) else model.student.backbone


def views_transform(args):
    if args.method == 'dino':
        return data.multi_crop(args.img_size, args.local_size, args.local_crops, global_scale=(args.crop_min, 1.0))
    if args.method == 'mae':
        return data.mae_view(args.img_size)
    return data.two_views(args.img_size, args.crop_min)


# ----------------------------------------------------------------------------------------------
# 4. Training: schedules, one optimizer step, the figure, the loop

def cosine(step, total, start, end):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def lr_at(step, total_steps, peak, warmup_steps, min_lr):
    """Linear warm-up to the peak, then cosine to min_lr."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, max(1, total_steps - warmup_steps), peak, min_lr)


def teacher_temp_at(step, warmup_steps, final, start=0.04):
    """DINO: teacher temperature, linear warm-up from `start` to `final`, then constant."""
    return final if step >= warmup_steps else start + (final - start) * step / warmup_steps


def schedule(step, total_steps, steps_per_epoch, args):
    """Everything that changes with the step: lr (linear scaling: lr x batch / 256), weight decay
    (cosine, DINO to weight_decay_end), teacher EMA momentum (cosine to 1), and DINO's teacher
    temperature and last-layer freeze."""
    epochs = lambda e: int(e * steps_per_epoch)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    dino = args.method == 'dino'
    return dict(lr=lr_at(step, total_steps, args.lr * args.batch_size / 256, epochs(args.warmup_epochs), args.min_lr),
                weight_decay=cosine(step, total_steps, args.weight_decay, wd_end),
                momentum=cosine(step, total_steps, args.momentum, 1.0),
                teacher_temp=teacher_temp_at(step, epochs(args.teacher_temp_epochs), args.teacher_temp) if dino else None,
                freeze_last_layer=dino and step < epochs(args.freeze_last_layer))


def param_groups(model):
    """No weight decay on biases, norms, the class token and positional embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or name.endswith(('cls_token', 'pos_embed', 'mask_token'))
            (no_decay if skip else decay).append(param)
    return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]


STATS = ('loss', 'method_loss', 'detect_loss', 'det_acc', 'det_auroc')


def train_step(model, batches, optimizer, scaler, autocast, sched, args):
    """One optimizer step on args.accum_steps micro-batches drawn from `batches`: forward, backward
    (DDP all-reduces gradients on the last micro-step only), clip, step, then the teacher's EMA.
    The loss is DILEMMA's: the method's own loss + lambda * the detection loss.
    Returns the mean over micro-steps of STATS, a (5,) fp32 tensor left on the device (no sync)."""
    inner = getattr(model, '_orig_mod', model)  # under torch.compile
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    raw = inner.module if ddp else inner
    for group in optimizer.param_groups:
        group['lr'] = sched['lr']
        if group['weight_decay'] > 0:
            group['weight_decay'] = sched['weight_decay']
    stats = torch.zeros(len(STATS), device=optimizer.param_groups[0]['params'][0].device)
    for micro in range(args.accum_steps):
        views = next(batches)
        last_micro = micro == args.accum_steps - 1
        with (inner.no_sync() if ddp and not last_micro else nullcontext()), autocast:
            method_loss, det = model(views, sched['teacher_temp'])
            detect, acc, auc = det if det is not None else [torch.zeros_like(method_loss)] * 3
            loss = method_loss + args.dilemma_weight * detect if det is not None else method_loss
        scaler.scale(loss / args.accum_steps).backward()
        stats += torch.stack([loss, method_loss, detect, acc, auc]).detach().float() / args.accum_steps
    if args.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
    if sched['freeze_last_layer']:
        raw.head.last_layer.weight.grad = None  # DINO: the prototypes stay fixed for the first epoch(s)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # teacher <- m * teacher + (1 - m) * student
        for teacher, student in getattr(raw, 'ema_pairs', list)():
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - sched['momentum'])
    return stats


@torch.no_grad()
def save_figure(model, images, path, step, drop_ratio, prob, seed=0):
    """For a few images, four panels: the input; what the student gets (dropped patches grey, misplaced
    ones outlined red); the same patches drawn where their positional embeddings claim they are; and
    what the detection head flags (green: caught, orange: false alarm, red: missed)."""
    enc = model.student
    was_training = enc.training
    enc.eval()
    N, _, H, W = images.shape
    P, S = enc.backbone.patch_size, max(1, 128 // H)  # upscale to ~128 px so single patches are visible
    with torch.random.fork_rng(devices=[]):  # on the CPU, leaving the training RNG untouched
        torch.manual_seed(seed)  # the same corruption at every evaluation, so figures are comparable
        keep, pos, labels = corrupt_positions(N, (H // P) * (W // P), drop_ratio, max(prob, 0.2), 'cpu')
    flagged = torch.zeros(N, keep.shape[1], dtype=torch.bool)
    if enc.detect is not None:
        tokens = enc.backbone(images, keep.to(images.device), pos.to(images.device))
        flagged = (enc.detect(tokens[:, 1:]).squeeze(-1) > 0).cpu()
    enc.train(was_training)
    wrong = labels.bool()
    caught, alarms = (flagged & wrong).sum().item(), (flagged & ~wrong).sum().item()
    pixels = (images.cpu() * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]).clamp(0, 1)
    pixels = (pixels * 255).byte().permute(0, 2, 3, 1).numpy()
    pad, cell, top = 6, H * S, 44
    fig = Image.new('RGB', (4 * cell + 5 * pad, top + N * (cell + pad) + 26), 'white')
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 4), f'step {step}: {caught} of {wrong.sum().item()} misplaced tokens flagged, {alarms} false alarms '
              f'({wrong.numel()} kept tokens)' if enc.detect is not None
              else f'step {step}: DILEMMA off (no head); red marks only illustrate the task', fill='black')
    for k, title in enumerate(('input', 'student input', 'as positions claim', 'flagged')):
        draw.text((pad + k * (cell + pad), 26), title, fill='black')
    box = lambda t, x0, y0: (x0 + t % (W // P) * P * S, y0 + t // (W // P) * P * S,
                             x0 + (t % (W // P) + 1) * P * S - 1, y0 + (t // (W // P) + 1) * P * S - 1)
    for i in range(N):
        img = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        y0, xs = top + i * (cell + pad), [pad + k * (cell + pad) for k in range(4)]
        fig.paste(img, (xs[0], y0))
        for x0 in xs[1:]:
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(128, 128, 128))
        for j, (t, claimed) in enumerate(zip(keep[i].tolist(), pos[i].tolist())):
            patch = img.crop(box(t, 0, 0))
            fig.paste(patch, box(t, xs[1], y0)[:2])
            fig.paste(patch, box(claimed, xs[2], y0)[:2])
            fig.paste(patch, box(t, xs[3], y0)[:2])
            if wrong[i, j]:
                draw.rectangle(box(t, xs[1], y0), outline='red', width=2)
                draw.rectangle(box(claimed, xs[2], y0), outline='red', width=2)
            if enc.detect is not None and (wrong[i, j] or flagged[i, j]):
                colour = 'lime' if wrong[i, j] and flagged[i, j] else ('orange' if flagged[i, j] else 'red')
                draw.rectangle(box(t, xs[3], y0), outline=colour, width=2)
    draw.text((pad, fig.height - 20), 'grey: dropped   red: wrong position   flags: green caught, orange false alarm, '
              'red missed', fill='black')
    fig.save(path)


def save(model, optimizer, scaler, args, step, path, ddp):
    """The run's checkpoint (master writes it; every process's RNG goes in). `backbone` + `backbone_args`
    are what eval_linear.py reads; `args` is how a re-run knows it is the same run."""
    rngs = data.rng_states(args.device, ddp)
    if data.dist_info()[0] == 0:
        data.save_checkpoint({'backbone': eval_backbone(model).state_dict(), 'backbone_kind': 'vit',
                              'backbone_args': vit.preset_args(args.model, img_size=args.img_size, pos_embed=args.pos_embed),
                              'args': vars(args), 'step': step, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                              'scaler': scaler.state_dict(), 'rng': rngs}, path)


def evaluate(model, knn, args, step, dtype, master):
    """k-NN top-1/top-5 of the evaluated backbone on the held-out split, the detection figure, a log line."""
    knn_loaders, num_classes, figure_images = knn
    top1, top5 = eval_linear.knn_monitor(eval_backbone(model), 'vit', *knn_loaders, args.device, num_classes, dtype)
    if master:
        save_figure(model, figure_images, os.path.join(args.out_dir, f'detection_{step:06d}.png'), step,
                    args.drop_ratio, args.dilemma_prob)
        with open(os.path.join(args.out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps({'step': step, 'knn_top1': top1, 'knn_top5': top5}) + '\n')
    return top1, top5


def log_record(step, means, seconds, steps, args, train_set, ddp):
    """One log.jsonl line from the mean of STATS over the last `steps` steps."""
    record = {'step': step, **dict(zip(STATS[:2], means[:2])), 'images_per_s': steps * args.batch_size / seconds}
    if trains_detection(args):  # detection on corrupted (DINO: global) crops
        record.update(zip(STATS[2:], means[2:]), det_info=base_rate_entropy(args.dilemma_prob) - means[2])  # nats below H(p)
    if args.skip_bad_images:
        record['skipped_images'] = data.skipped_images(train_set, args.device, ddp)
    return record


def main(argv=None):
    args = get_args(argv)
    data.check_writable(args.out_dir)
    ddp, rank, world, args.device = data.init_distributed(args.device, args.dist_timeout)
    master, device_type = rank == 0, 'cuda' if args.device.startswith('cuda') else 'cpu'
    torch.manual_seed(args.seed)  # same initial weights on every process (DDP also broadcasts them)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data: the pretraining views and, when the data has labels, the k-NN monitor's splits
    train_set = data.build_dataset(args.data, args.data_path, 'pretrain', views_transform(args), args.download, args.seed,
                                   args.skip_bad_images)
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
    model = build_model(args).to(args.device)
    if ddp and device_type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # projector BN over the global batch
    optimizer = torch.optim.AdamW(param_groups(model), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95) if args.method == 'mae' else (0.9, 0.999),
                                  fused=True)  # one kernel for all parameters (CUDA, and CPU since torch 2.4)
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == 'fp16')
    dtype = data.TORCH_DTYPES[args.dtype]
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    ckpt_path, log_path = os.path.join(args.out_dir, 'ckpt.pt'), os.path.join(args.out_dir, 'log.jsonl')
    step = start = data.resume(ckpt_path, args, model, optimizer, scaler, log_path)
    if step == 0:
        torch.manual_seed(args.seed + rank)  # different corruptions / drop paths on each process
    raw = model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.device] if device_type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model)
    if master:
        # wall times depend on it: OMP_NUM_THREADS if set, else 1 per process under torchrun, else the cores
        threads = f' ({torch.get_num_threads()} thread(s) each)' if args.device == 'cpu' else ''
        what = (f'+ DILEMMA (p={args.dilemma_prob}, drop={args.drop_ratio}, lambda={args.dilemma_weight})'
                if trains_detection(args) else f'without DILEMMA (no detection head, drop={args.drop_ratio})')
        print(f'{args.method} {what} '
              f'on {args.data} at {args.img_size} px, {args.model}, {sum(q.numel() for q in raw.parameters() if q.requires_grad) / 1e6:.1f}M '
              f'trainable parameters, {world} process(es) on {args.device}{threads}, {args.dtype} ({args.dtype_reason})')
        print(f'global batch {args.batch_size} ({micro_batch} per process x {world} x {args.accum_steps} accumulation), '
              f'lr {args.lr} x {args.batch_size}/256 = {args.lr * args.batch_size / 256:.3g}, '
              f'{total_steps} steps ({args.epochs} epochs of {steps_per_epoch}), '
              f'{f"resuming at step {step}" if step else "starting at step 0 (no checkpoint in --out-dir)"}')
        print(f'config: {json.dumps(vars(args))}')
        if knn is None:
            print('the data has no labels: no k-NN monitor and no detection figure, only the loss in log.jsonl')

    # ---- the loop: evaluate and save at the top (at last_step too, so nothing follows the loop), then one step
    batches = data.micro_batches(loader, step, args.accum_steps, args.device, device_views)
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
            record = log_record(step, (running / (step - logged_step)).tolist(), time.time() - t_log, step - logged_step, args,
                                train_set, ddp)
            record['lr'] = sched['lr']
            if master:
                with open(log_path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                pbar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['images_per_s']:.0f}",
                                 **({'auroc': f"{record['det_auroc']:.3f}"} if 'det_auroc' in record else {}))
            running.zero_()
            logged_step, t_log = step, time.time()
    pbar.close()
    if ddp:
        dist.destroy_process_group()
    if stop:
        data.exit_preempted(step, ckpt_path)  # status 75
    return {'knn_top1': top1, 'knn_top5': top5} if knn is not None else {}


if __name__ == '__main__':
    data.run_script(main, die)
