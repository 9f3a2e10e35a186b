import os

import pytest
import torch
from PIL import Image

import data


def test_shapes_are_deterministic_and_splits_differ():
    a, la = data.make_shapes(64, seed=3)
    b, lb = data.make_shapes(64, seed=3)
    c, _ = data.make_shapes(64, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (64, 32, 32, 3)
    train, val = data.Shapes('train', n=64), data.Shapes('val', n=64)
    assert not torch.equal(train.images, val.images)


def test_shapes_labels_are_balanced():
    _, labels = data.make_shapes(800, seed=0)
    counts = torch.bincount(labels, minlength=len(data.SHAPES))
    assert counts.tolist() == [100] * len(data.SHAPES)


def test_shapes_label_is_the_shape_not_the_colour():
    """The background colour (a corner pixel, snapped to the palette) is independent of the label:
    chi-square of the 8 x 8 class-by-colour table (49 degrees of freedom: mean 49, sd 10)."""
    images, labels = data.make_shapes(8000, seed=1)
    corner = images[:, 0, 0].float() / 255
    colour = torch.cdist(corner, data.PALETTE).argmin(1)
    table = torch.zeros(len(data.SHAPES), len(data.PALETTE))
    table.index_put_((labels, colour), torch.ones(len(labels)), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 100
    assert (table.sum(0) > 0).all()  # every palette colour is used
    mask = data._inside('ring', torch.tensor([0.0, 0.75]), torch.tensor([0.0, 0.0]))
    assert mask.tolist() == [False, True]  # a ring has a hole, a circle does not
    assert data._inside('circle', torch.tensor([0.0]), torch.tensor([0.0])).item()


def test_texture_modes_draw_the_same_scenes_and_only_change_the_fill():
    flat, labels = data.make_shapes(64, seed=2)
    silhouette, _ = data.make_shapes(64, seed=2, texture='silhouette')
    outside = (silhouette == 255).all(-1)  # (N, H, W): pixels wholly outside the object
    for mode in ('class', 'conflict'):
        textured, same_labels = data.make_shapes(64, seed=2, texture=mode)
        assert torch.equal(same_labels, labels)
        assert torch.equal(textured[outside], flat[outside])  # background, light and noise unchanged
        inside = (silhouette == 0).all(-1)
        assert (textured[inside].float() - flat[inside].float()).abs().mean() > 20  # the fill is textured
    assert set(silhouette.unique().tolist()) >= {0, 255}


def test_cue_conflict_textures_come_from_another_class_uniformly():
    labels = torch.arange(8000) % 8
    own, other = data.texture_classes(labels, 'class'), data.texture_classes(labels, 'conflict')
    assert torch.equal(own, labels) and (other != labels).all()
    table = torch.zeros(8, 8)
    table.index_put_((labels, other), torch.ones(len(labels)), accumulate=True)
    off_diagonal = table[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.min() > 100 and off_diagonal.max() < 185  # 1000 / 7 = 143 each
    ds = data.Shapes('val', n=16, texture='conflict')
    assert ds.texture_targets != ds.targets and len(ds.texture_targets) == 16
    assert data.Shapes('val', n=16).texture_targets == [-1] * 16


def test_each_texture_is_told_apart_by_its_pixels_alone():
    """On texture-only images, the nearest class mean of the image's power spectrum (blind to where the
    texture is) names the texture: the eight textures differ in what a texture is made of."""
    images, labels = data.make_shapes(400, seed=0, texture='only')
    gray = images.float().mean(-1)
    spectrum = torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs().flatten(1)
    spectrum = spectrum / spectrum.norm(dim=1, keepdim=True)
    means = torch.stack([spectrum[:200][labels[:200] == k].mean(0) for k in range(8)])
    predicted = (spectrum[200:] @ means.T).argmax(1)
    assert (predicted == labels[200:]).float().mean() > 0.9


def test_transform_output_sizes():
    img = Image.new('RGB', (300, 200), (120, 30, 200))
    views = data.two_views(32)(img)
    assert [v.shape for v in views] == [(3, 32, 32)] * 2
    views = data.multi_crop(224, 96, 3)(img)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 3
    assert [v.shape for v in data.mae_view(32)(img)] == [(3, 32, 32)]
    assert data.eval_transform(224)(img).shape == (3, 224, 224)
    assert data.eval_transform(32)(img).shape == (3, 32, 32)


def sampler_for(n, batch, rank, world, shuffle=True, drop_last=True):
    s = data.EpochSampler(n, batch, shuffle=shuffle, drop_last=drop_last, seed=7)
    s.rank, s.world = rank, world  # what dist_info() returns under torchrun
    return s


def test_ddp_sampler_split_gives_the_same_global_batches():
    one = list(sampler_for(50, 8, 0, 1))
    r0, r1 = list(sampler_for(50, 4, 0, 2)), list(sampler_for(50, 4, 1, 2))
    assert len(one) == 48 and len(r0) == len(r1) == 24  # 6 whole global batches of 8
    assert not {i for i, _ in r0} & {i for i, _ in r1}
    for j in range(6):  # batch j of one process == union of the two processes' batch j, seeds included
        assert set(one[8 * j:8 * j + 8]) == set(r0[4 * j:4 * j + 4]) | set(r1[4 * j:4 * j + 4])


def test_sampler_epochs_and_resume_mid_epoch():
    s = sampler_for(40, 8, 0, 1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_batch=2)
    assert list(s) == full[16:]
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in full]
    ev = sampler_for(10, 4, 1, 2, shuffle=False, drop_last=False)
    assert [i for i, _ in ev] == [1, 3, 5, 7, 9]


def test_seeded_dataset_repeats_views_and_keeps_the_global_rng():
    ds = data.SeededDataset(data.Shapes('val', transform=data.two_views(32), n=8))
    state = torch.get_rng_state()
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0][0], b[0][0]) and not torch.equal(a[0][0], c[0][0])


