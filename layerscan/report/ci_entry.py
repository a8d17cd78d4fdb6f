"""The entry to paste into vLLM-Omni's FP8 quality test for the recommended configuration.

Upstream guards FP8 quality with one ``QualityTestConfig(...)`` per model in
``tests/diffusion/quantization/test_quantization_quality.py`` of vllm-project/vllm-omni (the
form below was read at commit 06329c027bfc37bd1654e3ae84312728fbdcb5a1).  An entry names the
model, the ``quantization`` passed to ``Omni(quantization_config=...)``, the task (``t2i`` or
``t2v``), one prompt and seed, the generation settings, and ``max_lpips``: a float, or a dict of
thresholds per GPU (``{"H100": 0.15, "B200": 0.17}``), written to two decimals; the test asserts
``lpips <= max_lpips`` on that one image or clip.

The threshold is derived from the measurement rather than guessed.  Upstream scores one output
(the entry's prompt and seed: the study's first), so the base is the larger of the upper end of
the recommended configuration's LPIPS mean interval and that output's own LPIPS; to it goes the
noise floor's worst LPIPS (what BF16 itself varies by under numerically equivalent changes,
which upstream's single image is subject to as well); the sum is rounded up to two decimals.
An entry that cannot be upstream's (no LPIPS measured, measured on the CPU where FP8 is emulated
eagerly, an editing pipeline the test has no task for, an answer that is not final) says why
and is marked not for upstream.
"""

from __future__ import annotations

import ast
import math
import re

from layerscan.errors import UserError

UPSTREAM = {"repository": "vllm-project/vllm-omni",
            "path": "tests/diffusion/quantization/test_quantization_quality.py",
            "commit": "06329c027bfc37bd1654e3ae84312728fbdcb5a1"}
# QualityTestConfig's fields at that commit, in its order; the first four have no default.
UPSTREAM_FIELDS = ("id", "task", "prompt", "max_lpips", "model", "quantization", "baseline_model",
                   "quantized_model", "height", "width", "num_inference_steps", "num_frames", "seed",
                   "negative_prompt", "guidance_scale", "sigmas", "enable_cpu_offload")
REQUIRED_FIELDS = UPSTREAM_FIELDS[:4]
THRESHOLD_DECIMALS = 2


def round_up(value: float, decimals: int = THRESHOLD_DECIMALS) -> float:
    """``value`` rounded up at ``decimals`` (a threshold is never tighter than measured)."""
    scale = 10 ** decimals
    return math.ceil(value * scale - 1e-9) / scale


def gpu_key(device_name: str | None) -> str | None:
    """The SKU upstream keys thresholds by: "NVIDIA H100 80GB HBM3" -> "H100"; None off GPUs."""
    if not device_name:
        return None
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name)
    return match.group(1) if match else device_name


def entry_id(model: str) -> str:
    return "fp8_" + re.sub(r"[^a-z0-9]+", "_", model.rsplit("/", 1)[-1].lower()).strip("_")


def build_entry(*, model: str, quantization: dict | None, video: bool, edit: bool, prompt: str,
                seed: int, steps: int, height: int, width: int, guidance: float,
                num_frames: int | None, lpips_ci_high: float | None, lpips_first: float | None,
                lpips_floor: float | None, device_name: str | None, metric: str,
                final: bool = True) -> dict:
    """The entry's fields, the threshold's derivation, and whether it is for upstream."""
    fields = {"id": entry_id(model), "model": model, "quantization": quantization,
              "task": "t2v" if video else "t2i", "prompt": prompt, "max_lpips": None,
              "height": height, "width": width, "num_inference_steps": steps, "seed": seed,
              "guidance_scale": guidance}
    if video and num_frames is not None:
        fields["num_frames"] = num_frames
    reasons = []
    derivation = None
    if lpips_ci_high is None or lpips_floor is None or math.isnan(lpips_ci_high):
        reasons.append(f"LPIPS was not measured (scored with {metric}); max_lpips cannot be derived")
    else:
        base = max(lpips_ci_high, lpips_first if lpips_first is not None else lpips_ci_high)
        threshold = round_up(base + lpips_floor)
        fields["max_lpips"] = threshold
        derivation = {"lpips_ci95_high": lpips_ci_high, "lpips_of_this_output": lpips_first,
                      "noise_floor_worst_lpips": lpips_floor, "sum": base + lpips_floor,
                      "rounded_up": threshold}
    if device_name is None:
        reasons.append("measured on the CPU, where FP8 is emulated eagerly; upstream's test runs "
                       "on GPUs: measure there")
    if edit:
        reasons.append("the quality test has no task for editing pipelines (t2i and t2v only)")
    if quantization is None:
        reasons.append("no configuration passed, so there is nothing to guard")
    if not final:
        reasons.append("the answer is not final (see the report)")
    return {"fields": fields, "gpu": gpu_key(device_name), "device": device_name,
            "derivation": derivation, "for_upstream": not reasons, "not_for_upstream": reasons,
            "upstream": UPSTREAM}


