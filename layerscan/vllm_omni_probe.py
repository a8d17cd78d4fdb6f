"""Ask an installed vLLM-Omni what it does with a pipeline and a ``quantization_config``.

This file runs *inside the vLLM-Omni environment* (its own Python: vLLM pins a torch of its own),
never inside layerscan's: it imports nothing from layerscan.  ``layerscan.target_check`` starts
it as ``<python> vllm_omni_probe.py`` with a JSON request on stdin and reads one JSON answer
from stdout.

Request: ``{"model_dir": DIR, "configs": {NAME: quantization_config, ...}}``.
For each config it builds vLLM-Omni's own pipeline class for ``DIR`` (chosen by vLLM-Omni from
``model_index.json``, exactly as ``Omni(model=DIR)`` does) and reports, for every vLLM linear
layer, its component, the prefix its skip check saw and the quantization method vLLM chose;
plus every ``ignored_layers`` entry that no layer's prefix matches under vLLM's own
``is_layer_skipped``; or, when building fails (a config form that does not load), the error in
one line.

No inference runs, so this works on a CPU.  The shims below only let the classes be
*constructed* there; none touches the decision under test (``Fp8Config.get_quant_method``,
``is_layer_skipped``, ``ComponentQuantizationConfig.resolve`` and the pipelines' own choice of
which components get the config):

1. platform: vLLM-Omni has no CPU platform; device count 1, ``set_device`` a no-op, devices are
   the CPU, attention resolves to vLLM-Omni's SDPA backend, collectives use gloo;
2. one process group of one (gloo), as the engine's worker makes;
3. a current vLLM config whose ``model_config`` carries the dtype (``is_moe=False``) and whose
   device is the CPU: the online FP8 method reads the dtype from it;
4. the online FP8 method creates its (meta) weights without selecting an FP8 GEMM kernel,
   which needs a GPU;
5. where torchvision cannot load beside vLLM's torch, a stand-in module so that pipeline modules
   importing ``torchvision.transforms.functional`` at the top (Wan 2.2 image-to-video) import.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import sys
import types


def _install_shims():
    import torch
    from vllm_omni.platforms import current_omni_platform

    platform = type(current_omni_platform)
    platform.get_device_count = classmethod(lambda cls: 1)
    platform.set_device = classmethod(lambda cls, device: None)
    platform.get_torch_device = classmethod(lambda cls, *a, **k: torch.device("cpu"))
    platform.get_diffusion_attn_backend_cls = classmethod(
        lambda cls, *a, **k: "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend")
    platform.device_type = "cpu"
    platform.dist_backend = "gloo"

    from vllm_omni.diffusion.distributed import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parallel_state.init_distributed_environment(
        world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0,
        backend="gloo")
    parallel_state.initialize_model_parallel(backend="gloo")

    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    object.__setattr__(config, "model_config",
                       types.SimpleNamespace(dtype=torch.bfloat16, is_moe=False))

    from vllm.model_executor.layers.quantization.online import fp8 as online

    def create_plain_weights(self, layer, *args, **kwargs):
        online.OnlineLinearBase.create_weights(self, layer, *args, **kwargs)

    online.Fp8PerTensorOnlineLinearMethod.create_weights = create_plain_weights
    return set_current_vllm_config(config)


def _stand_in_torchvision() -> None:
    try:
        import torchvision.transforms.functional  # noqa: F401
        return
    except Exception:
        pass
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def _fp8_configs(quant_config) -> list:
    """The per-layer configs inside ``quant_config`` (one, or one per component of a map)."""
    from vllm_omni.quantization.component_config import ComponentQuantizationConfig

    if quant_config is None:
        return []
    if isinstance(quant_config, ComponentQuantizationConfig):
        found = [c for c in quant_config.component_configs.values() if c is not None]
        return found + ([quant_config.default_config] if quant_config.default_config else [])
    return [quant_config]


def _probe_one(model_dir: str, spec) -> dict:
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
    from vllm_omni.diffusion.data import OmniDiffusionConfig
    from vllm_omni.diffusion.registry import initialize_model

    od_config = OmniDiffusionConfig(model=model_dir, dtype=torch.bfloat16, quantization_config=spec)
    od_config.enrich_config()
    pipeline = initialize_model(od_config)
    layers = []
    for name, module in pipeline.named_modules():
        if isinstance(module, LinearBase):
            layers.append({"component": name.split(".", 1)[0],
                           "prefix": getattr(module, "prefix", name.split(".", 1)[-1]),
                           "method": type(module.quant_method).__name__})
    unmatched = []
    for config in _fp8_configs(od_config.quantization_config):
        for entry in getattr(config, "ignored_layers", None) or []:
            hits = [l for l in layers if is_layer_skipped(
                prefix=l["prefix"], ignored_layers=[entry],
                fused_mapping=getattr(config, "packed_modules_mapping", {}) or {},
                match_mode=getattr(config, "ignored_layers_match_mode", "exact"))]
            if not hits and entry not in unmatched:
                unmatched.append(entry)
    return {"pipeline": od_config.model_class_name, "layers": layers, "unmatched": unmatched,
            "error": None}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def main() -> int:
    request = json.load(sys.stdin)
    # vLLM and vLLM-Omni log to stdout (some of it through the file descriptor); the answer must
    # be the only thing there, so everything else goes to stderr.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    if True:
        import vllm
        import vllm_omni

        context = _install_shims()
        _stand_in_torchvision()
        results = {}
        with context:
            for name, spec in request["configs"].items():
                try:
                    results[name] = _probe_one(request["model_dir"], spec)
                except Exception as exc:  # a config form that does not load is an answer
                    results[name] = {"error": _one_line(exc), "layers": [], "unmatched": []}
    answer = {"vllm_omni": getattr(vllm_omni, "__version__", "unknown"),
              "vllm": getattr(vllm, "__version__", "unknown"), "results": results}
    sys.stdout.flush()
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
