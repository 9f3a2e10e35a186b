"""RF-ResNet: the analytic receptive field and map size agree with the real network."""
import json

import pytest
import torch
from torch import nn

from rf_resnet import (DEFAULTS, PRESETS, Bottleneck, RFResNet, build_rf_resnet, feature_size,
                       preset_args, receptive_field)

THIN = 0.0625  # 4 stem channels: the geometry is the same at any width, and it runs fast

# Non-preset geometries that exercise what the presets do not: unpadded imagenet stem + max-pool,
# several unpadded 3x3 blocks in a row (residual crop of 2 px, no downsample), strided 1x1 blocks,
# a max-pool after the bagnet stem, unit strides.
EXTRA_CONFIGS = {
    'unpadded_imagenet': dict(stem='imagenet', maxpool=True, padded=False, n3x3=(2, 2, 1, 0)),
    'unpadded_small_2x3': dict(stem='small', maxpool=False, padded=False, layers=(2, 3, 2, 2),
                               n3x3=(2, 3, 2, 0), strides=(1, 2, 2, 2)),
    'strided_1x1_first': dict(stem='imagenet', maxpool=False, n3x3=(0, 0, 2, 1), strides=(2, 2, 1, 2)),
    'bagnet_stem_maxpool': dict(stem='bagnet', maxpool=True, padded=True, n3x3=(1, 0, 1, 0)),
}
ALL_CONFIGS = {**{name: preset_args(name) for name in PRESETS}, **EXTRA_CONFIGS}


def make_gradient_probe(config):
    """Float64 eval-mode net in which every path from input to output carries a non-zero gradient:
    all conv weights positive, BN the identity (train-mode BN would couple positions through the
    batch statistics, and the zero-init last gamma would cut the residual branches), and max-pools
    replaced by average pools of the same geometry (a max routes its gradient to one input only)."""
    model = RFResNet(**{**config, 'width': THIN}).double().eval()
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


def touched_extent(grad_map):
    """(first, last) index where a 1-D non-negative gradient profile is non-zero."""
    touched = torch.nonzero(grad_map > 0).flatten()
    return touched[0].item(), touched[-1].item()


def measured_receptive_field(config):
    """Extent in pixels, along rows and along columns, of the input pixels that get a non-zero
    gradient from the centre position of the output map."""
    cfg = {**DEFAULTS, **config}
    total_stride = (2 if cfg['stem'] == 'imagenet' else 1) * (2 if cfg['maxpool'] else 1)
    for stride in cfg['strides']:
        total_stride *= stride
    # Margin of two output strides on each side, so that the RF of the centre output lies inside.
    img_size = receptive_field(config) + 4 * total_stride
    model = make_gradient_probe(config)
    x = torch.ones(1, 3, img_size, img_size, dtype=torch.float64, requires_grad=True)
    out = model(x)
    h, w = out.shape[-2:]
    out[0, :, h // 2, w // 2].sum().backward()
    grad = x.grad[0].abs().sum(dim=0)  # (H, W)
    extents = []
    for profile in (grad.sum(dim=1), grad.sum(dim=0)):  # per row, per column
        first, last = touched_extent(profile)
        assert first > 0 and last < img_size - 1, 'RF clipped by the image border: enlarge the input'
        extents.append(last - first + 1)
    return extents


@pytest.mark.parametrize('name', list(ALL_CONFIGS))
def test_analytic_receptive_field_equals_gradient_measurement(name):
    config = ALL_CONFIGS[name]
    rows, cols = measured_receptive_field(config)
    assert rows == cols == receptive_field(config)


def test_known_receptive_fields():
    assert receptive_field(preset_args('bagnet33')) == 33
    assert receptive_field(preset_args('resnet50')) == 427
    for name in PRESETS:  # presets named rfN have RF N
        if name.startswith('rf'):
            assert receptive_field(preset_args(name)) == int(name[2:].split('_')[0])
    # A 1x1 middle conv adds nothing; a 3x3 one adds 2 x the current jump.
    base = dict(stem='small', maxpool=False, strides=(1, 1, 1, 1), n3x3=(0, 0, 0, 0))
    assert receptive_field(base) == 3
    assert receptive_field({**base, 'n3x3': (3, 0, 0, 0)}) == 3 + 3 * 2


def test_known_feature_sizes():
    assert feature_size(preset_args('bagnet33'), 224) == 24
    assert feature_size(preset_args('resnet50'), 224) == 7
    assert feature_size(preset_args('resnet50_small'), 32) == 4
    assert feature_size(preset_args('bagnet33'), 32) == 0  # too small for the unpadded net

    bagnet = build_rf_resnet('bagnet33', width=THIN).eval()
    with torch.no_grad():
        assert bagnet(torch.randn(1, 3, 224, 224)).shape[-2:] == (24, 24)
        with pytest.raises(RuntimeError):
            bagnet(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('name', list(ALL_CONFIGS))
def test_feature_size_matches_forward(name):
    config = ALL_CONFIGS[name]
    model = RFResNet(**{**config, 'width': THIN}).eval()
    # Odd sizes too: floor division hides an off-by-one padding at 224 but not at 35.
    for size in (224, 97, 51, 35, 32):
        expected = feature_size(config, size)
        x = torch.randn(1, 3, size, size)
        if expected == 0:  # too small: the real network must refuse it too
            with pytest.raises(RuntimeError):
                model(x)
            continue
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, model.out_dim, expected, expected), (size, out.shape)


def test_output_shape_and_batch_independence():
    model = build_rf_resnet('rf67', width=0.125)
    assert model.out_dim == 2048 * 0.125
    x = torch.randn(3, 3, 64, 64)
    model.train()
    out = model(x)
    assert feature_size(preset_args('rf67'), 64) == 2  # total stride 32
    assert out.shape == (3, model.out_dim, 2, 2)
    out.mean().backward()  # trainable end to end
    assert model.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():  # in eval mode, each image's features do not depend on the rest of the batch
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]))


