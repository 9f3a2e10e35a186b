"""
Datasets, augmentations and loaders shared by dilemma.py, co_byol.py and eval_linear.py.

- `Shapes`: the embedded default dataset. Procedurally generated 32 px images whose label is the
  shape of one object; colours, noise, position, size and rotation are random, so only a
  representation that encodes shape can classify it. No download, deterministic from a seed.
- `build_dataset`: shapes, torchvision CIFAR-10/100 and STL-10, labelled ImageFolder trees
  (DIR/train, DIR/val) and flat folders of unlabelled images.
- augmentations: BYOL's two asymmetric views, DINO's multi-crop, MAE's crop+flip, plain evaluation.
- `make_loader`: one loader for one process or many (DDP). Every sample's augmentation is seeded by
  (seed, epoch, position in the epoch), so a resumed run, or one with another number of workers or
  processes, draws exactly the same views.
"""
import math
import multiprocessing
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ('shapes', 'cifar10', 'cifar100', 'stl10', 'folder')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DataError(Exception):
    """Bad data or a bad data path: the scripts print the message as one line and exit 2."""


def error_line(exc):
    """The one-line message of a DataError, also when a DataLoader worker re-raised it wrapped in a
    traceback (the original message is then the last line)."""
    return str(exc).strip().splitlines()[-1].split('DataError: ', 1)[-1]


# ----------------------------------------------------------------------------------------------
# The embedded dataset: shapes

SHAPES = ('circle', 'triangle', 'square', 'star', 'cross', 'ring', 'crescent', 'heart')


