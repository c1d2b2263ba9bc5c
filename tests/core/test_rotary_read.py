"""The fused rotary read: K = V keys rotated inside the score loop equal keys rotated into a workspace."""

import subprocess
import sys

import pytest
import torch

from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.models import build_model
from qkvlab.nn import attention, decode_step, kv_decode, rotary_read
from qkvlab.nn.kv_cache import QUANT_MAX, dequantize, quantize
from qkvlab.nn.positions import Rotary, apply_rotary
from tests.core.helpers import ATOL, full_and_steps, randomize_, small

QUANTIZED = list(QUANT_MAX)  # int8 and the float8 dtypes this PyTorch has


def test_pair_swap():
    q = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pair_list(rotary_read.pair_swap(q)) == [2.0, -1.0, 4.0, -3.0]


def pair_list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t]


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_scores_equal_queries_times_rotated_keys(rotary_dim):
    """The folded form, eager, against rotating the keys."""
    torch.manual_seed(0)
    rotary = Rotary(head_dim=8, max_len=32, rotary_dim=rotary_dim)
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 11, 8)  # G = 2 query heads per key head
    rot = rotary.read_table(11, "cpu")
    got = rotary_read.rotary_scores(q, rotary_read.pair_swap(q), k, rot)
    rotated = apply_rotary(k, rotary.tables(torch.arange(11)))  # (B, H_kv, Tk, D)
    assert torch.allclose(got, (q @ rotated.transpose(-2, -1)).permute(3, 0, 1, 2), atol=ATOL)  # (Tk, B, H_kv, G)


def test_tables_kept_equal_computed_ones_bit_for_bit():
    rotary = Rotary(head_dim=8, max_len=64, rotary_dim=6)
    for n in (5, 3, 40, 64):  # grows by doubling, serves shorter prefixes from the kept table
        assert torch.equal(rotary.prefix(n, "cpu"), rotary.tables(torch.arange(n)))
    cis = rotary.tables(torch.arange(9))
    rot = rotary.read_table(9, "cpu")  # (9, 8): (cos, sin) of each pair
    assert torch.equal(rot[:, 0:6:2], cis.real) and torch.equal(rot[:, 1:6:2], cis.imag)
    assert torch.equal(rot[:, 6:], torch.tensor([[1.0, 0.0]] * 9))  # the pair partial rotary leaves alone


def test_tables_built_while_decoding_serve_training_later():
    """Tables first built under inference_mode are plain tensors: a training step after generation works."""
    model = build_model(small(variant="Q-K=V", positions="rotary"))
    generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=2, temperature=0))
    model.train()
    model(torch.randint(0, 50, (2, 8))).sum().backward()


def _model(variant: str, rotary_fraction: float = 1.0):
    cfg = small(variant=variant, positions="rotary", rotary_fraction=rotary_fraction, n_heads=4)
    return randomize_(build_model(cfg).eval())


@pytest.mark.parametrize("variant, fraction", [("Q-K=V", 1.0), ("Q-MQA", 1.0), ("Q=K=V", 1.0), ("Q-K=V", 0.5)])
def test_cached_decoding_with_the_fused_read_equals_the_full_forward(variant, fraction):
    torch.manual_seed(1)
    model = _model(variant, fraction)
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = model.make_cache(2, 24, fused_rotary=True)
        model(x[:, :12], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(12, 20)], dim=1)
    assert torch.allclose(steps, full[:, 12:], atol=ATOL)
    assert cache.workspace_nbytes == 0  # no rotated copy of the cache was made


def test_ragged_batch_generates_the_same_tokens_fused_or_not():
    """Rows of different lengths take the masked path of the fused read."""
    model = _model("Q-K=V")
    prompts, sampling = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4]], SamplingConfig(max_new_tokens=12, temperature=0)
    assert generate(model, prompts, sampling, fused_rotary=True) == generate(model, prompts, sampling)


