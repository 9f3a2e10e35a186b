import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import finetune
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def stripes_folder(tmp_path_factory):
    """A tiny two-class task: horizontal or vertical stripes of random period, phase and colours,
    32 px; 96 train and 48 val images (chance: 50%)."""
    root = tmp_path_factory.mktemp('stripes')
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 96), ('val', 48)):
        for i in range(n):
            label = i % 2
            period = 4 + 4 * torch.rand((), generator=g)
            wave = torch.sin(2 * torch.pi * torch.arange(32.0) / period + 6.3 * torch.rand((), generator=g)) > 0
            mask = wave[:, None].expand(32, 32) if label == 0 else wave[None, :].expand(32, 32)
            a, b = torch.rand(2, 3, generator=g) * 255
            img = torch.where(mask[..., None], a, b).round().byte().numpy()
            folder = root / split / ('horizontal', 'vertical')[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f'{i}.png')
    return str(root)


def run(*args, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, 'finetune.py'), *args]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_layer_wise_decay_gives_each_layer_its_rate():
    backbone = vit.vit('vit_micro/4', pos_embed='learned')  # depth 2
    model = finetune.Classifier(backbone, 'vit', 5)
    groups = finetune.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale, decay = {}, {}
    for group in groups:
        for p in group['params']:
            scale[p], decay[p] = group['lr_scale'], group['weight_decay']
    named = dict(model.named_parameters())
    expected = {'backbone.patch_embed.proj.weight': 0.125, 'backbone.cls_token': 0.125, 'backbone.pos_embed': 0.125,
                'backbone.blocks.0.attn.qkv.weight': 0.25, 'backbone.blocks.0.norm1.bias': 0.25,
                'backbone.blocks.1.mlp.fc2.weight': 0.5, 'backbone.norm.weight': 1.0, 'head.weight': 1.0, 'head.bias': 1.0}
    for name, s in expected.items():
        assert scale[named[name]] == s, name
    assert len(scale) == len(named)  # every trainable parameter in exactly one group
    no_decay = {n for n, p in named.items() if decay[p] == 0}
    assert no_decay == {n for n, p in named.items() if p.ndim <= 1 or n.endswith(('cls_token', 'pos_embed'))}
    frozen = finetune.param_groups(finetune.Classifier(vit.vit('vit_micro/4', pos_embed='sincos'), 'vit', 5), 0.05, 0.5)
    assert all(p.requires_grad for g in frozen for p in g['params'])  # fixed sin-cos positions are not optimised


def test_mix_keeps_targets_distributions_and_cutmix_lambda_is_the_pasted_area():
    torch.manual_seed(0)
    x = torch.arange(4.0)[:, None, None, None].expand(4, 3, 8, 8).contiguous()
    targets = finetune.soft_targets(torch.tensor([0, 1, 2, 3]), 4, smoothing=0.1)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.max() == pytest.approx(0.925)
    for _ in range(5):
        mixed, mixed_targets = finetune.mix(x, targets, 0.0, 1.0)
        torch.testing.assert_close(mixed_targets.sum(1), torch.ones(4))
        own_share = (mixed[0] == 0).float().mean()  # image 0 keeps its pixels outside the box
        assert mixed_targets[0, 0] == pytest.approx(own_share * 0.925 + (1 - own_share) * 0.025, abs=1e-5)
    mixed, mixed_targets = finetune.mix(x, targets, 0.8, 0.0)
    lam = mixed_targets[0, 0].item() / 0.9 - 0.025 / 0.9  # targets lam * t + (1 - lam) * t.flip
    torch.testing.assert_close(mixed[0], lam * x[0] + (1 - lam) * x[3], rtol=1e-4, atol=1e-4)
    assert finetune.mix(x, targets, 0.0, 0.0)[0] is x


def test_fine_tuning_learns_a_tiny_task_far_above_chance(stripes_folder, tmp_path):
    args = vit.preset_args('vit_micro/4', pos_embed='sincos')
    torch.manual_seed(0)
    pretrained = vit.VisionTransformer(**args)
    torch.save({'backbone': pretrained.state_dict(), 'backbone_kind': 'vit', 'backbone_args': args,
                'args': {'data': 'folder', 'data_path': stripes_folder}, 'step': 1}, tmp_path / 'ckpt.pt')
    parsed = finetune.get_args([str(tmp_path / 'ckpt.pt'), '--drop-path', '0.2'])
    backbone, kind, backbone_args, train_args, _ = finetune.build(parsed)
    for k, v in pretrained.state_dict().items():  # fine-tuning starts from the checkpoint's weights
        torch.testing.assert_close(backbone.state_dict()[k], v)
    assert backbone.blocks[-1].drop_path_rate == pytest.approx(0.2) and train_args['data'] == 'folder'

    out = run(str(tmp_path / 'ckpt.pt'), '--epochs', '20', '--batch-size', '32', '--lr', '8e-3', '--workers', '0')
    # (the checkpoint's data: the stripes folder; measured 94% in 7 s on 2 cores)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result['results']['top1'] >= 85, out.stdout  # chance is 50
    assert result['results']['steps'] == 20 * 3 and result['settings']['data'] == 'folder'
    assert any(line.startswith('fine-tuned top-1') for line in lines)


def test_fine_tuning_under_torchrun_with_two_processes(stripes_folder):
    out = run('--random-init', '--model', 'vit_micro/4', '--data', 'folder', '--data-path', stripes_folder,
              '--epochs', '1', '--batch-size', '32', '--workers', '0', '--mixup', '0.8', '--cutmix', '1.0',
              launcher=[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['settings']['world_size'] == 2 and result['results']['steps'] == 3
    assert 0 <= result['results']['top1'] <= 100


def test_bad_input_is_one_line_and_exit_2(stripes_folder):
    for argv, message in ((['--random-init', '--layer-decay', '1.5'], '--layer-decay must be in (0, 1]'),
                          (['/no/such/ckpt.pt'], 'checkpoint not found'),
                          (['--random-init', '--model', 'vit_giant'], "unknown model 'vit_giant'")):
        out = run(*argv)
        assert out.returncode == 2 and out.stderr.count('\n') == 1 and message in out.stderr, out.stderr