def test_block_types_follow_n3x3():
    model = build_rf_resnet('rf67', width=THIN)  # n3x3 = (2, 2, 1, 0), layers (3, 4, 6, 3)
    kernels = [[block.conv2.kernel_size[0] for block in getattr(model, f'layer{i}')] for i in range(1, 5)]
    assert kernels == [[3, 3, 1], [3, 3, 1, 1], [3, 1, 1, 1, 1, 1], [1, 1, 1]]


def test_unpadded_block_crops_residual_around_the_centre():
    # A 3x3 valid conv's output i is centred on input i + 1, so the residual must be cropped by one
    # pixel on each side (BagNet's own code crops the bottom-right instead). With the last BN
    # gamma at zero (as RFResNet initialises it), the block is exactly relu(cropped input).
    block = Bottleneck(8, 2, stride=1, kernel_size=3, padded=False).eval()
    assert block.downsample is None
    nn.init.zeros_(block.bn3.weight)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x[..., 1:-1, 1:-1]))


def test_state_dict_round_trip_through_json_args():
    args = preset_args('bagnet33', width=0.125)
    restored_args = json.loads(json.dumps(args))  # as stored in a checkpoint's config
    assert restored_args == args
    source = RFResNet(**args)
    with torch.no_grad():  # make the state non-trivial (the last BN gammas start at zero)
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    copy = RFResNet(**restored_args)
    copy.load_state_dict(source.state_dict())  # strict: same names and shapes
    source.eval()
    copy.eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), source(x))
    assert {'conv1.weight', 'conv2.weight', 'bn1.weight', 'layer1.0.conv2.weight',
            'layer1.0.downsample.0.weight', 'layer4.2.bn3.weight'} <= set(source.state_dict())


def test_resnet50_preset_has_torchvision_parameter_layout():
    torchvision = pytest.importorskip('torchvision')
    with torch.device('meta'):  # shapes only
        ours = build_rf_resnet('resnet50').state_dict()
        theirs = torchvision.models.resnet50().state_dict()
    theirs = {k: v.shape for k, v in theirs.items() if not k.startswith('fc.')}
    assert {k: v.shape for k, v in ours.items()} == theirs


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match='resnet50'):  # the message lists the valid names
        build_rf_resnet('resnet51')
    with pytest.raises(ValueError, match='unknown'):
        preset_args('rf67', kernel=5)
    with pytest.raises(ValueError):
        RFResNet(stem='cifar')
    with pytest.raises(ValueError):
        RFResNet(layers=(1, 1, 1, 1), n3x3=(2, 1, 1, 1))
