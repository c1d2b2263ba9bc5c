"""The fused cache read as a Triton kernel (qkvlab.nn.triton_read), run on the CPU by Triton's interpreter.

The same kernel runs compiled on CUDA; here `TRITON_INTERPRET=1` executes it on CPU tensors, op by op, so what it
computes (rotation, masks, online softmax, key ranges and their merge, dequantisation) is checked on every machine.
"""

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.models import build_model
from qkvlab.nn import decode_step, kv_decode, rotary_read, triton_read
from qkvlab.nn.kv_cache import QUANT_MAX, dequantize, quantize
from tests.core.helpers import ATOL, randomize_, small

if not triton_read.available():
    if os.environ.get("CI") and platform.system() == "Linux" and platform.machine() == "x86_64":
        pytest.fail("triton is not installed; the test extra installs it on Linux x86_64", pytrace=False)
    pytest.skip("triton is not installed", allow_module_level=True)
if not triton_read.interpreting():
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setattr(triton_read, "ON_CPU", True)


def reference(q, kv, rot, mask, values=None):
    """Attention of q (B, H_kv, G, D) over keys rotated explicitly, in float64: (B, H_kv, G, D)."""
    q, kv = q.double(), kv.double()
    keys = kv
    if rot is not None:
        cos = rot[:, 0::2].double().repeat_interleave(2, -1)  # (Tk, D)
        sin = rot[:, 1::2].double().repeat_interleave(2, -1)
        swapped = torch.stack((-kv[..., 1::2], kv[..., 0::2]), dim=-1).flatten(-2)  # (-k1, k0) per pair
        keys = kv * cos + swapped * sin
    scores = q @ keys.transpose(-2, -1)  # (B, H_kv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    vals = kv if values is None else values.double()
    return scores.softmax(-1) @ vals


def table(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d): each pair's (cos, sin) of random angles."""
    angles = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    return torch.stack((angles.cos(), angles.sin()), dim=-1).flatten(-2)


def inputs(B, H_kv, G, D, Tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv, G, D, generator=g) * D ** -0.5
    kv = torch.randn(B, H_kv, Tk, D, generator=g) * 2  # peaked softmax: a wrong key shows well above rounding
    return q, kv


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H_kv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 6]), D=st.sampled_from([8, 48, 64]),
       Tk=st.integers(1, 90), splits=st.integers(1, 3), masked=st.booleans(), seed=st.integers(0, 99))
def test_rotary_read_equals_attention_on_rotated_keys(B, H_kv, G, D, Tk, splits, masked, seed):
    q, kv = inputs(B, H_kv, G, D, Tk, seed)
    rot = table(Tk, D, seed)
    mask = None
    if masked:  # ragged rows: a random subset, each row keeping its last key
        mask = torch.rand(B, Tk, generator=torch.Generator().manual_seed(seed)) > 0.4
        mask[:, -1] = True
    got = triton_read.decode(q, kv, rot, mask, splits=splits)
    assert got.dtype == torch.float32 and got.shape == (B, H_kv, G, D)
    assert torch.allclose(got.double(), reference(q, kv, rot, mask), atol=ATOL)


def test_leading_keys_masked_across_whole_ranges():
    """A row whose first 70 keys are masked: the first key ranges attend nothing and must weigh 0 in the merge."""
    q, kv = inputs(2, 2, 3, 64, 100)
    rot = table(100, 64)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[0, :70] = False
    got = triton_read.decode(q, kv, rot, mask, splits=4)
    assert not got.isnan().any()
    assert torch.allclose(got.double(), reference(q, kv, rot, mask), atol=ATOL)


def test_blocks_with_growing_maxima_rescale_what_came_before():
    """One range of 257 keys read in blocks of 64, each block's scores above the last's: every block rescales."""
    q, kv = inputs(1, 2, 2, 16, 257)
    kv = kv * torch.linspace(0.2, 3.0, 257)[:, None]  # later keys score higher
    q = q.abs() * 4
    kv = kv.abs()
    rot = table(257, 16)
    rot[:, 0::2], rot[:, 1::2] = 1.0, 0.0  # no turn: the growth survives the rotation
    got = triton_read.decode(q, kv, rot, None, splits=1)
    assert torch.allclose(got.double(), reference(q, kv, rot, None), atol=ATOL)


def test_separate_values_read_with_no_table():
    """Keys stored rotated (QKV, GQA): no table, the values from their own stream."""
    q, kv = inputs(2, 2, 2, 32, 40)
    values = torch.randn(2, 2, 40, 32)
    got = triton_read.decode(q, kv, None, None, values=values, splits=2)
    assert torch.allclose(got.double(), reference(q, kv, None, None, values), atol=ATOL)


def test_int8_cache_dequantised_as_read():
    q, kv = inputs(1, 2, 3, 64, 50)
    rot = table(50, 64)
    codes, scales = quantize(kv, torch.int8)
    got = triton_read.decode(q, codes, rot, None, scales=scales, splits=2)
    assert torch.allclose(got.double(), reference(q, dequantize(codes, scales), rot, None), atol=ATOL)
    values = torch.randn(1, 2, 50, 64)
    vcodes, vscales = quantize(values, torch.int8)
    got = triton_read.decode(q, codes, None, None, scales=scales, values=vcodes, value_scales=vscales)
    want = reference(q, dequantize(codes, scales), None, None, dequantize(vcodes, vscales))
    assert torch.allclose(got.double(), want, atol=ATOL)


