"""
Evaluate the frozen features of a checkpoint written by dilemma.py or co_byol.py (or of an untrained
backbone, --random-init) on a labelled dataset, without augmentation:

- weighted k-NN (cosine similarity, k = 20, votes weighted by exp(sim / 0.07), as DINO reports it);
- a linear probe trained on features extracted once and cached (top-1 and top-5);
- with --robustness, the top-1 of backbone + trained probe on perturbed validation images: Gaussian
  noise, occlusion of random square patches (filled with ImageNet's mean colour), patch shuffling
  (the image's cells permuted on a grid), internal corruption (the features pooled over a random
  subset of the feature map's positions; a ViT runs on a random subset of its patch tokens), and
  FGSM / PGD attacks. All of it runs in fp32 (an attack that follows bf16 / fp16 gradients takes
  wrong signs and overstates robustness).
- with --shape-bias, the cue-conflict test (Geirhos et al., ICLR 2019) on the textured shapes data:
  a probe trained where each object's texture is its class's, shape bias where the texture is
  another class's, and the probe's top-1 on shape alone and on texture alone.

Features: the ViT's class token (or mean patch token), or the RF-ResNet's average-pooled feature map.

    python eval_linear.py out/dino/ckpt.pt
    python eval_linear.py out/co_byol/ckpt.pt --robustness
    python eval_linear.py out/dino/ckpt.pt --shape-bias --robustness
    python eval_linear.py dino_deitsmall16_pretrain.pth --data folder --data-path DIR   # published ViT weights
    python eval_linear.py --random-init --model vit_tiny/4 --data folder --data-path DIR   # DIR/train/<class>, DIR/val/<class>
    python eval_linear.py --random-init --arch rf25_small --width 0.125 --robustness
    torchrun --nproc_per_node=2 eval_linear.py out/dino/ckpt.pt      # feature extraction split over 2

The checkpoint contract (both training scripts write it): a dict with 'backbone' (state dict),
'backbone_kind' ('vit' | 'rf_resnet'), 'backbone_args' (constructor kwargs), 'args' (the training
config), 'step', plus what the method needs to resume. The last line printed is one JSON object.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import rf_resnet
import vit

# ----------------------------------------------------------------------------------------------
# Backbones and features


def build_backbone(kind, backbone_args):
    if kind == 'vit':
        return vit.VisionTransformer(**backbone_args)
    if kind == 'rf_resnet':
        return rf_resnet.RFResNet(**backbone_args)
    raise ValueError(f"unknown backbone kind '{kind}'")


def load_checkpoint(path, num_heads=None):
    """Rebuild the backbone of a checkpoint. Returns (backbone, checkpoint dict). A file without the
    checkpoint contract but with ViT weights (timm, DINO, MoCo v3: vit.load_pretrained) gives the ViT
    they fit (vit.infer_args; `num_heads` as it says) and a checkpoint dict with only the contract."""
    if not os.path.isfile(path):
        raise data.DataError(f'checkpoint not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise data.DataError(f'cannot read checkpoint {path}: {e.__class__.__name__}: {e}') from None
    if isinstance(ckpt, dict) and not {'backbone', 'backbone_kind', 'backbone_args'} <= ckpt.keys():
        try:  # published ViT weights?
            backbone_args = vit.infer_args(ckpt, num_heads)
        except (ValueError, KeyError, AttributeError, TypeError):
            pass
        else:
            backbone = vit.VisionTransformer(**backbone_args)
            missing = vit.load_pretrained(backbone, ckpt)
            if missing:
                raise data.DataError(f'{path}: ViT weights without {", ".join(missing[:5])}')
            return backbone, {'backbone_kind': 'vit', 'backbone_args': backbone_args, 'args': {}, 'step': 'published weights'}
    if not isinstance(ckpt, dict) or not {'backbone', 'backbone_kind', 'backbone_args'} <= ckpt.keys():
        raise data.DataError(f'{path} is not a checkpoint of dilemma.py / co_byol.py '
                             '(needs backbone, backbone_kind, backbone_args) nor timm / DINO / MoCo v3 ViT weights')
    backbone = build_backbone(ckpt['backbone_kind'], ckpt['backbone_args'])
    backbone.load_state_dict(ckpt['backbone'])
    return backbone, ckpt


def random_subset(N, L, keep, generator, device):
    """(N, round(keep * L)) random distinct indices in [0, L) per row (at least one)."""
    return torch.rand(N, L, generator=generator, device=device).argsort(1)[:, :max(1, round(keep * L))]


def features(backbone, kind, images, pool='cls', keep=1.0, generator=None):
    """(N, C, H, W) images -> (N, D) frozen features: the ViT's class token (or the mean of its patch
    tokens, pool='avg'), or the RF-ResNet's pooled feature map (its average, then its MLP if it has
    one). keep < 1 (internal corruption), subsets drawn with `generator`: a ViT runs on a random
    round(keep * L) of its L patch tokens (token dropping: the sparse inputs DILEMMA and MAE train
    on); an RF-ResNet, which cannot leave input positions out, averages its map over a random
    round(keep * HW) of its positions. At least one token or position either way."""
    if kind == 'vit':
        keep_idx = None
        if keep < 1:
            P = backbone.patch_size
            keep_idx = random_subset(len(images), (images.shape[2] // P) * (images.shape[3] // P), keep, generator,
                                     images.device)
        out = backbone(images, keep_idx=keep_idx)  # (N, 1 + K, D)
        return out[:, 0] if pool == 'cls' else out[:, 1:].mean(1)
    tokens = backbone(images).flatten(2).transpose(1, 2)  # (N, HW, C)
    if keep < 1:
        pick = random_subset(tokens.shape[0], tokens.shape[1], keep, generator, tokens.device)
        tokens = tokens.gather(1, pick[:, :, None].expand(-1, -1, tokens.shape[2]))
    pooled = tokens.mean(1)
    if kind == 'rf_resnet' and backbone.mlp is not None:
        pooled = backbone.mlp(pooled)
    return pooled


def gather_in_order(x):
    """Process r holds rows r, r + W, r + 2W, ... of a tensor (the evaluation sampler's split);
    returns the whole tensor, in order, on every process. A no-op without a process group."""
    rank, world = data.dist_info()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(sum(int(s) for s in sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
    for r, (part, size) in enumerate(zip(parts, sizes)):
        out[r::world] = part[:int(size)]
    return out


@torch.no_grad()
def extract_features(backbone, kind, loader, device, dtype=torch.float32, pool='cls'):
    """Features and labels of every image of an evaluation loader: ((N, D) float32, (N,) long), on
    `device`, gathered from all processes."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in loader:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            feats.append(features(backbone, kind, images.to(device, non_blocking=True), pool).float())
        labels.append(y.to(device))
    backbone.train(was_training)
    return gather_in_order(torch.cat(feats)), gather_in_order(torch.cat(labels))


# ----------------------------------------------------------------------------------------------
# Classifiers on cached features


def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (N, C), labels (N,) -> [top-k accuracy in % for each k] (top-5 of 3 classes is 100)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [100.0 * hit[:, :k].any(1).float().mean().item() for k in ks]


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted k-NN: each test feature votes with its k most cosine-similar training features,
    weighted by exp(similarity / T). Returns (top-1, top-5) in %."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    scores = []
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()))
    return topk_accuracy(torch.cat(scores), test_y)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=100, lr=0.1, weight_decay=0.0,
                 batch_size=256, seed=0):
    """Logistic regression on frozen features, standardised with the training set's statistics (MAE's
    BatchNorm without affine): SGD with momentum and a cosine schedule. Returns ((top-1, top-5) in %,
    the trained nn.Sequential(standardise, linear) classifier)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    linear = torch.nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    x = (train_f - mean) / std
    steps_per_epoch = max(1, len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g).to(x.device)
            for j in range(steps_per_epoch):
                idx = perm[j * batch_size:(j + 1) * batch_size]
                loss = F.cross_entropy(linear(x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    classifier = torch.nn.Sequential(Standardise(mean, std), linear).eval()
    with torch.no_grad():
        return topk_accuracy(classifier(test_f), test_y), classifier


class Standardise(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('std', std)

    def forward(self, x):
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# Robustness: the frozen backbone + trained probe on perturbed validation images. Noise and attack
# strengths are in pixel units of the [0, 1] image (before normalisation); perturbed images are
# clipped to [0, 1].

def to_pixels(x):
    """Normalised images (N, 3, H, W) -> [0, 1] pixels (and back with from_pixels)."""
    return x * x.new_tensor(data.STD)[:, None, None] + x.new_tensor(data.MEAN)[:, None, None]


def from_pixels(x):
    return (x - x.new_tensor(data.MEAN)[:, None, None]) / x.new_tensor(data.STD)[:, None, None]


def gaussian_noise(x, sigma, generator):
    """Add N(0, sigma^2) to every pixel of the [0, 1] image (as ImageNet-C, sigma 0.08 ... 0.38), clip."""
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return from_pixels((to_pixels(x) + sigma * noise).clamp(0, 1))


def occlude(x, fraction, grid, generator):
    """Cut each image into grid x grid square cells and grey out round(fraction * grid^2) random ones
    with value 0 in normalised units: ImageNet's mean colour (every dataset here is normalised with
    ImageNet's mean and std, whatever its own mean)."""
    N, _, H, W = x.shape
    n_cells = round(fraction * grid * grid)
    order = torch.rand(N, grid * grid, generator=generator, device=x.device).argsort(1)
    cells = torch.zeros(N, grid * grid, dtype=torch.bool, device=x.device)
    cells.scatter_(1, order[:, :n_cells], True)
    rows = torch.arange(H, device=x.device) * grid // H  # the cell row of each pixel row
    cols = torch.arange(W, device=x.device) * grid // W
    mask = cells.view(N, grid, grid)[:, rows][:, :, cols]  # (N, H, W)
    return x.masked_fill(mask[:, None], 0.0)


