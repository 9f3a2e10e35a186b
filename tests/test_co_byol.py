"""co_byol.py: the losses on hand-built inputs, w = 0 is exactly BYOL, the local loss (symmetric and
one-way) pairs each view with the other view's targets, the loss forms, the MLP after pooling, LARS,
the EMA (target local projector included), SyncBatchNorm everywhere, the ImageNet defaults, the
training loop (one process, two under torchrun, exact resume), and bad input."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import co_byol
import data
import rf_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--width', '0.0625', '--proj-hidden', '32', '--proj-dim', '16']


# ---------------------------------------------------------------------------------------------
# The losses

def test_local_global_loss_on_hand_built_inputs():
    z = torch.randn(3, 8)
    same = z[:, :, None, None].expand(3, 8, 4, 4) * 2.5  # every position = its image's target (scaled)
    torch.testing.assert_close(co_byol.local_global_loss(same, z), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(co_byol.local_global_loss(-same, z), torch.tensor(4.0))
    half = same.clone()
    half[:, :, :2] *= -1  # half of the positions opposite: the mean over positions is 2
    torch.testing.assert_close(co_byol.local_global_loss(half, z), torch.tensor(2.0))
    other = z.roll(1, dims=0)[:, :, None, None].expand(3, 8, 4, 4)  # a position is compared with ITS image only
    expected = 2 - 2 * F.cosine_similarity(z.roll(1, dims=0), z, dim=1).mean()
    torch.testing.assert_close(co_byol.local_global_loss(other, z), expected)


def test_global_local_loss_on_hand_built_inputs():
    p = torch.randn(3, 8)
    same = p[:, :, None, None].expand(3, 8, 4, 4) * 0.5  # every local target = the global prediction (scaled)
    torch.testing.assert_close(co_byol.global_local_loss(p, same), torch.tensor(0.0), atol=1e-6, rtol=0)
    half = same.clone()
    half[:, :, :, :2] *= -1  # half of the local targets opposite
    torch.testing.assert_close(co_byol.global_local_loss(p, half), torch.tensor(2.0))
    z = torch.randn(3, 8, 2, 2, requires_grad=True)
    co_byol.global_local_loss(p.requires_grad_(True), z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0  # the target side gets no gradient


def test_byol_loss_on_hand_built_inputs():
    z = torch.randn(5, 8)
    torch.testing.assert_close(co_byol.byol_loss(3 * z, z), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(co_byol.byol_loss(-z, z), torch.tensor(4.0))
    p = torch.randn(5, 8)
    torch.testing.assert_close(co_byol.byol_loss(p, z), ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean())


def tiny_args(*extra):
    return co_byol.get_args([*TINY, '--arch', 'rf25_small', *extra])


def tiny_model(*extra):
    torch.manual_seed(0)
    return co_byol.CoBYOL(tiny_args(*extra))


def views(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]


def regression(p, z):
    """BYOL's loss as its paper writes it: || p/|p| - z/|z| ||^2, averaged over the batch."""
    return ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()


def test_local_weight_zero_is_exactly_byol():
    model = tiny_model('--local-weight', '0')
    assert model.local_projector is None and not any('local' in n for n, _ in model.named_parameters())
    x1, x2 = views()
    out = model([x1, x2])
    m = model
    assert m.encoder.mlp is not None  # the MLP after average pooling is on by default
    online = lambda x: m.predictor(m.projector(m.encoder.mlp(m.encoder(x).mean((2, 3)))))
    target = lambda x: m.target_projector(m.target_encoder.mlp(m.target_encoder(x).mean((2, 3))))
    expected = regression(online(x1), target(x2)) + regression(online(x2), target(x1))
    torch.testing.assert_close(out['loss'], expected, rtol=1e-5, atol=1e-6)
    assert out['local'] == 0
    # The same global path in a CO-BYOL model built from the same seed: its 'global' is that BYOL loss.
    torch.testing.assert_close(tiny_model('--local-weight', '0.3')([x1, x2])['global'], out['loss'].detach())


def cos_map(a, b):
    """cos between (B, d) and (B, d, n, n) along d: (B, n, n)."""
    return F.cosine_similarity(a[:, :, None, None].expand_as(b), b, dim=1)


