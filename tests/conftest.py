import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """A small labelled ImageFolder tree (train/ and val/, 3 shape classes, 32 px PNGs)."""
    import data
    root = tmp_path_factory.mktemp('folder')
    images, labels = data.make_shapes(120, seed=5)
    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        if y >= 3:
            continue
        split = 'val' if i % 4 == 0 else 'train'
        d = root / split / data.SHAPES[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.numpy()).save(d / f'{i}.png')
    return str(root)