def _inside(shape, x, y):
    """Boolean mask of the points (x, y), in the object's own frame (unit size), inside `shape`."""
    r, phi = torch.hypot(x, y), torch.atan2(y, x)

    def star(points, inner):  # a star polygon; inner = cos(pi / n) gives the regular n-gon
        sector = 2 * math.pi / points
        a = torch.remainder(phi, sector)
        a = torch.minimum(a, sector - a)  # fold onto the edge from an outer vertex to an inner one
        bx, by = inner * math.cos(sector / 2) - 1, inner * math.sin(sector / 2)
        px, py = r * torch.cos(a) - 1, r * torch.sin(a)
        return bx * py - by * px <= 0  # on the centre's side of that edge
    if shape == 'circle':
        return r < 0.9
    if shape == 'triangle':
        return star(3, math.cos(math.pi / 3))
    if shape == 'square':
        return torch.maximum(x.abs(), y.abs()) < 0.7
    if shape == 'star':
        return star(5, 0.45)
    if shape == 'cross':
        return ((x.abs() < 0.3) & (y.abs() < 0.95)) | ((y.abs() < 0.3) & (x.abs() < 0.95))
    if shape == 'ring':
        return (r < 0.95) & (r > 0.55)
    if shape == 'crescent':
        return (r < 0.95) & (torch.hypot(x - 0.45, y) > 0.75)
    if shape == 'heart':  # the classic implicit heart curve, scaled into the unit disc
        hx, hy = x * 1.25, -y * 1.25 + 0.15
        return (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 < 0
    raise ValueError(shape)


# Colours come from a small palette. With continuous random colours, the two augmented views of an
# image are easiest to match by their colours, and self-supervised methods learn colour, not shape
# (measured: k-NN at chance after a 10-minute run); with few colours shared by many images, shape is
# what tells images apart.
PALETTE = torch.tensor([[0.05, 0.05, 0.05], [0.95, 0.95, 0.95], [0.85, 0.15, 0.15], [0.15, 0.65, 0.2],
                        [0.15, 0.3, 0.85], [0.95, 0.85, 0.2], [0.7, 0.25, 0.75], [0.2, 0.75, 0.8]])


# Fill textures for the cue-conflict test (Geirhos et al., ICLR 2019): with texture='class' each class
# also has its own texture, so shape and texture both predict the label; texture='conflict' fills each
# object with the texture of another class, and what a classifier then answers says which cue it uses.
TEXTURES = ('horizontal stripes', 'vertical stripes', 'diagonal stripes /', 'diagonal stripes \\', 'checks',
            'dots', 'grid', 'zigzag')
TEXTURE_MODES = (None, 'class', 'conflict', 'only', 'silhouette')


def texture_classes(labels, texture, seed=0):
    """(n,) class whose texture fills each object: its own ('class', and 'only', where the label is the
    texture's class), another class uniformly ('conflict'), or -1 (no texture: None, 'silhouette')."""
    if texture in ('class', 'only'):
        return labels.clone()
    if texture == 'conflict':
        g = torch.Generator().manual_seed(1_000_003 + seed)
        return (labels + torch.randint(1, len(TEXTURES), labels.shape, generator=g)) % len(TEXTURES)
    if texture in (None, 'silhouette'):
        return torch.full_like(labels, -1)
    raise ValueError(f"texture must be one of {TEXTURE_MODES}, not '{texture}'")


def _ink(texture, px, py):
    """Boolean (m, S, S): where the texture of class texture[i] puts ink, at pixel coordinates px, py
    (m, S, S; already shifted by a random phase, so that the texture carries no position). Periods of
    6-8 px at 32 px: a 4 px patch sees a piece of one texture, never a flat area."""
    zig = (px % 8 - 4).abs() * 0.75  # a triangle wave of x, 3 px high
    inks = [py % 6 < 3, px % 6 < 3, (px + py) % 8 < 4, (px - py) % 8 < 4,
            (torch.floor(px / 3) + torch.floor(py / 3)) % 2 == 0,
            torch.hypot(px % 6 - 3, py % 6 - 3) < 1.5,
            (px % 6 < 1.5) | (py % 6 < 1.5), (py + zig) % 6 < 3]
    out = torch.zeros(px.shape, dtype=torch.bool)
    for k, ink in enumerate(inks):
        sel = texture == k
        out[sel] = ink[sel]
    return out


def make_shapes(n, size=32, seed=0, texture=None):
    """n images (n, size, size, 3) uint8 and balanced labels (n,): one object whose shape is the label,
    at a random position (+-15% of the image), size, rotation, colour (object and background: two
    different palette colours), shading and pixel-noise strength. Vectorised: 10k images in ~2 s.

    Note: `_inside` marks the outside of the triangle and the star (their polygon test has its sign
    flipped), so those two classes are a triangle- or star-shaped hole in an object-coloured surround.
    The default data has always been drawn so; the texture modes below keep it (the texture fills
    what the default colours as the object), so that every mode shows the scenes the models train on.

    texture (the cue-conflict test): None, a flat fill (the default data); 'class', the object filled
    with its class's texture (TEXTURES: stripes, checks, dots, ...) drawn in two tones of its colour;
    'conflict', with the texture of another class (texture_classes); 'only', no object, the whole image
    is the texture of the label's class; 'silhouette', a black object on white, nothing else (Geirhos'
    silhouettes). Every mode draws the scene (shape, place, colours, light, noise) from `seed` as the
    default does and the texture's phase from a generator of its own, so the same seed gives the same
    scenes in every mode, and the default images do not change.

    Background and object are each lit from above (within 30 degrees of vertical, random strength), as
    daylight falls on real scenes: brighter at the top, darker at the bottom. Besides realism this gives
    every patch, background included, a brightness that says how high it sits in the scene, a cue that
    random crops keep (crops rescale but never rotate, as sky stays above ground in natural photos).
    Without it a misplaced flat-colour patch could not be told from a correct one and DILEMMA's task is
    unsolvable here under DINO's crops (measured with light from random directions: detection AUROC
    0.51 vs 0.87 lit from above; RESULTS.md)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPES)
    labels = labels[torch.randperm(n, generator=g)]
    textures = texture_classes(labels, texture, seed)
    g_phase = torch.Generator().manual_seed(2_000_003 + seed)  # the texture's own draws (see above)
    images = torch.empty(n, size, size, 3, dtype=torch.uint8)
    S = 2 * size  # drawn at twice the size and averaged down: anti-aliased edges
    u = (torch.arange(S) + 0.5) / S * 2 - 1
    gy, gx = torch.meshgrid(u, u, indexing='ij')
    for start in range(0, n, 1024):
        lab = labels[start:start + 1024]
        m = len(lab)
        centre = (torch.rand(m, 2, 1, 1, generator=g) - 0.5) * 0.3
        scale = 0.6 + 0.25 * torch.rand(m, 1, 1, generator=g)
        angle = torch.rand(m, 1, 1, generator=g) * 2 * math.pi
        dx, dy = gx - centre[:, 0], gy - centre[:, 1]
        x = (dx * torch.cos(angle) + dy * torch.sin(angle)) / scale
        y = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / scale
        mask = torch.zeros(m, S, S, dtype=torch.bool)
        for k, shape in enumerate(SHAPES):
            sel = lab == k
            mask[sel] = _inside(shape, x[sel], y[sel])
        bg = torch.randint(0, len(PALETTE), (m,), generator=g)
        fg = (bg + torch.randint(1, len(PALETTE), (m,), generator=g)) % len(PALETTE)  # never the background's
        light = []
        for _ in range(2):  # background, object: brightness - strength * (height along the light direction)
            theta = -math.pi / 2 + (torch.rand(m, 1, 1, generator=g) - 0.5) * math.pi / 3  # -pi/2: from the top
            strength = 0.15 + 0.2 * torch.rand(m, 1, 1, generator=g)
            light.append((strength * (gx * torch.cos(theta) + gy * torch.sin(theta)))[:, None])
        fill = PALETTE[fg][:, :, None, None]  # (m, 3, 1, 1)
        if texture in ('class', 'conflict', 'only'):
            if texture == 'only':
                mask = torch.ones_like(mask)
            phase = torch.rand(m, 2, 1, 1, generator=g_phase) * 24  # 24: a multiple of every period
            px, py = (gx + 1) * size / 2 + phase[:, 0], (gy + 1) * size / 2 + phase[:, 1]  # in pixels at `size`
            dark = (fill * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True) < 0.5
            ink = fill + torch.where(dark, 0.45, -0.45)  # a second tone of the object's colour
            fill = torch.where(_ink(textures[start:start + m], px, py)[:, None], ink, fill)
        img = torch.where(mask[:, None], fill + light[1], PALETTE[bg][:, :, None, None] + light[0])
        if texture == 'silhouette':
            img = torch.where(mask[:, None], 0.0, 1.0).expand(-1, 3, -1, -1)
        img = torch.nn.functional.avg_pool2d(img, 2)
        noise = 0.15 * torch.rand(m, 1, 1, 1, generator=g) * torch.randn(m, 3, size, size, generator=g)
        if texture == 'silhouette':
            noise = torch.zeros_like(noise)
        images[start:start + m] = ((img + noise) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images, labels


class Shapes(Dataset):
    """The embedded default: `split` 'train' (10k images) or 'val' (2k), drawn from different seeds.
    texture: see make_shapes; `texture_targets` is the class of each object's texture (-1: none)."""
    classes = SHAPES

    def __init__(self, split='train', transform=None, seed=0, size=32, n=None, texture=None):
        n = n or (10_000 if split == 'train' else 2_000)
        self.split, self.seed, self.texture = split, seed, texture
        self.images, labels = make_shapes(n, size, seed=2 * seed + (split != 'train'), texture=texture)
        self.targets = labels.tolist()
        self.texture_targets = texture_classes(labels, texture, 2 * seed + (split != 'train')).tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].numpy())
        return (self.transform(img) if self.transform else img), self.targets[i]


