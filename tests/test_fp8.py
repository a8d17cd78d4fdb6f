"""FP8 numerics against a float64 reference, bounded by what e4m3 can represent."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from layerscan.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    apply_fp8_weight_storage,
    fp8_storage_bytes,
    fp8_linear,
    has_fp8_weight_storage,
    per_tensor_scale,
    quantize_activation,
    quantize_per_tensor,
    remove_fp8_weight_storage,
    row_scale,
)

# e4m3 has 3 mantissa bits: round-to-nearest relative error is at most 2**-4 for normal values.
E4M3_REL = 2.0 ** -4
E4M3_MIN_NORMAL = 2.0 ** -6


def test_e4m3_constants_match_torch():
    assert FP8_MAX == 448.0
    assert float(torch.tensor(1000.0).to(FP8_DTYPE).float().clamp(max=1e9)) != 1000.0


def test_weight_scale_is_amax_over_448_and_storage_is_float8():
    torch.manual_seed(0)
    w = torch.randn(64, 32, dtype=torch.bfloat16) * 3
    q, scale = quantize_per_tensor(w)
    assert q.dtype == FP8_DTYPE
    assert scale.dtype == torch.float32 and scale.numel() == 1
    assert torch.isclose(scale, w.float().abs().max() / 448.0)
    # The largest weight lands exactly on the e4m3 maximum.
    assert q.float().abs().max().item() == 448.0


def test_dequantized_weight_error_within_e4m3_bound():
    torch.manual_seed(1)
    w = torch.randn(128, 64, dtype=torch.float64)
    q, scale = quantize_per_tensor(w)
    deq = q.double() * scale.double()
    normal = (w.abs() / scale.double()) >= E4M3_MIN_NORMAL
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max().item() <= E4M3_REL + 1e-12
    # Subnormals: absolute error at most half the subnormal step (2**-10) times the scale.
    assert ((deq - w).abs()[~normal] <= 2.0 ** -10 * scale.double() + 1e-15).all()


def test_fused_shards_share_one_scale():
    a, b = torch.randn(8, 8), torch.randn(8, 8) * 10
    assert torch.isclose(per_tensor_scale(a, b), b.abs().max() / 448.0)


def test_per_token_activation_scales():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -4.0], [0.0, 0.0, 0.0]])
    q, s = quantize_activation(x, "token")
    assert s.shape == (3, 1)
    assert torch.allclose(s[:2, 0], torch.tensor([2.0 / 448, 100.0 / 448]))
    assert s[2, 0] > 0  # an all-zero row still gets a usable scale
    _, st = quantize_activation(x, "tensor")
    assert torch.allclose(st, torch.full((3, 1), 100.0 / 448))


def _reference(x, w, b):
    """float64 result of the exact same quantization: isolates the matmul from quant error."""
    return x.double() @ w.double().t() + (b.double() if b is not None else 0)


def test_fp8_linear_against_float64_reference():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 48, dtype=torch.bfloat16)
    w = torch.randn(32, 48, dtype=torch.bfloat16)
    b = torch.randn(32, dtype=torch.bfloat16)
    wq, ws = quantize_per_tensor(w)
    out = fp8_linear(x, wq, ws, b, "token")
    assert out.dtype == torch.bfloat16 and out.shape == (4, 5, 32)
    exact = _reference(x, w, b)
    # Each operand carries at most 2**-4 relative error (e4m3), so per product term the error is
    # bounded by ~2*2**-4 of |x||w|; sum those magnitudes for the bound, plus bf16 output rounding.
    bound = 2.2 * E4M3_REL * (x.double().abs() @ w.double().abs().t()) + 2 ** -7 * exact.abs() + 1e-3
    assert ((out.double() - exact).abs() <= bound).all()
    # And the FP8 result is a genuinely different (quantized) computation, not a BF16 matmul.
    assert not torch.equal(out, torch.nn.functional.linear(x, w, b))


def test_fp8_linear_matches_dequantized_math_closely():
    torch.manual_seed(3)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    wq, ws = quantize_per_tensor(w)
    xq, xs = quantize_activation(x, "token")
    expected = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    out = fp8_linear(x, wq, ws, None, "token")
    # Only FP32 accumulation and the final bf16 rounding separate the two.
    assert torch.allclose(out.double(), expected, rtol=2 ** -7, atol=1e-3)


def test_fp8_linear_module_switches_and_keeps_bf16_bit_exact():
    torch.manual_seed(4)
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    before = lin(x)
    Fp8Linear.convert(lin)
    Fp8Linear.convert(lin)  # idempotent
    assert isinstance(lin, Fp8Linear)
    assert set(dict(lin.state_dict())) == {"weight", "bias"}  # names unchanged
    assert torch.equal(lin(x), before)
    lin.set_precision(True)
    assert lin.weight_fp8.dtype == FP8_DTYPE
    fp8_out = lin(x)
    assert not torch.equal(fp8_out, before)
    # The CPU keeps the e4m3 values widened to FP32 once; the result is the same to the bit.
    assert torch.equal(lin.weight_fp8_values, lin.weight_fp8.float())
    widened = lin.weight_fp8_values.data_ptr()
    lin(x)
    assert lin.weight_fp8_values.data_ptr() == widened  # reused, not widened again
    assert torch.equal(fp8_out, fp8_linear(x, lin.weight_fp8, lin.weight_scale_row, lin.bias))
    saved = lin.weight_fp8.clone()
    lin.weight_fp8.fill_(float("nan"))  # an in-place write is seen: the widened copy follows it
    assert torch.isnan(lin(x)).all()
    lin.weight_fp8.copy_(saved)
    assert torch.equal(lin(x), fp8_out)
    lin.set_precision(False)
    assert torch.equal(lin(x), before)
    assert lin.weight_fp8_values.numel() == 0  # freed while the layer runs in BF16


def test_requantize_residency_holds_only_what_the_configuration_needs():
    torch.manual_seed(6)
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    before = lin(x)
    Fp8Linear.convert(lin)
    lin.set_precision(True, keep_bf16=True)
    both = lin(x)
    lin.set_precision(True, keep_bf16=False)
    assert lin.weight.numel() == 0 and lin.weight_fp8.numel() == 16 * 32  # FP8 only
    assert torch.equal(lin(x), both)
    lin.set_precision(False, keep_bf16=False)
    assert lin.weight_fp8.numel() == 0 and lin.weight.shape == (16, 32)  # BF16 only
    assert lin.weight_fp8_values.numel() == 0  # the CPU's widened copy goes with it
    assert torch.equal(lin(x), before)  # restored from the master copy, bit for bit
    lin.set_precision(True, keep_bf16=False)  # re-quantized from the master copy
    assert torch.equal(lin(x), both)


def test_fused_shards_quantize_their_shared_input_once():
    from layerscan.fp8 import SharedInput

    torch.manual_seed(7)
    shared = SharedInput(3)
    shards = [Fp8Linear.convert(nn.Linear(32, 16).to(torch.bfloat16), shared_input=shared)
              for _ in range(3)]
    for m in shards:
        m.set_precision(True)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    alone = [fp8_linear(x, m.weight_fp8, m.weight_scale, m.bias) for m in shards]
    calls = []
    original = shared.get
    shared.get = lambda t, s: calls.append(t) or original(t, s)
    outs = [m(x) for m in shards]
    assert all(torch.equal(a, b) for a, b in zip(alone, outs))
    assert len(calls) == 3 and shared._input is None  # released after the last shard
    y = x.clone()
    assert torch.equal(shards[0](y), alone[0])  # a new tensor is quantized afresh


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv3 = nn.Conv3d(2, 4, 1)
        self.norm = nn.LayerNorm(16)


def test_weight_storage_hooks_fp8_at_rest_bf16_in_forward_and_reversible():
    torch.manual_seed(5)
    model = _Tiny().to(torch.bfloat16)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    img = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    ref = model.lin(x)
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())

    assert apply_fp8_weight_storage(model) == 3
    assert apply_fp8_weight_storage(model) == 0  # idempotent
    assert has_fp8_weight_storage(model)
    for m in (model.lin, model.conv, model.conv3):
        # At rest: an empty compute-dtype parameter, the weight in FP8 beside it.
        assert m.weight.numel() == 0 and m.weight.dtype == torch.bfloat16
        assert m._layerscan_fp8_storage.weight_fp8.dtype == FP8_DTYPE
    assert model.norm.weight.dtype == torch.bfloat16
    seen = {}
    model.lin.register_forward_pre_hook(lambda m, a: seen.update(shape=tuple(m.weight.shape)))
    out = model.lin(x)
    assert seen["shape"] == tuple(originals["lin.weight"].shape)  # dequantized for compute (hook order: ours first)
    assert model.lin.weight.numel() == 0  # and released afterwards
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), atol=0.15, rtol=0.1)
    assert model.conv(img).dtype == torch.bfloat16
    bytes_fp8 = sum(p.numel() * p.element_size() for p in model.parameters()) + fp8_storage_bytes(model)
    weights = sum(m._layerscan_fp8_storage.weight_fp8.numel() for m in (model.lin, model.conv, model.conv3))
    assert bytes_before - bytes_fp8 == weights  # one byte saved per stored weight

    assert remove_fp8_weight_storage(model) == 3
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, originals[n])
    assert torch.equal(model.lin(x), ref)


def test_weight_storage_keeps_model_dtype_reporting_compute_dtype():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",)).to(torch.bfloat16)
    apply_fp8_weight_storage(vae)
    assert vae.dtype == torch.bfloat16  # pipelines cast latents to vae.dtype
    out = vae.decode(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)).sample
    assert torch.isfinite(out.float()).all()
    remove_fp8_weight_storage(vae)
    assert type(vae) is AutoencoderKL


def test_weight_storage_keeps_transformers_hidden_states():
    """transformers 5 records hidden states through hooks tied to the model: storage must leave
    the model as it is (a changed class returned hidden_states=None)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=16)).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    apply_fp8_weight_storage(model)
    out = model(input_ids=ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["token", "tensor"])