def merge_by_gpu(entries: list[dict]) -> list[dict]:
    """Entries for one model measured on several GPUs become one with per-GPU thresholds."""
    merged: dict[str, dict] = {}
    for entry in entries:
        key = entry["fields"]["id"]
        if key not in merged:
            merged[key] = {**entry, "fields": dict(entry["fields"]), "gpus": {}}
        held = merged[key]
        differ = sorted(k for k in set(held["fields"]) | set(entry["fields"])
                        if k != "max_lpips" and held["fields"].get(k) != entry["fields"].get(k))
        if differ:
            raise UserError(f"two reports for {key} differ in {', '.join(differ)}: one entry per "
                            "configuration and settings; merge only runs of the same study")
        if entry["gpu"] and entry["fields"]["max_lpips"] is not None:
            # The same GPU twice: the looser threshold, so that neither run would fail it.
            held["gpus"][entry["gpu"]] = max(entry["fields"]["max_lpips"],
                                             held["gpus"].get(entry["gpu"], 0.0))
        held["for_upstream"] = held["for_upstream"] and entry["for_upstream"]
        held["not_for_upstream"] = sorted(set(held["not_for_upstream"]) | set(entry["not_for_upstream"]))
    for held in merged.values():
        if len(held["gpus"]) > 1:
            held["fields"]["max_lpips"] = dict(sorted(held["gpus"].items()))
        elif held["gpus"]:
            held["fields"]["max_lpips"] = next(iter(held["gpus"].values()))
    return list(merged.values())


def render_entry(entry: dict) -> str:
    """The entry as Python source, as it would sit in upstream's ``QUALITY_CONFIGS`` list."""
    fields = entry["fields"]
    order = [name for name in UPSTREAM_FIELDS if name in fields]
    lines = []
    if not entry["for_upstream"]:
        lines += [f"# NOT FOR UPSTREAM: {reason}" for reason in entry["not_for_upstream"]]
    derivation = entry.get("derivation")
    if derivation and not isinstance(fields["max_lpips"], dict):
        where = f" on {entry['device']}" if entry.get("device") else " on the CPU"
        first = derivation["lpips_of_this_output"]
        lines.append(f"# max_lpips: max(LPIPS mean's 95 % CI upper end {derivation['lpips_ci95_high']:.4f}, "
                     f"this output's {first if first is None else format(first, '.4f')}) + noise floor "
                     f"{derivation['noise_floor_worst_lpips']:.4f} (worst), rounded up (measured{where})")
    lines.append("QualityTestConfig(")
    lines += [f"    {name}={_literal(fields[name])}," for name in order]
    lines.append("),")
    return "\n".join(lines)


def _literal(value) -> str:
    """A Python literal for JSON-shaped ``value`` (``None``/``True``, not ``null``/``true``)."""
    text = repr(value)
    ast.literal_eval(text)  # what upstream's file holds must be a plain literal
    return text


def parse_entry(source: str) -> dict:
    """The keyword values of one rendered ``QualityTestConfig(...)`` (comments ignored); raises
    ValueError when it is not one upstream's test could hold."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    tree = ast.parse(code.rstrip().rstrip(","), mode="eval")
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and call.func.id == "QualityTestConfig" and not call.args):
        raise ValueError("not a QualityTestConfig(...) call with keyword arguments")
    values = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    unknown = set(values) - set(UPSTREAM_FIELDS)
    missing = set(REQUIRED_FIELDS) - set(values)
    if unknown or missing:
        raise ValueError(f"unknown fields {sorted(unknown)}, missing {sorted(missing)}")
    return values
