"""How fast does DILEMMA's detection task start to learn, and what does it depend on?

A detection-only harness (no DINO / MoCo loss): a ViT with DILEMMA's sparse corrupted input and its
detection head, trained on DINO's global-crop augmentation of the shapes data or an image folder, AdamW,
warm-up then constant lr. Prints one JSON line per setting: detection AUROC and nats below H(p) over
the last 100 steps. Cheap (vit_micro/4: ~25 ms a step on 2 CPU cores), so it can sweep what full
pretraining runs cannot afford; the full runs (RESULTS.md) then check the chosen setting.

    python results/detection_ablation.py                       # the sweep on shapes
    python results/detection_ablation.py --data-path DIR       # an ImageFolder tree (DIR/train)
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import device_aug  # noqa: E402
import dilemma  # noqa: E402
import vit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
parser.add_argument('--data-path', default=None, help='ImageFolder tree (DIR/train); default: the shapes data')
parser.add_argument('--model', default='vit_micro/4')
parser.add_argument('--steps', type=int, default=600)
parser.add_argument('--batch-size', type=int, default=64)
parser.add_argument('--probs', type=float, nargs='+', default=[0.2, 0.5])
parser.add_argument('--drops', type=float, nargs='+', default=[0.5, 0.75])
parser.add_argument('--lrs', type=float, nargs='+', default=[2.5e-4, 2e-3])
parser.add_argument('--crop-mins', type=float, nargs='+', default=[0.4, 1.0], help='global crop scale (min, 1)')


def run(images, model, prob, drop, lr, crop_min, steps, batch, seed=0):
    torch.manual_seed(seed)
    views = device_aug.DeviceViews(images, data.multi_crop(32, 16, 0, global_scale=(crop_min, 1.0)).specs[:1])
    enc = dilemma.DilemmaEncoder(vit.vit(model, pos_embed='sincos'), drop, prob, 1.0)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=0.04)
    aucs, infos, t0 = [], [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(images), (batch,), generator=torch.Generator().manual_seed(seed * 10 ** 6 + step))
        _, _, (loss, _, auc) = enc(views(idx, seed * 10 ** 6 + step)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        aucs.append(auc.item())
        infos.append(dilemma.base_rate_entropy(prob) - loss.item())
    last = slice(-100, None)
    return {'auroc': sum(aucs[last]) / 100, 'info_nats': sum(infos[last]) / 100, 'seconds': round(time.time() - t0, 1)}


def main():
    args = parser.parse_args()
    if args.data_path:
        ds = data.build_dataset('folder', args.data_path, 'train')
        images, name = data.in_memory_images(ds), os.path.basename(os.path.normpath(args.data_path))
    else:
        images, name = data.Shapes('train').images, 'shapes'
    for prob, drop, lr, crop_min in itertools.product(args.probs, args.drops, args.lrs, args.crop_mins):
        result = run(images, args.model, prob, drop, lr, crop_min, args.steps, args.batch_size)
        print(json.dumps({'data': name, 'model': args.model, 'steps': args.steps, 'batch': args.batch_size, 'p': prob,
                          'drop': drop, 'lr': lr, 'crop_min': crop_min, **result}), flush=True)


if __name__ == '__main__':
    main()
