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
  processes, draws exactly the same views; `micro_batches` resumes mid-epoch.
- the files a run reads and writes, shared by the two training scripts: checkpoints written
  atomically (with the previous one kept), resume of exactly the same run, preemption signals.
"""
import json
import math
import multiprocessing
import os
import signal
import sys
from datetime import timedelta

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


class RunError(Exception):
    """Ends a run with a one-line message and an exit status: 2 bad input or data, 3 non-finite loss,
    4 a checkpoint or log could not be written."""

    def __init__(self, msg, status=2):
        super().__init__(msg)
        self.status = status


class DataError(RunError):
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


def init_distributed(device, timeout_minutes):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPUs, gloo on CPUs) and take
    this process's GPU. Returns (ddp, rank, world, device)."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return False, 0, 1, device
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=timedelta(minutes=timeout_minutes))
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, *dist_info(), device


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
# Images held in memory, for --device-aug (device_aug.py makes the views there)

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


def knn_splits(args, n_figure=6):
    """The k-NN monitor's data: (train and val loaders, number of classes, n_figure val images on the
    device for the run's figure), or None when the data has no labels or no held-out split."""
    sets = [build_dataset(args.data, args.data_path, s, eval_transform(args.img_size), args.download, args.seed,
                          args.skip_bad_images) for s in ('train', 'val')]
    if sets[1] is None or not sets[0].classes:
        return None
    loaders = [make_loader(s, 256, train=False, workers=args.workers, device=args.device) for s in sets]
    return loaders, len(sets[0].classes), torch.stack([sets[1][i][0] for i in range(min(n_figure, len(sets[1])))]).to(args.device)


def micro_batches(loader, step, accum_steps, device, device_views=None, channels_last=False):
    """Endless micro-batches (lists of views on `device`), starting where optimizer step `step`
    starts: mid-epoch on resume. With device_views the sampler's (index, seed) pairs are augmented
    on the device instead of by the loader's workers."""
    epoch, start = divmod(step * accum_steps, loader.sampler.batches_per_epoch())
    fmt = torch.channels_last if channels_last else torch.preserve_format
    while True:
        loader.sampler.set_epoch(epoch, start)
        if device_views is not None:
            for items in loader.batch_sampler:
                yield [v.contiguous(memory_format=fmt) for v in device_views(torch.tensor([i for i, _ in items]), items[0][1])]
        else:
            for views, _ in loader:
                yield [v.to(device, non_blocking=True, memory_format=fmt) for v in views]
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Run plumbing both training scripts share: their system flags, checkpoints, resume, preemption

def add_system_flags(parser, out_dir_help):
    """The flags of dilemma.py and co_byol.py that say where and how a run goes, not what it trains
    (only --seed changes the result)."""
    add = parser.add_argument
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    add('--dtype', choices=DTYPES, default='auto', help='autocast dtype (GradScaler for fp16); auto: bf16 on Ampere+ GPUs '
        'and on CPUs with native bf16, fp16 on older GPUs, else fp32')
    add('--compile', action='store_true', help='torch.compile the model')
    add('--seed', type=int, default=0)
    add('--out-dir', default=None, help=out_dir_help)
    add('--log-every', type=int, default=20, help='steps between log.jsonl lines')
    add('--eval-every', type=int, default=None, help='steps between k-NN + figure + checkpoint (default: 4 per run)')
    add('--ckpt-every', type=int, default=200, help='steps between checkpoints')
    add('--skip-bad-images', action='store_true', help='skip unreadable images (named on stderr, counted in the log) instead of stopping')
    add('--dist-timeout', type=float, default=10, help='minutes a process waits for the others before giving up')
    add('--print-config', action='store_true', help='print the settings this command would train with (every default resolved) and exit')