def test_bfloat16_cache_gives_bfloat16_out_computed_in_float32():
    q, kv = inputs(1, 2, 2, 64, 30)
    rot = table(30, 64)
    got = triton_read.decode(q.bfloat16(), kv.bfloat16(), rot, None)
    assert got.dtype == torch.bfloat16
    want = reference(q.bfloat16(), kv.bfloat16(), rot, None)
    assert torch.allclose(got.double(), want, atol=1e-2)


def test_a_cache_view_is_read_in_place():
    """The cache's read is a prefix view of a longer buffer: strides, not a copy."""
    q, buf = inputs(2, 2, 2, 16, 64)
    kv = buf[:, :, :37]
    rot = table(37, 16)
    got = triton_read.decode(q, kv, rot, None, splits=2)
    assert torch.allclose(got.double(), reference(q, kv, rot, None), atol=ATOL)


def test_serves_only_where_it_runs(monkeypatch):
    q, kv = inputs(1, 1, 2, 16, 4)
    assert triton_read.serves(q, kv)
    assert not triton_read.serves(q, kv.double())  # float64: the other paths
    assert not triton_read.serves(q, kv, values=kv.bfloat16())  # values in another dtype
    codes, scales = quantize(kv, torch.int8)
    assert triton_read.serves(q, codes, scales) and not triton_read.serves(q, codes)
    fp8 = [dt for dt in QUANT_MAX if dt != torch.int8]
    for dt in fp8:
        assert not triton_read.serves(q, *quantize(kv, dt))
    monkeypatch.setattr(triton_read, "ON_CPU", False)
    assert not triton_read.serves(q, kv)  # CPU tensors only when asked for


def test_decode_attention_takes_the_triton_kernel(monkeypatch):
    """rotary_read.decode_attention (what the attention module calls) goes to the Triton kernel when it serves."""
    def no_cpu_kernel(*args, **kw):
        raise AssertionError("the C++ kernel was called")

    monkeypatch.setattr(kv_decode, "decode", no_cpu_kernel)
    q, kv = inputs(2, 2, 3, 16, 20)
    rot = table(20, 16)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :5] = False
    heads = q.reshape(2, 6, 1, 16) / 16 ** -0.5  # (B, H, 1, D) unscaled, as the module passes it
    got = rotary_read.decode_attention(heads, kv, rot, mask[:, None, None, :])
    want = reference(q, kv, rot, mask).reshape(2, 6, 1, 16)
    assert torch.allclose(got.double(), want, atol=ATOL)


@pytest.mark.parametrize("variant", ["Q-K=V", "Q-MQA"])
def test_cached_decoding_through_the_triton_read_equals_the_full_forward(variant, monkeypatch):
    """The whole model: one-token steps read the cache through the Triton kernel (the native CPU step, which
    would bypass the attention modules, is turned off)."""
    monkeypatch.setattr(decode_step, "serves", lambda *a, **kw: False)
    calls = []
    real = triton_read.decode
    monkeypatch.setattr(triton_read, "decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(1)
    model = randomize_(build_model(small(variant=variant, positions="rotary", n_heads=4)).eval())
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = model.make_cache(2, 20, fused_rotary=True)
        model(x[:, :10], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(10, 16)], dim=1)
    assert len(calls) == 6 * model.config.n_layers
    assert torch.allclose(steps, full[:, 10:], atol=ATOL)
    assert cache.workspace_nbytes == 0


def test_check_available_runs_the_kernel_once():
    rotary_read.check_available("cpu", torch.float32)  # under the interpreter: the Triton kernel, no error
    assert rotary_read.unavailable("cpu", torch.float32) is None


def test_merge_weighs_empty_ranges_zero():
    m = torch.tensor([[[float("-inf")], [0.5]]])  # (N=1, S=2, G=1): the first range attended nothing
    l_sum = torch.tensor([[[0.0], [2.0]]])
    acc = torch.tensor([[[[0.0, 0.0]], [[4.0, 6.0]]]])  # (1, 2, 1, 2)
    assert torch.equal(triton_read.merge(m, l_sum, acc), torch.tensor([[[2.0, 3.0]]]))


def test_gpu_benchmark_paths_agree_and_time(monkeypatch):
    """benchmarks/gpu_read.py (for GPUs) on tiny CPU tensors: its four paths run, the K = V ones agree."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    gpu_read = importlib.import_module("gpu_read")
    res = gpu_read.measure(1, 4, 2, 16, 40, torch.float32, torch.device("cpu"), repeats=1)
    assert set(res) == set(gpu_read.PATHS) and all(t > 0 and rate > 0 for t, rate in res.values())
    with pytest.raises(SystemExit, match="for CUDA GPUs"):
        gpu_read.main(["--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_read.parse_args(["--groups", "4"])  # 4 does not divide 6 heads


@pytest.mark.slow
def test_kernel_compiles_for_a_cuda_gpu_without_spilling():
    """Triton's compiler, not its interpreter: PTX and a cubin for sm_80 (no GPU needed) in every configuration
    the read uses, at most 168 registers a thread (three 128-thread programs an SM) and nothing spilled."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script), "sm_80"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 12
    for *case, block_t, registers, spills in rows:
        assert int(spills) == 0 and int(registers) <= 168, (case, block_t, registers, spills)
