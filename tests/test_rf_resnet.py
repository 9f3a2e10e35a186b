"""RF-ResNet: the analytic receptive field and map size agree with the real network, every position
of every stage reaches the output, and bagnet33 computes what BagNet-33's published code computes."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rf_resnet
from rf_resnet import (DEFAULTS, PRESETS, BasicBlock, Bottleneck, RFResNet, build_rf_resnet, feature_size,
                       preset_args, receptive_field, stage_liveness)

THIN = 0.0625  # 4 stem channels: the geometry is the same at any width, and it runs fast

# Non-preset geometries that exercise what the presets do not: unpadded imagenet stem + max-pool,
# several unpadded 3x3 blocks in a row (residual crop of 2 px, no downsample), a strided first
# layer and 1x1 layers between 3x3 ones, a max-pool after the bagnet stem, unit strides, unpadded
# basic blocks (two cropped convs per block) with the corner crop.
EXTRA_CONFIGS = {
    'unpadded_imagenet': dict(stem='imagenet', maxpool=True, padded=False, n3x3=(2, 2, 1, 0),
                              strides=(1, 2, 2, 1)),
    'unpadded_small_2x3': dict(stem='small', maxpool=False, padded=False, layers=(2, 3, 2, 2),
                               n3x3=(2, 3, 2, 0), strides=(1, 2, 2, 1)),
    'strided_first_layer': dict(stem='imagenet', maxpool=False, n3x3=(1, 0, 2, 1), strides=(2, 1, 1, 2)),
    'bagnet_stem_maxpool': dict(stem='bagnet', maxpool=True, padded=True, n3x3=(1, 0, 1, 0),
                                strides=(1, 1, 2, 1)),
    'unpadded_basic_corner': dict(stem='small', maxpool=False, padded=False, block='basic', crop='corner',
                                  layers=(2, 2, 2, 2), n3x3=(2, 1, 1, 0), strides=(1, 2, 2, 1)),
}
ALL_CONFIGS = {**{name: preset_args(name) for name in PRESETS}, **EXTRA_CONFIGS}


def make_gradient_probe(config):
    """rf_resnet.gradient_probe: positive weights, identity BN, average pools: every path carries gradient."""
    return rf_resnet.gradient_probe(config, width=THIN)


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
    # rf41_small is rf49_small unstrided at layer4: rf25_small's 8 x 8 map with rf49_small's blocks
    assert feature_size(preset_args('rf41_small'), 32) == feature_size(preset_args('rf25_small'), 32) == 8
    with torch.device('meta'):
        params = {n: sum(p.numel() for p in RFResNet(**preset_args(n)).parameters()) for n in ('rf41_small', 'rf49_small')}
    assert params['rf41_small'] == params['rf49_small']
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
    assert feature_size(preset_args('rf67'), 64) == 4  # total stride 16: its 1x1 layer4 does not stride
    assert out.shape == (3, model.out_dim, 4, 4)
    out.mean().backward()  # trainable end to end
    assert model.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():  # in eval mode, each image's features do not depend on the rest of the batch
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]))


def test_block_types_follow_n3x3():
    model = build_rf_resnet('rf67', width=THIN)  # n3x3 = (2, 2, 1, 0), layers (3, 4, 6, 3)
    kernels = [[block.conv2.kernel_size[0] for block in getattr(model, f'layer{i}')] for i in range(1, 5)]
    assert kernels == [[3, 3, 1], [3, 3, 1, 1], [3, 1, 1, 1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize('Block', [Bottleneck, BasicBlock])
def test_unpadded_block_crops_residual_around_the_centre_or_at_the_corner(Block):
    # A 3x3 valid conv's output i is centred on input i + 1, so 'centre' crops one pixel on each
    # side per conv; 'corner' (BagNet's code) keeps the top-left. With the last BN gamma at zero
    # (as RFResNet initialises it), the block is exactly relu(cropped input).
    channels = 8 if Block is Bottleneck else 2  # the identity shortcut: out = in channels
    cut = 1 if Block is Bottleneck else 2  # a basic block has two 3x3 convs
    for crop, expected in (('centre', lambda x: x[..., cut:-cut, cut:-cut]),
                           ('corner', lambda x: x[..., :-2 * cut, :-2 * cut])):
        block = Block(channels, 2, stride=1, kernel_size=3, padded=False, crop=crop).eval()
        assert block.downsample is None
        nn.init.zeros_(block.last_bn.weight)
        x = torch.randn(1, channels, 9, 9)
        with torch.no_grad():
            torch.testing.assert_close(block(x), torch.relu(expected(x)))


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
    with pytest.raises(ValueError, match='no 3x3 block but stride 2'):  # would skip 3 positions in 4
        RFResNet(n3x3=(2, 2, 1, 0), strides=(1, 2, 2, 2))
    for bad in (dict(block='wide'), dict(crop='left'), dict(pool='max')):
        with pytest.raises(ValueError, match='unknown'):
            RFResNet(**bad)


# ---------------------------------------------------------------------------------------------
# Liveness: no position of any stage is computed for nothing


def exact_size(config, at_least):
    """The smallest image size >= at_least at which no strided op drops a last row or column (so the
    whole map is its valid region): for every strided op, (size + 2 pad - kernel) % stride == 0."""
    for size in range(at_least, at_least + 512):
        n, ok = size, True
        for kernel, stride, pad in rf_resnet._main_path(config):
            ok = ok and (n + 2 * pad - kernel) % stride == 0
            n = (n + 2 * pad - kernel) // stride + 1
        if ok and n >= 2:
            return size
    raise AssertionError('no exact size found')


@pytest.mark.parametrize('name', list(ALL_CONFIGS))
def test_every_position_of_every_stage_and_every_pixel_reaches_the_output(name):
    # The gradient of the output's sum reaches every position of each stage's input (the stem's
    # output, layer1-3's outputs) and every input pixel. Before layer4 of rf67, rf99 and the small
    # presets stopped striding, only 25% of layer3's positions (and ~56% of layer2's) did.
    config = ALL_CONFIGS[name]
    size = exact_size(config, 64)
    live = stage_liveness(config, size)
    assert live == {'image': 1.0, 'layer1': 1.0, 'layer2': 1.0, 'layer3': 1.0, 'layer4': 1.0}, (size, live)


def test_a_strided_1x1_layer_would_be_caught_by_the_liveness_measure():
    # The measure itself: a net built around the constructor's check (a strided 1x1 layer4) has
    # 1 live layer4-input position in 4.
    args = preset_args('rf25_small')
    model = rf_resnet.gradient_probe(args)
    block = model.layer4[0]
    block.conv2.stride = block.downsample[0].stride = (2, 2)
    maps = {}
    model.layer4.register_forward_pre_hook(lambda m, inputs: maps.setdefault('in', inputs[0]))
    out = model(torch.ones(1, 3, 32, 32, dtype=torch.float64))
    grad, = torch.autograd.grad(out.sum(), maps['in'])
    assert (grad[0].abs().sum(0) > 0).double().mean().item() == 0.25


def test_preset_table_reports_full_liveness_for_every_preset():
    lines = rf_resnet.preset_table().splitlines()
    assert len(lines) == 1 + len(PRESETS)
    assert all(line.split()[-1] == '100%' for line in lines[1:])


# ---------------------------------------------------------------------------------------------
# bagnet33 is BagNet-33: the published architecture, written out as plain functions


def reference_bagnet33(state, x):
    """BagNet-33's forward (Brendel & Bethge 2019, its published PyTorch model) in eval mode, from
    a state dict with the same names: stem 1x1 conv, 3x3 valid conv, BN, ReLU; four layers of
    (3, 4, 6, 3) bottlenecks whose first block has a valid 3x3 middle conv with strides (2, 2, 2, 1)
    and the others 1x1; when sizes differ, the residual loses its last `diff` rows and columns."""
    def bn(x, prefix):
        return F.batch_norm(x, state[prefix + '.running_mean'], state[prefix + '.running_var'],
                            state[prefix + '.weight'], state[prefix + '.bias'], False, 0.0, 1e-5)
    x = F.conv2d(F.conv2d(x, state['conv1.weight']), state['conv2.weight'])
    x = F.relu(bn(x, 'bn1'))
    for layer, (n_blocks, stride) in enumerate(zip((3, 4, 6, 3), (2, 2, 2, 1)), start=1):
        for b in range(n_blocks):
            p = f'layer{layer}.{b}'
            s = stride if b == 0 else 1
            out = F.relu(bn(F.conv2d(x, state[p + '.conv1.weight']), p + '.bn1'))
            out = F.relu(bn(F.conv2d(out, state[p + '.conv2.weight'], stride=s), p + '.bn2'))
            out = bn(F.conv2d(out, state[p + '.conv3.weight']), p + '.bn3')
            residual = x
            if p + '.downsample.0.weight' in state:
                residual = bn(F.conv2d(x, state[p + '.downsample.0.weight'], stride=s), p + '.downsample.1')
            if residual.shape[-1] != out.shape[-1]:
                diff = residual.shape[-1] - out.shape[-1]
                residual = residual[:, :, :-diff, :-diff]
            x = F.relu(out + residual)
    return x


def test_bagnet33_matches_the_reference_forward_on_the_same_weights():
    torch.manual_seed(0)
    model = build_rf_resnet('bagnet33', width=0.125).double()
    with torch.no_grad():  # non-trivial weights and BN statistics (the last BN gammas start at zero)
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(t + 0.2 * torch.randn_like(t).abs() if 'running_var' in name else t + 0.2 * torch.randn_like(t))
    model.eval()
    state = model.state_dict()
    kernels = [state[f'layer{i}.{b}.conv2.weight'].shape[-1] for i, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
    assert kernels == [3, 1, 1, 3, 1, 1, 1, 3, 1, 1, 1, 1, 1, 3, 1, 1]  # one 3x3 block leads each layer
    x = torch.randn(2, 3, 61, 61, dtype=torch.float64)  # an odd size: the crop removes a row at every stride
    with torch.no_grad():
        ours, reference = model(x), reference_bagnet33(state, x)
    torch.testing.assert_close(ours, reference)
    # The centred variant is a different function on the same weights (it is offered, named as such).
    centred = build_rf_resnet('bagnet33_centred', width=0.125).double().eval()
    centred.load_state_dict(state)
    with torch.no_grad():
        assert (centred(x) - reference).abs().max() > 1e-3
    assert model.bn1.momentum == 0.001 and model.layer1[0].bn1.momentum == 0.1  # BagNet's stem BN only