def check_system_flags(args, default_out_dir):
    """Checks of the batch split and device (RunError), the dtype `auto` resolves to (recorded in the
    checkpoint's args), the default out-dir; --print-config prints the settings and exits."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % (world * args.accum_steps):
        raise RunError(f'--batch-size {args.batch_size} is not divisible by {world} process(es) x {args.accum_steps} '
                       'accumulation step(s)')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise RunError('--device cuda but no CUDA device is available (use --device cpu)')
    args.dtype, args.dtype_reason = resolve_dtype(args.dtype, args.device)
    args.out_dir = args.out_dir or default_out_dir
    if args.print_config:
        print(json.dumps(vars(args), indent=1))
        sys.exit(0)


def run_script(main, die):
    """`python SCRIPT.py`: stop signals end the run at a step boundary with a checkpoint, and a RunError
    or an unwritable log / figure ends it with one line on stderr and its exit status."""
    catch_stop_signals()
    try:
        main()
    except RunError as e:  # bad input or data (2), a non-finite loss (3), a checkpoint that cannot be written (4)
        die(error_line(e), e.status)
    except OSError as e:  # writing the log or a figure: disk full, folder removed, ...
        die(f'{e.__class__.__name__}: {e}', 4)


def check_writable(folder):
    """Fail at start, not at the first checkpoint, when the output folder cannot be written."""
    probe = os.path.join(folder, f'.write_test.{os.getpid()}')  # one per process: DDP ranks check at once
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise RunError(f'cannot write to --out-dir {folder}: {e.strerror or e}', 4) from None


def save_checkpoint(obj, path):
    """Never half-written: write PATH.tmp and fsync it; only then move the old checkpoint to
    ckpt_prev.pt and rename the new one into place. A failed write (disk full, read-only folder) is
    a RunError (exit 4) that leaves the previous checkpoint as it was."""
    tmp, prev = path + '.tmp', path[:-3] + '_prev.pt'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, prev)
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        os.fsync(folder)  # the renames themselves reach the disk
        os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise RunError(f'cannot write checkpoint {path}: {e}; the previous checkpoint is untouched', 4) from None


def load_checkpoint(path):
    """The newest readable checkpoint: ckpt.pt, else ckpt_prev.pt (after a crash between the two
    renames of save_checkpoint, or when ckpt.pt was truncated). None when there is none."""
    prev = path[:-3] + '_prev.pt'
    for p in (path, prev):
        if os.path.exists(p):
            try:
                ckpt = torch.load(p, map_location='cpu', weights_only=False)
            except Exception as e:  # truncated zip, garbage, ...: torch raises several types
                print(f'warning: {p} is unreadable ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); '
                      'trying the previous checkpoint', file=sys.stderr)
                continue
            if p == prev and os.path.exists(path):
                os.replace(path, path + '.corrupt')  # so that the next save does not make it ckpt_prev.pt
            return ckpt
    if os.path.exists(path) or os.path.exists(prev):
        raise RunError(f'no readable checkpoint in {os.path.dirname(path)}: move the checkpoints away or use another --out-dir')
    return None


# Flags that do not change what is trained: a run may resume with other values of these.
RUN_PLUMBING = {'out_dir', 'log_every', 'eval_every', 'ckpt_every', 'workers', 'device', 'dtype', 'dtype_reason', 'compile',
                'max_steps', 'dist_timeout', 'skip_bad_images', 'download', 'print_config'}


def changed_flags(saved, args):
    """'--flag saved -> now' for every flag that changes the model or the training and differs from
    the checkpoint's run (flags it did not have count as changed)."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in vars(args).items()
            if k not in RUN_PLUMBING and saved.get(k, '(unset)') != v]


def rng_states(device, ddp):
    """Every process's RNG state, rank order (saved so that a resumed run draws what it would have)."""
    own = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device.startswith('cuda') else None}
    if not ddp:
        return [own]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def resume(path, args, model, optimizer, scaler, log_path):
    """Re-running the same command continues from `path`: loads model, optimizer, scaler and this
    process's RNG, and forgets log lines of steps that will be redone. A checkpoint of another run
    (any training flag differs) is a RunError naming the flags: a run resumes only itself.
    Returns the step to start from (0 without a checkpoint)."""
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return 0
    changed = changed_flags(ckpt['args'], args)
    if changed:
        raise RunError(f"{path} is another run ({', '.join(changed)}): use another --out-dir, or the same flags to resume")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    rank = dist_info()[0]
    rng = ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0]
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and args.device.startswith('cuda'):
        torch.cuda.set_rng_state(rng['cuda'])
    if rank == 0 and os.path.exists(log_path):
        lines = [line for line in open(log_path) if json.loads(line)['step'] <= ckpt['step']]
        open(log_path, 'w').writelines(lines)
    return ckpt['step']


STOP_SIGNALS = []  # names of SIGTERM / SIGUSR1 / SIGINT received: finish the step, checkpoint, exit 75


def request_stop(signum, frame):
    if signum == signal.SIGINT and STOP_SIGNALS:  # a second Ctrl-C: stop now, without a checkpoint
        raise KeyboardInterrupt
    STOP_SIGNALS.append(signal.Signals(signum).name)


def catch_stop_signals():
    """Schedulers' warnings before a kill (SIGTERM, SIGUSR1) and Ctrl-C end the run at the next step
    boundary with a checkpoint (see should_stop)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, request_stop)


def should_stop(step, every, device, ddp):
    """Has a stop signal arrived? One process checks every step; under DDP the processes agree every
    `every` steps (one all-reduce), so that all of them stop at the same step."""
    if not ddp:
        return bool(STOP_SIGNALS)
    if step % every:
        return False
    flag = torch.tensor(float(bool(STOP_SIGNALS)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def skipped_images(dataset, device, ddp):
    """Reads of unreadable images so far (--skip-bad-images), summed over the processes; only image
    folders can hold broken files."""
    counter = getattr(dataset, 'skipped', None)
    skipped = torch.tensor(float(counter.value if counter is not None else 0), device=device)
    if ddp:
        dist.all_reduce(skipped)
    return int(skipped.item())


def exit_preempted(step, ckpt_path):
    print(f"{', '.join(STOP_SIGNALS) or 'a stop signal (on another process)'} at step {step}: {ckpt_path} written; "
          'exiting with status 75, re-run the same command to continue', file=sys.stderr)
    sys.exit(75)


def check_finite(sums, names, first_step, step, ckpt_path, saved_step, model=None):
    """RunError (exit 3) when a loss summed on the device over steps first_step..step is not finite,
    or (with model) a parameter is: the last good checkpoint is never overwritten by a diverged run."""
    bad = [f'{name} is {v}' for name, v in zip(names, sums.tolist()) if not math.isfinite(v)]
    if not bad and model is not None and not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        bad = ['a parameter is not finite']
    if bad:
        raise RunError(f'non-finite loss in steps {first_step}-{step} ({", ".join(bad)}); {ckpt_path} (step {saved_step}) '
                       'is the last good checkpoint', 3)