def shuffle_patches(x, grid, generator):
    """Cut each image (N, C, H, W) into grid x grid equal cells (H and W divisible by grid) and put
    them back in a random order, one permutation per image: the parts stay, their layout is lost.
    grid 1 is the identity."""
    N, C, H, W = x.shape
    h, w = H // grid, W // grid
    cells = x.reshape(N, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5).reshape(N, grid * grid, C, h, w)
    order = torch.rand(N, grid * grid, generator=generator, device=x.device).argsort(1)
    cells = cells.gather(1, order[:, :, None, None, None].expand_as(cells))
    return cells.reshape(N, grid, grid, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)


def input_gradient(model, pixels, y):
    """d cross-entropy(model(normalised pixels), y) / d pixels, in fp32 even when called under an
    autocast region (the caller's bf16 / fp16 would flip the sign of small gradient entries)."""
    with torch.autocast(pixels.device.type, enabled=False), torch.enable_grad():  # and under no_grad
        pixels = pixels.detach().float().requires_grad_(True)
        loss = F.cross_entropy(model(from_pixels(pixels)).float(), y)
        grad, = torch.autograd.grad(loss, pixels)
    return grad


def attack(model, x, y, eps, steps):
    """L-infinity attack on the cross-entropy of `model` (normalised images -> logits), eps in [0, 1]
    pixel units, in fp32. steps = 1: FGSM (one step of eps); more: PGD without random start, step
    2.5 eps / steps, each step projected back onto the eps-ball and the valid image. Returns
    normalised images."""
    clean = to_pixels(x.float()).detach()
    adv, alpha = clean.clone(), eps if steps == 1 else 2.5 * eps / steps
    for _ in range(steps):
        adv = adv + alpha * input_gradient(model, adv, y).sign()
        adv = torch.minimum(torch.maximum(adv, clean - eps), clean + eps).clamp(0, 1)
    return from_pixels(adv).detach()


