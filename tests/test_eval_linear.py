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


def test_random_init_with_a_checkpoint_is_its_architecture_untrained_on_its_data(tmp_path):
    trained = write_checkpoint(tmp_path / 'ckpt.pt')
    args = eval_linear.get_args([str(tmp_path / 'ckpt.pt'), '--random-init'])
    backbone, kind, backbone_args, train_args, source = eval_linear.choose_backbone(args)
    assert (kind, backbone_args, train_args) == ('vit', vit.preset_args('vit_mini/4', depth=2), {'data': 'shapes'})
    assert backbone.state_dict().keys() == trained.state_dict().keys() and len(backbone.blocks) == 2
    assert not torch.equal(backbone.patch_embed.proj.weight, trained.patch_embed.proj.weight)  # fresh weights
    assert source.startswith('random init')
    assert eval_linear.data_and_size(args, kind, backbone_args, train_args) == 32 and args.data == 'shapes'


@pytest.mark.parametrize('argv, message', [
    ([], 'give a checkpoint path, or --random-init'),
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


# ----------------------------------------------------------------------------------------------
# Robustness

def stripes(n, seed):
    """Class 0: horizontal stripes, class 1: vertical, random phase: a random-init CNN + probe separates them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    wave = 0.5 + 0.3 * torch.sin(0.8 * torch.arange(32.0)[None, :, None] + 6.28 * torch.rand(n, 1, 1, generator=g))
    img = torch.where(y[:, None, None] == 0, wave.expand(n, 32, 32), wave.transpose(1, 2).expand(n, 32, 32))
    return eval_linear.from_pixels(img[:, None].repeat(1, 3, 1, 1)), y


def test_perturbations_stay_in_the_image_and_the_eps_ball():
    x, y = stripes(8, seed=1)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(eval_linear.gaussian_noise(x, 0.0, g), x)
    noisy = eval_linear.to_pixels(eval_linear.gaussian_noise(x, 0.5, g))
    assert noisy.min() >= -1e-6 and noisy.max() <= 1 + 1e-6 and (noisy - eval_linear.to_pixels(x)).abs().mean() > 0.2
    occluded = eval_linear.occlude(x, 0.25, 4, g)
    grey = (occluded == 0).all(1)  # (N, H, W): pixels set to the mean colour
    assert torch.allclose(grey.float().mean((1, 2)), torch.full((8,), 0.25))  # 4 of 16 cells, each 8 x 8
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    for steps in (1, 3):
        adv = eval_linear.attack(linear, x, y, 4 / 255, steps)
        delta = eval_linear.to_pixels(adv) - eval_linear.to_pixels(x)
        assert delta.abs().max() <= 4 / 255 + 1e-5 and delta.abs().max() > 3 / 255
        loss = torch.nn.functional.cross_entropy
        assert loss(linear(adv), y) > loss(linear(x), y)  # the attack increases the probe's loss


def test_robustness_accuracy_falls_as_the_noise_grows_on_a_random_init_network():
    import types
    import rf_resnet
    torch.manual_seed(0)
    backbone = rf_resnet.RFResNet(**rf_resnet.preset_args('rf17_small', width=0.125)).eval()
    (train_x, train_y), (val_x, val_y) = stripes(400, seed=0), stripes(200, seed=1)
    with torch.no_grad():
        train_f, val_f = (eval_linear.features(backbone, 'rf_resnet', x) for x in (train_x, val_x))
    (clean, _), probe = eval_linear.linear_probe(train_f, train_y, val_f, val_y, 2, epochs=50)
    assert clean > 95
    args = types.SimpleNamespace(seed=0, noise_sigmas=[0, 0.1, 0.3, 1.0], occlusion=[0, 1.0], occlusion_grid=4,
                                 shuffle_grids=[1, 4], internal_keep=[1.0, 0.25], attack_eps=[0, 8], pgd_steps=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(val_x, val_y), batch_size=100)
    r = eval_linear.robustness(backbone, 'rf_resnet', probe, loader, 'cpu', 'cls', args)
    noise = [r['noise'][str(s)] for s in args.noise_sigmas]
    assert noise[0] == clean
    # strength 0 is the clean image for every row
    assert r['occlusion']['0'] == r['shuffle']['1'] == r['internal']['1.0'] == r['fgsm']['0/255'] == r['pgd']['0/255'] == clean
    assert noise[0] > noise[1] > noise[2] and noise[3] < 65, noise  # falls with sigma, to near chance
    majority = 100 * max(val_y.float().mean(), 1 - val_y.float().mean())
    assert r['occlusion']['1.0'] <= majority + 1e-4  # a fully grey image carries no class
    assert r['pgd']['8/255'] <= r['fgsm']['8/255'] < clean


def test_robustness_from_the_command_line(tmp_path, image_folder):
    # a small image folder, not the 12,000 shapes images: the features of all of them took most of a minute
    out = run('--random-init', '--arch', 'rf17_small', '--width', '0.125', '--robustness', '--robust-images', '8',
              '--noise-sigmas', '0', '0.3', '--probe-epochs', '5', '--workers', '0', '--attack-eps', '1',
              '--data', 'folder', '--data-path', image_folder)
    assert out.returncode == 0, out.stderr
    assert 'noise sigma 0.3' in out.stdout and 'PGD-5 eps 1/255' in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])['results']
    assert set(result['robustness']) == {'noise', 'occlusion', 'shuffle', 'internal', 'fgsm', 'pgd'} and result['robust_images'] == 8
    assert set(result['robustness']['internal']) == {'1.0', '0.5', '0.25', '0.1'} and 'shuffle 8 x 8' in out.stdout
    bad = run('--random-init', '--arch', 'rf17_small', '--width', '0.125', '--robustness', '--shuffle-grids', '5')
    assert bad.returncode == 2 and 'divide the image size 32' in bad.stderr and bad.stderr.count('\n') == 1



def test_shuffle_patches_permutes_the_cells_of_each_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)  # every pixel distinct
    torch.testing.assert_close(eval_linear.shuffle_patches(x, 1, g), x)
    out = eval_linear.shuffle_patches(x, 4, g)
    cells = lambda t: t.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1)  # (N, 16 cells, C*2*2)
    for i in range(2):  # the same cells, each intact, in a new order
        before, after = cells(x)[i], cells(out)[i]
        match = [next(j for j in range(16) if torch.equal(after[k], before[j])) for k in range(16)]
        assert sorted(match) == list(range(16)) and match != list(range(16))


class PositionMap(torch.nn.Module):
    """A stand-in RF-ResNet whose 4 x 4 map holds, at position p, the one-hot vector e_p (16 channels)."""
    mlp = None

    def forward(self, x):
        return torch.eye(16).view(16, 4, 4).expand(len(x), 16, 4, 4)


def test_internal_corruption_pools_over_a_random_subset_of_positions():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(5, 3, 32, 32)
    full = eval_linear.features(PositionMap(), 'rf_resnet', x)
    torch.testing.assert_close(full, torch.full((5, 16), 1 / 16))
    part = eval_linear.features(PositionMap(), 'rf_resnet', x, keep=0.25, generator=g)
    assert ((part == 0) | (part == 0.25)).all() and ((part > 0).sum(1) == 4).all()  # the mean of 4 positions
    assert len({tuple(row.tolist()) for row in part}) > 1  # a different subset per image
    one = eval_linear.features(PositionMap(), 'rf_resnet', x, keep=0.01, generator=g)
    assert ((one > 0).sum(1) == 1).all()  # at least one position


def test_fgsm_on_a_linear_model_is_its_closed_form():
    # logits = W x + b on the normalised image: the pixel gradient of the cross-entropy of class y is
    # (softmax - onehot(y)) W / std, whose sign for 2 classes is sign(W[1 - y] - W[y]).
    torch.manual_seed(0)
    x, y = stripes(6, seed=2)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    eps = 4 / 255
    W = linear[1].weight.detach()
    direction = torch.sign(W[1 - y] - W[y]).view(-1, 3, 32, 32)
    expected = eval_linear.from_pixels((eval_linear.to_pixels(x) + eps * direction).clamp(0, 1))
    torch.testing.assert_close(eval_linear.attack(linear, x, y, eps, 1), expected, rtol=0, atol=1e-5)


def brightness(n, seed):
    """Class 0: dark grey images, class 1: light grey (+ pixel noise): a linear model separates them
    by a margin that an L-inf step of 0.25 overturns (every pixel moves past the other class's mean)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    img = (0.4 + 0.2 * y.float())[:, None, None, None] + 0.05 * torch.randn(n, 3, 16, 16, generator=g)
    return eval_linear.from_pixels(img.clamp(0, 1)), y


class MeanBrightness(torch.nn.Module):
    """Logits (0, 10 * (mean pixel - 0.5)): a linear classifier that separates brightness() with a
    margin of ~0.1 in mean pixel value, and whose softmax never saturates (no masked gradients)."""

    def forward(self, x):
        score = 10 * (eval_linear.to_pixels(x).mean((1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


def test_fgsm_at_a_large_eps_falls_far_below_clean_where_it_must():
    # Every pixel moves by 0.25 against its class: the mean crosses 0.5 for every image.
    val_x, val_y = brightness(200, 1)
    model = MeanBrightness()
    accuracy = lambda images: 100 * (model(images).argmax(1) == val_y).float().mean().item()
    clean = accuracy(val_x)
    assert clean > 95
    fooled = accuracy(eval_linear.attack(model, val_x, val_y, 0.25, 1))
    assert fooled < clean - 80, (clean, fooled)
    assert accuracy(eval_linear.attack(model, val_x, val_y, 0.0, 1)) == clean  # eps 0: the images as they were
    small = accuracy(eval_linear.attack(model, val_x, val_y, 0.02, 1))
    assert small > fooled  # and the damage grows with eps


def test_attack_runs_in_fp32_under_autocast():
    # Called inside a bf16 autocast region (as feature extraction runs), the attack's input gradient
    # and the adversarial images must be those of fp32: bf16 flips the sign of small entries.
    import rf_resnet
    torch.manual_seed(0)
    backbone = rf_resnet.RFResNet(**rf_resnet.preset_args('rf17_small', width=0.125)).eval()
    x, y = stripes(16, seed=4)
    with torch.no_grad():
        feats = eval_linear.features(backbone, 'rf_resnet', x)
    _, probe = eval_linear.linear_probe(feats, y, feats, y, 2, epochs=20)
    model = lambda images: probe(eval_linear.features(backbone, 'rf_resnet', images))
    pixels = eval_linear.to_pixels(x)
    p = pixels.clone().requires_grad_(True)
    reference, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(eval_linear.from_pixels(p)), y), p)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        grad = eval_linear.input_gradient(model, pixels, y)
        adv = eval_linear.attack(model, x, y, 2 / 255, 3)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(adv, eval_linear.attack(model, x, y, 2 / 255, 3), rtol=0, atol=1e-6)


def test_random_init_floor_is_the_model_dilemma_trains_by_default():
    import dilemma
    trained, floor = dilemma.get_args([]), eval_linear.get_args(['--random-init'])
    assert (floor.model, floor.pos_embed) == (trained.model, trained.pos_embed)


# ----------------------------------------------------------------------------------------------
# Token dropping (ViT internal corruption) and shape bias

def test_vit_internal_corruption_runs_the_encoder_on_a_random_subset_of_tokens():
    torch.manual_seed(0)
    model = vit.vit('vit_micro/4').eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(eval_linear.features(model, 'vit', x, keep=1.0), model(x)[:, 0])
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs['keep_idx']), with_kwargs=True)
    part = eval_linear.features(model, 'vit', x, keep=0.25, generator=torch.Generator().manual_seed(1))
    keep_idx = seen[-1]
    assert keep_idx.shape == (3, 16) and all(len(set(row.tolist())) == 16 for row in keep_idx)  # 16 of 64, distinct
    assert len({tuple(sorted(row.tolist())) for row in keep_idx}) == 3  # a different subset per image
    torch.testing.assert_close(part, model(x, keep_idx=keep_idx)[:, 0])  # each token keeps its own position
    avg = eval_linear.features(model, 'vit', x, pool='avg', keep=0.25, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(avg, model(x, keep_idx=keep_idx)[:, 1:].mean(1))


def local_spectra(ds):
    """Sees texture only: the power spectrum of 8 x 8 windows, averaged over the windows (where
    anything is, hence the silhouette, is lost)."""
    gray = ds.images.float().mean(-1) / 255  # (N, H, W)
    windows = gray.unfold(1, 8, 4).unfold(2, 8, 4).reshape(len(gray), -1, 8, 8)
    spectrum = torch.fft.rfft2(windows - windows.mean((2, 3), keepdim=True)).abs()
    return spectrum.mean(1).flatten(1), torch.tensor(ds.targets)


def silhouette_descriptor(ds):
    """Sees the silhouette only: the same scenes drawn as silhouettes (same seed, texture='silhouette'),
    described by the angular Fourier magnitudes (orders 0-6) of the mask in 2 px rings around its
    centroid (blind to fill, colour, position and rotation). Texture-only images have no silhouette."""
    import data
    if ds.texture == 'only':
        return torch.zeros(len(ds), 8 * 7), torch.tensor(ds.targets)
    mask = (data.Shapes(ds.split, seed=ds.seed, n=len(ds), texture='silhouette').images[..., 0] < 128).float()
    N, H, W = mask.shape
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing='ij')
    area = mask.sum((1, 2))
    dy = ys - ((mask * ys).sum((1, 2)) / area)[:, None, None]
    dx = xs - ((mask * xs).sum((1, 2)) / area)[:, None, None]
    ring, theta = (torch.hypot(dx, dy) / 2).long().clamp(max=7).flatten(1), torch.atan2(dy, dx)
    feats = [torch.zeros(N, 8, dtype=torch.complex64).scatter_add_(1, ring, (mask * torch.polar(torch.ones_like(theta), k * theta)).flatten(1)).abs()
             for k in range(7)]
    return torch.cat(feats, 1), torch.tensor(ds.targets)


def test_shape_bias_is_0_for_a_texture_classifier_and_1_for_a_silhouette_classifier():
    sets = eval_linear.shape_bias_sets(32, seed=0, n_train=1600, n_val=400)
    texture = eval_linear.shape_bias(local_spectra, sets, probe_epochs=50)
    assert texture['shape_bias'] < 0.1 and texture['texture_decisions'] > 80, texture
    assert texture['texture_only_top1'] > 85 and texture['shape_only_top1'] < 25 and texture['consistent_top1'] > 90
    shape = eval_linear.shape_bias(silhouette_descriptor, sets, probe_epochs=50)
    assert shape['shape_bias'] > 0.95 and shape['shape_decisions'] > 90, shape
    assert shape['shape_only_top1'] > 90 and shape['texture_only_top1'] < 25
    assert eval_linear.cue_decisions(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 1])) == \
        {'shape_decisions': 25.0, 'texture_decisions': 25.0, 'shape_bias': 0.5}


def test_vit_token_drop_and_shape_bias_from_the_command_line(image_folder):
    out = run('--random-init', '--model', 'vit_micro/4', '--robustness', '--robust-images', '8', '--noise-sigmas', '0',
              '--attack-eps', '1', '--probe-epochs', '5', '--workers', '0', '--data', 'folder', '--data-path', image_folder,
              '--shape-bias', '--shape-bias-images', '400')
    assert out.returncode == 0, out.stderr
    assert 'tokens kept 25%' in out.stdout and 'shape bias' in out.stdout and 'texture only' in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])['results']
    assert set(result['robustness']['internal']) == {'1.0', '0.5', '0.25', '0.1'}
    assert result['robustness']['internal']['1.0'] == result['robustness']['noise']['0.0']  # keep 1 is the clean image
    assert set(result['shape_bias']) == {'consistent_top1', 'shape_only_top1', 'texture_only_top1', 'shape_decisions',
                                         'texture_decisions', 'shape_bias'}
