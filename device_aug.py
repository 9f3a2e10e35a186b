"""
The views of data.py's augmentations made on the training device, a batch at a time (--device-aug),
for datasets held in memory (data.in_memory_images): a GPU never waits for 2 CPU cores.

Differences from the torchvision pipeline in data.py [ours]: the colour-jitter order is drawn per batch
(torchvision: per image), hue is a rotation of the YIQ chroma plane (torchvision: an HSV shift), and
the crop is resampled bicubically without antialiasing. The tests compare the two pipelines at 32 px,
where neither blurs: `_blur` (used above 64 px) is not compared with torchvision's.
"""
import math

import torch
import torch.nn.functional as F

from data import MEAN, STD


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
