"""The CPU attention-kernel choice: math for short sequences, PyTorch's default for long ones,
and the same ViT output and gradients either way."""
import torch

from selfsight.backbones.vit import ViTBackbone
from selfsight.nn.attention import CPU_MATH_MAX_TOKENS, attention_kernels


def test_short_cpu_sequences_run_the_math_kernel_and_long_ones_keep_the_default():
    short, long_ = torch.zeros(2, CPU_MATH_MAX_TOKENS, 8), torch.zeros(2, CPU_MATH_MAX_TOKENS + 1, 8)
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernels(short):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernels(long_):
        assert torch.backends.cuda.flash_sdp_enabled()


def test_vit_gives_the_same_features_and_gradients_with_either_kernel(fmnist_small, monkeypatch):
    import selfsight.nn.attention as attention
    x = fmnist_small.images[:8].float().div(255)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2)

    def run(limit, dtype):                 # limit 160: 50 tokens take the math kernel; 0: PyTorch's default (flash)
        monkeypatch.setattr(attention, "CPU_MATH_MAX_TOKENS", limit)
        model = vit.to(dtype)
        model.zero_grad()
        out = model(x.to(dtype))
        out.square().sum().backward()
        return out.detach().double(), model.net.blocks[0].attn.qkv.weight.grad.double().clone()

    ref_out, ref_grad = run(CPU_MATH_MAX_TOKENS, torch.float64)
    scale = ref_grad.abs().max().item()
    for limit in (CPU_MATH_MAX_TOKENS, 0):     # each fp32 kernel as close to the float64 reference
        out, grad = run(limit, torch.float32)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=2e-3 * scale)
