import torch

import data
import device_aug


def test_device_crop_boxes_follow_random_resized_crop():
    import torchvision.transforms as T
    n, scale = 20000, (0.2, 1.0)
    x0, y0, w, h = device_aug.crop_boxes(n, 32, 32, scale, torch.Generator().manual_seed(0))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32).all() and (y0 + h <= 32).all()
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale, (3 / 4, 4 / 3)) for _ in range(n)],
                       dtype=torch.float)  # (i, j, h, w)
    for ours, theirs in ((w * h / 1024, ref[:, 2] * ref[:, 3] / 1024), (w / h, ref[:, 3] / ref[:, 2]), (x0 + w / 2, ref[:, 1] + ref[:, 3] / 2)):
        grid = torch.linspace(ours.min(), ours.max(), 200)
        ks = ((ours[:, None] <= grid).float().mean(0) - (theirs[:, None] <= grid).float().mean(0)).abs().max()
        assert ks < 0.03, ks  # Kolmogorov-Smirnov distance; 0.03 is far above the sampling noise of 20k draws


def test_device_views_flip_half_the_time_and_keep_values_in_range():
    images = torch.zeros(4000, 32, 32, 3, dtype=torch.uint8)
    images[:, :, 16:] = 255  # right half white
    spec = dict(size=32, scale=(1.0, 1.0), jitter=False, blur_p=0.0, solarize_p=0.0)  # the whole image, flip only
    view = device_aug.DeviceViews(images, [spec])(torch.arange(4000), seed=1)[0]
    pixels = view * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]
    flipped = pixels[:, :, :, :16].mean((1, 2, 3)) > pixels[:, :, :, 16:].mean((1, 2, 3))
    assert abs(flipped.float().mean() - 0.5) < 4 * (0.25 / 4000) ** 0.5
    shapes = data.Shapes('train', n=256, size=96)
    full = dict(size=96, scale=(0.08, 1.0), jitter=True, blur_p=1.0, solarize_p=0.5)
    views = device_aug.DeviceViews(shapes.images, [full, full])(torch.arange(256), seed=2)
    assert views[0].shape == (256, 3, 96, 96) and not torch.equal(views[0], views[1])
    for v in views:
        pixels = v * torch.tensor(data.STD)[:, None, None] + torch.tensor(data.MEAN)[:, None, None]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and torch.isfinite(v).all()
    again = device_aug.DeviceViews(shapes.images, [full, full])(torch.arange(256), seed=2)
    torch.testing.assert_close(again[0], views[0])  # the seed fixes every draw: exact resume


def test_device_views_match_the_dataloader_pipeline_in_distribution():
    shapes = data.Shapes('train', n=1024)
    tf = data.two_views(32, crop_min=0.2)
    torch.manual_seed(0)
    cpu = torch.stack([torch.stack(tf(shapes[i][0])) for i in range(1024)])  # (n, 2, 3, 32, 32)
    dev = torch.stack(device_aug.DeviceViews(shapes.images, tf.specs)(torch.arange(1024), seed=0), 1)
    for stat in (lambda x: x.mean((0, 3, 4)), lambda x: x.std((0, 3, 4))):  # per view and channel
        torch.testing.assert_close(stat(dev), stat(cpu), atol=0.06, rtol=0.06)
    assert data.in_memory_images(shapes) is shapes.images