def robustness(backbone, kind, classifier, loader, device, pool, args):
    """Top-1 (%) of backbone + probe on the loader's images under each perturbation of args, in fp32
    (whatever dtype extracted the probe's training features). Returns {'noise': {sigma: acc},
    'occlusion': {fraction: acc}, 'shuffle': {grid: acc}, 'internal': {keep: acc} (ViTs: token
    dropping; RF-ResNets: pooling over a subset of positions; see `features`), 'fgsm': {'k/255': acc},
    'pgd': {...}}; strength 0 (grid 1, keep 1) = clean."""
    backbone.eval().requires_grad_(False)
    classifier.requires_grad_(False)
    rank = data.dist_info()[0]
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)

    def model(x, keep=1.0):
        with torch.autocast(torch.device(device).type, enabled=False):
            return classifier(features(backbone, kind, x.float(), pool, keep, generator).float())

    # (name, strength, image perturbation, keep fraction of the positions pooled)
    tests = ([('noise', s, lambda x, y, s=s: gaussian_noise(x, s, generator), 1.0) for s in args.noise_sigmas]
             + [('occlusion', f, lambda x, y, f=f: occlude(x, f, args.occlusion_grid, generator), 1.0) for f in args.occlusion]
             + [('shuffle', g, lambda x, y, g=g: shuffle_patches(x, g, generator), 1.0) for g in args.shuffle_grids]
             + [('internal', k, lambda x, y: x, k) for k in args.internal_keep])
    tests += [(name, f'{e:g}/255', lambda x, y, e=e, k=k: attack(model, x, y, e / 255, k), 1.0)
              for name, k in (('fgsm', 1), ('pgd', args.pgd_steps)) for e in args.attack_eps]
    correct, total = torch.zeros(len(tests), device=device), torch.zeros((), device=device)
    for images, y in loader:
        x, y = images.to(device, non_blocking=True), y.to(device)
        for i, (_, _, perturb, keep) in enumerate(tests):
            x_bad = perturb(x, y)
            with torch.no_grad():
                correct[i] += (model(x_bad, keep).argmax(1) == y).sum()
        total += len(y)
    if data.dist_info()[1] > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    results = {}
    for (name, strength, _, _), c in zip(tests, (100 * correct / total).tolist()):
        results.setdefault(name, {})[str(strength)] = c
    return results


