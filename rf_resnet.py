"""RF-ResNet: a ResNet-50-like (bottleneck) or ResNet-18-like (basic block) CNN with a controlled
receptive field (RF).

The network returns the pre-pool feature map (N, C, H', W'): every position is a *local*
representation whose RF is bounded. Knobs: blocks per layer, how many leading blocks of each layer
have 3x3 convs (the rest have 1x1 ones, which add no RF), the block type, the max-pool, the strides
of the first block of each layer, the stem, padding (BagNet style unpadded convs with the residual
cropped, around the centre or at the bottom-right as BagNet's code does), and an optional MLP after
average pooling (`pool`). `receptive_field` and `feature_size` compute the geometry analytically
from the same constructor kwargs; tests/test_rf_resnet.py checks both against the real network
(gradients and forward shapes), and checks that every position of every stage reaches the output.
"""
import inspect

import torch
from torch import nn

BASE_WIDTH = 64  # channels of the stem and of layer1's first conv, as in ResNet-50 / ResNet-18
EXPANSION = {'bottleneck': 4, 'basic': 1}  # block output channels = expansion x its inner width

# Presets, named by their exact receptive field (pixels). A layer whose blocks are all 1x1 never
# strides: a strided 1x1 conv would read one position in four and the other three would never reach
# the output (the constructor refuses it). So the presets whose last layer is 1x1 end at half the
# total stride of the others: rf67/99 at 16 (14 x 14 at 224 px) instead of ResNet-50's 32, and
# rf17/25_small (no stem stride, no max-pool) at 4 (8 x 8 at 32 px) instead of 8.
# The '_small' presets (3x3 stride-1 stem, no max-pool) are for 32-64 px images; the 'r18' ones
# use basic blocks and layers (2, 2, 2, 2) (rf29_r18_small: the RF-29 network of the CO-SSL paper's
# small datasets [ours: its exact configuration]).
#
# | name            | block  | stem     | maxpool | n3x3      | strides   | padded | RF  | map@224 | map@32 |
# |-----------------|--------|----------|---------|-----------|-----------|--------|-----|---------|--------|
# | bagnet33        | bottl. | bagnet   | no      | (1,1,1,1) | (2,2,2,1) | no     | 33  | 24      | -      |
# | bagnet33_centred| bottl. | bagnet   | no      | (1,1,1,1) | (2,2,2,1) | no     | 33  | 24      | -      |
# | rf67            | bottl. | imagenet | yes     | (2,2,1,0) | (1,2,2,1) | yes    | 67  | 14      | 2      |
# | rf99            | bottl. | imagenet | yes     | (2,2,2,0) | (1,2,2,1) | yes    | 99  | 14      | 2      |
# | rf155           | bottl. | imagenet | yes     | (3,3,2,1) | (1,2,2,2) | yes    | 155 | 7       | 1      |
# | rf195           | bottl. | imagenet | yes     | (2,2,2,2) | (1,2,2,2) | yes    | 195 | 7       | 1      |
# | resnet50        | bottl. | imagenet | yes     | (3,4,6,3) | (1,2,2,2) | yes    | 427 | 7       | 1      |
# | rf17_small      | bottl. | small    | no      | (2,2,1,0) | (1,2,2,1) | yes    | 17  | 56      | 8      |
# | rf25_small      | bottl. | small    | no      | (2,2,2,0) | (1,2,2,1) | yes    | 25  | 56      | 8      |
# | rf41_small      | bottl. | small    | no      | (2,2,2,2) | (1,2,2,1) | yes    | 41  | 56      | 8      |
# | rf49_small      | bottl. | small    | no      | (2,2,2,2) | (1,2,2,2) | yes    | 49  | 28      | 4      |
# | resnet50_small  | bottl. | small    | no      | (3,4,6,3) | (1,2,2,2) | yes    | 107 | 28      | 4      |
# | rf29_r18_small  | basic  | small    | no      | (2,1,1,0) | (1,2,2,1) | yes    | 29  | 56      | 8      |
# | resnet18_small  | basic  | small    | no      | (2,2,2,2) | (1,2,2,2) | yes    | 109 | 28      | 4      |
# Bottleneck presets use layers (3,4,6,3). rf17/25/49_small have the blocks of rf67/99/195.
# rf41_small is rf49_small with layer4 unstrided [ours]: the same blocks and parameters, an 8 x 8 map
# at 32 px like rf25_small. Against rf25_small it adds field and layer4's 3x3 convs at the same map;
# rf41 -> rf49 halves the map (and adds the last 8 px of field).
# bagnet33 is BagNet-33 exactly (bottom-right residual crop, stem BN momentum 0.001);
# bagnet33_centred crops the residual around the centre instead, which keeps each residual aligned
# with the middle of its conv window (same RF, same parameters, different function).
# The table is printed from the code by `python rf_resnet.py`.
_IMAGENET = dict(stem='imagenet', maxpool=True, strides=(1, 2, 2, 2), padded=True)
_SMALL = dict(stem='small', maxpool=False, strides=(1, 2, 2, 2), padded=True)
_BAGNET = dict(stem='bagnet', maxpool=False, strides=(2, 2, 2, 1), padded=False, n3x3=(1, 1, 1, 1))
_R18 = dict(block='basic', layers=(2, 2, 2, 2))
PRESETS = {
    'bagnet33': dict(_BAGNET, crop='corner'),
    'bagnet33_centred': dict(_BAGNET, crop='centre'),
    'rf67': dict(_IMAGENET, n3x3=(2, 2, 1, 0), strides=(1, 2, 2, 1)),
    'rf99': dict(_IMAGENET, n3x3=(2, 2, 2, 0), strides=(1, 2, 2, 1)),
    'rf155': dict(_IMAGENET, n3x3=(3, 3, 2, 1)),
    'rf195': dict(_IMAGENET, n3x3=(2, 2, 2, 2)),
    'resnet50': dict(_IMAGENET, n3x3=(3, 4, 6, 3)),
    'rf17_small': dict(_SMALL, n3x3=(2, 2, 1, 0), strides=(1, 2, 2, 1)),
    'rf25_small': dict(_SMALL, n3x3=(2, 2, 2, 0), strides=(1, 2, 2, 1)),
    'rf41_small': dict(_SMALL, n3x3=(2, 2, 2, 2), strides=(1, 2, 2, 1)),
    'rf49_small': dict(_SMALL, n3x3=(2, 2, 2, 2)),
    'resnet50_small': dict(_SMALL, n3x3=(3, 4, 6, 3)),
    'rf29_r18_small': dict(_SMALL, **_R18, n3x3=(2, 1, 1, 0), strides=(1, 2, 2, 1)),
    'resnet18_small': dict(_SMALL, **_R18, n3x3=(2, 2, 2, 2)),
}
STEMS = ('imagenet', 'bagnet', 'small')
BLOCKS = ('bottleneck', 'basic')
CROPS = ('centre', 'corner')