# ----------------------------------------------------------------------------------------------
# Real datasets

def load_image(path):
    """Open an image as RGB; an unreadable file is a DataError that names it."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:  # PIL raises many types for broken files; all mean the same here
        reason = f'{e.__class__.__name__}: {e}' if path not in str(e) else e.__class__.__name__
        raise DataError(f'cannot read image {path}: {reason}') from None


class ImageList(Dataset):
    """Images from a list of (path, label) pairs; label -1 for unlabelled folders. With skip_bad, an
    unreadable image is replaced by the next readable one (so the epoch keeps its length), named once
    on stderr per loader process, and counted in `skipped` (shared by the loader's worker processes)."""

    def __init__(self, samples, classes, transform=None, skip_bad=False):
        self.samples, self.classes, self.transform, self.skip_bad = samples, classes, transform, skip_bad
        self.targets = [y for _, y in samples]
        self.skipped = multiprocessing.Value('q', 0)  # shared memory: workers forked later see the same counter
        self._named = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(i, i + len(self.samples)):
            path, _ = self.samples[j % len(self.samples)]
            try:
                img = load_image(path)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                with self.skipped.get_lock():
                    self.skipped.value += 1
                if path not in self._named:
                    self._named.add(path)
                    print(f'warning: skipping {error_line(e)[len("cannot read image "):]}', file=sys.stderr)
        else:
            raise DataError(f'no readable image among the {len(self.samples)} files')
        return (self.transform(img) if self.transform else img), self.samples[j % len(self.samples)][1]


def _image_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True)
                  for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def image_folder(root, transform=None, skip_bad=False):
    """DIR/<class>/*.jpg -> labelled ImageList; a folder without class subfolders -> unlabelled."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = [(p, y) for y, c in enumerate(classes) for p in _image_files(os.path.join(root, c))]
    if not samples:  # no class folders with images: a flat folder of unlabelled images
        classes, samples = [], [(p, -1) for p in _image_files(root)]
    if not samples:
        raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found under {root}')
    return ImageList(samples, classes, transform, skip_bad)


def build_dataset(name, path, split, transform=None, download=False, seed=0, skip_bad=False):
    """split: 'pretrain' (what self-supervised training reads), 'train' (labelled, for k-NN and probes)
    or 'val'. Returns None when the split does not exist (a folder without val/). skip_bad: see ImageList."""
    import torchvision.datasets as tvd
    if name == 'shapes':
        return Shapes('val' if split == 'val' else 'train', transform, seed=seed)
    if name == 'folder':
        if not path or not os.path.isdir(path):
            raise DataError(f"--data folder needs --data-path DIR, an existing folder (got '{path}')")
        sub = os.path.join(path, 'train' if split == 'pretrain' else split)
        if os.path.isdir(sub):
            return image_folder(sub, transform, skip_bad)
        if split == 'pretrain':  # no train/: the folder itself holds the (unlabelled) images
            return image_folder(path, transform, skip_bad)
        return None
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    root = path or os.path.join('data', name)
    try:
        if name == 'stl10':
            stl_split = {'pretrain': 'train+unlabeled', 'train': 'train', 'val': 'test'}[split]
            return tvd.STL10(root, split=stl_split, transform=transform, download=download)
        cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
        return cls(root, train=split != 'val', transform=transform, download=download)
    except RuntimeError as e:
        if 'not found' not in str(e).lower() and 'corrupted' not in str(e).lower():
            raise
        raise DataError(f"{name} not found under '{root}': pass --download to fetch it there, "
                        f'or --data-path to the folder that holds it') from None


def default_img_size(name, path=None):
    """Training resolution that follows the data: 32 px for CIFAR and shapes, 96 for STL-10, and for
    a folder the size of its first image when that is small (<= 64 px), else 224."""
    if name in ('shapes', 'cifar10', 'cifar100'):
        return 32
    if name == 'stl10':
        return 96
    if name == 'folder' and path and os.path.isdir(path):
        for file in _image_files(path)[:100]:  # the first readable one (broken files are reported later)
            try:
                w, h = load_image(file).size
            except DataError:
                continue
            return min(w, h) if max(w, h) <= 64 else 224
    return 224


# ----------------------------------------------------------------------------------------------
# Augmentations (sizes follow the data: blur is left out at <= 64 px, where it erases the image)

def to_tensor():
    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def _ssl_view(size, scale, blur_p, solarize_p, jitter=True):
    """One augmented view. Its parameters are kept as `spec`, so DeviceViews can make the same view."""
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip()]
    if jitter:
        ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    if size > 64 and blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * round(size / 20) + 1, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=solarize_p))
    view = T.Compose(ops + [to_tensor()])
    view.spec = dict(size=size, scale=scale, jitter=jitter, blur_p=blur_p if size > 64 else 0.0, solarize_p=solarize_p)
    return view


class MultiView:
    """Applies several transforms to one image: returns the list of views."""

    def __init__(self, transforms):
        self.transforms = transforms
        self.specs = [t.spec for t in transforms]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def two_views(size, crop_min=0.08):
    """BYOL's asymmetric pair (also MoCo v3's and, here, SimCLR's): blur always / rarely, solarise
    never / sometimes."""
    return MultiView([_ssl_view(size, (crop_min, 1.0), 1.0, 0.0), _ssl_view(size, (crop_min, 1.0), 0.1, 0.2)])


def multi_crop(size, local_size, n_local, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
    """DINO's multi-crop: two global views (size px) then n_local local ones (local_size px)."""
    views = [_ssl_view(size, global_scale, 1.0, 0.0), _ssl_view(size, global_scale, 0.1, 0.2)]
    return MultiView(views + [_ssl_view(local_size, local_scale, 0.5, 0.0)] * n_local)