# ----------------------------------------------------------------------------------------------
# Shape bias: the cue-conflict test of Geirhos et al. (ICLR 2019), made exact on the shapes data. A
# probe learns the 8 classes from images where each object is filled with its own class's texture, so
# that shape and texture both give the label; on images where the texture comes from another class,
# its answers say which cue the features carry: shape bias = shape / (shape + texture) decisions.

def shape_bias_sets(img_size, seed=0, n_train=None, n_val=None):
    """The labelled sets of the test (32 px shapes, resized to img_size by the evaluation transform):
    'train' and 'consistent' (each object filled with its own class's texture), 'conflict' (with the
    texture of another class; `texture_targets`), 'shape_only' (flat fill: the default val images),
    'texture_only' (no object, the whole image textured). The val sets show the same scenes."""
    tf = data.eval_transform(img_size)
    val = lambda texture: data.Shapes('val', tf, seed, n=n_val, texture=texture)
    return {'train': data.Shapes('train', tf, seed, n=n_train, texture='class'), 'consistent': val('class'),
            'conflict': val('conflict'), 'shape_only': val(None), 'texture_only': val('only')}


def cue_decisions(predicted, shape_y, texture_y):
    """On cue-conflict images (shape_y != texture_y everywhere): the % of decisions for the shape's
    class and for the texture's class, and shape bias = shape / (shape + texture) (nan if neither)."""
    shape = (predicted == shape_y).float().mean().item()
    texture = (predicted == texture_y).float().mean().item()
    return {'shape_decisions': 100 * shape, 'texture_decisions': 100 * texture,
            'shape_bias': shape / (shape + texture) if shape + texture > 0 else float('nan')}


def shape_bias(featurize, sets, probe_epochs=100, probe_lr=0.1, probe_wd=0.0, seed=0):
    """featurize(dataset) -> ((N, D) features, (N,) labels). Trains the linear probe on sets['train'];
    returns its top-1 (%) on the cue-consistent, shape-only and texture-only images, and its cue
    decisions on the conflict images (cue_decisions)."""
    feats = {name: featurize(ds) for name, ds in sets.items()}
    (top1, _), probe = linear_probe(*feats['train'], *feats['consistent'], len(data.SHAPES), probe_epochs, probe_lr,
                                    probe_wd, seed=seed)
    results = {'consistent_top1': top1}
    with torch.no_grad():
        for name in ('shape_only', 'texture_only'):
            results[f'{name}_top1'] = topk_accuracy(probe(feats[name][0]), feats[name][1], ks=(1,))[0]
        f, shape_y = feats['conflict']
        texture_y = torch.tensor(sets['conflict'].texture_targets, device=shape_y.device)
        results.update(cue_decisions(probe(f).argmax(1), shape_y, texture_y))
    return results


def knn_monitor(backbone, kind, train_loader, val_loader, device, num_classes, dtype=torch.float32):
    """What the training scripts call at each evaluation: k-NN top-1 / top-5 on the val split."""
    train_f, train_y = extract_features(backbone, kind, train_loader, device, dtype)
    val_f, val_y = extract_features(backbone, kind, val_loader, device, dtype)
    return knn_classify(train_f, train_y, val_f, val_y, num_classes)


# ----------------------------------------------------------------------------------------------
# Command line