def crop_residual(x, height, width, crop):
    """Crop (N, C, H, W) -> (N, C, height, width) so the residual matches an unpadded conv output.
    'centre': a valid kxk conv's output i is centred on input i + k//2, so cut equally on both sides.
    'corner': keep the top-left, as BagNet's code does (residual[:, :, :-diff, :-diff])."""
    if crop == 'corner':
        return x[..., :height, :width]
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def _shortcut(in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (stride on the middle conv): 1x1 -> kxk -> 1x1 (x4 channels).

    kernel_size 3 or 1 for the middle conv; with padded=False the middle conv is unpadded and the
    residual is cropped to the output size (`crop`). (N, C_in, H, W) -> (N, 4*planes, H', W').
    """

    def __init__(self, in_channels, planes, stride=1, kernel_size=3, padded=True, crop='centre'):
        super().__init__()
        out_channels = planes * EXPANSION['bottleneck']
        self.crop = crop
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride=stride,
                               padding=kernel_size // 2 if padded else 0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    @property
    def last_bn(self):  # zero-initialised: the block starts as the identity
        return self.bn3

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        if residual.shape[-2:] != out.shape[-2:]:  # only in unpadded blocks
            residual = crop_residual(residual, *out.shape[-2:], self.crop)
        return self.relu(out + residual)


class BasicBlock(nn.Module):
    """ResNet-18's block: kxk (stride) -> kxk, same channels; kernel_size 3 or 1 for both convs.
    (N, C_in, H, W) -> (N, planes, H', W')."""

    def __init__(self, in_channels, planes, stride=1, kernel_size=3, padded=True, crop='centre'):
        super().__init__()
        pad = kernel_size // 2 if padded else 0
        self.crop = crop
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes, stride)

    @property
    def last_bn(self):
        return self.bn2

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        if residual.shape[-2:] != out.shape[-2:]:
            residual = crop_residual(residual, *out.shape[-2:], self.crop)
        return self.relu(out + residual)


def pool_mlp(dim):
    """The MLP after average pooling (Linear-BN-ReLU-Linear, dim -> dim -> dim) [ours: its sizes]."""
    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim))


class RFResNet(nn.Module):
    """ResNet whose receptive field is set by its kwargs; forward returns the pre-pool map.

    layers:  blocks per layer (4 layers).  n3x3: how many leading blocks of each layer have 3x3
    convs (the others 1x1).  block: 'bottleneck' (ResNet-50) or 'basic' (ResNet-18).
    strides: stride of the first block of each layer; a layer with no 3x3 block must have stride 1.
    maxpool: 3x3 stride-2 max-pool after the stem (presets use it only with 'imagenet').
    stem: 'imagenet' (7x7 s2 conv), 'bagnet' (1x1 conv then 3x3 s1 conv, BN momentum 0.001, as
    BagNet) or 'small' (3x3 s1 conv, for 32-64 px images).  padded: False = BagNet style, every conv
    and the max-pool unpadded, residuals cropped ('centre' or 'corner' = BagNet's bottom-right cut).
    width: multiplier of the base width 64.  pool: 'avg' or 'avg_mlp' (an MLP after the average
    pooling, see `pooled`).
    forward: (N, 3, H, W) -> (N, out_dim, H', W'), H' = feature_size(kwargs, H).
    pooled:  (N, out_dim, H', W') -> (N, out_dim), the global representation.
    """

    def __init__(self, layers=(3, 4, 6, 3), n3x3=(3, 4, 6, 3), strides=(1, 2, 2, 2), maxpool=True,
                 stem='imagenet', padded=True, width=1.0, block='bottleneck', crop='centre', pool='avg'):
        super().__init__()
        _validate(dict(layers=layers, n3x3=n3x3, strides=strides, maxpool=maxpool, stem=stem,
                       padded=padded, width=width, block=block, crop=crop, pool=pool))
        base = max(1, round(BASE_WIDTH * width))
        bn_momentum = 0.1
        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3 if padded else 0, bias=False)
        elif stem == 'bagnet':  # attribute names follow BagNet's code
            self.conv1 = nn.Conv2d(3, base, 1, bias=False)
            self.conv2 = nn.Conv2d(base, base, 3, padding=1 if padded else 0, bias=False)
            bn_momentum = 0.001  # BagNet's stem BN
        else:
            self.conv1 = nn.Conv2d(3, base, 3, padding=1 if padded else 0, bias=False)
        self.bn1 = nn.BatchNorm2d(base, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.MaxPool2d(3, stride=2, padding=1 if padded else 0) if maxpool
                        else nn.Identity())

        Block, expansion = (Bottleneck if block == 'bottleneck' else BasicBlock), EXPANSION[block]
        in_channels = base
        for index, (n_blocks, n_wide, stride) in enumerate(zip(layers, n3x3, strides)):
            planes = base * 2 ** index
            blocks = []
            for b in range(n_blocks):
                blocks.append(Block(in_channels, planes, stride=stride if b == 0 else 1,
                                    kernel_size=3 if b < n_wide else 1, padded=padded, crop=crop))
                in_channels = planes * expansion
            setattr(self, f'layer{index + 1}', nn.Sequential(*blocks))
        self.out_dim = in_channels
        self.mlp = pool_mlp(in_channels) if pool == 'avg_mlp' else None
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
            if isinstance(m, (Bottleneck, BasicBlock)):
                nn.init.zeros_(m.last_bn.weight)

    def forward(self, x):
        x = self.conv1(x)
        if hasattr(self, 'conv2'):  # bagnet stem
            x = self.conv2(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pooled(self, fmap):
        """(N, C, H, W) feature map -> (N, C): the average over positions, then the MLP if any.
        The local representations are the positions of the map itself (before pooling)."""
        pooled = fmap.mean((2, 3))
        return pooled if self.mlp is None else self.mlp(pooled)


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
    for key, valid in (('block', BLOCKS), ('crop', CROPS), ('pool', ('avg', 'avg_mlp'))):
        if config[key] not in valid:
            raise ValueError(f'unknown {key} {config[key]!r}; valid: {list(valid)}')
    for index, (n_wide, stride) in enumerate(zip(n3x3, config['strides'])):
        if n_wide == 0 and stride != 1:  # its shortcut and main path would both be strided 1x1 convs
            raise ValueError(f'layer{index + 1} has no 3x3 block but stride {stride}: a strided 1x1 conv '
                             'would skip 3 positions in 4 of its input (use stride 1)')


def _main_path(config):
    """(kernel, stride, padding) of every op on the longest path (stem, pool, each block's kxk
    convs: the bottleneck's middle one, both of a basic block). Its 1x1 convs and the residual path
    never widen the RF, so they are left out."""
    cfg = {**DEFAULTS, **config}
    _validate(cfg)
    pad = cfg['padded']
    if cfg['stem'] == 'imagenet':
        ops = [(7, 2, 3 if pad else 0)]
    else:  # 'bagnet' (its leading 1x1 conv adds nothing) and 'small'
        ops = [(3, 1, 1 if pad else 0)]
    if cfg['maxpool']:
        ops.append((3, 2, 1 if pad else 0))
    convs_per_block = 2 if cfg['block'] == 'basic' else 1  # bottleneck: only its middle conv
    for n_blocks, n_wide, stride in zip(cfg['layers'], cfg['n3x3'], cfg['strides']):
        for b in range(n_blocks):
            k = 3 if b < n_wide else 1
            for c in range(convs_per_block):  # the stride is on the block's first kxk conv
                ops.append((k, stride if b == 0 and c == 0 else 1, k // 2 if pad else 0))
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


def gradient_probe(config, width=1 / 64):
    """A float64 eval-mode copy of the net in which every input-output path carries a non-zero
    gradient: conv weights positive, BN the identity (train-mode BN would couple positions through
    the batch statistics, and the zero-initialised last gammas would cut the residual branches), and
    max-pools replaced by average pools of the same geometry (a max sends its gradient to one input).
    Geometry does not depend on the width, so a thin net suffices."""
    model = RFResNet(**{**DEFAULTS, **config, 'width': width, 'pool': 'avg'}).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # gamma 1, beta 0, running mean 0 and var 1
    if isinstance(model.maxpool, nn.MaxPool2d):
        pool = model.maxpool
        model.maxpool = nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding)
    return model


def stage_liveness(config, img_size):
    """For each stage input (the stem's output, then each layer's output but the last) and the
    image: the fraction of its positions with a non-zero gradient from the sum of the output map,
    i.e. that reach the output at all. 1.0 everywhere for a net that wastes no computation
    (at an image size where no strided conv drops a last row or column). Returns
    {'image': f, 'layer1': f, ..., 'layer4': f}, keyed by the layer that reads the map."""
    model = gradient_probe(config)
    maps = {}
    hooks = [getattr(model, f'layer{i}').register_forward_pre_hook(
        lambda module, inputs, i=i: maps.__setitem__(f'layer{i}', inputs[0])) for i in range(1, 5)]
    x = torch.ones(1, 3, img_size, img_size, dtype=torch.float64, requires_grad=True)
    out = model(x)
    for h in hooks:
        h.remove()
    names = ['image', *maps]
    grads = torch.autograd.grad(out.sum(), [x, *maps.values()])
    return {name: (g[0].abs().sum(0) > 0).double().mean().item() for name, g in zip(names, grads)}


def preset_table():
    """One line per preset: name, block, RF, map side at 224 and 32 px, parameters at width 1, and
    the fraction of the last stage's input positions that reach the output (measured by gradients
    at 224 px; 100% for every preset)."""
    lines = [f"{'name':<18}{'block':>11}{'RF':>5}{'map@224':>9}{'map@32':>8}{'params':>9}{'layer4 in live':>16}"]
    for name in PRESETS:
        args = preset_args(name)
        with torch.device('meta'):  # shapes only: no memory, no init cost
            n_params = sum(p.numel() for p in RFResNet(**args).parameters())
        sizes = [feature_size(args, s) or '-' for s in (224, 32)]
        live = stage_liveness(args, 224)['layer4']
        lines.append(f"{name:<18}{args['block']:>11}{receptive_field(args):>5}{sizes[0]:>9}{sizes[1]:>8}"
                     f'{n_params / 1e6:>8.2f}M{live:>16.0%}')
    return '\n'.join(lines)


if __name__ == '__main__':
    print(preset_table())
