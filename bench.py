"""
Speed of full training steps (forward, backward, optimizer, EMA) of every method, on synthetic
in-memory batches, after warm-up; one table, then one JSON line with every row.

    python bench.py                                    # ViT-S/16 at 224 px, bf16, on cuda if there is one
    python bench.py --device cpu --batch-size 16       # what BENCHMARKS.md reports for this CPU
    python bench.py --model vit_micro/4 --img-size 32 --batch-size 8 --steps 2 --warmup 1   # seconds

Columns: ms/step, images/s, peak memory (CUDA: allocated during the row; CPU: the process's peak RSS
so far), FLOPs per image counted with torch.utils.flop_counter (forward + backward of one step),
achieved FLOP/s and MFU against the peak of a large matmul in the same dtype, measured in this run.
Ratios measured in the same run: (1) our ViT against torchvision's VisionTransformer of the same size,
forward + backward, dense (target <= 1.0); (2) each DILEMMA method sparse (its default drop ratio)
against dense (compare with the FLOP ratio); (3) CO-BYOL against BYOL on the same RF-ResNet (target
<= 1.3); and augmentation throughput of the DataLoader path against --device-aug.
"""
import argparse
import itertools
import json
import math
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import co_byol
import data
import device_aug
import dilemma
import vit

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument('--methods', default='mocov3,dino,simclr,mae,byol,co_byol', help='comma-separated')
parser.add_argument('--model', default='vit_small/16', help=f'ViT preset: {", ".join(vit.PRESETS)}')
parser.add_argument('--img-size', type=int, default=224)
parser.add_argument('--arch', default=None, help='RF-ResNet preset for BYOL / CO-BYOL (default: resnet50, rf25_small at <= 64 px)')
parser.add_argument('--width', type=float, default=None, help='RF-ResNet width (default: 1, 0.125 at <= 64 px)')
parser.add_argument('--batch-size', type=int, default=32)
parser.add_argument('--steps', type=int, default=5, help='timed steps per row (the median is reported)')
parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (compilation, allocator)')
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--dtype', choices=data.DTYPES, default='auto', help='auto: bf16 where the device computes it natively, else fp16 on GPUs, fp32 on CPUs')
parser.add_argument('--compile', action='store_true')
parser.add_argument('--no-compare', action='store_true', help='skip the torchvision ViT and augmentation rows')
parser.add_argument('--aug-images', type=int, default=1024, help='images per augmentation-throughput measurement')


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_matmul_peak(device, dtype, n=None):
    """FLOP/s of a large square matmul in `dtype`: the roof MFU is measured against."""
    n = n or (8192 if device.startswith('cuda') else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times[1:])


