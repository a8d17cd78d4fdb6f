"""`--compile`: FP8 layers trace under torch.compile."""

from __future__ import annotations

import pytest
import torch

from layerscan import fp8
from layerscan.fp8 import Fp8Linear


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
