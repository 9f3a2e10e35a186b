import json
import os
import subprocess
import sys

import pytest
import torch

import eval_linear
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def separable(n_per_class=60, classes=5, dim=16, seed=0):
    """Gaussian clusters far apart: any sane classifier gets ~100%."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 5
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_knn_and_probe_reach_100_on_separable_features():
    x, y = separable()
    train_x, train_y = x[:200], y[:200]
    test_x, test_y = x[200:], y[200:]
    top1, top5 = eval_linear.knn_classify(train_x, train_y, test_x, test_y, 5)
    assert top1 == 100.0 and top5 == 100.0
    (p1, p5), clf = eval_linear.linear_probe(train_x, train_y, test_x, test_y, 5, epochs=30)
    assert p1 == 100.0 and p5 == 100.0
    assert clf(test_x).shape == (len(test_x), 5)


def test_knn_and_probe_are_at_chance_on_random_labels():
    x, _ = separable()
    y = torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(3))
    top1, _ = eval_linear.knn_classify(x[:200], y[:200], x[200:], y[200:], 5)
    (p1, _), _ = eval_linear.linear_probe(x[:200], y[:200], x[200:], y[200:], 5, epochs=30)
    assert top1 < 50 and p1 < 50


def test_knn_votes_are_weighted_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])  # nearest to class 0, but two class-1 neighbours
    assert eval_linear.knn_classify(train, labels, test, torch.tensor([0]), 2, k=3)[0] == 100.0
    assert eval_linear.knn_classify(train, labels, test, torch.tensor([0]), 2, k=3, temperature=100)[0] == 0.0


def run(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'eval_linear.py'), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def write_checkpoint(path):
    args = vit.preset_args('vit_mini/4', depth=2)
    model = vit.VisionTransformer(**args)
    torch.save({'backbone': model.state_dict(), 'backbone_kind': 'vit', 'backbone_args': args,
                'args': {'data': 'shapes'}, 'step': 7}, path)
    return model


def test_checkpoint_evaluation_prints_table_and_json_last(image_folder, tmp_path):
    ckpt = tmp_path / 'ckpt.pt'
    write_checkpoint(ckpt)
    out = run(str(ckpt), '--data', 'folder', '--data-path', image_folder, '--probe-epochs', '20',
              '--workers', '0')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith('k-NN') for line in lines) and any('linear probe' in line for line in lines)
    result = json.loads(lines[-1])
    assert set(result['results']) >= {'knn_top1', 'knn_top5', 'probe_top1', 'probe_top5'}
    assert 0 <= result['results']['knn_top1'] <= 100
    assert result['settings']['kind'] == 'vit' and result['settings']['img_size'] == 32
    assert 'step 7' in out.stdout


def test_features_of_a_checkpoint_are_those_of_the_saved_model(tmp_path):
    model = write_checkpoint(tmp_path / 'ckpt.pt').eval()
    backbone, ckpt = eval_linear.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(eval_linear.features(backbone.eval(), 'vit', x), model(x)[:, 0])


@pytest.mark.parametrize('argv, message', [
    (['--random-init', '--data', 'mnist'], "unknown dataset 'mnist'"),
    (['--random-init', '--data', 'folder', '--data-path', '/no/such/dir'], 'existing folder'),
    (['--random-init', '--img-size', '30'], 'not divisible by the patch size 4'),
    (['/no/such/ckpt.pt'], 'checkpoint not found'),
    (['--random-init', '--model', 'vit_giant'], "unknown model 'vit_giant'"),
    (['--random-init', '--pool', 'max'], "invalid choice: 'max'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    out = run(*argv)
    assert out.returncode == 2
    assert out.stderr.count('\n') == 1 and message in out.stderr, out.stderr


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    full = torch.arange(11 * 3, dtype=torch.float32).view(11, 3)
    gathered = eval_linear.gather_in_order(full[rank::world])  # the evaluation sampler's split
    torch.save(gathered, out + f'.{rank}')
    dist.destroy_process_group()


def test_gather_in_order_across_two_processes(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = str(tmp_path / 'g')
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2)
    full = torch.arange(11 * 3, dtype=torch.float32).view(11, 3)
    for rank in range(2):
        torch.testing.assert_close(torch.load(out + f'.{rank}'), full)
