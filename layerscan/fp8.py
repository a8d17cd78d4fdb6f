"""FP8 numerics as vLLM-Omni runs them, applied to a diffusers pipeline in place.

Two mechanisms; which component gets which is the target's (``layerscan.profiles``):

* W8A8 linear layers (the DiT's; where a ``vllm-omni`` target quantizes the text encoder, its
  language model too): weights become ``float8_e4m3fn`` with one per-tensor scale ``amax / 448``;
  activations are quantized on every call (per token by default, per tensor as an option) and
  the matmul runs on the FP8 operands (``torch._scaled_mm`` on GPUs, the same arithmetic in FP32
  on CPUs, see ``fp8_linear``) with output and bias in the model dtype.
* FP8 weight storage (the ``seed`` target's text encoder and VAE): Linear/Conv2d/Conv3d weights
  stored in FP8, dequantized in a forward pre-hook and put back in a post-hook; compute stays in
  BF16.

Both are reversible without reloading: W8A8 layers keep their BF16 weight next to the FP8 copy
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


def _triton_per_token_quantizer():
    """Per-token activation quantization as one Triton kernel: one read, one write per element.

    As separate PyTorch ops (abs, amax, divide, clamp, cast) the quantization costs five passes
    and five launches per layer; on a 20B DiT that launch overhead alone exceeds the FP8 GEMM's
    gain.  Same arithmetic as ``quantize_activation`` (IEEE division, round-to-nearest cast).
    Returns None where Triton is unavailable.
    """
    global _TRITON_QUANT
    if _TRITON_QUANT is not None:
        return _TRITON_QUANT or None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON_QUANT = False
        return None

    @triton.jit
    def kernel(x_ptr, q_ptr, s_ptr, n_cols, x_stride, q_stride,
               BLOCK: tl.constexpr, FMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FMAX, MIN_SCALE)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FMAX), FMAX)
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)

    def quantize(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
        rows, cols = x2d.shape
        q = torch.empty((rows, cols), device=x2d.device, dtype=FP8_DTYPE)
        scales = torch.empty((rows, 1), device=x2d.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        kernel[(rows,)](x2d, q, scales, cols, x2d.stride(0), q.stride(0), BLOCK=block,
                        FMAX=FP8_MAX, MIN_SCALE=MIN_ACTIVATION_SCALE,
                        num_warps=min(16, max(4, block // 1024)))
        return q, scales

    _TRITON_QUANT = quantize
    return quantize


_TRITON_QUANT = None


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str = "token",
    quantized_input: tuple[torch.Tensor, torch.Tensor] | None = None,
    weight_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + b`` with W8A8 FP8 operands, FP32 accumulation and output in ``x.dtype``.

    The per-tensor weight scale is expanded to one scale per output channel, which is how vLLM
    feeds a per-tensor weight to a row-wise scaled GEMM.  ``quantized_input`` lets the shards of
    a fused layer share one quantization of their common input.

    On the CPU the same arithmetic runs as an FP32 GEMM of the e4m3 values: every e4m3 value and
    every product of two is exact in FP32, the sum accumulates in FP32, and the row and column
    scales and the bias are applied to the FP32 result before its one rounding to ``x.dtype`` —
    what ``torch._scaled_mm`` computes, up to the order of the FP32 accumulation
    (tests/test_fp8.py compares them).  ``weight_values``: ``weight_fp8`` already widened to
    FP32 (exact), which a layer keeps on the CPU because widening e4m3 is the slowest step there.
    GPUs keep the real FP8 GEMM.
    """
    out_features = weight_fp8.shape[0]
    if quantized_input is None:
        quantized_input = quantize_input(x, scheme)
    x_fp8, x_scale = quantized_input
    w_scale = weight_scale if weight_scale.dim() == 2 else row_scale(weight_scale, out_features)
    if x_fp8.device.type == "cpu":
        values = weight_fp8.float() if weight_values is None else weight_values
        out = (x_fp8.float() @ values.t()) * x_scale * w_scale
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
    fused_bias = bias is not None and _scaled_mm_takes_bias(x.device.type)
    out = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=bias if fused_bias else None, out_dtype=x.dtype)
    if bias is not None and not fused_bias:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)


_BIAS_SUPPORT: dict[str, bool] = {}


