"""`--compile`: FP8 configurations run compiled and match eager FP8, BF16 comes back exactly,
the auto strategy's proxy still sees every layer, and a compiler failure is named as one.

The DiT's repeated blocks are compiled by torch.compile (inductor on the CPU here), through the
same ``open_session``/``evaluate`` path as ``layerscan eval --compile``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from layerscan import fp8
from layerscan.evaluate import evaluate, failure_message
from layerscan.fp8 import Fp8Linear
from layerscan.generate import load_png
from layerscan.proxy.scores import Proxies
from layerscan.session import open_session
from layerscan.study import build_study


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_fp8_linear_needs_no_probe_inside_the_trace(monkeypatch, fresh_dynamo):
    # An empty probe cache is a fresh process: the state every compiled FP8 run used to fail in.
    monkeypatch.setattr(fp8, "_BIAS_SUPPORT", {})
    torch.manual_seed(0)
    layer = Fp8Linear.convert(torch.nn.Linear(32, 16).to(torch.bfloat16))
    layer.set_precision(True)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # tracing is what failed
    assert torch.equal(compiled(x), layer(x))


def test_a_compiler_failure_is_named_as_one(fresh_dynamo):
    # What fp8_linear used to do inside a compiled region: read a probe's result on the host.
    def probe_in_trace(x):
        return x * 2 if bool((x == 1).all()) else x

    with pytest.raises(RuntimeError) as info:
        torch.compile(probe_in_trace, fullgraph=True, backend="eager")(torch.ones(4))
    message = failure_message(info.value)
    assert message.startswith("compile error (torch._dynamo.exc.UserError): ")
    assert "data-dependent" in message
    assert failure_message(RuntimeError("boom\nmore")) == "RuntimeError: boom"


def _images(directory, spec) -> np.ndarray:
    return np.stack([load_png(directory / spec.image_name(i))
                     for i in range(len(spec.items()))]).astype(np.int16)


def test_compiled_fp8_matches_eager_and_bf16_comes_back(planted_dir, tmp_path, fresh_dynamo):
    # One prompt, two seeds and guidance 1 (no negative-prompt pass): every DiT call has the same
    # shapes, so each configuration costs one compilation and the test stays short.
    (tmp_path / "prompts.txt").write_text("a red circle on a white background\n")
    values = dict(model=str(planted_dir), prompts=str(tmp_path / "prompts.txt"), seeds=[0, 1],
                  steps=2, height=32, width=32, guidance=1.0, metrics=["ssim", "psnr"],
                  criterion_metric="psnr")
    eager_session = open_session(build_study(values), "cpu", cache_root=tmp_path / "cache",
                                 warn=lambda m: None)
    study = build_study({**values, "compile": True})
    session = open_session(study, "cpu", cache_root=tmp_path / "cache", warn=lambda m: None)
    assert not session.baseline.cached  # its own reference, not the eager one of the same spec

    def run(config, name, on=None):
        on = on or session
        record = evaluate(on.engine, config, on.spec, on.baseline, on.scorer, study.criterion,
                          image_dir=tmp_path / name)
        assert record.status == "complete", record.error
        assert all(math.isfinite(v) for v in [*record.mean.values(), *record.worst.values()])
        return record, _images(tmp_path / name, session.spec)

    compiled, compiled_images = run((), "fp8-compiled")
    assert compiled.execution_mode == "compiled"
    # The planted img_mlp outlier makes the DiT's FP8 visible: ~34.4 dB, where keeping img_mlp
    # in BF16 gives ~52 dB.  Compiled FP8 that silently ran the DiT in BF16 fails here.
    assert compiled.mean["psnr"] < 37.0

    eager, eager_images = run((), "fp8-eager", on=eager_session)
    assert eager.execution_mode == "eager"
    # Measured: compiled and eager FP8 differ by at most 4 pixel levels, 0.69 on average, and
    # 0.05 dB PSNR.  Compiled BF16 alone differs from eager BF16 by up to 2 levels (0.34 on
    # average: inductor keeps fused intermediates in float32); FP8 turns some of those last-bit
    # differences into a flipped e4m3 rounding.  FP8 itself moves the pixels 3.7 levels on
    # average, so 1.5 still tells compiled FP8 from compiled BF16.
    difference = np.abs(compiled_images - eager_images)
    assert difference.mean() <= 1.5 and difference.max() <= 12
    assert abs(compiled.mean["psnr"] - eager.mean["psnr"]) <= 0.5

    graphs = counters["stats"]["unique_graphs"]
    bf16, bf16_images = run(None, "bf16-compiled")
    assert counters["stats"]["unique_graphs"] == graphs  # its graph is still cached: no recompile
    assert np.array_equal(bf16_images, np.stack(session.baseline.images))
    assert bf16.mean == {"ssim": 1.0, "psnr": 100.0}

    # The auto strategy's layer-local proxy hooks every FP8 layer; compiled blocks would run
    # their cached graphs without calling the hooks and score every layer 0.
    proxies = Proxies(session)
    scores = {g.pattern: proxies.score(g.layers) for g in session.loaded.index.groups("family")}
    assert min(scores.values()) > 0 and max(scores, key=scores.get) == "img_mlp"
