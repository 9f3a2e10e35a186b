"""dilemma.py: the DILEMMA core (corruption, detection, what each pass sees), the four methods with DILEMMA on and off, the
training loop (resume, two processes), and bad input."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import device_aug
import dilemma
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# corrupt_positions

@pytest.mark.parametrize('drop_ratio', [0.0, 0.25, 0.5, 0.75])
def test_labels_line_up_with_kept_tokens(drop_ratio):
    torch.manual_seed(0)
    N, L = 5, 64
    keep, pos, labels = dilemma.corrupt_positions(N, L, drop_ratio, 0.3, 'cpu')
    K = round(L * (1 - drop_ratio))
    assert keep.shape == pos.shape == labels.shape == (N, K)
    assert torch.equal(labels.bool(), pos != keep)  # label 1 exactly where the position is not the token's own
    for i in range(N):
        assert len(set(keep[i].tolist())) == K  # each kept token once
    assert ((pos >= 0) & (pos < L)).all()


def test_no_token_gets_its_own_position_and_sparse_wrong_positions_are_dropped_ones():
    torch.manual_seed(1)
    for drop_ratio in (0.5, 0.75, 0.9):
        keep, pos, labels = dilemma.corrupt_positions(200, 64, drop_ratio, 0.5, 'cpu')
        for i in range(200):
            kept = set(keep[i].tolist())
            wrong = pos[i][labels[i].bool()].tolist()
            assert not kept & set(wrong)  # never a kept location (so never its own)
            assert len(set(wrong)) == len(wrong)  # no two tokens share an embedding
            assert len(set(pos[i].tolist())) == keep.shape[1]


def test_dense_wrong_positions_are_any_other_location():
    torch.manual_seed(2)
    keep, pos, labels = dilemma.corrupt_positions(400, 16, 0.0, 0.5, 'cpu')
    assert torch.equal(keep, torch.arange(16).expand(400, 16))
    wrong = labels.bool()
    assert (pos[wrong] != keep[wrong]).all()
    # uniform over the 15 others: every (token, wrong position) pair turns up
    pairs = set(zip(keep[wrong].tolist(), pos[wrong].tolist()))
    assert len(pairs) == 16 * 15


def test_corrupted_fraction_is_close_to_p_and_kept_tokens_are_uniform():
    torch.manual_seed(3)
    keep, _, labels = dilemma.corrupt_positions(2000, 64, 0.75, 0.2, 'cpu')
    assert abs(labels.mean().item() - 0.2) < 0.01  # 32,000 tokens: standard error 0.002
    freq = torch.bincount(keep.flatten(), minlength=64).float() / 2000
    assert (freq - 0.25).abs().max() < 0.05  # each location kept with probability K / L
    _, _, none = dilemma.corrupt_positions(100, 64, 0.75, 0.0, 'cpu')
    assert none.sum() == 0


def tiny_backbone(**kw):
    torch.manual_seed(0)
    return vit.vit('vit_micro/4', **kw)


def test_corrupting_positions_changes_the_encoder_output():
    """The official fork's bug 1: corrupted positions never reached the network."""
    enc = dilemma.DilemmaEncoder(tiny_backbone(), 0.75, 0.5, 1.0).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    keep, pos, labels = dilemma.corrupt_positions(4, 64, 0.75, 0.5, 'cpu')
    assert labels.sum() > 0
    clean, corrupted = enc.backbone(x, keep), enc.backbone(x, keep, pos)
    moved = labels.bool()
    assert (clean[:, 1:][moved] - corrupted[:, 1:][moved]).abs().amax(-1).min() > 1e-3
    torch.manual_seed(5)
    tokens, keep_out, (loss, acc, auc) = enc(x)  # the encoder draws the same corruption from the same seed
    torch.testing.assert_close(tokens, corrupted)
    assert torch.equal(keep_out, keep) and 0 <= acc <= 1 and 0 <= auc <= 1 and loss > 0


def test_detection_loss_value():
    head = torch.nn.Linear(8, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, 2.0)  # every token says "wrong" with logit 2
    tokens = torch.randn(2, 1 + 3, 8)
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    loss, acc, auc = dilemma.detection_loss(head, tokens, labels)
    expected = (3 * F.softplus(torch.tensor(-2.0)) + 3 * F.softplus(torch.tensor(2.0))) / 6
    torch.testing.assert_close(loss, expected)
    assert acc.item() == pytest.approx(0.5)