def _scaled_mm_takes_bias(device_type: str) -> bool:
    """Whether this build's row-wise ``_scaled_mm`` adds a BF16 bias in its epilogue.

    Probed once per device type: where it does, the bias costs no separate kernel launch.  The
    probe reads a result back to the host, which a compiled region cannot do (dynamo stops with
    "Could not guard on data-dependent expression"), so ``Fp8Linear.set_precision`` probes
    eagerly before any FP8 forward and traced code only reads the recorded answer.  Guessing
    inside a trace is no option: a fused and a separate bias add round differently, and compiled
    and eager runs must compute the same thing.
    """
    if device_type not in _BIAS_SUPPORT:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"torch._scaled_mm's bias support on {device_type!r} must be probed before "
                f"compiling: call layerscan.fp8._scaled_mm_takes_bias({device_type!r}) eagerly "
                "first (Fp8Linear.set_precision does)")
        a = torch.ones(16, 16, device=device_type).to(FP8_DTYPE)
        s = torch.ones(16, 1, device=device_type)
        try:
            out = torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t().contiguous(),
                                   bias=torch.ones(16, device=device_type, dtype=torch.bfloat16),
                                   out_dtype=torch.bfloat16)
            _BIAS_SUPPORT[device_type] = bool((out == 17).all())
        except (RuntimeError, TypeError):
            _BIAS_SUPPORT[device_type] = False
    return _BIAS_SUPPORT[device_type]


