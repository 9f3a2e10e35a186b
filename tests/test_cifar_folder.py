"""results/cifar_folder.py: the fixed train / held-out split of CIFAR-10 as an ImageFolder tree."""
import os
import sys

import pytest
import torchvision
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results'))
import cifar_folder  # noqa: E402
import data  # noqa: E402


def listing(root, split):
    return {c: sorted(os.listdir(os.path.join(root, split, c))) for c in sorted(os.listdir(os.path.join(root, split)))}


def test_split_from_a_folder_takes_the_first_n_then_the_next_m_per_class(tmp_path):
    src = tmp_path / 'src'
    for c in ('cat', 'dog'):
        (src / 'train' / c).mkdir(parents=True)
        for i in range(7):
            Image.new('RGB', (32, 32), (i * 30, 0, 0)).save(src / 'train' / c / f'{i:04d}.jpg')
    out = str(tmp_path / 'out')
    cifar_folder.main([out, '--from-folder', str(src), '--train-per-class', '4', '--val-per-class', '2'])
    assert listing(out, 'train') == {c: [f'{i:04d}.jpg' for i in range(4)] for c in ('cat', 'dog')}
    assert listing(out, 'val') == {c: [f'{i:04d}.jpg' for i in range(2)] for c in ('cat', 'dog')}
    # val holds source images 4 and 5 (the next two), never one of train's
    link = lambda split, f: os.path.basename(os.readlink(os.path.join(out, split, 'cat', f)))
    assert [link('train', f) for f in listing(out, 'train')['cat']] == ['0000.jpg', '0001.jpg', '0002.jpg', '0003.jpg']
    assert [link('val', f) for f in listing(out, 'val')['cat']] == ['0004.jpg', '0005.jpg']
    train_set = data.build_dataset('folder', out, 'train', None)
    val_set = data.build_dataset('folder', out, 'val', None)
    assert len(train_set) == 8 and len(val_set) == 4


def test_split_from_torchvision_keeps_its_order_and_writes_png(tmp_path, monkeypatch):
    class FakeCIFAR10:
        classes = ['airplane', 'ship']

        def __init__(self, root, train, download):
            assert train  # only the training split is ever used
            self.items = [(Image.new('RGB', (32, 32), (i, i, i)), i % 2) for i in range(10)]

        def __iter__(self):
            return iter(self.items)

    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', FakeCIFAR10)
    out = str(tmp_path / 'out')
    cifar_folder.main([out, '--train-per-class', '3', '--val-per-class', '1'])
    assert listing(out, 'val') == {'airplane': ['0000.png'], 'ship': ['0000.png']}
    # class 'ship' got source images 1, 3, 5 (train) and 7 (val): grey levels tell them apart
    assert Image.open(os.path.join(out, 'val', 'ship', '0000.png')).getpixel((0, 0)) == (7, 7, 7)
    assert Image.open(os.path.join(out, 'train', 'ship', '0002.png')).getpixel((0, 0)) == (5, 5, 5)


def test_bad_requests_exit_with_one_line(tmp_path):
    (tmp_path / 'src' / 'train' / 'cat').mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(tmp_path / 'src' / 'train' / 'cat' / 'a.png')
    for argv, message in [([str(tmp_path / 'o1'), '--from-folder', str(tmp_path / 'nowhere')], 'needs DIR/train'),
                          ([str(tmp_path / 'o2'), '--from-folder', str(tmp_path / 'src')], 'fewer than'),
                          ([str(tmp_path / 'src'), '--from-folder', str(tmp_path / 'src')], 'exists'),
                          ([str(tmp_path / 'o3'), '--train-per-class', '0'], '>= 1')]:
        with pytest.raises(SystemExit) as e:
            cifar_folder.main(argv)
        assert message in str(e.value)
