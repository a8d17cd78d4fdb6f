"""FP8 numerics as vLLM-Omni runs them, applied to a diffusers pipeline in place.

Two mechanisms, one per component kind (see the reference notes in the README):

* DiT linear layers run W8A8: weights become ``float8_e4m3fn`` with one per-tensor scale
  ``amax / 448``; activations are quantized on every call (per token by default, per tensor as an
  option) and the matmul runs in FP8 through ``torch._scaled_mm`` with output and bias in the
  model dtype.  The same code path serves CPU and SM89+ GPUs.
* Text encoder and VAE keep their Linear/Conv2d/Conv3d weights stored in FP8 and dequantize them
  in a forward pre-hook, putting the FP8 tensor back in a post-hook; compute stays in BF16.

Both are reversible without reloading: the DiT layers keep their BF16 weight next to the FP8 copy
and switch per layer, the storage hooks keep a CPU copy of the original weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# vLLM floors dynamic per-token scales so an all-zero row cannot produce a zero (or denormal)
# scale; weights use the seed guide's clamp of amax at 1e-12.
MIN_ACTIVATION_SCALE = 1.0 / (FP8_MAX * 512.0)
MIN_WEIGHT_AMAX = 1e-12
ACTIVATION_SCHEMES = ("token", "tensor")
SCALE_BYTES = 4  # one float32 per-tensor scale per quantized weight


def per_tensor_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """One float32 scale ``amax / 448`` over all ``tensors``.

    Several tensors share a scale when they are shards of one fused layer: vLLM fuses
    ``to_q/to_k/to_v`` in BF16 first and quantizes the fused weight as one tensor.
    """
    amax = torch.stack([t.detach().abs().amax().float() for t in tensors]).amax()
    return (amax.clamp(min=MIN_WEIGHT_AMAX) / FP8_MAX).to(torch.float32)


def quantize_per_tensor(
    tensor: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to e4m3 with a per-tensor float32 scale (``amax / 448`` unless given)."""
    scale = per_tensor_scale(tensor) if scale is None else scale
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activation(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of a 2-D input.

    ``token``: one scale per row, shape (M, 1).  ``tensor``: one scale for the whole input,
    broadcast to (M, 1) so a single ``_scaled_mm`` call (row-wise scales) covers both schemes.
    """
    xf = x.float()
    if scheme == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif scheme == "tensor":
        amax = xf.abs().amax().reshape(1, 1).expand(xf.shape[0], 1)
    else:
        raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}, got {scheme!r}")
    scale = (amax / FP8_MAX).clamp(min=MIN_ACTIVATION_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.contiguous()


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str = "token",
) -> torch.Tensor:
    """``x @ W.T + b`` with W8A8 FP8 operands, FP32 accumulation and output in ``x.dtype``.

    The per-tensor weight scale is expanded to one scale per output channel, which is how vLLM
    feeds a per-tensor weight to a row-wise scaled GEMM.
    """
    out_features = weight_fp8.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    x_fp8, x_scale = quantize_activation(x2d, scheme)
    w_scale = weight_scale.reshape(1, 1).expand(1, out_features).contiguous()
    out = torch._scaled_mm(
        x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype
    )
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` that also holds an FP8 copy of its weight and can run either way.

    Modules are converted by swapping their class, so parameter names, the state dict and the
    BF16 weight stay untouched; ``fp8_enabled`` picks the path on each call.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    fp8_enabled: bool
    activation_scheme: str

    @classmethod
    def convert(
        cls, module: nn.Linear, activation_scheme: str = "token", scale: torch.Tensor | None = None
    ) -> "Fp8Linear":
        """Convert in place (idempotent); ``scale`` is shared by the shards of a fused layer."""
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}")
        if not isinstance(module, cls):
            weight_fp8, scale = quantize_per_tensor(module.weight.data, scale)
            module.__class__ = cls
            module.register_buffer("weight_fp8", weight_fp8.contiguous(), persistent=False)
            module.register_buffer("weight_scale", scale, persistent=False)
            module.fp8_enabled = False
        module.activation_scheme = activation_scheme
        return module  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, self.activation_scheme)


# --- FP8 weight storage for text encoders and VAEs -------------------------------------------

STORAGE_TYPES = (nn.Linear, nn.Conv2d, nn.Conv3d)


@dataclass
class _StorageState:
    original: torch.Tensor  # bit-exact copy of the weight, kept on CPU so it costs no device memory
    weight_fp8: torch.Tensor
    scale: torch.Tensor
    compute_dtype: torch.dtype
    handles: tuple


def _dequantize_pre_hook(module: nn.Module, args) -> None:
    state: _StorageState = module._layerscan_fp8_storage
    module.weight.data = state.weight_fp8.to(state.compute_dtype) * state.scale.to(state.compute_dtype)


def _restore_post_hook(module: nn.Module, args, output) -> None:
    module.weight.data = module._layerscan_fp8_storage.weight_fp8


def _with_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Make ``model.dtype`` keep answering the compute dtype.

    diffusers and transformers derive ``model.dtype`` from the first floating parameter; with
    weights at rest in FP8 pipelines would otherwise cast their latents to float8.
    """
    base = type(model)
    if getattr(base, "_layerscan_storage_base", None) is not None:
        return
    shim = type(f"Fp8Storage{base.__name__}", (base,), {
        "_layerscan_storage_base": base,
        "dtype": property(lambda self: self._layerscan_compute_dtype),
    })
    model._layerscan_compute_dtype = compute_dtype
    model.__class__ = shim


def apply_fp8_weight_storage(model: nn.Module) -> int:
    """Store every Linear/Conv2d/Conv3d weight of ``model`` in FP8; returns how many were converted.

    Idempotent: modules already converted are skipped, so calling it twice changes nothing.
    """
    converted = 0
    compute_dtype = None
    for module in model.modules():
        if not isinstance(module, STORAGE_TYPES) or hasattr(module, "_layerscan_fp8_storage"):
            continue
        weight = module.weight.data
        compute_dtype = compute_dtype or weight.dtype
        weight_fp8, scale = quantize_per_tensor(weight)
        handles = (
            module.register_forward_pre_hook(_dequantize_pre_hook),
            module.register_forward_hook(_restore_post_hook),
        )
        module._layerscan_fp8_storage = _StorageState(
            weight.detach().to("cpu", copy=True), weight_fp8, scale, weight.dtype, handles
        )
        module.weight.data = weight_fp8
        converted += 1
    if converted:
        _with_compute_dtype(model, compute_dtype)
    return converted


def remove_fp8_weight_storage(model: nn.Module) -> int:
    """Undo ``apply_fp8_weight_storage`` bit for bit; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        state = getattr(module, "_layerscan_fp8_storage", None)
        if state is None:
            continue
        for handle in state.handles:
            handle.remove()
        module.weight.data = state.original.to(state.weight_fp8.device)
        del module._layerscan_fp8_storage
        restored += 1
    base = getattr(type(model), "_layerscan_storage_base", None)
    if base is not None:
        model.__class__ = base
        del model._layerscan_compute_dtype
    return restored


def has_fp8_weight_storage(model: nn.Module) -> bool:
    return any(hasattr(m, "_layerscan_fp8_storage") for m in model.modules())