def row_scale(weight_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """The per-tensor scale as one scale per output channel, shape (1, N)."""
    return weight_scale.reshape(1, 1).expand(1, out_features).contiguous()


def quantize_input(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten to 2-D and quantize: one Triton kernel on CUDA in eager mode (torch.compile
    fuses the reference ops by itself), the reference ops everywhere else."""
    x2d = x.reshape(-1, x.shape[-1])
    if x.is_cuda and scheme == "token" and not torch.compiler.is_compiling():
        quantize = _triton_per_token_quantizer()
        if quantize is not None:
            return quantize(x2d)
    return quantize_activation(x2d, scheme)


class SharedInput:
    """One quantized input shared by the shards of a fused layer (to_q/to_k/to_v see the same x).

    vLLM runs the fused layer as one GEMM with one activation quantization; diffusers calls each
    shard on the same tensor.  The input is recognised by identity (holding the reference keeps
    its memory from being reused by another tensor) and released after the last shard's call.
    """

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.clear()

    def get(self, x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Inference-mode tensors keep no version counter; shards never modify their input.
        version = None if x.is_inference() else x._version
        if self._input is not x or self._version != version:
            self._input, self._version, self._uses = x, version, 0
            self._value = quantize_input(x, scheme)
        value = self._value
        self._uses += 1
        if self._uses == self.shards:
            self.clear()
        return value

    def clear(self) -> None:
        self._input = self._value = self._version = None
        self._uses = 0


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` that can run either in BF16 or FP8 W8A8, switched in place.

    Modules are converted by swapping their class, so parameter names and the state dict stay
    untouched.  Two residencies (``set_precision``'s ``keep_bf16``):

    * both copies resident: BF16 weight and FP8 weight live side by side; a switch flips a flag.
    * re-quantize on switch: the device holds only what the configuration needs (FP8 weight for
      quantized layers, BF16 for the others); a CPU master copy of the BF16 weight makes every
      switch exact and reversible.  This is the mode for models whose two copies do not fit.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    fp8_enabled: bool
    activation_scheme: str
    shared_input: SharedInput | None
    bf16_master: torch.Tensor | None

    @classmethod
    def convert(
        cls,
        module: nn.Linear,
        activation_scheme: str = "token",
        scale: torch.Tensor | None = None,
        shared_input: SharedInput | None = None,
    ) -> "Fp8Linear":
        """Convert in place (idempotent); ``scale`` is shared by the shards of a fused layer.

        The FP8 copy is made on the first ``set_precision(fp8=True)``.
        """
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}")
        if not isinstance(module, cls):
            weight = module.weight.data
            module.__class__ = cls
            module.register_buffer("weight_fp8", weight.new_empty(0, dtype=FP8_DTYPE), persistent=False)
            # On the CPU: weight_fp8's values in FP32, widened once per version of weight_fp8
            # (see fp8_linear and _widened_weight).
            module.register_buffer("weight_fp8_values", weight.new_empty(0, dtype=torch.float32),
                                   persistent=False)
            module.widened_version = None
            module.register_buffer("weight_scale", per_tensor_scale(weight) if scale is None
                                   else scale.to(weight.device), persistent=False)
            # Expanded once here rather than on every call: a kernel launch per layer saved.
            module.register_buffer("weight_scale_row",
                                   row_scale(module.weight_scale, module.out_features),
                                   persistent=False)
            module.fp8_enabled = False
            module.bf16_master = None
        module.activation_scheme = activation_scheme
        module.shared_input = shared_input
        return module  # type: ignore[return-value]

    def set_precision(self, fp8: bool, keep_bf16: bool = True) -> None:
        device = self.weight_scale.device
        if fp8 and self.weight_fp8.numel() == 0:
            source = self.weight.data if self.weight.numel() else self.bf16_master.to(device)
            self.weight_fp8 = quantize_per_tensor(source, self.weight_scale)[0].contiguous()
        if not fp8:  # the CPU's widened copy lives only while the layer runs in FP8
            self.weight_fp8_values = self.weight_fp8_values.new_empty(0)
            self.widened_version = None
        if not fp8 and self.weight.numel() == 0:
            self.weight.data = self.bf16_master.to(device)
        if not keep_bf16:
            if self.bf16_master is None:
                master = self.weight.data.to("cpu", copy=True)
                self.bf16_master = master.pin_memory() if device.type == "cuda" else master
            if fp8:
                self.weight.data = self.weight.data.new_empty(0)
            else:
                self.weight_fp8 = self.weight_fp8.new_empty(0)
        if fp8:
            _scaled_mm_takes_bias(device.type)  # here, eagerly: a compiled forward cannot probe
        self.fp8_enabled = fp8
        if self.shared_input is not None:
            self.shared_input.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        shared = None
        if self.shared_input is not None and not torch.compiler.is_compiling():
            shared = self.shared_input.get(x, self.activation_scheme)
        return fp8_linear(x, self.weight_fp8, self.weight_scale_row, self.bias,
                          self.activation_scheme, shared, self._widened_weight())

    def _widened_weight(self) -> torch.Tensor | None:
        """``weight_fp8`` in FP32 for the CPU's arithmetic, kept while ``weight_fp8`` is unchanged
        (its version counter tells an in-place write); None where fp8_linear widens per call:
        on GPUs, inside a compiled graph, or for a weight made in inference mode (no counter)."""
        weight = self.weight_fp8
        if (weight.device.type != "cpu" or torch.compiler.is_compiling()
                or weight.is_inference()):
            return None
        key = (weight.data_ptr(), weight._version)
        if self.widened_version != key or self.weight_fp8_values.numel() != weight.numel():
            self.weight_fp8_values = weight.float()
            self.widened_version = key
        return self.weight_fp8_values


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


def _release_post_hook(module: nn.Module, args, output) -> None:
    state: _StorageState = module._layerscan_fp8_storage
    module.weight.data = state.weight_fp8.new_empty(0, dtype=state.compute_dtype)


def apply_fp8_weight_storage(model: nn.Module) -> int:
    """Store every Linear/Conv2d/Conv3d weight of ``model`` in FP8; returns how many were converted.

    At rest each weight parameter is an empty tensor of the compute dtype and the FP8 copy is a
    plain attribute: ``model.dtype`` (the first floating parameter's) keeps answering the compute
    dtype, so pipelines cast their inputs as before, and the module keeps its class (transformers
    5 records hidden states through hooks tied to it).  Idempotent: modules already converted
    are skipped, so calling it twice changes nothing.
    """
    converted = 0
    for module in model.modules():
        if not isinstance(module, STORAGE_TYPES) or hasattr(module, "_layerscan_fp8_storage"):
            continue
        weight = module.weight.data
        weight_fp8, scale = quantize_per_tensor(weight)
        handles = (
            module.register_forward_pre_hook(_dequantize_pre_hook),
            module.register_forward_hook(_release_post_hook),
        )
        module._layerscan_fp8_storage = _StorageState(
            weight.detach().to("cpu", copy=True), weight_fp8, scale, weight.dtype, handles
        )
        module.weight.data = weight.new_empty(0)
        converted += 1
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
    return restored


def fp8_storage_bytes(model: nn.Module) -> int:
    """Bytes of the FP8 weight copies held at rest (what storage puts in the weights' place)."""
    return sum(m._layerscan_fp8_storage.weight_fp8.numel() for m in model.modules()
               if hasattr(m, "_layerscan_fp8_storage"))


def has_fp8_weight_storage(model: nn.Module) -> bool:
    return any(hasattr(m, "_layerscan_fp8_storage") for m in model.modules())