def test_auroc_is_the_probability_that_a_positive_outranks_a_negative():
    scores, labels = torch.tensor([[0.1, 0.4, 0.35, 0.8]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert dilemma.auroc(scores, labels).item() == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs ordered
    assert dilemma.auroc(-scores, labels).item() == pytest.approx(0.25)
    assert dilemma.auroc(scores, torch.zeros(1, 4)).item() == 0.5  # one class only: no ranking to measure
    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(20000, generator=g), (torch.rand(20000, generator=g) < 0.2).float()
    assert dilemma.auroc(noise, y).item() == pytest.approx(0.5, abs=0.02)
    assert dilemma.base_rate_entropy(0.5) == pytest.approx(math.log(2))
    assert dilemma.base_rate_entropy(0.2) == pytest.approx(0.5004, abs=1e-4)


def test_corrupted_counts_per_image_are_binomial_and_wrong_positions_uniform():
    """A bug that corrupts all or none of an image's tokens keeps the pooled mean at p but not the
    per-image distribution: compare the counts with Binomial(K, p) (chi-square, 6 degrees of freedom)."""
    torch.manual_seed(11)
    N, L, K, p = 20000, 64, 16, 0.2
    keep, pos, labels = dilemma.corrupt_positions(N, L, 0.75, p, 'cpu')
    counts = torch.bincount(labels.sum(1).long(), minlength=K + 1).float()
    binom = torch.tensor([math.comb(K, k) * p ** k * (1 - p) ** (K - k) for k in range(K + 1)]) * N
    observed = torch.cat([counts[:6], counts[6:].sum(0, keepdim=True)])  # pool the tail (expected < 5 per cell)
    expected = torch.cat([binom[:6], binom[6:].sum(0, keepdim=True)])
    assert ((observed - expected) ** 2 / expected).sum() < 22.5  # chi-square(6) 99.9% quantile
    # wrong positions: uniform over the 64 locations (sparse case: any dropped location)
    freq = torch.bincount(pos[labels.bool()], minlength=L).float()
    assert ((freq - freq.mean()) ** 2 / freq.mean()).sum() < 120  # chi-square(63) 99.9% quantile: 103
    # dense case: a token's wrong position is uniform over the L - 1 others
    keep, pos, labels = dilemma.corrupt_positions(4000, 16, 0.0, 1.0, 'cpu')
    offsets = torch.bincount(((pos - keep) % 16)[labels.bool()], minlength=16).float()
    assert offsets[0] == 0 and ((offsets[1:] - offsets[1:].mean()) ** 2 / offsets[1:].mean()).sum() < 37.7  # chi2(14)


# ---------------------------------------------------------------------------------------------
# The methods: DILEMMA off is exactly the plain method

def method_args(method, *extra):
    args = dilemma.get_args(['--method', method, '--model', 'vit_micro/4', '--proj-hidden', '32', '--proj-dim', '16',
                             '--out-dim', '64', '--decoder-dim', '32', '--local-crops', '2', *extra])
    return args


def views_for(method, N=4):
    g = torch.Generator().manual_seed(0)
    if method == 'dino':
        return [torch.randn(N, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(N, 3, 16, 16, generator=g) for _ in range(2)]
    return [torch.randn(N, 3, 32, 32, generator=g) for _ in range(1 if method == 'mae' else 2)]


def plain_loss(model, method, views, teacher_temp):
    """Each method's loss written out directly from its definition, without DILEMMA."""
    m = model
    if method == 'mocov3':
        def ctr(q, k):
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            return F.cross_entropy(q @ k.T / 0.2, torch.arange(len(q))) * 2 * 0.2
        q1, q2 = (m.predictor(m.projector(m.student.backbone(x)[:, 0])) for x in views)
        k1, k2 = (m.teacher_projector(m.teacher(x)[:, 0]) for x in views)
        return ctr(q1, k2) + ctr(q2, k1)
    if method == 'simclr':
        z = F.normalize(torch.cat([m.projector(m.student.backbone(x)[:, 0]) for x in views]), dim=1)
        n = len(views[0])
        sim = (z @ z.T / m.temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float('-inf'))
        return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
    if method == 'dino':
        t = [F.softmax(m.teacher_head(m.teacher(x)[:, 0]) / teacher_temp, -1) for x in views[:2]]
        s = [F.log_softmax(m.head(m.student.backbone(x)[:, 0]) / m.student_temp, -1) for x in views]
        terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(len(views)) if i != j]
        return sum(terms) / len(terms)
    if method == 'mae':  # MAE's masking and loss, with the encoder told nothing but true positions
        x, P = views[0], 4
        L, K = 64, round(64 * 0.25)
        keep = torch.rand(len(x), L).argsort(1)[:, :K]
        y = m.decoder_embed(m.student.backbone(x, keep))
        full = m.mask_token.expand(len(x), L, -1).clone()
        for i in range(len(x)):
            full[i, keep[i]] = y[i, 1:]
        y = torch.cat([y[:, :1], full + m.decoder_pos], 1)
        for block in m.decoder_blocks:
            y = block(y)
        pred = m.decoder_pred(m.decoder_norm(y))[:, 1:]
        target = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 4, 5, 1).reshape(len(x), L, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        err = ((pred - target) ** 2).mean(-1)
        masked = torch.ones(len(x), L)
        for i in range(len(x)):
            masked[i, keep[i]] = 0
        return (err * masked).sum() / masked.sum()


@pytest.mark.parametrize('method', dilemma.METHODS)
def test_dilemma_off_is_exactly_the_plain_method(method):
    off = ['--dilemma-prob', '0'] + ([] if method == 'mae' else ['--drop-ratio', '0'])
    torch.manual_seed(0)
    model = dilemma.build_model(method_args(method, *off))
    assert model.student.detect is None
    views = views_for(method)
    torch.manual_seed(7)
    loss, det = model(views, 0.05)
    torch.manual_seed(7)
    expected = plain_loss(model, method, views, 0.05)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert det is None


@pytest.mark.parametrize('method', dilemma.METHODS)
def test_train_step_adds_the_weighted_detection_loss_and_trains_the_head(method):
    torch.manual_seed(0)
    args = method_args(method, '--dilemma-weight', '0.5')
    model = dilemma.build_model(args)
    head_before = model.student.detect.weight.detach().clone()
    pairs = getattr(model, 'ema_pairs', list)()
    before = [[p.detach().clone() for p in teacher.parameters()] for teacher, _ in pairs]
    optimizer = torch.optim.AdamW(dilemma.param_groups(model), lr=1e-3)
    sched = dilemma.schedule(0, 100, 10, args)
    stats = dilemma.train_step(model, iter([views_for(method)]), optimizer, torch.amp.GradScaler('cpu', enabled=False),
                               contextlib.nullcontext(), sched, args)
    loss, method_loss, detect = stats[:3]
    assert torch.isfinite(loss) and detect > 0
    torch.testing.assert_close(loss, method_loss + 0.5 * detect)  # DILEMMA: method + lambda * detection
    assert not torch.equal(model.student.detect.weight, head_before)  # the head took a step
    m = sched['momentum']
    for (teacher, student), old in zip(pairs, before):  # teachers move only by EMA towards the updated student
        for t, t0, s in zip(teacher.parameters(), old, student.parameters()):
            torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_schedules_are_functions_of_the_step():
    args = method_args('dino', '--lr', '0.4', '--batch-size', '64', '--min-lr', '0', '--warmup-epochs', '1', '--momentum', '0.99',
                       '--weight-decay', '0.04', '--weight-decay-end', '0.4', '--teacher-temp', '0.07',
                       '--teacher-temp-epochs', '2', '--freeze-last-layer', '1')
    at = lambda step: dilemma.schedule(step, 100, 10, args)  # 100 steps, 10 a epoch
    assert at(0)['lr'] == pytest.approx(0.01) and at(9)['lr'] == pytest.approx(0.1)  # warm-up to 0.4 x 64 / 256
    assert at(55)['lr'] == pytest.approx(0.05) and at(100)['lr'] == pytest.approx(0.0)  # cosine after it
    assert [at(s)['weight_decay'] for s in (0, 50, 100)] == pytest.approx([0.04, 0.22, 0.4])
    assert [at(s)['momentum'] for s in (0, 50, 100)] == pytest.approx([0.99, 0.995, 1.0])
    assert [at(s)['teacher_temp'] for s in (0, 10, 20, 90)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert at(9)['freeze_last_layer'] and not at(10)['freeze_last_layer']
    moco = dilemma.schedule(50, 100, 10, method_args('mocov3', '--weight-decay', '0.1'))
    assert moco['teacher_temp'] is None and not moco['freeze_last_layer'] and moco['weight_decay'] == pytest.approx(0.1)


def test_the_frozen_last_layer_does_not_move_and_the_rest_does():
    args = method_args('dino', '--freeze-last-layer', '1')
    model = dilemma.build_model(args)
    last, first = model.head.last_layer.weight.detach().clone(), model.head.mlp[0].weight.detach().clone()
    dilemma.train_step(model, iter([views_for('dino')]), torch.optim.AdamW(dilemma.param_groups(model), lr=1e-2),
                       torch.amp.GradScaler('cpu', enabled=False), contextlib.nullcontext(), dilemma.schedule(0, 100, 10, args), args)
    assert torch.equal(model.head.last_layer.weight, last) and not torch.equal(model.head.mlp[0].weight, first)


def test_weight_decay_spares_biases_norms_tokens_and_positions():
    model = dilemma.build_model(method_args('mae', '--pos-embed', 'learned'))
    decay, no_decay = dilemma.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay['params']}
    assert no_decay['weight_decay'] == 0 and {'student.backbone.cls_token', 'student.backbone.pos_embed', 'mask_token'} <= spared
    assert all(n.endswith('bias') or 'norm' in n or n.endswith(('cls_token', 'pos_embed', 'mask_token')) for n in spared)
    assert {names[id(p)] for p in decay['params']} >= {'student.backbone.blocks.0.attn.qkv.weight', 'student.detect.weight'}
    assert len(decay['params']) + len(no_decay['params']) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The training loop

def train(tmp_path, name, *extra, folder=None):
    out = str(tmp_path / name)
    argv = ['--model', 'vit_micro/4', '--batch-size', '8', '--workers', '0', '--dtype', 'fp32', '--out-dir', out,
            '--proj-hidden', '32', '--proj-dim', '16', '--out-dim', '64', '--decoder-dim', '32', '--local-crops', '2',
            '--log-every', '1', *extra]
    if folder:
        argv += ['--data', 'folder', '--data-path', folder]
    result = dilemma.main(argv)
    return out, result


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


@pytest.mark.parametrize('method', dilemma.METHODS)
@pytest.mark.parametrize('on', [True, False])
def test_each_method_runs_a_few_steps(method, on, tmp_path, image_folder, capsys):
    off = ['--dilemma-prob', '0'] + ([] if method == 'mae' else ['--drop-ratio', '0'])
    out, result = train(tmp_path, 'run', '--method', method, '--max-steps', '3', *([] if on else off), folder=image_folder)
    header = capsys.readouterr().out.splitlines()[0]  # says whether detection is trained, not '+ DILEMMA (p=0.0 ...)'
    assert header.startswith(f'{method} + DILEMMA (p=0.2' if on else f'{method} without DILEMMA (no detection head')
    steps = [r for r in read_log(out) if 'loss' in r]
    assert [r['step'] for r in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in steps)
    assert all(('detect_loss' in r and r['detect_loss'] > 0 and 0 <= r['det_auroc'] <= 1) == on for r in steps)
    assert 0 <= result['knn_top1'] <= 100
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['step'] == 3 and ckpt['backbone_kind'] == 'vit'
    assert vit.VisionTransformer(**ckpt['backbone_args']).load_state_dict(ckpt['backbone']) is not None
    assert any(f.startswith('detection_') and f.endswith('.png') for f in os.listdir(out))


@pytest.mark.parametrize('aug', [[], ['--device-aug']])
def test_resume_reaches_the_same_parameters(aug, tmp_path, image_folder):
    whole, _ = train(tmp_path, 'whole', '--method', 'dino', '--max-steps', '4', '--drop-path', '0.1', *aug, folder=image_folder)
    part, _ = train(tmp_path, 'part', '--method', 'dino', '--max-steps', '2', '--drop-path', '0.1', *aug, folder=image_folder)
    train(tmp_path, 'part', '--method', 'dino', '--max-steps', '4', '--drop-path', '0.1', *aug, folder=image_folder)
    a = torch.load(os.path.join(whole, 'ckpt.pt'), weights_only=False)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=False)
    assert a['step'] == b['step'] == 4
    for k, v in a['model'].items():
        torch.testing.assert_close(b['model'][k], v, rtol=0, atol=0, msg=k)
    assert [r['step'] for r in read_log(part) if 'loss' in r] == [1, 2, 3, 4]


def test_detection_learns_under_dino_augmentation_within_a_bounded_number_of_steps():
    """A later change that breaks learning must fail here: a tiny encoder on the shapes data under DINO's
    global-crop augmentation (40-100% crops, colour jitter, grayscale, solarisation, flips) must rank
    misplaced tokens well above chance (AUROC 0.5) and find information below H(p).
    Measured: AUROC ~0.8 after 500 steps, ~15 s on 2 CPU cores."""
    torch.manual_seed(0)
    shapes = data.Shapes('train', n=2048)
    views = device_aug.DeviceViews(shapes.images, data.multi_crop(32, 16, 0, global_scale=(0.4, 1.0)).specs[1:2])
    enc = dilemma.DilemmaEncoder(vit.vit('vit_micro/4', pos_embed='sincos'), 0.5, 0.5, 1.0)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3, weight_decay=0.04)
    aucs, losses = [], []
    for step in range(500):
        for group in opt.param_groups:
            group['lr'] = 2e-3 * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(shapes.images), (64,), generator=torch.Generator().manual_seed(step))
        _, _, (loss, _, auc) = enc(views(idx, step)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        aucs.append(auc.item())
        losses.append(loss.item())
    assert sum(aucs[:20]) / 20 < 0.55  # it starts at chance ...
    auc, info = sum(aucs[-100:]) / 100, math.log(2) - sum(losses[-100:]) / 100
    assert auc > 0.7 and info > 0.03, (auc, info)  # ... and learns (100 steps x 2048 tokens: noise ~0.003)


# ---------------------------------------------------------------------------------------------
# Two processes

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def full_batch():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(8, 16, generator=g) for k in ('q', 'k', 'z1', 'z2')}


