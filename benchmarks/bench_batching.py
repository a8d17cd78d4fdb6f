#!/usr/bin/env python3
"""Does batching pay at full size?  One DiT call on a batch of two against two calls of one.

    python benchmarks/bench_batching.py --out results/runs/batching.json

A layerscan evaluation calls the pipeline once per output, and Qwen-Image's true CFG calls the
DiT twice per step (conditional, then unconditional).  Batching either (two outputs per call,
or the two CFG passes in one DiT call) turns two DiT calls on M tokens into one on 2M.  That
pays only where one call leaves the GPU idle.  Measured on the full-size Qwen-Image DiT (random
weights, built from configs as in ``bench_fullsize_run.py``) with the inputs of a real 1024x1024
call recorded from the pipeline: the median of ``--repeats`` timed rounds, after warm-up, of
(a) two calls of batch 1 and (b) one call of batch 2 (the same inputs twice: the cost of CFG's
two passes or of two outputs, whichever is batched), in BF16 and in FP8 everywhere, eager and
compiled.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_fullsize_run import build_pipeline  # noqa: E402


def record_call(pipe, size: int, steps: int = 1):
    """The DiT's first call of a real pipeline call: (args, kwargs)."""
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append((args, dict(kwargs)))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(prompt="a red fox in fresh snow", height=size, width=size, num_inference_steps=steps,
                 true_cfg_scale=4.0, negative_prompt=" ", generator=torch.Generator("cpu").manual_seed(0))
    finally:
        handle.remove()
    return seen[0]


def doubled(value):
    """A call input for a batch of two: tensors stacked on the batch axis, per-sample lists twice."""
    if torch.is_tensor(value) and value.dim() > 0:
        return torch.cat([value, value])
    if isinstance(value, list):
        return value + value
    return value


def timed(fn, device, repeats: int) -> float:
    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: tests the script")
    args = p.parse_args(argv)

    from layerscan.engine import Fp8Engine
    from layerscan.pipeline import wrap_pipeline
    from layerscan.session import compile_transformer

    device = torch.device("cpu" if args.smoke else "cuda")
    pipe = build_pipeline(device, args.smoke)
    size = 64 if args.smoke else args.size
    call_args, call_kwargs = record_call(pipe, size)
    call_kwargs["return_dict"] = False
    two_args = tuple(doubled(a) for a in call_args)
    two_kwargs = {k: doubled(v) for k, v in call_kwargs.items()}
    tokens = call_kwargs["hidden_states"].shape[1] if "hidden_states" in call_kwargs else None
    loaded = wrap_pipeline(pipe, "fullsize-qwen-image", Path("."), "random-seed-0", device, torch.bfloat16)
    engine = Fp8Engine(loaded)
    dit = pipe.transformer

    def one_by_one():
        with torch.inference_mode():
            dit(*call_args, **call_kwargs)
            dit(*call_args, **call_kwargs)

    def as_pair():
        with torch.inference_mode():
            dit(*two_args, **two_kwargs)

    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            compile_transformer(dit)
        for precision, config in (("BF16", None), ("FP8 everywhere", ())):
            engine.apply(config)
            two_calls = timed(one_by_one, device, args.repeats)
            one_call = timed(as_pair, device, args.repeats)
            rows.append(dict(mode=mode, precision=precision, two_calls_of_one_s=round(two_calls, 4),
                             one_call_of_two_s=round(one_call, 4),
                             gain=round(two_calls / one_call, 4)))
            print(rows[-1], flush=True)
    result = dict(
        command=" ".join(["python", "benchmarks/bench_batching.py", *(argv or sys.argv[1:])]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, python=platform.python_version(), size=size, image_tokens=tokens,
        residency=engine.residency, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