def vit_forward_flops(args, batch):
    """Analytic matmul FLOPs of a dense ViT forward: patch embedding, and per block qkv, attention
    scores, attention-weighted values, output projection and the 4x MLP (2 FLOPs per multiply-add)."""
    L, D = (args['img_size'] // args['patch_size']) ** 2, args['embed_dim']
    N = L + 1
    per_block = 2 * N * D * 3 * D + 2 * N * N * D * 2 + 2 * N * D * D + 2 * N * D * 4 * D * 2
    return batch * (2 * L * 3 * args['patch_size'] ** 2 * D + args['depth'] * per_block)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# On CPU, SDPA runs aten._scaled_dot_product_flash_attention_for_cpu (and its backward), which the FLOP
# registry of some torch releases (2.14 and older) does not list: attention would count as zero FLOPs.
CPU_ATTENTION_FLOPS = {name: formula for name, formula in (('_scaled_dot_product_flash_attention_for_cpu', _cpu_attention_flops),
                                                 ('_scaled_dot_product_flash_attention_for_cpu_backward',
                                                  _cpu_attention_backward_flops))
                       if hasattr(torch.ops.aten, name) and getattr(torch.ops.aten, name) not in flop_registry}


def count_flops(fn):
    custom = {getattr(torch.ops.aten, name): formula for name, formula in CPU_ATTENTION_FLOPS.items()}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(step_fn, device, warmup, steps):
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def dilemma_step(args, method, dense, autocast):
    """One training step of `method` (dilemma.train_step, as the run does it: clip, step, EMA) on
    synthetic views; dense = DILEMMA off."""
    argv = ['--method', method, '--model', args.model, '--img-size', str(args.img_size), '--device', args.device,
            '--batch-size', str(args.batch_size), '--dtype', args.dtype, '--out-dir', '/tmp/bench-unused']
    if dense:
        argv += ['--dilemma-prob', '0'] + ([] if method == 'mae' else ['--drop-ratio', '0'])
    a = dilemma.get_args(argv)
    torch.manual_seed(0)
    model = dilemma.build_model(a).to(args.device)
    optimizer = torch.optim.AdamW(dilemma.param_groups(model), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(args.device.split(':')[0], enabled=a.dtype == 'fp16')
    views = [torch.randn(args.batch_size, 3, s['size'], s['size'], device=args.device)
             for s in dilemma.views_transform(a).specs]
    forward = torch.compile(model) if args.compile else model
    sched = dilemma.schedule(10, 1000, 100, a)
    batches = itertools.repeat(views)
    return lambda: dilemma.train_step(forward, batches, optimizer, scaler, autocast, sched, a), a


def byol_step(args, local_weight, autocast):
    """One co_byol.train_step (BYOL when local_weight = 0) on synthetic views."""
    small = args.img_size <= 64
    argv = ['--local-weight', str(local_weight), '--img-size', str(args.img_size), '--device', args.device,
            '--batch-size', str(args.batch_size), '--arch', args.arch or ('rf25_small' if small else 'resnet50'),
            '--width', str(args.width or (0.125 if small else 1.0)), '--dtype', args.dtype, '--out-dir', '/tmp/bench-unused']
    a = co_byol.get_args(argv)
    torch.manual_seed(0)
    model = co_byol.CoBYOL(a).to(args.device, memory_format=torch.channels_last)
    optimizer = co_byol.build_optimizer(model, a)
    scaler = torch.amp.GradScaler(args.device.split(':')[0], enabled=a.dtype == 'fp16')
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    forward = torch.compile(model) if args.compile else model
    sched = co_byol.schedule(10, 1000, 100, a)
    batches = itertools.repeat(views)
    return lambda: co_byol.train_step(forward, batches, optimizer, scaler, autocast, sched, a), a


def vit_pair(args, autocast):
    """Forward + backward of our ViT and torchvision's of the same size, dense, on the same batch."""
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
    p = vit.preset_args(args.model, img_size=args.img_size)
    ours = vit.VisionTransformer(**p).to(args.device)
    theirs = TorchvisionViT(image_size=args.img_size, patch_size=p['patch_size'], num_layers=p['depth'],
                            num_heads=p['num_heads'], hidden_dim=p['embed_dim'], mlp_dim=4 * p['embed_dim'],
                            num_classes=p['embed_dim']).to(args.device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    fns = []
    for model, out in ((ours, lambda y: y[:, 0]), (theirs, lambda y: y)):
        forward = torch.compile(model) if args.compile else model

        def step(model=model, forward=forward, out=out):
            with autocast:
                loss = out(forward(x)).float().square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        fns.append(step)
    return fns, p


def augmentation_throughput(args):
    """Images/s of the two-view augmentations: DataLoader workers (2) on PIL images, and on the device."""
    shapes = data.Shapes('train', n=args.aug_images, size=args.img_size)
    tf = data.two_views(args.img_size, 0.2)
    shapes.transform = tf
    loader = data.make_loader(shapes, 64, train=True, workers=2)
    next(iter(loader))  # start the workers
    t0 = time.perf_counter()
    n = sum(len(views[0]) for views, _ in loader)
    cpu = n / (time.perf_counter() - t0)
    device_views = device_aug.DeviceViews(shapes.images.to(args.device), tf.specs)
    index = torch.arange(args.aug_images)
    device_views(index[:64], 0)
    sync(args.device)
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, args.aug_images, 64)):
        device_views(index[start:start + 64], i)
    sync(args.device)
    return cpu, args.aug_images / (time.perf_counter() - t0)


def main(argv=None):
    args = parser.parse_args(argv)
    methods = args.methods.split(',')
    unknown = set(methods) - set(dilemma.METHODS) - {'byol', 'co_byol'}
    if unknown:
        parser.error(f'unknown methods: {", ".join(sorted(unknown))}')
    if args.model not in vit.PRESETS:
        parser.error(f"unknown model '{args.model}' (choose from {', '.join(vit.PRESETS)})")
    dev_type = 'cuda' if args.device.startswith('cuda') else 'cpu'
    args.dtype, dtype_reason = data.resolve_dtype(args.dtype, args.device)
    dtype = data.TORCH_DTYPES[args.dtype]
    autocast = torch.autocast(dev_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    peak = measure_matmul_peak(args.device, dtype)
    name = torch.cuda.get_device_name() if dev_type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{name}, {args.dtype} ({dtype_reason}){", compiled" if args.compile else ""}: matmul peak {peak / 1e12:.2f} TFLOP/s; '
          f'batch {args.batch_size}, {args.img_size} px, median of {args.steps} steps after {args.warmup}')

    rows = []

    def add(method, model, drop, step, flops_fn=None):
        if dev_type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        flops = count_flops(flops_fn or step)  # flops_fn: the same step uncompiled, when --compile
        sec = time_steps(step, args.device, args.warmup, args.steps)
        row = dict(method=method, model=model, img_size=args.img_size, batch=args.batch_size, drop=drop,
                   ms_per_step=1000 * sec, images_per_s=args.batch_size / sec, peak_mem_mb=peak_memory_mb(args.device),
                   gflops_per_image=flops / args.batch_size / 1e9 if flops else None)
        row['tflops_per_s'] = flops / sec / 1e12 if flops else None
        row['mfu'] = flops / sec / peak if flops else None
        rows.append(row)
        fmt = lambda v, f: format(v, f) if v is not None else '-'
        print(f"{method:<18}{model:<18}{drop:>5}{row['ms_per_step']:>10.1f}{row['images_per_s']:>9.1f}{row['peak_mem_mb']:>9.0f}"
              f"{fmt(row['gflops_per_image'], '10.2f')}{fmt(row['tflops_per_s'], '9.3f')}{fmt(row['mfu'], '7.1%')}")
        return row

    print(f"{'method':<18}{'model':<18}{'drop':>5}{'ms/step':>10}{'img/s':>9}{'mem MB':>9}{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}")
    ratios = {}
    for method in methods:
        if method in dilemma.METHODS:
            timed = {}
            for dense in (True, False):
                step, a = dilemma_step(args, method, dense, autocast)
                plain = dilemma_step(args, method, dense, autocast)[0] if args.compile else None  # FLOPs uncompiled
                label = method + (' (plain)' if dense else ' + DILEMMA')
                timed[dense] = add(label, args.model, a.drop_ratio, step, plain)
            ratios[f'{method} sparse/dense time'] = timed[False]['ms_per_step'] / timed[True]['ms_per_step']
            if timed[True]['gflops_per_image']:
                ratios[f'{method} sparse/dense FLOPs'] = timed[False]['gflops_per_image'] / timed[True]['gflops_per_image']
    cnn = {}
    for method in [m for m in methods if m in ('byol', 'co_byol')]:
        step, a = byol_step(args, 0.0 if method == 'byol' else 0.3, autocast)
        plain = byol_step(args, 0.0 if method == 'byol' else 0.3, autocast)[0] if args.compile else None
        cnn[method] = add(method, f'{a.arch} x{a.width:g}', 0, step, plain)
    if len(cnn) == 2:
        ratios['co_byol/byol time'] = cnn['co_byol']['ms_per_step'] / cnn['byol']['ms_per_step']
    if not args.no_compare:
        (ours, theirs), p = vit_pair(args, autocast)
        t_ours = time_steps(ours, args.device, args.warmup, args.steps)
        t_theirs = time_steps(theirs, args.device, args.warmup, args.steps)
        ratios['vit.py/torchvision time'] = t_ours / t_theirs
        print(f'ViT forward+backward ({args.model}, dense): ours {1000 * t_ours:.1f} ms, torchvision {1000 * t_theirs:.1f} ms')
        cpu_aug, dev_aug = augmentation_throughput(args)
        ratios['augmentation images/s DataLoader (2 workers)'] = cpu_aug
        ratios[f'augmentation images/s on {args.device}'] = dev_aug
    peak_end = measure_matmul_peak(args.device, dtype)  # again: the best of both guards against a noisy moment
    if peak_end > peak:
        for row in rows:
            row['mfu'] = row['mfu'] * peak / peak_end if row['mfu'] else None
        print(f'(matmul peak re-measured at the end: {peak_end / 1e12:.2f} TFLOP/s; the MFU column above used '
              f'{peak / 1e12:.2f}, the JSON line uses the higher)')
        peak = peak_end
    for k, v in ratios.items():
        print(f'{k:<48}{v:>10.3f}')
    print(json.dumps({'device': name, 'dtype': args.dtype, 'compile': args.compile, 'matmul_peak_tflops': peak / 1e12,
                      'rows': rows, 'ratios': ratios, 'settings': vars(args)}))


if __name__ == '__main__':
    main()