def dino_views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]


def dino_model():
    torch.manual_seed(0)
    return dilemma.build_model(method_args('dino', '--dilemma-prob', '0', '--drop-ratio', '0'))


def _two_process_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    half = slice(4 * rank, 4 * rank + 4)  # process r holds block r of the global batch
    b = {k: v[half].clone().requires_grad_() for k, v in full_batch().items()}
    moco = dilemma.contrastive_loss(b['q'], b['k'], 0.2)
    simclr = dilemma.nt_xent(b['z1'], b['z2'], 0.2)
    simclr.backward()
    model = dino_model()
    dino = model([v[half] for v in dino_views()], 0.04)[0]
    torch.save({'moco': moco.detach(), 'simclr': simclr.detach(), 'grad_z1': b['z1'].grad, 'grad_z2': b['z2'].grad,
                'dino': dino.detach(), 'center': model.center}, f'{out}.{rank}')
    dist.destroy_process_group()


def test_two_processes_agree_with_one_on_the_same_global_batch(tmp_path):
    """MoCo v3's gathered keys, SimCLR's gathered negatives (and their gradient), DINO's all-reduced
    centre: two processes with half the batch each compute what one process computes on all of it."""
    import torch.multiprocessing as mp
    out = str(tmp_path / 'r')
    mp.spawn(_two_process_worker, args=(2, free_port(), out), nprocs=2)
    ranks = [torch.load(f'{out}.{r}') for r in range(2)]
    b = {k: v.clone().requires_grad_() for k, v in full_batch().items()}
    moco = dilemma.contrastive_loss(b['q'], b['k'], 0.2)
    simclr = dilemma.nt_xent(b['z1'], b['z2'], 0.2)
    simclr.backward()
    model = dino_model()
    dino = model(dino_views(), 0.04)[0]
    mean = lambda key: (ranks[0][key] + ranks[1][key]) / 2
    torch.testing.assert_close(mean('moco'), moco.detach())
    torch.testing.assert_close(mean('simclr'), simclr.detach())
    # DDP averages the processes' gradients: (grad on process r) / 2 == the single-process gradient
    for key in ('z1', 'z2'):
        grad = torch.cat([ranks[0][f'grad_{key}'], ranks[1][f'grad_{key}']]) / 2
        torch.testing.assert_close(grad, b[key].grad)
    torch.testing.assert_close(mean('dino'), dino.detach(), rtol=1e-5, atol=1e-5)
    for r in range(2):
        torch.testing.assert_close(ranks[r]['center'], model.center)