def test_asking_for_the_fused_read_without_a_compiler_is_one_clear_error_for_every_model(monkeypatch):
    """Every model's large float cache may take the read, so an explicit request checks for it up front."""
    def no_compiler():
        raise QkvlabError("no C++ compiler")

    monkeypatch.setattr(kv_decode, "library", no_compiler)
    for variant, positions in (("QKV", "rotary"), ("Q-K=V", "learned")):
        model = build_model(small(variant=variant, positions=positions)).eval()
        sampling = SamplingConfig(max_new_tokens=4, temperature=0)
        with pytest.raises(QkvlabError, match="no C[+][+] compiler"):
            generate(model, [[1, 2]], sampling, fused_rotary=True)
        assert generate(model, [[1, 2]], sampling)  # not asked for: SDPA, no compiler needed


@pytest.mark.parametrize("G, D", [(4, 64), (6, 32), (6, 64)])
@pytest.mark.parametrize("T", [1100, 1117, 530])
def test_rotated_reads_of_32_key_blocks_with_halves_masked(G, D, T):
    """Four or six heads a key take blocks of 32 keys: a row whose first 16 keys are masked (its first block half
    empty), a whole block masked, the other row attending only the second half of its blocks here and there; the
    last block 5-29 keys long, against softmax attention on rotated keys."""
    g = torch.Generator().manual_seed(T + G)
    B, H = 2, 2
    q, kv = torch.randn(B, H, G, D, generator=g) * 2, torch.randn(B, H, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :16] = False
    mask[0, 64:96] = False
    for b0 in range(0, T, 96):
        mask[1, b0:b0 + 16] = False
    rot = Rotary(D, T).read_table(T, "cpu")
    got = kv_decode.decode(q, rotary_read.pair_swap(q), kv, rot, mask)
    assert torch.allclose(got, _reference(q, kv, rot, mask), atol=ATOL)


def _ragged_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """(B, T) bool: about 70 % of keys attended per row, always the first."""
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return mask


def _reference(q, kv, rot, mask):
    """Softmax attention of grouped queries (B, H_kv, G, D) on keys rotated explicitly: (B, H_kv, G, D)."""
    scores = rotary_read.rotary_scores(q, rotary_read.pair_swap(q), kv, rot).permute(1, 2, 3, 0)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ kv