@pytest.mark.parametrize('grid', [0, 2])
@pytest.mark.parametrize('mode', ['symmetric', 'one_way'])
def test_local_loss_pairs_each_view_with_the_other_views_targets(grid, mode):
    model = tiny_model('--local-weight', '0.4', '--local-grid', str(grid), '--local-loss', mode)
    assert (model.target_local_projector is not None) == (mode == 'symmetric')
    x1, x2 = views()
    out = model([x1, x2])
    m = model
    pool = lambda f: F.adaptive_avg_pool2d(f, grid) if grid else f
    online = lambda x: m.predictor(m.projector(m.encoder.pooled(m.encoder(x))))
    target = lambda x: m.target_projector(m.target_encoder.pooled(m.target_encoder(x)))
    local = lambda x: m.local_predictor(m.local_projector(pool(m.encoder(x))))  # (B, d, n, n)
    l1 = local(x1)
    assert l1.shape == (4, 16, grid or 8, grid or 8)  # rf25_small: 8 x 8 locals at 32 px
    # each online local prediction -> the other view's target global projection
    to_global = [(2 - 2 * cos_map(target(xo), local(x))).mean() for x, xo in ((x1, x2), (x2, x1))]
    if mode == 'symmetric':
        # and the online global prediction -> each target local projection of the other view
        target_local = lambda x: m.target_local_projector(pool(m.target_encoder(x)))
        to_local = [(2 - 2 * cos_map(online(x), target_local(xo))).mean() for x, xo in ((x1, x2), (x2, x1))]
        by_hand = sum((a + b) / 2 for a, b in zip(to_global, to_local))
    else:
        by_hand = sum(to_global)
    torch.testing.assert_close(out['local'], by_hand.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['loss'], 0.6 * out['global'] + 0.4 * out['local'], rtol=1e-6, atol=1e-6)
    out['loss'].backward()
    for name, p in model.named_parameters():  # everything online learns; the targets only by EMA
        assert (p.grad is None) == name.startswith('target_'), name
    assert model.local_projector[0].weight.grad.abs().sum() > 0


def test_symmetric_local_loss_sends_gradient_to_the_global_predictor():
    # With w = 1 in the convex form the loss is the local loss alone: only its global -> local
    # direction (online global prediction vs the other view's target local projections) reaches the
    # global predictor.
    for mode, reaches in (('symmetric', True), ('one_way', False)):
        model = tiny_model('--local-weight', '0.5', '--local-loss', mode)
        model.local_weight = 1.0
        model(views())['loss'].backward()
        grad = model.predictor[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches, mode


def test_loss_forms():
    x = views()
    convex = tiny_model('--local-weight', '0.25')(x)
    total = tiny_model('--local-weight', '0.25', '--loss-form', 'sum')(x)  # same seed, same weights
    torch.testing.assert_close(convex['loss'], 0.75 * convex['global'] + 0.25 * convex['local'])
    torch.testing.assert_close(total['loss'], total['global'] + 0.25 * total['local'])
    torch.testing.assert_close(total['local'], convex['local'])
    assert co_byol.get_args([*TINY, '--loss-form', 'sum', '--local-weight', '2']).local_weight == 2  # w >= 1 allowed


def test_no_pool_mlp_is_the_plain_average():
    model = tiny_model('--no-pool-mlp')
    assert model.encoder.mlp is None and not any('mlp' in n for n, _ in model.named_parameters())
    f = torch.randn(2, model.encoder.out_dim, 3, 3)
    torch.testing.assert_close(model.encoder.pooled(f), f.mean((2, 3)))
    assert tiny_args('--no-pool-mlp').no_pool_mlp and co_byol.backbone_args(tiny_args('--no-pool-mlp'))['pool'] == 'avg'
    assert co_byol.backbone_args(tiny_args())['pool'] == 'avg_mlp'


def test_sync_batchnorm_covers_every_batchnorm():
    model = co_byol.sync_batchnorm(tiny_model())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 20 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.encoder.modules())  # the encoder too, as BYOL
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.target_local_projector.modules())


def test_large_image_defaults_are_byols_100_epoch_configuration():
    large = co_byol.defaults(224)
    assert (large['lr'], large['weight_decay'], large['momentum'], large['epochs']) == (0.45, 1e-6, 0.99, 100)
    assert large['arch'] == 'resnet50' and large['optimizer'] == 'lars' and large['batch_size'] == 4096