def dino_three_steps(rank=0, world=1, prob='0'):
    """Three dilemma.train_step calls of DINO (no BatchNorm anywhere) on the same 8-image global batches,
    this process taking its share; returns the parameters and the corruptions this process drew."""
    args = method_args('dino', '--dilemma-prob', prob, '--drop-ratio', '0' if prob == '0' else '0.5', '--accum-steps', '1')
    torch.manual_seed(0)  # the same initial weights everywhere
    raw = model = dilemma.build_model(args)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(args.seed + rank)  # as dilemma.main: each process draws its own corruptions
    g = torch.Generator().manual_seed(5)
    share = slice(8 // world * rank, 8 // world * (rank + 1))
    batches = iter([[torch.randn(8, 3, s, s, generator=g)[share] for s in (32, 32, 16, 16)] for _ in range(3)])
    optimizer = torch.optim.AdamW(dilemma.param_groups(raw), lr=1e-3)
    drawn, corrupt = [], dilemma.corrupt_positions
    dilemma.corrupt_positions = lambda *a: drawn.append(corrupt(*a)) or drawn[-1]
    try:
        for step in range(3):
            dilemma.train_step(model, batches, optimizer, torch.amp.GradScaler('cpu', enabled=False), contextlib.nullcontext(),
                               dilemma.schedule(step, 100, 10, args), args)
    finally:
        dilemma.corrupt_positions = corrupt
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}, drawn