def mae_view(size):
    """MAE's augmentation: a random resized crop and a flip, nothing else."""
    return MultiView([_ssl_view(size, (0.2, 1.0), 0.0, 0.0, jitter=False)])


def eval_transform(size):
    """No augmentation: resize (keeping 224/256 of the image at ImageNet sizes) and centre-crop."""
    resize = size if size <= 64 else int(size * 256 / 224)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), to_tensor()])


# ----------------------------------------------------------------------------------------------
# Loading, one process or many

def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


DTYPES = ('auto', 'bf16', 'fp16', 'fp32')
TORCH_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere (AVX2-only CPUs:
    AMD before Zen 4, most laptops) bf16 autocast runs emulated kernels, measured 7x slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    return any(check() for check in checks if check is not None)


def resolve_dtype(requested, device):
    """--dtype auto -> the fastest precision that trains correctly on `device`, and why (one phrase).
    CUDA: bf16 on Ampere or newer, else fp16 (with a GradScaler). CPU: bf16 only with native support,
    else fp32. An explicit bf16 / fp16 / fp32 is returned as it is."""
    if requested != 'auto':
        return requested, 'set by --dtype'
    if device.startswith('cuda'):
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return 'bf16', f'auto: CUDA compute capability {major}.{minor} has bf16'
        return 'fp16', f'auto: CUDA compute capability {major}.{minor} has no bf16, fp16 with a GradScaler'
    if cpu_has_native_bf16():
        return 'bf16', 'auto: this CPU has native bf16 (AVX512-BF16 / AMX)'
    return 'fp32', 'auto: this CPU has no native bf16 (bf16 would be emulated, several times slower than fp32)'


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, sample_seed) for this process. The epoch's order is a permutation seeded by
    (seed, epoch); process r of W takes positions r, r + W, ... so the union of the processes' j-th
    batches is the same global batch whatever W is. With drop_last only whole global batches are
    used. `set_epoch(epoch, start_batch)` starts mid-epoch when a run resumes."""

    def __init__(self, n, batch_size, shuffle, drop_last, seed=0):
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.rank, self.world = dist_info()
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self):
        return self.n // (self.batch_size * self.world)

    def _positions(self):
        total = self.batches_per_epoch() * self.batch_size * self.world if self.drop_last else self.n
        return range(self.rank + self.start_batch * self.batch_size * self.world, total, self.world)

    def __len__(self):
        return len(self._positions())

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        base = (self.seed * 1_000_003 + self.epoch) * self.n
        for pos in self._positions():
            yield order[pos].item(), (base + pos) % (2 ** 63)


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) is drawn with torch's RNG seeded by `seed`,
    leaving the caller's RNG untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _own_process_group(worker_id):
    """Loader workers leave the job's process group: a SIGTERM / SIGINT sent to the whole group (a
    scheduler's preemption, Ctrl-C) reaches the training process only, which finishes its step with
    its workers alive and writes its checkpoint. The loader can still stop them by their pid."""
    os.setpgrp()


def make_loader(dataset, batch_size, train, seed=0, workers=2, device='cpu'):
    """batch_size is per process. Training loaders shuffle and drop the last partial global batch;
    evaluation loaders keep every sample, in order, split r::W across processes."""
    sampler = EpochSampler(len(dataset), batch_size, shuffle=train, drop_last=train, seed=seed)
    if train and sampler.batches_per_epoch() == 0:
        raise DataError(f'the dataset has {len(dataset)} images, fewer than one global batch '
                        f'({batch_size * sampler.world})')
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      worker_init_fn=_own_process_group,
                      pin_memory=str(device).startswith('cuda'), persistent_workers=workers > 0,
                      # its own generator, so that starting an epoch never draws from the global RNG
                      generator=torch.Generator())


# ----------------------------------------------------------------------------------------------
# The same views made on the training device, a batch at a time (--device-aug), for datasets held in
# memory: a GPU never waits for 2 CPU cores. Differences from the torchvision pipeline [ours]: the
# colour-jitter order is drawn per batch (torchvision: per image), hue is a rotation of the YIQ chroma
# plane (torchvision: an HSV shift), and the crop is resampled bicubically without antialiasing.

def in_memory_images(dataset):
    """(N, H, W, 3) uint8 tensor of every image of the shapes data, CIFAR, or a folder of equally sized
    images (decoded once); DataError for anything else."""
    if isinstance(dataset, Shapes):
        return dataset.images
    if getattr(dataset, 'data', None) is not None and getattr(dataset.data, 'ndim', 0) == 4:  # CIFAR
        return torch.as_tensor(dataset.data)
    if isinstance(dataset, ImageList):
        images = [torch.from_numpy(np.array(load_image(p))) for p, _ in dataset.samples]
        if len({im.shape for im in images}) == 1:
            return torch.stack(images)
    raise DataError('--device-aug needs images of one size held in memory (shapes, CIFAR, a folder of equal-size images)')


def crop_boxes(n, H, W, scale, generator, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's boxes for n images at once: of 10 tries of (area, aspect ratio), the first
    that fits, else the whole image with its ratio clamped. Returns x0, y0, w, h (n,) in pixels."""
    dev = generator.device
    area = torch.empty(n, 10, device=dev).uniform_(*scale, generator=generator) * H * W
    ratio_ = torch.exp(torch.empty(n, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * ratio_).round(), torch.sqrt(area / ratio_).round()
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = fits.float().argmax(1, keepdim=True)
    w_fb, h_fb = (W, round(W / ratio[0])) if W / H < ratio[0] else ((round(H * ratio[1]), H) if W / H > ratio[1] else (W, H))
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], float(w_fb))
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], float(h_fb))
    x0 = (torch.rand(n, device=dev, generator=generator) * (W - w + 1)).floor()
    y0 = (torch.rand(n, device=dev, generator=generator) * (H - h + 1)).floor()
    return x0, y0, w, h


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _colour_jitter(x, g):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) on (n, 3, H, W) in [0, 1], one factor per image."""
    n = len(x)
    u = lambda lo, hi: torch.empty(n, 1, 1, 1, device=x.device).uniform_(lo, hi, generator=g)
    for op in torch.randperm(4, device=x.device, generator=g).tolist():
        if op == 0:
            x = x * u(0.6, 1.4)
        elif op == 1:
            mean = _gray(x).mean((1, 2, 3), keepdim=True)
            x = mean + (x - mean) * u(0.6, 1.4)
        elif op == 2:
            x = _gray(x) + (x - _gray(x)) * u(0.8, 1.2)
        else:  # hue: rotate the chroma (I, Q) plane by up to +-0.1 turn
            yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
            angle = u(-0.1, 0.1)[:, 0, 0, 0] * 2 * math.pi
            rot = torch.zeros(n, 3, 3, device=x.device)
            rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, angle.cos(), angle.cos()
            rot[:, 1, 2], rot[:, 2, 1] = -angle.sin(), angle.sin()
            m = torch.linalg.inv(yiq) @ rot @ yiq  # (n, 3, 3)
            x = torch.einsum('nij,njhw->nihw', m, x)
        x = x.clamp(0, 1)
    return x


def _blur(x, g, size):
    """GaussianBlur with kernel 2 round(size / 20) + 1 and sigma ~ U(0.1, 2), one sigma per image."""
    n, c, H, W = x.shape
    k = 2 * round(size / 20) + 1
    sigma = torch.empty(n, device=x.device).uniform_(0.1, 2.0, generator=g)
    t = torch.arange(k, device=x.device) - k // 2
    kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, k)
    x = F.pad(x.reshape(1, n * c, H, W), (k // 2,) * 4, mode='reflect')
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    return F.conv2d(x, kernel[:, None, :, None], groups=n * c).reshape(n, c, H, W)


def device_view(images, spec, g):
    """One view of a batch of uint8 images (n, H, W, 3) on the device -> normalised (n, 3, S, S)."""
    n, H, W, _ = images.shape
    S, dev = spec['size'], images.device
    chance = lambda p: torch.rand(n, 1, 1, 1, device=dev, generator=g) < p
    x0, y0, w, h = crop_boxes(n, H, W, spec['scale'], g)
    flip = torch.where(torch.rand(n, device=dev, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)  # output [-1, 1] -> the crop box, in [-1, 1] input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = w / W * flip, (2 * x0 + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, (n, 3, S, S), align_corners=False)
    x = images.permute(0, 3, 1, 2).float() / 255
    x = F.grid_sample(x, grid, mode='bicubic', padding_mode='border', align_corners=False).clamp(0, 1)
    if spec['jitter']:
        x = torch.where(chance(0.8), _colour_jitter(x, g), x)
        x = torch.where(chance(0.2), _gray(x).expand_as(x), x)
    if spec['blur_p'] > 0:
        x = torch.where(chance(spec['blur_p']), _blur(x, g, S), x)
    if spec['solarize_p'] > 0:
        x = torch.where(chance(spec['solarize_p']) & (x >= 128 / 255), 1 - x, x)
    mean, std = torch.tensor(MEAN, device=dev)[:, None, None], torch.tensor(STD, device=dev)[:, None, None]
    return (x - mean) / std


class DeviceViews:
    """The views of a MultiView's specs, made on the device from uint8 images (N, H, W, 3) kept there.
    views(index (n,), seed) -> list of (n, 3, S, S); the seed fixes every random draw (exact resume)."""

    def __init__(self, images, specs):
        self.images, self.specs = images, specs

    def __call__(self, index, seed):
        g = torch.Generator(device=self.images.device).manual_seed(seed)
        batch = self.images[index.to(self.images.device)]
        return [device_view(batch, spec, g) for spec in self.specs]
