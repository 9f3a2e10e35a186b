"""RF-ResNet: a bottleneck ResNet-50-like CNN with a controlled receptive field (RF).

The network returns the pre-pool feature map (N, C, H', W'): every position is a *local*
representation whose RF is bounded. Knobs (DESIGN.md section 3): blocks per layer, how many
leading blocks of each layer have a 3x3 middle conv (the rest have a 1x1 one, which adds no RF),
the max-pool, the strides of the first block of each layer, the stem, and padding (BagNet style
unpadded convs with the residual cropped). `receptive_field` and `feature_size` compute the
geometry analytically from the same constructor kwargs; tests/test_rf_resnet.py checks both
against the real network (gradients and forward shapes).
"""
import inspect

import torch
from torch import nn

BASE_WIDTH = 64  # channels of the stem and of layer1's bottleneck, as in ResNet-50
EXPANSION = 4    # bottleneck output channels = 4 x its inner width

# Presets, named by their exact receptive field (pixels). All 'imagenet'-stem presets keep the
# ResNet-50 stride (32, a 7x7 map at 224 px), so they differ only in RF, not in the number of locals.
# The '_small' presets (3x3 stride-1 stem, no max-pool, 4x4 map at 32 px) mirror some of them.
#
# | name           | stem     | maxpool | n3x3      | strides   | padded | RF  | map@224 | map@32 |
# |----------------|----------|---------|-----------|-----------|--------|-----|---------|--------|
# | bagnet33       | bagnet   | no      | (1,1,1,1) | (2,2,2,1) | no     | 33  | 24      | -      |
# | rf67           | imagenet | yes     | (2,2,1,0) | (1,2,2,2) | yes    | 67  | 7       | 1      |
# | rf99           | imagenet | yes     | (2,2,2,0) | (1,2,2,2) | yes    | 99  | 7       | 1      |
# | rf155          | imagenet | yes     | (3,3,2,1) | (1,2,2,2) | yes    | 155 | 7       | 1      |
# | rf195          | imagenet | yes     | (2,2,2,2) | (1,2,2,2) | yes    | 195 | 7       | 1      |
# | resnet50       | imagenet | yes     | (3,4,6,3) | (1,2,2,2) | yes    | 427 | 7       | 1      |
# | rf17_small     | small    | no      | (2,2,1,0) | (1,2,2,2) | yes    | 17  | 28      | 4      |
# | rf25_small     | small    | no      | (2,2,2,0) | (1,2,2,2) | yes    | 25  | 28      | 4      |
# | rf49_small     | small    | no      | (2,2,2,2) | (1,2,2,2) | yes    | 49  | 28      | 4      |
# | resnet50_small | small    | no      | (3,4,6,3) | (1,2,2,2) | yes    | 107 | 28      | 4      |
# All use layers (3,4,6,3). rf17/25/49_small have the blocks of rf67/99/195. The table is printed
# from the code by `python rf_resnet.py`.
_IMAGENET = dict(stem='imagenet', maxpool=True, strides=(1, 2, 2, 2), padded=True)
_SMALL = dict(stem='small', maxpool=False, strides=(1, 2, 2, 2), padded=True)
PRESETS = {
    'bagnet33': dict(stem='bagnet', maxpool=False, strides=(2, 2, 2, 1), padded=False,
                     n3x3=(1, 1, 1, 1)),
    'rf67': dict(_IMAGENET, n3x3=(2, 2, 1, 0)),
    'rf99': dict(_IMAGENET, n3x3=(2, 2, 2, 0)),
    'rf155': dict(_IMAGENET, n3x3=(3, 3, 2, 1)),
    'rf195': dict(_IMAGENET, n3x3=(2, 2, 2, 2)),
    'resnet50': dict(_IMAGENET, n3x3=(3, 4, 6, 3)),
    'rf17_small': dict(_SMALL, n3x3=(2, 2, 1, 0)),
    'rf25_small': dict(_SMALL, n3x3=(2, 2, 2, 0)),
    'rf49_small': dict(_SMALL, n3x3=(2, 2, 2, 2)),
    'resnet50_small': dict(_SMALL, n3x3=(3, 4, 6, 3)),
}
STEMS = ('imagenet', 'bagnet', 'small')


def _center_crop(x, height, width):
    """Crop (N, C, H, W) -> (N, C, height, width) around the centre, so an unpadded conv output
    (which loses k//2 pixels on each side) stays aligned with its residual."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (stride on the middle conv): 1x1 -> kxk -> 1x1 (x4 channels).

    kernel_size 3 or 1 for the middle conv; with padded=False the middle conv is unpadded and the
    residual is centre-cropped to the output size. (N, C_in, H, W) -> (N, 4*planes, H', W').
    """

    def __init__(self, in_channels, planes, stride=1, kernel_size=3, padded=True):
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride=stride,
                               padding=kernel_size // 2 if padded else 0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        if residual.shape[-2:] != out.shape[-2:]:  # only in unpadded blocks
            residual = _center_crop(residual, *out.shape[-2:])
        return self.relu(out + residual)