def test_lars_scales_each_update_by_the_trust_ratio():
    w, b = torch.nn.Parameter(torch.full((3, 4), 2.0)), torch.nn.Parameter(torch.ones(4))
    w.grad, b.grad = torch.full((3, 4), 0.5), torch.full((4,), 0.5)
    opt = co_byol.LARS([{'params': [w]}, {'params': [b], 'weight_decay': 0.0, 'lars': False}], lr=0.1,
                       weight_decay=0.1, eta=0.01)
    opt.step()
    update = 0.5 + 0.1 * 2.0  # grad + wd * w
    ratio = 0.01 * (2.0 * 12 ** 0.5) / (update * 12 ** 0.5)  # eta ||w|| / ||update||
    torch.testing.assert_close(w.detach(), torch.full((3, 4), 2.0 - 0.1 * ratio * update))
    torch.testing.assert_close(b.detach(), torch.full((4,), 1.0 - 0.1 * 0.5))  # plain SGD, no decay
    opt.step()  # momentum 0.9: the second update is 1.9 x the (new) first one for b
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.95 - 0.1 * 0.5 * 1.9))


def test_schedules():
    args = tiny_args('--momentum', '0.99', '--warmup-epochs', '1', '--lr', '0.4', '--batch-size', '64')
    at = lambda step: co_byol.schedule(step, 100, 10, args)  # 100 steps of which 10 are one epoch of warm-up
    assert at(0)['momentum'] == pytest.approx(0.99) and at(100)['momentum'] == pytest.approx(1.0)
    assert at(50)['momentum'] == pytest.approx(0.995)
    assert at(0)['lr'] == pytest.approx(0.1 / 10) and at(9)['lr'] == pytest.approx(0.1)  # 0.4 x 64 / 256, linear warm-up
    assert at(100)['lr'] == pytest.approx(0.0)


def test_train_step_updates_the_online_network_and_moves_the_target_by_ema():
    args = tiny_args('--local-weight', '0.3')
    model = co_byol.CoBYOL(args)
    before = [[p.detach().clone() for p in target.parameters()] for target, _ in model.ema_pairs()]
    online_before = next(model.encoder.parameters()).detach().clone()
    sched = dict(lr=0.1, momentum=0.9)
    x = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    stats = co_byol.train_step(model, iter([x]), co_byol.build_optimizer(model, args), torch.amp.GradScaler('cpu', enabled=False),
                               contextlib.nullcontext(), sched, args)
    torch.testing.assert_close(stats[0], 0.7 * stats[1] + 0.3 * stats[2])  # convex form
    assert not torch.equal(next(model.encoder.parameters()), online_before)  # the online network took a step
    for (target, online), old in zip(model.ema_pairs(), before):
        for t, t0, o in zip(target.parameters(), old, online.parameters()):
            torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)


# ---------------------------------------------------------------------------------------------
# The training loop

def train(tmp_path, name, folder, *extra):
    out = str(tmp_path / name)
    argv = [*TINY, '--batch-size', '8', '--workers', '0', '--dtype', 'fp32', '--out-dir', out, '--log-every', '1',
            '--data', 'folder', '--data-path', folder, *extra]
    return out, co_byol.main(argv)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


@pytest.mark.parametrize('extra', [['--local-weight', '0.3'], ['--local-weight', '0'],
                                   ['--local-weight', '0.5', '--local-grid', '2', '--optimizer', 'adamw', '--lr', '1e-3'],
                                   ['--local-weight', '0.3', '--device-aug']])
def test_a_few_steps_of_training(extra, tmp_path, image_folder):
    out, result = train(tmp_path, 'run', image_folder, '--max-steps', '3', *extra)
    steps = [r for r in read_log(out) if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3]
    assert all(0 <= r['loss'] <= 8 for r in steps)
    local_on = float(extra[1]) > 0
    assert all(('local_loss' in r) == local_on for r in steps)
    assert 0 <= result['knn_top1'] <= 100
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['step'] == 3 and ckpt['backbone_kind'] == 'rf_resnet' and ckpt['args']['local_weight'] == float(extra[1])
    backbone = rf_resnet.RFResNet(**ckpt['backbone_args'])
    backbone.load_state_dict(ckpt['backbone'])  # strict
    for k, v in ckpt['backbone'].items():  # the ONLINE encoder
        assert torch.equal(v, ckpt['model'][f'encoder.{k}'])
    assert 'agreement_000003.png' in os.listdir(out)


