"""bench.py: runs on CPU with a tiny model and prints its table and JSON line; FLOP counts match the
analytic count of a ViT forward."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('model, img_size', [('vit_micro/4', 32), ('vit_small/16', 224)])
def test_flop_count_of_a_vit_forward_matches_the_analytic_count(model, img_size):
    args = vit.preset_args(model, img_size=img_size)
    net = vit.VisionTransformer(**args)
    x = torch.randn(2, 3, img_size, img_size)
    counted = bench.count_flops(lambda: net(x))
    analytic = bench.vit_forward_flops(args, batch=2)
    assert abs(counted / analytic - 1) < 0.03, (counted, analytic)
    keep = torch.arange(16).expand(2, 16)  # 16 kept tokens: the blocks cost what 16 tokens cost
    sparse = bench.count_flops(lambda: net(x, keep))
    blocks_on_16 = bench.vit_forward_flops({**args, 'img_size': 4 * args['patch_size']}, 2)  # 4 x 4 = 16 patches
    embed_all = bench.vit_forward_flops({**args, 'depth': 0}, 2)  # (the patch embedding may see every patch)
    assert 0.97 * blocks_on_16 <= sparse <= 1.03 * (blocks_on_16 + embed_all), (sparse, blocks_on_16)


def test_attention_flops_are_counted_forward_and_backward():
    """On CPU, SDPA dispatches to an op that some torch releases' FLOP registry lacks: it must not count 0."""
    b, h, s, d = 2, 3, 17, 16
    q = torch.randn(b, h, s, d, requires_grad=True)
    forward = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert forward == 2 * (2 * b * h * s * s * d)  # scores q k^T and the weighted sum of v
    both = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    assert both >= 3 * forward  # the backward pass is at least twice the forward's matmuls


def test_bench_runs_on_cpu_and_prints_a_table_and_json():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--device', 'cpu', '--model', 'vit_micro/4',
                          '--img-size', '32', '--batch-size', '8', '--steps', '2', '--warmup', '1', '--width', '0.0625',
                          '--aug-images', '128'], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[1].split()[:3] == ['method', 'model', 'drop']
    result = json.loads(lines[-1])
    methods = [r['method'] for r in result['rows']]
    assert methods == ['mocov3 (plain)', 'mocov3 + DILEMMA', 'dino (plain)', 'dino + DILEMMA', 'simclr (plain)',
                       'simclr + DILEMMA', 'mae (plain)', 'mae + DILEMMA', 'byol', 'co_byol']
    for r in result['rows']:
        assert r['ms_per_step'] > 0 and r['gflops_per_image'] > 0 and 0 < r['mfu'] < 1.5
    ratios = result['ratios']
    assert ratios['mocov3 sparse/dense FLOPs'] < 0.7  # a quarter of the student's tokens; teacher and heads stay dense
    assert {'vit.py/torchvision time', 'co_byol/byol time', 'augmentation images/s on cpu'} <= set(ratios)