class RFResNet(nn.Module):
    """Bottleneck ResNet whose receptive field is set by its kwargs; returns the pre-pool map.

    layers:  blocks per layer (4 layers).  n3x3: how many leading blocks of each layer have a 3x3
    middle conv (the others a 1x1).  strides: stride of the first block of each layer.
    maxpool: 3x3 stride-2 max-pool after the stem (presets use it only with 'imagenet').
    stem: 'imagenet' (7x7 s2 conv), 'bagnet' (1x1 conv then 3x3 s1 conv, as BagNet) or 'small'
    (3x3 s1 conv, for 32 px images).  padded: False = BagNet style, every conv and the max-pool
    unpadded, residuals centre-cropped.  width: multiplier of the base width 64.
    forward: (N, 3, H, W) -> (N, out_dim, H', W'), H' = feature_size(kwargs, H).
    """

    def __init__(self, layers=(3, 4, 6, 3), n3x3=(3, 4, 6, 3), strides=(1, 2, 2, 2), maxpool=True,
                 stem='imagenet', padded=True, width=1.0):
        super().__init__()
        _validate(dict(layers=layers, n3x3=n3x3, strides=strides, maxpool=maxpool, stem=stem,
                       padded=padded, width=width))
        base = max(1, round(BASE_WIDTH * width))
        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3 if padded else 0, bias=False)
        elif stem == 'bagnet':  # attribute names follow BagNet's code
            self.conv1 = nn.Conv2d(3, base, 1, bias=False)
            self.conv2 = nn.Conv2d(base, base, 3, padding=1 if padded else 0, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, base, 3, padding=1 if padded else 0, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.MaxPool2d(3, stride=2, padding=1 if padded else 0) if maxpool
                        else nn.Identity())

        in_channels = base
        for index, (n_blocks, n_wide, stride) in enumerate(zip(layers, n3x3, strides)):
            planes = base * 2 ** index
            blocks = []
            for b in range(n_blocks):
                blocks.append(Bottleneck(in_channels, planes, stride=stride if b == 0 else 1,
                                         kernel_size=3 if b < n_wide else 1, padded=padded))
                in_channels = planes * EXPANSION
            setattr(self, f'layer{index + 1}', nn.Sequential(*blocks))
        self.out_dim = in_channels
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts as zero, so every block starts as the identity (Goyal et al.).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        x = self.conv1(x)
        if hasattr(self, 'conv2'):  # bagnet stem
            x = self.conv2(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# The defaults of the constructor are the single source of the defaults of the analytic helpers.
DEFAULTS = {name: p.default for name, p in inspect.signature(RFResNet.__init__).parameters.items()
            if name != 'self'}


def _validate(config):
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f'unknown RFResNet argument(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}')
    if config['stem'] not in STEMS:
        raise ValueError(f"unknown stem {config['stem']!r}; valid: {list(STEMS)}")
    for key in ('layers', 'n3x3', 'strides'):
        if len(config[key]) != 4:
            raise ValueError(f'{key} must have 4 entries (one per layer), got {config[key]}')
    layers, n3x3 = config['layers'], config['n3x3']
    if min(layers) < 1 or any(not 0 <= w <= n for w, n in zip(n3x3, layers)):
        raise ValueError(f'need 1 <= layers and 0 <= n3x3 <= layers, got {layers}, {n3x3}')
    if config['width'] <= 0:
        raise ValueError(f"width must be positive, got {config['width']}")


def _main_path(config):
    """(kernel, stride, padding) of every op on the longest path (stem, pool, each block's
    middle conv). 1x1 convs and the residual path never widen the RF, so they are left out,
    except a strided 1x1 middle conv, which still changes the jump and the size."""
    cfg = {**DEFAULTS, **config}
    _validate(cfg)
    pad = cfg['padded']
    if cfg['stem'] == 'imagenet':
        ops = [(7, 2, 3 if pad else 0)]
    else:  # 'bagnet' (its leading 1x1 conv adds nothing) and 'small'
        ops = [(3, 1, 1 if pad else 0)]
    if cfg['maxpool']:
        ops.append((3, 2, 1 if pad else 0))
    for n_blocks, n_wide, stride in zip(cfg['layers'], cfg['n3x3'], cfg['strides']):
        for b in range(n_blocks):
            k = 3 if b < n_wide else 1
            ops.append((k, stride if b == 0 else 1, k // 2 if pad else 0))
    return ops


def receptive_field(config):
    """RF in pixels of one output position: rf += (k - 1) * jump; jump *= stride."""
    rf, jump = 1, 1
    for kernel, stride, _ in _main_path(config):
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


def feature_size(config, img_size):
    """Side of the output map for a square img_size input; 0 when the image is too small."""
    size = img_size
    for kernel, stride, padding in _main_path(config):
        size = (size + 2 * padding - kernel) // stride + 1
        if size < 1:
            return 0
    return size


def preset_args(name, width=1.0, **overrides):
    """Resolved constructor kwargs of a preset (JSON-able; store them in checkpoints)."""
    if name not in PRESETS:
        raise ValueError(f'unknown RF-ResNet preset {name!r}; valid: {", ".join(PRESETS)}')
    args = {**DEFAULTS, **PRESETS[name], 'width': width, **overrides}
    _validate(args)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def build_rf_resnet(name, width=1.0, **overrides):
    """The preset `name` (see PRESETS), with optional constructor overrides."""
    return RFResNet(**preset_args(name, width, **overrides))


def preset_table():
    """One line per preset: name, RF, map side at 224 and 32 px, parameters at width 1."""
    lines = [f"{'name':<16}{'RF':>5}{'map@224':>9}{'map@32':>8}{'params':>9}"]
    for name in PRESETS:
        args = preset_args(name)
        with torch.device('meta'):  # shapes only: no memory, no init cost
            n_params = sum(p.numel() for p in RFResNet(**args).parameters())
        sizes = [feature_size(args, s) or '-' for s in (224, 32)]
        lines.append(f'{name:<16}{receptive_field(args):>5}{sizes[0]:>9}{sizes[1]:>8}'
                     f'{n_params / 1e6:>8.2f}M')
    return '\n'.join(lines)


if __name__ == '__main__':
    print(preset_table())
