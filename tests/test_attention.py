import json
import os
import subprocess
import sys

import torch
from PIL import Image

import attention
import eval_linear
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'attention.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_class_token_attention_is_what_the_last_block_computes():
    torch.manual_seed(0)
    model = vit.vit('vit_micro/4').eval()
    x = torch.randn(2, 3, 32, 32)
    weights = attention.class_token_attention(model, x)  # (N, heads, 1 + L)
    assert weights.shape == (2, 2, 65)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))
    attn, seen = model.blocks[-1].attn, {}
    attn.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0], out=output))
    model(x)
    N, T, D = seen['x'].shape
    v = attn.qkv(seen['x']).view(N, T, 3, 2, D // 2)[:, :, 2].transpose(1, 2)  # (N, heads, T, head dim)
    mixed = (weights[:, :, None] @ v).transpose(1, 2).reshape(N, 1, D)  # the class token's attention output
    torch.testing.assert_close(attn.proj(mixed)[:, 0], seen['out'][:, 0], rtol=1e-5, atol=1e-6)


def timm_layout(model):
    """The state dict a timm / DINO file holds for `model`: prefixed, a pos_embed slot for the class
    token, and a classifier head."""
    sd = {f'module.{k}': v.clone() for k, v in model.state_dict().items()}
    cls_pos = torch.randn(1, 1, model.embed_dim) * 0.02
    sd['module.pos_embed'] = torch.cat([cls_pos, sd['module.pos_embed']], 1)
    sd['module.cls_token'] = sd['module.cls_token'] - cls_pos  # so that the folded class token is the model's
    sd['module.head.weight'], sd['module.head.bias'] = torch.randn(10, model.embed_dim), torch.zeros(10)
    return {'state_dict': sd}


def test_published_weights_load_with_their_shape_inferred_and_the_png_is_written(tmp_path):
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, pos_embed='learned').eval()
    torch.save(timm_layout(model), tmp_path / 'published.pth')
    assert vit.infer_args(timm_layout(model)) == dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                                      mlp_ratio=4.0, pos_embed='learned')
    loaded, ckpt = eval_linear.load_checkpoint(str(tmp_path / 'published.pth'))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    out = run(str(tmp_path / 'published.pth'), '--out', str(tmp_path / 'a.png'), '--images', '3')
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['heads'] == 2 and result['grid'] == [4, 4] and result['images'] == 3
    png = Image.open(tmp_path / 'a.png')
    assert png.size == (4 * (96 + 6) + 6, 40 + 3 * (96 + 6))  # input, 2 heads, mean; 3 rows


def test_a_training_checkpoint_gets_its_png_beside_it_and_a_cnn_is_refused(tmp_path):
    import rf_resnet
    args = vit.preset_args('vit_micro/4', pos_embed='sincos')
    torch.save({'backbone': vit.VisionTransformer(**args).state_dict(), 'backbone_kind': 'vit', 'backbone_args': args,
                'args': {'data': 'shapes'}, 'step': 3}, tmp_path / 'ckpt.pt')
    out = run(str(tmp_path / 'ckpt.pt'), '--images', '2')
    assert out.returncode == 0, out.stderr
    assert os.path.isfile(tmp_path / 'attention.png') and 'step 3' in out.stdout
    cnn = rf_resnet.preset_args('rf17_small', width=0.125)
    torch.save({'backbone': rf_resnet.RFResNet(**cnn).state_dict(), 'backbone_kind': 'rf_resnet', 'backbone_args': cnn},
               tmp_path / 'cnn.pt')
    bad = run(str(tmp_path / 'cnn.pt'))
    assert bad.returncode == 2 and 'not a ViT' in bad.stderr and bad.stderr.count('\n') == 1