def _ddp_train_worker(rank, world, port, out, prob):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.save(dino_three_steps(rank, world, prob), f'{out}.{rank}')
    dist.destroy_process_group()


def test_ddp_training_steps_equal_one_process_on_the_global_batch(tmp_path):
    """End to end through train_step: 2 processes x 4 images under DDP reach the parameters (students,
    EMA teachers, DINO's centre) of 1 process x 8 images after 3 steps (DILEMMA off, so nothing random)."""
    import torch.multiprocessing as mp
    out = str(tmp_path / 'r')
    mp.spawn(_ddp_train_worker, args=(2, free_port(), out, '0'), nprocs=2)
    single, _ = dino_three_steps()
    for r in range(2):
        params, _ = torch.load(f'{out}.{r}')
        for k, v in single.items():
            torch.testing.assert_close(params[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_processes_draw_different_corruptions(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / 'r')
    mp.spawn(_ddp_train_worker, args=(2, free_port(), out, '0.5'), nprocs=2)
    (p0, drawn0), (p1, drawn1) = (torch.load(f'{out}.{r}') for r in range(2))
    assert len(drawn0) == len(drawn1) == 3  # one sparse corrupted pass (the global crops) per step
    for (k0, pos0, _), (k1, pos1, _) in zip(drawn0, drawn1):
        assert not torch.equal(k0, k1) and not torch.equal(pos0, pos1)
    for k in p0:  # and DDP keeps their parameters identical all the same
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0, msg=k)


def test_main_seeds_each_process_to_draw_its_own_corruptions(tmp_path, image_folder):
    """Through dilemma.py's main under torchrun (not a test's own seeding): same --seed, 2 processes, and
    each draws different kept tokens and wrong positions at each step."""
    out = str(tmp_path / 'drawn')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'tests', 'record_corruptions.py'), out, '--method', 'simclr', '--model', 'vit_micro/4',
           '--batch-size', '8', '--workers', '0', '--dtype', 'fp32', '--device', 'cpu', '--proj-hidden', '32',
           '--max-steps', '2', '--eval-every', '100', '--data', 'folder', '--data-path', image_folder,
           '--out-dir', str(tmp_path / 'run')]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(f'{out}.{r}')[:2] for r in range(2))  # the two training steps (the figure comes last)
    for (k0, pos0), (k1, pos1) in zip(rank0, rank1):
        assert k0.shape == k1.shape == (8, 32)  # 4 images x 2 views per process, half of 64 tokens kept
        assert not torch.equal(k0, k1) and not torch.equal(pos0, pos1)


