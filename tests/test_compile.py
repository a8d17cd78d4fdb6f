"""`--compile`: FP8 layers trace under torch.compile; a compiler failure is named as one."""

from __future__ import annotations

import pytest
import torch

from layerscan import fp8
from layerscan.evaluate import failure_message
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
