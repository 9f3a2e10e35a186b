"""
Evaluate the frozen features of a checkpoint written by dilemma.py or co_byol.py (or of an untrained
backbone, --random-init) on a labelled dataset, without augmentation:

- weighted k-NN (cosine similarity, k = 20, votes weighted by exp(sim / 0.07), as DINO reports it);
- a linear probe trained on features extracted once and cached (top-1 and top-5).

    python eval_linear.py out/dino/ckpt.pt
    python eval_linear.py --random-init --model vit_tiny/4 --data folder --data-path ../shared/data/cifar10-6k
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
import vit

# ----------------------------------------------------------------------------------------------
# Backbones and features


def build_backbone(kind, backbone_args):
    if kind == 'vit':
        return vit.VisionTransformer(**backbone_args)
    if kind == 'rf_resnet':
        import rf_resnet
        return rf_resnet.RFResNet(**backbone_args)
    raise ValueError(f"unknown backbone kind '{kind}'")


def load_checkpoint(path):
    """Rebuild the backbone of a checkpoint. Returns (backbone, checkpoint dict)."""
    if not os.path.isfile(path):
        raise data.DataError(f'checkpoint not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise data.DataError(f'cannot read checkpoint {path}: {e.__class__.__name__}: {e}') from None
    if not isinstance(ckpt, dict) or not {'backbone', 'backbone_kind', 'backbone_args'} <= ckpt.keys():
        raise data.DataError(f'{path} is not a checkpoint of dilemma.py / co_byol.py '
                             '(needs backbone, backbone_kind, backbone_args)')
    backbone = build_backbone(ckpt['backbone_kind'], ckpt['backbone_args'])
    backbone.load_state_dict(ckpt['backbone'])
    return backbone, ckpt


def features(backbone, kind, images, pool='cls'):
    """(N, C, H, W) images -> (N, D) frozen features: the ViT's class token (or the mean of its patch
    tokens, pool='avg'), or the RF-ResNet's globally average-pooled feature map."""
    out = backbone(images)
    if kind == 'vit':
        return out[:, 0] if pool == 'cls' else out[:, 1:].mean(1)
    return out.mean((2, 3))


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
def extract_features(backbone, kind, loader, device, dtype=torch.bfloat16, pool='cls'):
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


def knn_monitor(backbone, kind, train_loader, val_loader, device, num_classes, dtype=torch.bfloat16):
    """What the training scripts call at each evaluation: k-NN top-1 / top-5 on the val split."""
    train_f, train_y = extract_features(backbone, kind, train_loader, device, dtype)
    val_f, val_y = extract_features(backbone, kind, val_loader, device, dtype)
    return knn_classify(train_f, train_y, val_f, val_y, num_classes)


# ----------------------------------------------------------------------------------------------
# Command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('ckpt', nargs='?', help='ckpt.pt written by dilemma.py or co_byol.py')
    p.add_argument('--random-init', action='store_true', help='evaluate an untrained backbone (the floor)')
    p.add_argument('--model', default='vit_tiny/4', help=f'ViT preset for --random-init: {", ".join(vit.PRESETS)}')
    p.add_argument('--arch', default=None, help='RF-ResNet preset for --random-init (instead of --model)')
    p.add_argument('--data', default=None, help=f'one of {", ".join(data.DATASETS)} (default: the checkpoint\'s, else shapes)')
    p.add_argument('--data-path', default=None, help='dataset folder (ImageFolder tree with train/ and val/ for --data folder)')
    p.add_argument('--download', action='store_true', help='let torchvision download CIFAR / STL-10')
    p.add_argument('--img-size', type=int, default=None, help='default: the checkpoint\'s, else what the data suggests')
    p.add_argument('--pool', choices=('cls', 'avg'), default='cls', help='ViT feature: class token or mean patch token')
    p.add_argument('--batch-size', type=int, default=256, help='per process, for feature extraction')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=('bf16', 'fp16', 'fp32'), default='bf16', help='autocast for feature extraction')
    p.add_argument('--k', type=int, default=20)
    p.add_argument('--temperature', type=float, default=0.07)
    p.add_argument('--probe-epochs', type=int, default=100, help='0 skips the linear probe')
    p.add_argument('--probe-lr', type=float, default=0.1)
    p.add_argument('--probe-wd', type=float, default=0.0)
    p.add_argument('--seed', type=int, default=0)
    p.error = lambda msg: die(msg)  # one line, exit 2 (argparse would print the whole usage first)
    return p.parse_args(argv)