def test_loader_batches(image_folder):
    ds = data.build_dataset('folder', image_folder, 'train', data.eval_transform(32))
    loader = data.make_loader(ds, 8, train=True, workers=0)
    batches = list(loader)
    assert len(batches) == len(ds) // 8 and all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    with pytest.raises(data.DataError, match='fewer than one global batch'):
        data.make_loader(ds, 1000, train=True, workers=0)


def test_folder_datasets(image_folder, tmp_path):
    train = data.build_dataset('folder', image_folder, 'train')
    val = data.build_dataset('folder', image_folder, 'val')
    assert train.classes == ['circle', 'square', 'triangle'] and len(val) > 0
    assert set(train.targets) == {0, 1, 2}
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(3):
        Image.new('RGB', (20, 20)).save(flat / f'{i}.jpg')
    unlabelled = data.build_dataset('folder', str(flat), 'pretrain')
    assert len(unlabelled) == 3 and unlabelled[0][1] == -1
    assert data.build_dataset('folder', str(flat), 'val') is None
    assert data.default_img_size('folder', image_folder) == 32


def test_missing_and_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match='existing folder'):
        data.build_dataset('folder', str(tmp_path / 'nope'), 'train')
    with pytest.raises(data.DataError, match='--download'):
        data.build_dataset('cifar10', str(tmp_path), 'train')
    with pytest.raises(data.DataError, match='unknown dataset'):
        data.build_dataset('mnist', None, 'train')
    with pytest.raises(data.DataError, match='no images'):
        data.build_dataset('folder', str(tmp_path), 'pretrain')
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'broken.jpg').write_bytes(b'not a jpeg')
    ds = data.build_dataset('folder', str(bad), 'pretrain')
    with pytest.raises(data.DataError, match='broken.jpg'):
        ds[0]


def test_error_line_survives_a_dataloader_worker(tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'empty.jpg').write_bytes(b'')
    loader = data.make_loader(data.build_dataset('folder', str(bad), 'pretrain'), 1, train=False, workers=1)
    with pytest.raises(data.DataError) as e:
        next(iter(loader))
    line = data.error_line(e.value)
    assert line.startswith('cannot read image') and 'empty.jpg' in line and '\n' not in line


# ----------------------------------------------------------------------------------------------
# Augmentation on the device (--device-aug): the same distribution as the DataLoader pipeline

def test_auto_dtype_is_fp32_without_native_bf16_and_bf16_with_it(monkeypatch):
    import co_byol
    import dilemma
    for native, expected in ((False, 'fp32'), (True, 'bf16')):
        monkeypatch.setattr(data, 'cpu_has_native_bf16', lambda native=native: native)
        assert data.resolve_dtype('auto', 'cpu')[0] == expected
        assert dilemma.get_args([]).dtype == expected  # the default of the training scripts is auto ...
        assert co_byol.get_args([]).dtype == expected
        for explicit in ('bf16', 'fp16', 'fp32'):  # ... and an explicit --dtype always wins
            assert data.resolve_dtype(explicit, 'cpu') == (explicit, 'set by --dtype')
            assert dilemma.get_args(['--dtype', explicit]).dtype == explicit
            assert co_byol.get_args(['--dtype', explicit]).dtype == explicit


def test_auto_dtype_on_cuda_follows_the_compute_capability(monkeypatch):
    for capability, expected in (((7, 0), 'fp16'), ((7, 5), 'fp16'), ((8, 0), 'bf16'), ((9, 0), 'bf16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert data.resolve_dtype('auto', 'cuda')[0] == expected
        assert data.resolve_dtype('fp32', 'cuda')[0] == 'fp32'


def test_native_bf16_is_asked_of_pytorch(monkeypatch):
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda v=amx: v, raising=False)
        assert data.cpu_has_native_bf16() is expected
