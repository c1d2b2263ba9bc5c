"""`qkvlab.nn.linear.Linear`: few-row CPU inference through the weight-streaming kernel equals nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import build_model
from qkvlab.nn import kv_decode, linear
from tests.core.helpers import ATOL, full_and_steps, randomize_, small


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 33, 64, 128])
@pytest.mark.parametrize("N, K", [(384, 128), (200, 48), (75, 40), (64, 1536), (100, 37), (7, 300), (1, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_equals_f_linear(M, N, K, bias):
    """Row counts up to the most `max_rows` allows (blocks of four and the rest); whole chunks of 64 weight rows
    (the four streams), a partial chunk after them (200), an odd partial chunk with K a multiple of 8 but not of 16
    (75, 40: AVX2's two weight streams and the row left over), sizes that are no multiple of the lanes."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    got = linear.small_linear(x, w, b)
    assert got is not None and torch.allclose(got, F.linear(x, w, b), atol=1e-4)


def test_strided_inputs_and_leading_dims_keep_their_shape():
    x = torch.randn(2, 1, 9, 64)[..., :48]  # a strided view of a wider tensor
    w = torch.randn(96, 48)
    got = linear.small_linear(x[:, :, :4], w, None)  # (2, 1, 4, 48): 8 rows
    assert got.shape == (2, 1, 4, 96) and torch.allclose(got, F.linear(x[:, :, :4], w), atol=1e-4)


def _counting(monkeypatch) -> list:
    calls: list = []
    real = linear.small_linear
    monkeypatch.setattr(linear, "small_linear", lambda *a: calls.append(1) or real(*a))
    return calls


def test_the_layer_takes_the_kernel_only_for_few_row_float_inference(monkeypatch):
    limit = linear.max_rows()
    calls = _counting(monkeypatch)
    layer = linear.Linear(128, 256)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    few, many = torch.randn(3, 128), torch.randn(limit + 1, 128)
    with torch.no_grad():
        assert torch.allclose(layer(few), F.linear(few, layer.weight, layer.bias), atol=1e-4) and len(calls) == 1
        layer(many)  # more than max_rows() rows
        layer.double()(few.double())  # float64
        assert len(calls) == 1
    layer.float()
    out = layer(few)  # gradients wanted: autograd's path
    out.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None
    with torch.no_grad():
        linear.Linear(8, 16)(torch.randn(1, 8))  # a weight below MIN_WEIGHT
    assert len(calls) == 1


@pytest.mark.parametrize("vendor, rows", [("AuthenticAMD", 128), ("GenuineIntel", 8), ("", 8)])
def test_the_row_limit_follows_the_cpu(vendor, rows, monkeypatch):
    """AMD CPUs take up to 128 rows (PyTorch's BLAS is slow there at 16-128), others 8; read once."""
    asked = []
    monkeypatch.setattr(linear, "_cpu_vendor", lambda: asked.append(1) or vendor)
    linear.max_rows.cache_clear()
    try:
        assert linear.max_rows() == rows and linear.max_rows() == rows and asked == [1]
    finally:
        linear.max_rows.cache_clear()


def test_the_vendor_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert linear._cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an ARM machine names no vendor_id
    assert linear._cpu_vendor(str(info)) == "" and linear._cpu_vendor(str(tmp_path / "missing")) == ""


def test_the_layer_falls_back_without_a_compiler(monkeypatch):
    tries = []

    def no_compiler():
        tries.append(1)
        raise QkvlabError("no C++ compiler")

    monkeypatch.setattr(kv_decode, "library", no_compiler)
    layer, x = linear.Linear(128, 256), torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer(x)
    assert len(tries) == 1  # the failed build is remembered, not retried at every call


@pytest.mark.parametrize("variant, positions", [("QKV", "learned"), ("Q-K=V", "rotary"), ("Q-MQA", "learned")])
def test_cached_decoding_through_the_kernel_equals_the_full_forward(variant, positions, monkeypatch):
    """With every weight taking the kernel (MIN_WEIGHT 0), one-token steps (ragged rows too) equal the full
    forward, and generation gives the same tokens as nn.Linear everywhere."""
    monkeypatch.setattr(linear, "MIN_WEIGHT", 0)
    calls = _counting(monkeypatch)
    torch.manual_seed(5)
    model = randomize_(build_model(small(variant=variant, positions=positions, n_heads=4)).eval())
    full, steps = full_and_steps(model, torch.randint(0, 50, (2, 16)), 9)
    assert calls and torch.allclose(steps, full, atol=ATOL * 10)
    prompts, sampling = [[1, 2, 3, 4, 5, 6], [7, 8]], SamplingConfig(max_new_tokens=8, temperature=0)
    fast = generate(model, prompts, sampling)
    monkeypatch.setattr(linear, "enabled", False)
    assert fast == generate(model, prompts, sampling)