def test_ema_moves_the_target_towards_the_online_network(tmp_path, image_folder):
    out, _ = train(tmp_path, 'ema', image_folder, '--max-steps', '1', '--momentum', '0.9')
    state = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']
    args = co_byol.get_args([*TINY, '--data', 'folder', '--data-path', image_folder])
    torch.manual_seed(0)  # main() builds the model right after seeding with --seed
    init = co_byol.CoBYOL(args).state_dict()
    moved = 0
    for name, p in co_byol.CoBYOL(args).named_parameters():
        if name.startswith(('encoder.', 'projector.', 'local_projector.')):  # the target local projector too
            expected = 0.9 * init[name] + 0.1 * state[name]  # momentum 0.9 at step 0
            torch.testing.assert_close(state[f'target_{name}'], expected, rtol=1e-5, atol=1e-6)
            moved += not torch.equal(state[name], init[name])
    assert moved > 0


def test_resume_reaches_bit_identical_parameters(tmp_path, image_folder):
    extra = ['--local-weight', '0.3', '--eval-every', '100']
    whole, _ = train(tmp_path, 'whole', image_folder, '--max-steps', '4', *extra)
    part, _ = train(tmp_path, 'part', image_folder, '--max-steps', '2', *extra)
    train(tmp_path, 'part', image_folder, '--max-steps', '4', *extra)
    a = torch.load(os.path.join(whole, 'ckpt.pt'), weights_only=False)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=False)
    assert a['step'] == b['step'] == 4
    for k, v in a['model'].items():
        assert torch.equal(b['model'][k], v), k
    for k, v in a['optimizer']['state'].items():
        assert torch.equal(b['optimizer']['state'][k]['momentum_buffer'], v['momentum_buffer'])
    assert [r['step'] for r in read_log(part) if 'loss' in r] == [1, 2, 3, 4]


def test_torchrun_two_processes_complete_a_run(tmp_path, image_folder):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'co_byol.py'), *TINY, '--batch-size', '8', '--workers', '0', '--dtype', 'fp32',
           '--device', 'cpu', '--max-steps', '3', '--log-every', '1', '--data', 'folder', '--data-path', image_folder,
           '--out-dir', out]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert run.returncode == 0, run.stderr[-3000:]
    assert '2 process(es) on cpu (2 thread(s) each)' in run.stdout and run.stdout.strip().splitlines()[-1].startswith('final k-NN top-1')
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['step'] == 3 and len(ckpt['rng']) == 2
    assert [r['step'] for r in read_log(out) if 'loss' in r] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2

@pytest.mark.parametrize('argv, env, message', [
    (['--local-weight', '1'], {}, '--local-weight must be in [0, 1)'),
    (['--local-grid', '9'], {}, 'larger than the 8 x 8 feature map'),
    (['--loss-form', 'sum', '--local-weight', '-1'], {}, 'must be >= 0 with --loss-form sum'),
    (['--local-loss', 'both'], {}, "invalid choice: 'both'"),
    (['--arch', 'resnet51'], {}, "unknown arch 'resnet51'"),
    (['--arch', 'bagnet33'], {}, 'too small for bagnet33'),
    (['--optimizer', 'lamb'], {}, "invalid choice: 'lamb'"),
    (['--batch-size', '9'], {'WORLD_SIZE': '2'}, 'not divisible by 2 process(es)'),
    (['--data', 'imagenet21k'], {}, "unknown dataset 'imagenet21k'"),
    (['--data', 'folder', '--data-path', '/no/such/dir', '--max-steps', '1'], {}, 'existing folder'),
])
def test_bad_input_is_one_line_and_exit_2(argv, env, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'co_byol.py'), *argv], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert run.returncode == 2, run.stderr
    assert run.stderr.count('\n') == 1 and message in run.stderr, run.stderr


def test_a_rerun_with_other_training_flags_stops_instead_of_reusing_the_run(tmp_path, image_folder, capsys):
    out, _ = train(tmp_path, 'run', image_folder, '--max-steps', '1')
    for changed, flag in ((['--crop-min', '0.5'], '--crop-min 0.2 -> 0.5'), (['--epochs', '3'], '--epochs 16 -> 3.0')):
        with pytest.raises(data.RunError) as stop:  # python co_byol.py prints it as one line and exits 2
            train(tmp_path, 'run', image_folder, '--max-steps', '2', *changed)
        assert stop.value.status == 2 and flag in str(stop.value)
    train(tmp_path, 'run', image_folder, '--max-steps', '2')
    assert [r['step'] for r in read_log(out) if 'loss' in r] == [1, 2]  # same training flags: it resumes