@pytest.mark.parametrize("m,k,n", [(64, 192, 576), (77, 768, 3072), (128, 3072, 768), (5, 32, 48)])
def test_cpu_path_equals_scaled_mm_within_accumulation_rounding(m, k, n, scheme):
    """The CPU's FP32 GEMM of the e4m3 values against torch._scaled_mm on the same operands:
    both sum exact products in FP32 and round once; only the order of the sum may differ, so an
    output differs by at most one BF16 step, and rarely."""
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, dtype=torch.bfloat16) * 2
    x[:, 3] *= 60  # an outlier channel, as real activations have
    weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.05
    bias = torch.randn(n, dtype=torch.bfloat16)
    w_fp8, w_scale = quantize_per_tensor(weight)
    ours = fp8_linear(x, w_fp8, w_scale, bias, scheme)
    x_fp8, x_scale = quantize_activation(x, scheme)
    reference = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=row_scale(w_scale, n),
                                 out_dtype=torch.bfloat16) + bias
    # The reference adds the bias after its own rounding: compare with the bias the same way.
    unbiased = fp8_linear(x, w_fp8, w_scale, None, scheme)
    scaled = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=row_scale(w_scale, n),
                              out_dtype=torch.bfloat16)
    # One BF16 step of the result, plus what a different FP32 summation order can change when
    # large products cancel (the classic bound: k units of FP32 roundoff on the sum of |products|).
    magnitude = (x_fp8.float().abs() @ w_fp8.float().abs().t()) * x_scale * row_scale(w_scale, n)
    tolerance = torch.finfo(torch.bfloat16).eps * scaled.float().abs() + k * 2.0**-24 * magnitude
    assert ((unbiased.float() - scaled.float()).abs() <= tolerance).all()
    assert (unbiased != scaled).float().mean() < 0.01
    # With the bias applied before the one rounding, ours is at least as close to the exact value.
    exact = (x_fp8.double() @ w_fp8.double().t()) * x_scale.double() * w_scale.double() + bias.double()
    assert (ours.double() - exact).abs().mean() <= (reference.double() - exact).abs().mean() * 1.001