def data_and_size(args, kind, backbone_args, train_args):
    """Sets args.data / args.data_path to what the checkpoint was trained on unless given, and returns
    the image size to evaluate at; DataError (one line, exit 2) for a size the backbone cannot take."""
    args.data = args.data or train_args.get('data', 'shapes')
    if args.data_path is None and args.data == train_args.get('data'):
        args.data_path = train_args.get('data_path')
    img_size = args.img_size or backbone_args.get('img_size') or train_args.get('img_size') \
        or data.default_img_size(args.data, args.data_path)
    if kind == 'vit' and img_size % backbone_args['patch_size']:
        raise data.DataError(f"image size {img_size} is not divisible by the patch size {backbone_args['patch_size']}")
    if kind == 'rf_resnet' and rf_resnet.feature_size(backbone_args, img_size) == 0:
        raise data.DataError(f'image size {img_size} is too small for this RF-ResNet (its feature map would be empty)')
    return img_size


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('ckpt', nargs='?', help='ckpt.pt written by dilemma.py or co_byol.py')
    p.add_argument('--random-init', action='store_true', help='evaluate an untrained backbone (the floor): with a checkpoint, its architecture on its data; alone, --model or --arch')
    p.add_argument('--model', default='vit_mini/4', help=f'ViT preset for --random-init (default: what dilemma.py trains at 32 px): {", ".join(vit.PRESETS)}')
    p.add_argument('--pos-embed', choices=('learned', 'sincos'), default='sincos', help='ViT positional embedding for --random-init')
    p.add_argument('--num-heads', type=int, default=None, help='heads of a ViT loaded from timm / DINO / MoCo v3 weights (not stored in them; default embed_dim / 64)')
    p.add_argument('--arch', default=None, help=f'RF-ResNet preset for --random-init (instead of --model): {", ".join(rf_resnet.PRESETS)}')
    p.add_argument('--width', type=float, default=1.0, help='RF-ResNet width multiplier for --random-init')
    p.add_argument('--data', default=None, help=f'one of {", ".join(data.DATASETS)} (default: the checkpoint\'s, else shapes)')
    p.add_argument('--data-path', default=None, help='dataset folder (ImageFolder tree with train/ and val/ for --data folder)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10')
    p.add_argument('--img-size', type=int, default=None, help='default: the checkpoint\'s, else what the data suggests')
    p.add_argument('--pool', choices=('cls', 'avg'), default='cls', help='ViT feature: class token or mean patch token')
    p.add_argument('--batch-size', type=int, default=256, help='per process, for feature extraction')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=data.DTYPES, default='auto', help='autocast for feature extraction (auto: bf16 where the device computes it natively, else fp16 on GPUs, fp32 on CPUs); --robustness, attacks included, always runs in fp32')
    p.add_argument('--k', type=int, default=20)
    p.add_argument('--temperature', type=float, default=0.07)
    p.add_argument('--probe-epochs', type=int, default=100, help='0 skips the linear probe')
    p.add_argument('--probe-lr', type=float, default=0.1)
    p.add_argument('--probe-wd', type=float, default=0.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--robustness', action='store_true', help='after the probe: top-1 under noise, occlusion, patch shuffling, internal corruption, FGSM and PGD')
    p.add_argument('--noise-sigmas', type=float, nargs='+', default=[0, 0.05, 0.1, 0.2, 0.4], help='Gaussian noise std, [0, 1] pixel units')
    p.add_argument('--occlusion', type=float, nargs='+', default=[0, 0.1, 0.25, 0.5], help='fractions of the image occluded')
    p.add_argument('--occlusion-grid', type=int, default=8, help='occluded patches (ImageNet mean colour) are cells of a GRID x GRID partition')
    p.add_argument('--shuffle-grids', type=int, nargs='+', default=[1, 2, 4, 8], help='patch shuffling: permute the cells of a G x G grid (1 = clean; must divide the image size)')
    p.add_argument('--internal-keep', type=float, nargs='+', default=[1.0, 0.5, 0.25, 0.1], help='internal corruption, this fraction kept at random (1 = clean): ViTs run on that fraction of their patch tokens (token dropping), RF-ResNets pool their features over that fraction of the feature map\'s positions')
    p.add_argument('--attack-eps', type=float, nargs='+', default=[1, 2], help='FGSM / PGD L-inf radius, in units of 1/255 of the pixel range')
    p.add_argument('--pgd-steps', type=int, default=5)
    p.add_argument('--robust-images', type=int, default=0, help='evaluate robustness on this many random val images (0 = all)')
    p.add_argument('--shape-bias', action='store_true', help='cue-conflict test on the textured shapes data (whatever --data is): a probe trained where shape and texture agree, shape bias where they conflict, top-1 on each cue alone')
    p.add_argument('--shape-bias-images', type=int, default=0, help='N training images and N // 5 of each test set for --shape-bias (0: 10,000 and 2,000)')
    p.error = lambda msg: die(msg)  # one line, exit 2 (argparse would print the whole usage first)
    return p.parse_args(argv)


def die(msg):
    print(f'eval_linear.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def choose_backbone(args):
    """(backbone, kind, backbone_args, the checkpoint's training args, a description) for the command
    line: a checkpoint's trained backbone; with --random-init and a checkpoint, the same architecture
    untrained (that checkpoint's own floor, on its data); --random-init alone, the --model / --arch preset."""
    if not args.ckpt and not args.random_init:
        die('give a checkpoint path, or --random-init (with a checkpoint: its architecture, untrained)')
    if args.ckpt:
        backbone, ckpt = load_checkpoint(args.ckpt, args.num_heads)
        kind, backbone_args, train_args = ckpt['backbone_kind'], ckpt['backbone_args'], ckpt.get('args', {})
        step = ckpt.get('step')
        source = f'{args.ckpt} ({step})' if isinstance(step, str) else f'{args.ckpt} (step {step})'  # str: published weights
        args.model = args.arch = args.pos_embed = None  # the checkpoint's (backbone_args), not the presets' flags
        if args.random_init:  # seeded by --seed in main
            backbone, source = build_backbone(kind, backbone_args), f'random init, the architecture of {args.ckpt}'
        return backbone, kind, backbone_args, train_args, source
    args.data = args.data or 'shapes'
    img = args.img_size or data.default_img_size(args.data, args.data_path)
    if args.arch:
        if args.arch not in rf_resnet.PRESETS:
            die(f"unknown arch '{args.arch}' (choose from {', '.join(rf_resnet.PRESETS)})")
        if args.width <= 0:
            die(f'--width must be positive, got {args.width}')
        kind, backbone_args = 'rf_resnet', rf_resnet.preset_args(args.arch, width=args.width)
    elif args.model not in vit.PRESETS:
        die(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
    else:
        kind, backbone_args = 'vit', vit.preset_args(args.model, img_size=img, pos_embed=args.pos_embed)
        if img % backbone_args['patch_size']:
            die(f"image size {img} is not divisible by the patch size {backbone_args['patch_size']}")
    return build_backbone(kind, backbone_args), kind, backbone_args, {}, 'random init'


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    if 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1:
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
        if args.device.startswith('cuda'):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(args.device)
    rank, world = data.dist_info()
    torch.manual_seed(args.seed)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        die('--device cuda but no CUDA device is available (use --device cpu)')
    args.dtype, args.dtype_reason = data.resolve_dtype(args.dtype, args.device)

    backbone, kind, backbone_args, train_args, source = choose_backbone(args)
    img_size = data_and_size(args, kind, backbone_args, train_args)
    if args.robustness and args.probe_epochs <= 0:
        die('--robustness evaluates the linear probe: it needs --probe-epochs > 0')
    if not all(0 <= f <= 1 for f in args.occlusion) or args.occlusion_grid < 1 or args.pgd_steps < 1:
        die('--occlusion fractions must be in [0, 1], --occlusion-grid and --pgd-steps >= 1')
    if not all(0 < k <= 1 for k in args.internal_keep):
        die(f'--internal-keep fractions must be in (0, 1], got {args.internal_keep}')
    if not all(g >= 1 and img_size % g == 0 for g in args.shuffle_grids):
        die(f'--shuffle-grids {args.shuffle_grids}: every grid must be >= 1 and divide the image size {img_size}')
    backbone.to(args.device)

    tf = data.eval_transform(img_size)
    train_set = data.build_dataset(args.data, args.data_path, 'train', tf, args.download)
    val_set = data.build_dataset(args.data, args.data_path, 'val', tf, args.download)
    if val_set is None or not train_set.classes:
        die(f'{args.data} at {args.data_path} needs labelled train/ and val/ folders for evaluation')
    loaders = [data.make_loader(s, args.batch_size, train=False, workers=args.workers, device=args.device)
               for s in (train_set, val_set)]
    dtype = data.TORCH_DTYPES[args.dtype]
    train_f, train_y = extract_features(backbone, kind, loaders[0], args.device, dtype, args.pool)
    val_f, val_y = extract_features(backbone, kind, loaders[1], args.device, dtype, args.pool)
    t_feat = time.time() - t0
    num_classes = len(train_set.classes)
    results = {}
    results['knn_top1'], results['knn_top5'] = knn_classify(train_f, train_y, val_f, val_y, num_classes,
                                                            args.k, args.temperature)
    if args.probe_epochs > 0:
        (results['probe_top1'], results['probe_top5']), classifier = linear_probe(
            train_f, train_y, val_f, val_y, num_classes, args.probe_epochs, args.probe_lr, args.probe_wd, seed=args.seed)
    if args.robustness:
        robust_set = val_set
        if 0 < args.robust_images < len(val_set):
            pick = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(args.seed))[:args.robust_images]
            robust_set = torch.utils.data.Subset(val_set, pick.sort().values.tolist())
        robust_loader = data.make_loader(robust_set, args.batch_size, train=False, workers=args.workers, device=args.device)
        results['robustness'] = robustness(backbone, kind, classifier, robust_loader, args.device, args.pool, args)
        results['robust_images'] = len(robust_set)
    if args.shape_bias:
        n = args.shape_bias_images or None
        sets = shape_bias_sets(img_size, args.seed, n, n and max(1, n // 5))
        featurize = lambda ds: extract_features(backbone, kind, data.make_loader(
            ds, args.batch_size, train=False, workers=args.workers, device=args.device), args.device, dtype, args.pool)
        results['shape_bias'] = shape_bias(featurize, sets, args.probe_epochs or 100, args.probe_lr, args.probe_wd,
                                           args.seed)
    results['seconds'] = round(time.time() - t0, 1)

    if rank == 0:
        print(f'backbone: {kind} {backbone_args} from {source}')
        print(f'data: {args.data} {args.data_path or ""} at {img_size} px: {len(train_set)} train / '
              f'{len(val_set)} val images, {num_classes} classes, {train_f.shape[1]}-d features, '
              f'{world} process(es), features in {t_feat:.1f} s, {args.dtype} ({args.dtype_reason})')
        print(f"{'evaluation':<24}{'top-1':>8}{'top-5':>8}")
        print(f"{f'k-NN (k={args.k}, T={args.temperature})':<24}{results['knn_top1']:>8.2f}{results['knn_top5']:>8.2f}")
        if 'probe_top1' in results:
            print(f"{f'linear probe ({args.probe_epochs} ep)':<24}{results['probe_top1']:>8.2f}{results['probe_top5']:>8.2f}")
        if 'robustness' in results:
            print(f"robustness: probe top-1 on {results['robust_images']} val images, fp32 (noise and eps in [0, 1] pixel units)")
            internal = 'tokens kept' if kind == 'vit' else 'internal keep'  # ViTs: token dropping
            labels = {'noise': lambda s: f'noise sigma {s}', 'occlusion': lambda s: f'occlusion {float(s):.0%}',
                      'shuffle': lambda s: f'shuffle {s} x {s}', 'internal': lambda s: f'{internal} {float(s):.0%}',
                      'fgsm': lambda s: f'FGSM eps {s}', 'pgd': lambda s: f'PGD-{args.pgd_steps} eps {s}'}
            for name, accs in results['robustness'].items():
                for strength, acc in accs.items():
                    print(f'{labels[name](strength):<24}{acc:>8.2f}')
        if 'shape_bias' in results:
            r = results['shape_bias']
            print(f"shape bias (cue conflict, textured shapes; probe trained where shape and texture agree): "
                  f"{r['shape_bias']:.3f} ({r['shape_decisions']:.1f}% shape, {r['texture_decisions']:.1f}% texture decisions)")
            for name, label in (('consistent', 'shape + texture'), ('shape_only', 'shape only'), ('texture_only', 'texture only')):
                print(f"{label:<24}{r[name + '_top1']:>8.2f}")
        settings = {k: v for k, v in vars(args).items()}
        settings.update(kind=kind, backbone_args=backbone_args, img_size=img_size, world_size=world)
        print(json.dumps({'results': results, 'settings': settings}))
    if world > 1:
        dist.destroy_process_group()
    return results


if __name__ == '__main__':
    try:
        main()
    except data.DataError as e:
        die(data.error_line(e))