def test_torchrun_two_processes_complete_a_run(tmp_path, image_folder):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'dilemma.py'), '--method', 'simclr', '--model', 'vit_micro/4', '--batch-size', '8',
           '--workers', '0', '--dtype', 'fp32', '--device', 'cpu', '--proj-hidden', '32', '--max-steps', '3',
           '--log-every', '1', '--data', 'folder', '--data-path', image_folder, '--out-dir', out]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='2'))
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'final k-NN top-1' in run.stdout and '2 process(es) on cpu (2 thread(s) each)' in run.stdout
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['step'] == 3


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2

@pytest.mark.parametrize('argv, env, message', [
    (['--method', 'byol'], {}, "invalid choice: 'byol'"),
    (['--drop-ratio', '1.0'], {}, '--drop-ratio must be in [0, 1)'),
    (['--drop-ratio', '-0.1'], {}, '--drop-ratio must be in [0, 1)'),
    (['--batch-size', '9'], {'WORLD_SIZE': '2'}, 'not divisible by 2 process(es)'),
    (['--method', 'mae', '--drop-ratio', '0'], {}, "MAE's mask ratio"),
    (['--data', 'imagenet21k'], {}, "unknown dataset 'imagenet21k'"),
    (['--data', 'folder', '--data-path', '/no/such/dir', '--max-steps', '1'], {}, 'existing folder'),
    (['--img-size', '30'], {}, 'not divisible by the patch size 4'),
    (['--model', 'vit_huge/14'], {}, "unknown model 'vit_huge/14'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, env, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'dilemma.py'), *argv], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, **env})
    assert run.returncode == 2, run.stderr
    assert run.stderr.count('\n') == 1 and message in run.stderr, run.stderr


@pytest.mark.parametrize('on', [True, False])
def test_compiled_model_trains_with_dilemma_on_and_off(on):
    """torch.compile of the whole model: the loss keeps its gradient (with DILEMMA off an earlier
    version added a constant zero, and the compiled loss came back without a grad_fn)."""
    off = [] if on else ['--dilemma-prob', '0', '--drop-ratio', '0']
    args = dilemma.get_args(['--method', 'mocov3', '--model', 'vit_micro/4', '--proj-hidden', '32', '--proj-dim', '16',
                             '--out-dir', '/tmp/unused', *off])
    torch.manual_seed(0)
    model = dilemma.build_model(args)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    loss, det = torch.compile(model)(views)
    (loss + det[0] if on else loss).backward()
    grad = model.student.backbone.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert (det is not None) == on


# ---------------------------------------------------------------------------------------------
# What each pass sees: one sparse corrupted student pass for both losses, dense clean teachers

def record_calls(module):
    """Wrap module.forward; returns the list of (keep_idx, pos_idx, output) of each call."""
    calls, forward = [], module.forward

    def wrapped(x, keep_idx=None, pos_idx=None):
        out = forward(x, keep_idx, pos_idx)
        calls.append((keep_idx, pos_idx, out))
        return out
    module.forward = wrapped
    return calls


@pytest.mark.parametrize('method', dilemma.METHODS)
def test_the_method_loss_uses_the_sparse_corrupted_pass_and_teachers_see_dense_clean_views(method):
    torch.manual_seed(0)
    args = method_args(method, '--dilemma-prob', '0.5')
    model = dilemma.build_model(args)
    m = model
    student = record_calls(m.student.backbone)
    teacher = record_calls(m.teacher) if hasattr(m, 'teacher') else []
    heads = []  # what the method's head receives: the class tokens of the student pass
    head = {'mocov3': 'projector', 'simclr': 'projector', 'dino': 'head', 'mae': 'decoder_embed'}[method]
    getattr(m, head).register_forward_hook(lambda mod, inp, out: heads.append(inp[0]))
    model(views_for(method))
    keep, pos, tokens = student[0]
    assert keep is not None and keep.shape[1] == round(64 * (1 - args.drop_ratio)) < 64 and (pos != keep).any()  # sparse, corrupted
    two_views = method in ('mocov3', 'simclr')  # both views in one pass, the head applied to each half
    used = torch.cat(heads[:2]) if two_views else heads[0]
    assert torch.equal(used, tokens if method == 'mae' else tokens[:, 0])  # the very same pass
    if method == 'dino':  # local crops: dense (16 tokens of 16), never corrupted, detection on globals only
        assert len(student) == 2
        l_keep, l_pos, _ = student[1]
        assert l_keep is None and l_pos is None and torch.equal(heads[1], student[1][2][:, 0])
    else:
        assert len(student) == 1
    for t_keep, t_pos, _ in teacher:
        assert t_keep is None and t_pos is None


def test_detection_reads_patch_tokens_with_a_nonzero_head():
    torch.manual_seed(0)
    enc = dilemma.DilemmaEncoder(tiny_backbone(), 0.75, 0.5, 1.0)
    assert enc.detect.weight.abs().sum() > 0  # a zero head would give a constant logit: no ranking to learn
    tokens, labels = torch.randn(3, 1 + 8, 64), (torch.rand(3, 8) < 0.5).float()
    loss = dilemma.detection_loss(enc.detect, tokens, labels)[0]
    other_cls = tokens.clone()
    other_cls[:, 0] += 10
    assert torch.equal(dilemma.detection_loss(enc.detect, other_cls, labels)[0], loss)  # class token ignored
    other_patch = tokens.clone()
    other_patch[:, 1] += 10
    assert not torch.equal(dilemma.detection_loss(enc.detect, other_patch, labels)[0], loss)


def test_mae_decoder_places_tokens_at_their_true_positions(monkeypatch):
    torch.manual_seed(0)
    model = dilemma.build_model(method_args('mae', '--dilemma-prob', '0.5'))
    m = model
    drawn, decoder_in = [], []
    corrupt = dilemma.corrupt_positions
    monkeypatch.setattr(dilemma, 'corrupt_positions', lambda *a: drawn.append(corrupt(*a)) or drawn[-1])
    m.decoder_blocks[0].register_forward_hook(lambda mod, inp, out: decoder_in.append(inp[0]))
    embedded = []
    m.decoder_embed.register_forward_hook(lambda mod, inp, out: embedded.append(out))
    model(views_for('mae'))
    keep, pos, labels = drawn[0]
    y, full = embedded[0], decoder_in[0][:, 1:] - m.decoder_pos  # decoder input without its positions
    assert labels.sum() > 0
    for i in range(len(keep)):
        torch.testing.assert_close(full[i, keep[i]], y[i, 1:])  # at keep_idx: the token itself
        moved = labels[i].bool()
        if moved.any():  # at the wrong position it was told: a mask token, not the token
            assert not torch.allclose(full[i, pos[i][moved]], y[i, 1:][moved])


def test_dino_centre_is_the_ema_of_teacher_outputs_and_is_subtracted_next_call():
    torch.manual_seed(0)
    args = method_args('dino', '--dilemma-prob', '0', '--drop-ratio', '0')
    model = dilemma.build_model(args)
    m = model
    views = views_for('dino')
    centre0 = torch.randn_like(m.center)
    m.center.copy_(centre0)
    with torch.no_grad():
        t = m.teacher_head(m.teacher(torch.cat(views[:2]))[:, 0])
        s = [F.log_softmax(m.head(m.student.backbone(x)[:, 0]) / m.student_temp, -1) for x in views]
        probs = [F.softmax((tt - centre0) / 0.04, -1) for tt in t.chunk(2)]
        expected = sum(-(probs[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j) / 6
        loss, _ = model(views, 0.04)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)  # the centre given is subtracted
    torch.testing.assert_close(m.center, 0.9 * centre0 + 0.1 * t.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)


def test_mocov3_predictor_ends_in_batchnorm():
    model = dilemma.build_model(method_args('mocov3'))
    last = model.predictor[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine  # as MoCo v3 builds it for ViTs


def test_a_rerun_with_other_training_flags_stops_instead_of_reusing_the_run(tmp_path, image_folder, capsys):
    out, _ = train(tmp_path, 'run', '--method', 'dino', '--max-steps', '1', folder=image_folder)
    for changed, flag in ((['--drop-ratio', '0'], '--drop-ratio 0.5 -> 0.0'), (['--crop-min', '0.9'], '--crop-min 0.4 -> 0.9'),
                          (['--dilemma-prob', '0'], '--dilemma-prob 0.2 -> 0.0')):
        with pytest.raises(data.RunError) as stop:  # python dilemma.py prints it as one line and exits 2
            train(tmp_path, 'run', '--method', 'dino', '--max-steps', '2', *changed, folder=image_folder)
        assert stop.value.status == 2 and flag in str(stop.value)
    _, result = train(tmp_path, 'run', '--method', 'dino', '--max-steps', '2', '--log-every', '5', folder=image_folder)
    assert [r['step'] for r in read_log(out) if 'loss' in r] == [1, 2]  # same training flags: it resumes


def test_help_and_print_config_show_the_methods_real_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        dilemma.get_args(['--help'])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert 'dino at <= 64 px:' in text and f"lr={dilemma.METHOD_DEFAULTS['dino'][0]['lr']}" in text
    with pytest.raises(SystemExit) as done:
        dilemma.get_args(['--method', 'mocov3', '--print-config'])
    assert done.value.code == 0
    config = json.loads(capsys.readouterr().out)
    assert config['lr'] == dilemma.METHOD_DEFAULTS['mocov3'][0]['lr'] and config['model'] == 'vit_mini/4'


def test_detection_fields_are_logged_only_when_a_head_is_trained(tmp_path, image_folder):
    out, _ = train(tmp_path, 'w0', '--method', 'simclr', '--max-steps', '2', '--dilemma-weight', '0', folder=image_folder)
    assert all('det_auroc' not in r and 'detect_loss' not in r for r in read_log(out))  # no head: nothing to report