@pytest.mark.parametrize("B, H, G, T, D", [(2, 3, 1, 100, 8), (1, 1, 6, 2100, 64), (3, 2, 1, 1500, 128),
                                           (2, 2, 3, 65, 32), (1, 2, 2, 40, 48), (1, 2, 4, 1100, 64),
                                           (2, 1, 2, 530, 64), (3, 1, 3, 77, 64), (2, 1, 6, 300, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_cpu_kernel_equals_attention_on_rotated_keys(B, H, G, T, D, masked):
    """Unrolled head sizes (32, 64, 128) and the general path; several key ranges (T >= 1024); ragged masks; two to
    four or six query heads a key (each key rotated once in registers for all of them)."""
    g = torch.Generator().manual_seed(T)
    q, kv = torch.randn(B, H, G, D, generator=g), torch.randn(B, H, T, D, generator=g)
    mask = _ragged_mask(B, T, g) if masked else None
    rot = Rotary(D, T).read_table(T, "cpu")
    got = kv_decode.decode(q, rotary_read.pair_swap(q), kv, rot, mask)
    assert torch.allclose(got, _reference(q, kv, rot, mask), atol=ATOL)


def test_the_cpu_kernel_reads_a_cache_slice_in_place():
    """The cache is a view (B, H, Tk, D) of a longer buffer: strides, not a copy."""
    buffer = torch.randn(2, 3, 50, 16)
    kv = buffer[:, :, :37]
    q = torch.randn(2, 3, 1, 16)
    rot = Rotary(16, 50).read_table(37, "cpu")
    got = kv_decode.decode(q, rotary_read.pair_swap(q), kv, rot, None)
    assert torch.allclose(got, _reference(q, kv.contiguous(), rot, None), atol=ATOL)


def test_other_dtypes_take_the_compiled_path():
    """float64 is not the kernel's: the torch.compile'd scores serve it, equal to the full forward."""
    torch.manual_seed(2)
    model = _model("Q-K=V").double()
    x = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2, 16, fused_rotary=True)
        model(x[:, :10], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(10, 14)], dim=1)
    assert torch.allclose(steps, full[:, 10:], atol=1e-10)


def test_a_missing_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QKVLAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(QkvlabError, match="C\\+\\+ compiler .*no-such-compiler.* does not run"):
        kv_decode.library.__wrapped__()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_unwritable_kernel_directory_is_one_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("QKVLAB_KERNEL_DIR", str(blocker / "kernels"))
    with pytest.raises(QkvlabError, match="cannot write the fused rotary read's CPU kernel into .*QKVLAB_KERNEL_DIR"):
        kv_decode.library.__wrapped__()
    assert blocker.read_text() == "not a directory"


def test_a_failed_build_is_one_clear_error_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("QKVLAB_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kv_decode, "FLAGS", [*kv_decode.FLAGS, "--no-such-flag"])
    with pytest.raises(QkvlabError, match="building the fused rotary read's CPU kernel with .* failed"):
        kv_decode.library.__wrapped__()
    assert not any((tmp_path / "kernels").iterdir())  # the temporary build directory is gone


def test_loading_the_kernel_leaves_the_process_s_subnormal_floats_alone():
    """Built with -ffast-math, the library once linked crtfastmath.o, which turned on flush-to-zero for the whole
    process at load: NumPy's and PyTorch's subnormals became 0 (and hypothesis refused to run). The library is the
    one a new user gets: its cache key covers the sources, compile and link flags and the compiler, so a cached build
    is the same build (and this suite builds it once, not again here)."""
    code = ("import sys, torch; from qkvlab.nn import kv_decode; kv_decode.library(); "
            "sys.exit(0 if (torch.tensor([1e-45]) * 1.0).item() > 0 else 3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_generate_reports_an_unavailable_fused_read_in_one_line(monkeypatch):
    def broken():
        raise QkvlabError("building the fused rotary read's CPU kernel with c++ failed: error")

    monkeypatch.setattr(kv_decode, "library", broken)
    with pytest.raises(QkvlabError, match="fused rotary read's CPU kernel"):
        generate(_model("Q-K=V"), [[1, 2]], SamplingConfig(max_new_tokens=2), fused_rotary=True)


@pytest.mark.parametrize("B, H, G, T, D", [(2, 1, 6, 2100, 64), (1, 2, 4, 70, 32), (3, 1, 2, 1500, 128),
                                           (2, 2, 3, 40, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_cpu_kernel_without_tables_equals_plain_attention(B, H, G, T, D, masked):
    """No rotation table: keys read as stored (learned positions), for every query head of a group."""
    g = torch.Generator().manual_seed(T + G)
    q, kv = torch.randn(B, H, G, D, generator=g), torch.randn(B, H, T, D, generator=g)
    mask = _ragged_mask(B, T, g) if masked else None
    scores = q @ kv.transpose(-2, -1)  # (B, H, G, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    got = kv_decode.decode(q, None, kv, None, mask)
    assert torch.allclose(got, scores.softmax(-1) @ kv, atol=ATOL)


@pytest.mark.parametrize("G, D", [(5, 64), (8, 128), (7, 32), (1, 64)])
@pytest.mark.parametrize("sharpness", [1.0, 8.0])
@pytest.mark.parametrize("rotate", [None, 1.0, 0.5])  # keys as stored, rotated, half their dims rotated
def test_the_vectorised_read_equals_softmax_attention(G, D, sharpness, rotate):
    """Head sizes 32/64/128 take the 16-keys-per-vector loop, whose query heads share each value load in groups
    (4 + 1, 2 + 2 + 2 + 2, ...): every grouping, sharp softmaxes (the running maximum moves, exponents far below
    zero) and masks that drop whole blocks of 16 keys, against a float64 reference; keys as stored (with keys =
    values and with separate values) and keys rotated on the fly (K = V; one query head folds the rotation into
    its query, a group rotates each key once), wholly or in part."""
    g = torch.Generator().manual_seed(G * D)
    B, H, T = 2, 2, 1100
    q = torch.randn(B, H, G, D, generator=g) * sharpness / D ** 0.5  # scores of standard deviation `sharpness`
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    mask = _ragged_mask(B, T, g)
    mask[0, 16:80] = False  # four whole blocks of one row
    mask[1, T - 40:] = False  # the tail of the other
    swapped = rotary_read.pair_swap(q)
    rot = Rotary(D, T, rotary_dim=int(D * rotate)).read_table(T, "cpu") if rotate else None
    if rotate:
        scores = rotary_read.rotary_scores(q.double(), swapped.double(), k.double(),
                                           rot.double()).permute(1, 2, 3, 0)  # (B, H, G, T)
    else:
        scores = q.double() @ k.double().transpose(-2, -1)  # (B, H, G, T)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    for values in (k,) if rotate else (k, v):
        got = kv_decode.decode(q, swapped if rotate else None, k, rot, mask,
                               values=None if values is k else values)
        assert torch.allclose(got.double(), scores.softmax(-1) @ values.double(), atol=ATOL)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rotary_reads_two_streams_at_a_time(G, threads):
    """Rotary K = V reads two (row, key head) streams together (one query head a key, and groups): an odd number
    of streams (3 rows x 3 heads: a pair spans two rows, one stream is left alone), each row's own mask (whole
    blocks of 16 dropped in one stream of a pair only, a row's first 40 keys dropped), any split of the work over
    threads, against float64."""
    g = torch.Generator().manual_seed(threads)
    B, H, T, D = 3, 3, 1300, 64
    q = torch.randn(B, H, G, D, generator=g) * 4 / D ** 0.5
    kv = torch.randn(B, H, T, D, generator=g)
    mask = _ragged_mask(B, T, g)
    mask[0, :] = True
    mask[0, 32:96] = False  # row 0 (streams 0-2; stream 2 pairs with row 1's first head)
    mask[1, 700:] = False
    mask[1, :40] = False  # row 1 attends nothing in its first blocks while its pair (row 0) does
    mask[1, 40] = True
    rot = Rotary(D, T).read_table(T, "cpu")
    swapped = rotary_read.pair_swap(q)
    scores = rotary_read.rotary_scores(q.double(), swapped.double(), kv.double(), rot.double()).permute(1, 2, 3, 0)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, H, G, T)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kv_decode.decode(q, swapped, kv, rot, mask)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(got.double(), scores.softmax(-1) @ kv.double(), atol=ATOL)


@pytest.mark.parametrize("variant", ["Q-MQA", "Q-GQA-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_learned_grouped_k_equals_v_reads_once_and_equals_the_full_forward(variant, dtype, monkeypatch):
    """Learned positions, grouped K = V heads: one-token steps go through the one-pass read (the kernel in
    float32, plain matmuls otherwise) and equal the full forward, ragged rows included."""
    monkeypatch.setattr(attention, "GROUPED_READ_MIN_BYTES", 0)  # the test's caches are tiny
    monkeypatch.setattr(decode_step, "enabled", False)  # the per-layer read, not the whole-step call
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(3)
    model = randomize_(build_model(small(variant=variant, positions="learned", n_heads=4)).eval()).to(dtype)
    x = torch.randint(0, 50, (2, 18))
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2, 20, fused_rotary=True)
        model(x[:, :10], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(10, 18)], dim=1)
    assert torch.allclose(steps, full[:, 10:], atol=ATOL)
    assert (len(calls) > 0) == (dtype == torch.float32)
    prompts, sampling = [[1, 2, 3, 4, 5, 6], [7, 8]], SamplingConfig(max_new_tokens=8, temperature=0)
    assert generate(model, prompts, sampling, fused_rotary=True) == generate(model, prompts, sampling)


@pytest.mark.parametrize("variant, positions", [("Q-MQA", "learned"), ("Q-K=V", "learned"), ("QKV", "learned"),
                                                ("QKV", "rotary"), ("GQA-2", "rotary")])
def test_small_unrotated_caches_keep_sdpa(variant, positions, monkeypatch):
    """Below GROUPED_READ_MIN_BYTES / STORED_READ_MIN_BYTES a layer's keys stay in the CPU's cache: the fused
    read is not asked for."""
    monkeypatch.setattr(kv_decode, "decode", lambda *a: pytest.fail("the fused read ran on a tiny cache"))
    model = build_model(small(variant=variant, positions=positions, n_heads=4)).eval()
    sampling = SamplingConfig(max_new_tokens=4, temperature=0)
    assert generate(model, [[1, 2, 3]], sampling, fused_rotary=True) == generate(model, [[1, 2, 3]], sampling)


@pytest.mark.parametrize("B, H, G, T, D", [(2, 3, 1, 100, 8), (1, 2, 3, 2100, 64), (2, 1, 4, 65, 32),
                                           (3, 2, 1, 1500, 128), (2, 1, 6, 530, 64), (1, 3, 2, 1100, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_cpu_kernel_reads_separate_float_keys_and_values(B, H, G, T, D, masked):
    """QKV / GQA float caches: keys and values from their own streams, read in place from longer caches,
    against softmax attention; two to six query heads a key (all heads scored at once), masks that drop a whole
    block of 16 keys and the first keys of a row."""
    g = torch.Generator().manual_seed(T * G + D)
    q = torch.randn(B, H, G, D, generator=g)
    k, v = (torch.randn(B, H, T + 5, D, generator=g)[:, :, :T] for _ in range(2))  # views, as the model reads
    mask = _ragged_mask(B, T, g) if masked else None
    if mask is not None and T > 64:
        mask[0, 16:32] = False
        mask[-1, :5] = False
        mask[-1, 5] = True
    scores = q @ k.transpose(-2, -1)  # (B, H, G, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    got = kv_decode.decode(q, None, k, None, mask, values=v)
    assert torch.allclose(got, scores.softmax(-1) @ v, atol=ATOL)


@pytest.mark.parametrize("variant, positions", [("QKV", "learned"), ("QKV", "rotary"), ("GQA-2", "rotary"),
                                                ("Q=K-V", "learned"), ("Q=X", "learned"), ("Q-K=V", "learned"),
                                                ("Q=K=V", "learned")])
def test_large_float_caches_read_in_one_pass_and_equal_the_full_forward(variant, positions, monkeypatch):
    """Above the thresholds (set to 0 here) every variant's one-token steps go through the kernel and equal
    the full forward, ragged rows included; generation gives the same tokens."""
    monkeypatch.setattr(attention, "STORED_READ_MIN_BYTES", 0)
    monkeypatch.setattr(attention, "GROUPED_READ_MIN_BYTES", 0)
    monkeypatch.setattr(decode_step, "enabled", False)  # the per-layer read, not the whole-step call
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(4)
    model = randomize_(build_model(small(variant=variant, positions=positions, n_heads=4)).eval())
    full, steps = full_and_steps(model, torch.randint(0, 50, (2, 18)), 10, fused_rotary=True)
    assert calls and torch.allclose(steps, full, atol=ATOL)
    prompts, sampling = [[1, 2, 3, 4, 5, 6], [7, 8]], SamplingConfig(max_new_tokens=8, temperature=0)
    assert generate(model, prompts, sampling, fused_rotary=True) == generate(model, prompts, sampling)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("B, H, G, T, D", [(2, 3, 1, 100, 8), (1, 1, 6, 2100, 64), (3, 2, 1, 1500, 128),
                                           (2, 2, 3, 65, 32), (1, 3, 1, 300, 64), (2, 1, 5, 260, 64),
                                           (2, 3, 1, 200, 64)])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_the_cpu_kernel_dequantises_a_quantised_cache_as_it_reads(B, H, G, T, D, rotate, dtype):
    """int8 / float8 values and bfloat16 scales read in place (one stream, or keys and values apart; rows of other
    lengths) give what the dequantised float cache gives."""
    g = torch.Generator().manual_seed(T + D)
    q, x = torch.randn(B, H, G, D, generator=g), torch.randn(B, H, T + 3, D, generator=g)
    values, scales = quantize(x, dtype)
    values, scales = values[:, :, :T], scales[:, :, :T]  # views of a longer cache, as the model reads them
    rot = Rotary(D, T, rotary_dim=int(D * rotate)).read_table(T, "cpu") if rotate else None
    swapped = rotary_read.pair_swap(q) if rotate else None
    mask = _ragged_mask(B, T, g)
    want = kv_decode.decode(q, swapped, dequantize(values, scales), rot, mask)
    assert torch.allclose(kv_decode.decode(q, swapped, values, rot, mask, scales), want, atol=ATOL)
    if not rotate:  # keys and values apart (QKV, GQA), each with its own scales
        v, v_scales = (t[:, :, :T] for t in quantize(torch.randn(B, H, T + 3, D, generator=g), dtype))
        want = kv_decode.decode(q, None, dequantize(values, scales), None, mask, values=dequantize(v, v_scales))
        assert torch.allclose(kv_decode.decode(q, None, values, None, mask, scales, values=v, value_scales=v_scales),
                              want, atol=ATOL)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("B, H, G, T, D", [(2, 3, 1, 100, 8), (1, 1, 6, 2100, 64), (3, 2, 1, 1500, 128),
                                           (2, 2, 3, 65, 48), (1, 3, 1, 300, 64), (2, 1, 5, 260, 64),
                                           (2, 2, 4, 129, 32), (1, 2, 2, 700, 128), (2, 3, 1, 200, 64)])
def test_the_cpu_kernel_widens_a_bfloat16_cache_as_it_reads(B, H, G, T, D, rotate):
    """bfloat16 values read in place (one stream, or keys and values apart) give what their float32 copy gives."""
    g = torch.Generator().manual_seed(T + D + 1)
    q = torch.randn(B, H, G, D, generator=g)
    x, v = (torch.randn(B, H, T + 3, D, generator=g).bfloat16()[:, :, :T] for _ in range(2))  # cache views
    rot = Rotary(D, T).read_table(T, "cpu") if rotate else None
    swapped = rotary_read.pair_swap(q) if rotate else None
    mask = _ragged_mask(B, T, g)
    want = kv_decode.decode(q, swapped, x.float(), rot, mask)
    assert torch.allclose(kv_decode.decode(q, swapped, x, rot, mask), want, atol=ATOL)
    if not rotate:
        want = kv_decode.decode(q, None, x.float(), None, mask, values=v.float())
        assert torch.allclose(kv_decode.decode(q, None, x, None, mask, values=v), want, atol=ATOL)


@pytest.mark.parametrize("variant, positions", [("Q-K=V", "rotary"), ("Q-MQA", "rotary"), ("QKV", "learned"),
                                                ("GQA-2", "rotary"), ("Q=K=V", "learned")])
def test_a_bfloat16_cache_is_read_as_stored_and_equals_widening_it_first(variant, positions, monkeypatch):
    """A float32 model over a bfloat16 cache: one-token steps give the kernel the bfloat16 tensors (no float32
    copy of the layer's cache); the logits equal those of widening the cache first, greedy tokens too."""
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a, **kw: calls.append(a[2].dtype) or real(*a, **kw))
    monkeypatch.setattr(decode_step, "serves", lambda *a, **kw: False)  # (the native step takes float32 caches)
    torch.manual_seed(5)
    model = randomize_(build_model(small(variant=variant, positions=positions, n_heads=4)).eval())
    x = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        logits = []
        for fused in (False, True):
            cache = model.make_cache(2, 14, dtype="bf16", fused_rotary=fused)
            model(x[:, :8], cache)
            logits.append(torch.cat([model(x[:, i:i + 1], cache) for i in range(8, 14)], dim=1))
    assert calls and set(calls) == {torch.bfloat16}
    assert torch.allclose(logits[0], logits[1], atol=ATOL)
    prompts, sampling = [[1, 2, 3, 4, 5, 6], [7, 8]], SamplingConfig(max_new_tokens=6, temperature=0)
    assert (generate(model, prompts, sampling, cache_dtype="bf16", fused_rotary=True)
            == generate(model, prompts, sampling, cache_dtype="bf16", fused_rotary=False))


@pytest.mark.parametrize("B, H, G, T, D", [(2, 3, 1, 100, 8), (1, 2, 3, 2100, 64), (2, 1, 4, 65, 32)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_cpu_kernel_reads_separate_int8_keys_and_values(B, H, G, T, D, masked):
    """QKV / GQA int8 caches: keys and values from their own streams and scales, against softmax attention
    on the dequantised tensors."""
    g = torch.Generator().manual_seed(T * G)
    q = torch.randn(B, H, G, D, generator=g)
    (k8, ks), (v8, vs) = (quantize(torch.randn(B, H, T, D, generator=g), torch.int8) for _ in range(2))
    mask = _ragged_mask(B, T, g) if masked else None
    scores = q @ dequantize(k8, ks).transpose(-2, -1)  # (B, H, G, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    want = scores.softmax(-1) @ dequantize(v8, vs)
    got = kv_decode.decode(q, None, k8, None, mask, ks, v8, vs)
    assert torch.allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("variant, positions", [("Q-K=V", "learned"), ("Q-K=V", "rotary"), ("Q-MQA", "learned"),
                                                ("Q=K=V", "rotary"), ("QKV", "learned"), ("QKV", "rotary"),
                                                ("GQA-2", "rotary"), ("Q=K-V", "rotary"), ("Q=X", "learned")])
@pytest.mark.parametrize("cache_dtype", ["int8", "fp8"])
def test_quantised_cache_read_in_one_pass_generates_the_same_tokens(variant, positions, cache_dtype, monkeypatch):
    """With the fused read an int8 cache (one stream or two) is dequantised inside the kernel: the same logits
    (to float rounding) and greedy tokens as dequantising the whole cache first, ragged rows included."""
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a: calls.append(a[2].dtype) or real(*a))
    torch.manual_seed(4)
    model = randomize_(build_model(small(variant=variant, positions=positions, n_heads=4)).eval())
    prompts, sampling = [[1, 2, 3, 4, 5, 6], [7, 8]], SamplingConfig(max_new_tokens=8, temperature=0)
    fused = generate(model, prompts, sampling, cache_dtype=cache_dtype, fused_rotary=True)
    assert calls and calls[0] in QUANT_MAX
    assert fused == generate(model, prompts, sampling, cache_dtype=cache_dtype, fused_rotary=False)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        logits = []
        for fused_read in (False, True):
            cache = model.make_cache(2, 12, dtype=cache_dtype, fused_rotary=fused_read)
            model(x[:, :6], cache)
            logits.append(torch.cat([model(x[:, i:i + 1], cache) for i in range(6, 12)], dim=1))
    # The two reads differ by float rounding (~1e-6); a later layer's new key that lands next to an int8 / fp8
    # rounding boundary can then be stored one step apart, which moves the logits by up to ~1e-3 (seen: 7.6e-4).
    # The kernel itself is held to ATOL on identical caches by the tests above.
    assert torch.allclose(logits[0], logits[1], atol=3e-3)


def test_int8_generation_reads_in_one_pass_by_default_and_falls_back_without_a_kernel(monkeypatch):
    """fused_rotary=None (the default): int8 caches use the kernel when it can be built here, and decode the
    old way (same tokens) when it cannot; float caches are untouched."""
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a: calls.append(1) or real(*a))
    model = randomize_(build_model(small(variant="QKV", positions="learned", n_heads=4)).eval())
    prompts, sampling = [[1, 2, 3], [4]], SamplingConfig(max_new_tokens=6, temperature=0)
    slow = generate(model, prompts, sampling, cache_dtype="int8", fused_rotary=False)
    assert not calls
    generate(model, prompts, sampling)  # float32 cache: not the kernel's unless asked
    assert not calls
    assert generate(model, prompts, sampling, cache_dtype="int8") == slow and calls

    def no_compiler():
        raise QkvlabError("the fused rotary read's CPU kernel needs a C++ compiler (set CXX, or install g++)")

    calls.clear()
    monkeypatch.setattr(kv_decode, "library", no_compiler)
    assert generate(model, prompts, sampling, cache_dtype="int8") == slow and not calls
    with pytest.raises(QkvlabError, match="C\\+\\+ compiler"):
        generate(model, prompts, sampling, cache_dtype="int8", fused_rotary=True)  # asked for: one clear error


@pytest.mark.parametrize("rotate", [True, False])
def test_short_caches_split_rows_across_threads_and_equal_one_thread(rotate):
    """Below 1,024 keys there is one key range; with more threads the (row, head) streams are split between
    work items instead, which must give what one thread gives (masks included)."""
    g = torch.Generator().manual_seed(11)
    B, H, G, T, D = 3, 2, 3, 300, 64
    q, kv = torch.randn(B, H, G, D, generator=g), torch.randn(B, H, T, D, generator=g)
    mask = _ragged_mask(B, T, g)
    rot = Rotary(D, T).read_table(T, "cpu") if rotate else None
    swapped = rotary_read.pair_swap(q) if rotate else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kv_decode.decode(q, swapped, kv, rot, mask)
        torch.set_num_threads(4)  # 4 work items over 6 (row, head) streams
        split = kv_decode.decode(q, swapped, kv, rot, mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(split, one, atol=ATOL, rtol=0)
    if rotate:
        torch.testing.assert_close(one, _reference(q, kv, rot, mask), atol=ATOL, rtol=0)