def die(msg):
    print(f'eval_linear.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


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

    if args.random_init == bool(args.ckpt):
        die('give either a checkpoint path or --random-init')
    train_args = {}
    if args.ckpt:
        backbone, ckpt = load_checkpoint(args.ckpt)
        kind, backbone_args, train_args = ckpt['backbone_kind'], ckpt['backbone_args'], ckpt.get('args', {})
        source = f"{args.ckpt} (step {ckpt.get('step')})"
    else:
        args.data = args.data or 'shapes'
        img = args.img_size or data.default_img_size(args.data, args.data_path)
        if args.arch:
            import rf_resnet
            kind, backbone_args = 'rf_resnet', rf_resnet.preset_args(args.arch)
        elif args.model not in vit.PRESETS:
            die(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
        else:
            kind, backbone_args = 'vit', vit.preset_args(args.model, img_size=img)
            if img % backbone_args['patch_size']:
                die(f"image size {img} is not divisible by the patch size {backbone_args['patch_size']}")
        backbone, source = build_backbone(kind, backbone_args), 'random init'
    args.data = args.data or train_args.get('data', 'shapes')
    if args.data_path is None and args.data == train_args.get('data'):
        args.data_path = train_args.get('data_path')
    img_size = args.img_size or backbone_args.get('img_size') or train_args.get('img_size') \
        or data.default_img_size(args.data, args.data_path)
    if kind == 'vit' and img_size % backbone_args['patch_size']:
        die(f"image size {img_size} is not divisible by the patch size {backbone_args['patch_size']}")
    backbone.to(args.device)

    tf = data.eval_transform(img_size)
    train_set = data.build_dataset(args.data, args.data_path, 'train', tf, args.download)
    val_set = data.build_dataset(args.data, args.data_path, 'val', tf, args.download)
    if val_set is None or not train_set.classes:
        die(f'{args.data} at {args.data_path} needs labelled train/ and val/ folders for evaluation')
    loaders = [data.make_loader(s, args.batch_size, train=False, workers=args.workers, device=args.device)
               for s in (train_set, val_set)]
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[args.dtype]
    train_f, train_y = extract_features(backbone, kind, loaders[0], args.device, dtype, args.pool)
    val_f, val_y = extract_features(backbone, kind, loaders[1], args.device, dtype, args.pool)
    t_feat = time.time() - t0
    num_classes = len(train_set.classes)
    results = {}
    results['knn_top1'], results['knn_top5'] = knn_classify(train_f, train_y, val_f, val_y, num_classes,
                                                            args.k, args.temperature)
    if args.probe_epochs > 0:
        (results['probe_top1'], results['probe_top5']), _ = linear_probe(
            train_f, train_y, val_f, val_y, num_classes, args.probe_epochs, args.probe_lr, args.probe_wd, seed=args.seed)
    results['seconds'] = round(time.time() - t0, 1)

    if rank == 0:
        print(f'backbone: {kind} {backbone_args} from {source}')
        print(f'data: {args.data} {args.data_path or ""} at {img_size} px: {len(train_set)} train / '
              f'{len(val_set)} val images, {num_classes} classes, {train_f.shape[1]}-d features, '
              f'{world} process(es), features in {t_feat:.1f} s')
        print(f"{'evaluation':<24}{'top-1':>8}{'top-5':>8}")
        print(f"{f'k-NN (k={args.k}, T={args.temperature})':<24}{results['knn_top1']:>8.2f}{results['knn_top5']:>8.2f}")
        if 'probe_top1' in results:
            print(f"{f'linear probe ({args.probe_epochs} ep)':<24}{results['probe_top1']:>8.2f}{results['probe_top5']:>8.2f}")
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
