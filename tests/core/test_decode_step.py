"""The whole-step native decode (`qkvlab.nn.decode_step`): every block of a one-token step in one C++ call equals
the full forward and the per-layer path, writes the cache as they do, and steps aside wherever it does not apply."""

import contextlib
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate
from qkvlab.nn import decode_step, linear
from tests.core.helpers import ATOL, make, small, variant_grid

NATIVE = variant_grid(plus=False)


@contextlib.contextmanager
def counting_native_calls():
    """A list that grows by one for every step a native call served: the call's name ("decode_tokens", the whole
    step from token ids; "decode_layers", the blocks alone)."""
    served = []

    def counted(real):
        def call(*args):
            out = real(*args)
            if out is not None:
                served.append(real.__name__)
            return out
        return call

    with mock.patch.object(decode_step, "decode_layers", counted(decode_step.decode_layers)), \
            mock.patch.object(decode_step, "decode_tokens", counted(decode_step.decode_tokens)):
        yield served


@pytest.fixture
def native_calls():
    with counting_native_calls() as served:
        yield served


def _steps(model, x, prefill, native: bool, monkeypatch, **cache_kw):
    """Logits of x[:, prefill:] decoded one token at a time (B, T - prefill, V), and the cache."""
    monkeypatch.setattr(decode_step, "enabled", native)
    B, T = x.shape
    with torch.no_grad():
        cache = model.make_cache(B, T, **({"fused_rotary": True} | cache_kw))
        model(x[:, :prefill], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(prefill, T)], dim=1)
    return steps, cache


def _native_equals_full(model, x, prefill, monkeypatch) -> None:
    """Native steps over x[:, prefill:] give the full forward's logits."""
    with torch.no_grad():
        full = model(x)[:, prefill:]
    native, _ = _steps(model, x, prefill, True, monkeypatch)
    torch.testing.assert_close(native, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", NATIVE)
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_native_steps_equal_the_full_forward_and_the_per_layer_path(variant, positions, native_calls, monkeypatch):
    """Every variant without a pair bias, MHA / GQA / MQA (8 query heads), learned and rotary positions; the cache
    the native steps wrote equals the per-layer path's."""
    model = make(small(variant=variant, positions=positions))
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        full = model(x)[:, 9:]
    native, cache = _steps(model, x, 9, True, monkeypatch)
    assert native_calls == ["decode_tokens"] * 7  # the whole step, embeddings to logits
    layered, reference = _steps(model, x, 9, False, monkeypatch)
    assert len(native_calls) == 7  # the per-layer run did not take it
    torch.testing.assert_close(native, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(native, layered, atol=ATOL, rtol=0)
    for mine, theirs in zip(cache.buffers, reference.buffers, strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == reference.lengths.tolist() == [16] * 3


@pytest.mark.parametrize("norm, mlp, activation", [("rmsnorm", "swiglu", "gelu"), ("layernorm", "gelu", "gelu_tanh"),
                                                   ("layernorm", "gelu", "gelu")])
@pytest.mark.parametrize("bias", [True, False])
def test_every_norm_mlp_and_bias_choice(norm, mlp, activation, bias, native_calls, monkeypatch):
    cfg = small(variant="Q-GQA-2", positions="rotary", norm=norm, mlp=mlp, activation=activation, bias=bias,
                n_heads=4)
    _native_equals_full(make(cfg), torch.randint(0, 50, (2, 14)), 6, monkeypatch)
    assert native_calls


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([(4, 16), (2, 32), (1, 64), (4, 12), (2, 48)]), batch=st.integers(1, 20),
       fraction=st.sampled_from([1.0, 0.5]), kv=st.sampled_from(["Q-K=V", "QKV", "Q-MQA", "Q=K=V"]))
def test_head_sizes_batches_and_partial_rotary(heads, batch, fraction, kv):
    """Unrolled head sizes (16-float multiples) and the general loop (12, 48), any batch up to 20 rows (the row
    limit at 64, as on AMD CPUs), partial rotary: the native steps equal the full forward."""
    n_heads, head_dim = heads
    cfg = small(variant=kv, positions="rotary", n_heads=n_heads, head_dim=head_dim, d_model=n_heads * head_dim,
                rotary_fraction=fraction)
    model = make(cfg, seed=batch)
    x = torch.randint(0, 50, (batch, 12), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad(), counting_native_calls() as served, mock.patch.object(linear, "max_rows", lambda: 64):
        full = model(x)[:, 5:]
        cache = model.make_cache(batch, 12, fused_rotary=True)
        model(x[:, :5], cache)
        steps = torch.cat([model(x[:, i:i + 1], cache) for i in range(5, 12)], dim=1)
    assert len(served) == 7
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


def test_generation_gives_the_same_tokens_native_or_per_layer(monkeypatch):
    model = make(small(variant="Q-K=V", positions="rotary", n_heads=4))
    prompts, sampling = [[1, 2, 3, 4], [5, 6, 7, 8]], SamplingConfig(max_new_tokens=12, temperature=0)
    native = generate(model, prompts, sampling, fused_rotary=True)
    monkeypatch.setattr(decode_step, "enabled", False)
    assert native == generate(model, prompts, sampling, fused_rotary=True)


def _fresh_step(model, x, **cache_kw):
    with torch.no_grad():
        cache = model.make_cache(x.shape[0], x.shape[1] + 1, **cache_kw)
        model(x, cache)
        return model(x[:, -1:], cache), cache


@pytest.mark.parametrize("case", ["not asked", "ragged", "int8", "training", "gradients", "pair bias", "float64",
                                  "too many rows"])
def test_steps_aside_where_it_does_not_apply(case, native_calls):
    """The per-layer path runs (and gives the full forward's logits) whenever the native step does not serve."""
    variant = "QKV+" if case == "pair bias" else "Q-K=V"
    model = make(small(variant=variant, positions="rotary", n_heads=4))
    rows = linear.max_rows() + 1 if case == "too many rows" else 2
    x = torch.randint(0, 50, (rows, 8))
    kw = {"fused_rotary": case != "not asked"} | ({"dtype": "int8"} if case == "int8" else {})
    if case == "float64":
        model = model.double()
    if case == "training":
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    with torch.no_grad():
        cache = model.make_cache(rows, 9, **kw)
        model(x, cache)
        if case == "ragged":
            cache.set_lengths([8, 6])
        with torch.enable_grad() if case == "gradients" else torch.no_grad():
            model(x[:, -1:], cache)
    assert native_calls == []


def test_a_full_cache_is_the_same_error_as_before(monkeypatch):
    model = make(small(variant="Q-K=V", positions="rotary", n_heads=4))
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        cache = model.make_cache(2, 6, fused_rotary=True)
        model(x, cache)
        with pytest.raises(QkvlabError, match="holds 6 tokens"):
            model(x[:, -1:], cache)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA", "Q=K-V"])
def test_heads_narrower_than_the_model(variant, native_calls, monkeypatch):
    """n_heads * head_dim (48) below d_model (64): the projections' widths, not d_model, size the heads."""
    model = make(small(variant=variant, positions="rotary", n_heads=4, head_dim=12, d_model=64))
    _native_equals_full(model, torch.randint(0, 50, (2, 10)), 5, monkeypatch)
    assert len(native_calls) == 5


@pytest.mark.parametrize("kind, reference", [
    (0, lambda f, h: torch.nn.functional.gelu(f)),
    (1, lambda f, h: torch.nn.functional.gelu(f, approximate="tanh")),
    (2, lambda f, h: torch.nn.functional.silu(f[:, :h]) * f[:, h:])])
def test_the_native_activations_match_pytorch_in_float64(kind, reference):
    """The native step's vectorised GELU (erf and tanh forms) and SwiGLU, over -30..30 (both exp clamps) and a
    width that leaves a scalar tail (37 = 2 x 16 + 5): within 1e-6 of float64, relative to max(1, |x|)."""
    from qkvlab.nn import kv_decode

    rows, hidden = 3, 37
    width = 2 * hidden if kind == 2 else hidden
    grid = torch.linspace(-30, 30, rows * width, dtype=torch.float64)
    f = grid[torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(kind))].reshape(rows, width)
    f[0, :6] = torch.tensor([0.0, -0.0, 1e-6, -1e-6, 3.0, -3.0], dtype=torch.float64)
    x = f.float().contiguous()
    out = torch.empty(rows, hidden)
    kv_decode.library().qkvlab_mlp_activation(x.data_ptr(), out.data_ptr(), rows, hidden, kind)
    expected = reference(x.double(), hidden)
    scale = torch.maximum(expected.abs(), torch.ones(()))
    assert ((out.double() - expected).abs() / scale).max().item() < 1e-6


def test_a_parametrised_weight_is_read_through_its_parametrisation(native_calls, monkeypatch):
    """A weight computed by torch.nn.utils.parametrize (not in the module's parameters) is what the step uses."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = make(small(variant="Q-K=V", positions="rotary", n_heads=4))
    parametrize.register_parametrization(model.backbone.blocks[1].attn.qkv, "weight", Doubled())
    _native_equals_full(model, torch.randint(0, 50, (2, 10)), 5, monkeypatch)
    assert native_calls


@pytest.mark.parametrize("positions", ["sinusoidal", "none"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_position_table_and_tied_or_untied_output(positions, tied, native_calls, monkeypatch):
    """The whole step adds a sinusoidal table or no position at all, and reads a tied or untied output layer."""
    if positions not in __import__("qkvlab.arch", fromlist=["POSITIONS"]).POSITIONS:
        pytest.skip(f"no {positions!r} positions")
    model = make(small(variant="Q-K=V", positions=positions, tie_embeddings=tied))
    _native_equals_full(model, torch.randint(0, 50, (2, 10)), 5, monkeypatch)
    assert native_calls == ["decode_tokens"] * 5


def _step_logits(model, x):
    """The logits of the last token of x decoded with a cache filled with the rest."""
    with torch.no_grad():
        cache = model.make_cache(x.shape[0], x.shape[1], fused_rotary=True)
        model(x[:, :-1], cache)
        return model(x[:, -1:], cache)


@pytest.mark.parametrize("change", ["data", "parameter", "module", "state dict", "assigned state dict",
                                    "output layer"])
def test_the_step_follows_weights_changed_between_steps(change, native_calls, monkeypatch):
    """The native step keeps its weights' addresses across steps; a weight's data swapped (`.data =`), a new
    Parameter, a replaced module, a state dict loaded in place or by assignment, or a new output layer are all seen
    at the next step (the logits equal the modules')."""
    model = make(small(variant="Q-K=V", positions="rotary", n_heads=4, tie_embeddings=False))
    x = torch.randint(0, 50, (2, 8))
    _step_logits(model, x)  # a plan built
    block = model.backbone.blocks[1]
    _kept = [p.data for p in model.parameters()]  # the old storages stay alive: new data lands at new addresses
    with torch.no_grad():
        if change == "data":
            block.attn.qkv.weight.data = 2 * block.attn.qkv.weight.data
        elif change == "parameter":
            block.mlp.fc.weight = torch.nn.Parameter(-block.mlp.fc.weight.detach().clone())
        elif change == "module":
            fc = block.mlp.fc
            block.mlp.fc = type(fc)(fc.in_features, fc.out_features, bias=fc.bias is not None)
        elif change in ("state dict", "assigned state dict"):
            state = {k: 0.5 * v for k, v in model.state_dict().items()}
            model.load_state_dict(state, assign=change == "assigned state dict")
        else:
            model.lm_head.weight.data = torch.randn_like(model.lm_head.weight)
    calls = len(native_calls)
    native = _step_logits(model, x)
    assert len(native_calls) == calls + 1  # the step after the change was native
    monkeypatch.setattr(decode_step, "enabled", False)
    torch.testing.assert_close(native, _step_logits(model, x), atol=ATOL, rtol=0)


def test_the_step_follows_a_position_table_assigned_between_steps(native_calls, monkeypatch):
    """A buffer assigned (the sinusoidal position table: a registered buffer, no Parameter) is seen at the next
    step through the buffer-registration hook."""
    model = make(small(variant="QKV", positions="sinusoidal", n_heads=4))
    x = torch.randint(0, 50, (2, 8))
    _step_logits(model, x)  # a plan built
    positions = model.backbone.pos_emb
    kept = positions.table
    positions.table = 3 * kept  # a new tensor at a new address, registered as the buffer
    calls = len(native_calls)
    native = _step_logits(model, x)
    assert len(native_calls) == calls + 1
    monkeypatch.setattr(decode_step, "enabled", False)
    torch.testing.assert_close(native, _step_logits(model, x), atol=ATOL, rtol=0)


def test_importing_qkvlab_installs_no_global_hooks_until_a_native_step():
    """PyTorch's process-wide registration hooks are installed by the first native step's plan, not at import."""
    script = """
import torch.nn.modules.module as m
def count():
    return sum(len(d) for d in (m._global_module_registration_hooks, m._global_parameter_registration_hooks,
                                m._global_buffer_registration_hooks))
import qkvlab, qkvlab.generate, qkvlab.models
from qkvlab.nn import decode_step
from tests.core.helpers import make, small
model = make(small(variant="QKV", n_heads=4))
before = count()
import torch
with torch.no_grad():
    cache = model.make_cache(1, 4, fused_rotary=True)
    model(torch.tensor([[1, 2]]), cache)
    model(torch.tensor([[3]]), cache)  # one token: the native step, its plan built
    model(torch.tensor([[4]]), cache)
print(before, count())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "3"]


def test_a_token_id_out_of_range_is_the_modules_error_and_writes_nothing(native_calls):
    model = make(small(variant="Q-K=V", positions="learned", n_heads=4))
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        cache = model.make_cache(2, 8, fused_rotary=True)
        model(x, cache)
        stored = [b.clone() for b in cache.buffers]
        with pytest.raises(IndexError):
            model(torch.tensor([[3], [50]]), cache)
    assert native_calls == []
    assert cache.lengths.tolist() == [6, 6]
    for before, after in zip(stored, cache.buffers, strict=True):
        assert torch.equal(before, after)


def test_hidden_states_steps_take_the_blocks_call(native_calls, monkeypatch):
    """`GPT.hidden` (the Hugging Face wrapper's path) steps through the blocks' native call and equals the modules."""
    model = make(small(variant="Q-GQA-2", positions="rotary", n_heads=4))
    x = torch.randint(0, 50, (2, 9))

    def hidden_steps():
        with torch.no_grad():
            cache = model.make_cache(2, 9, fused_rotary=True)
            model.hidden(x[:, :5], cache)
            return torch.cat([model.hidden(x[:, i:i + 1], cache) for i in range(5, 9)], dim=1)

    native = hidden_steps()
    assert native_calls == ["decode_layers"] * 4
    monkeypatch.setattr(decode_step, "enabled", False)
    torch.testing.assert_close(native, hidden_steps(), atol=ATOL, rtol=0)


def test_without_the_whole_step_the_blocks_call_serves_and_agrees(native_calls, monkeypatch):
    """`whole_step = False` (benchmarks/decode_step.py's "blocks"): embeddings and logits as modules, the blocks
    native; the logits equal the whole step's."""
    model = make(small(variant="QKV", positions="learned", n_heads=4))
    x = torch.randint(0, 50, (2, 8))
    whole = _step_logits(model, x)
    monkeypatch.setattr(decode_step, "whole_step", False)
    blocks = _step_logits(model, x)
    assert native_calls == ["decode_tokens", "decode_layers"]
    torch.testing.assert_close(blocks, whole, atol=ATOL, rtol=0)


class _Adapted(torch.nn.Linear):
    """A Linear that computes more than its weight (as a LoRA adapter does): x W^T + b + 0.5 x."""

    def forward(self, x):
        return super().forward(x) + 0.5 * x[..., :self.out_features]


@pytest.mark.parametrize("where", ["block", "output layer"])
def test_a_module_that_computes_more_than_its_weight_runs_as_a_module(where, native_calls, monkeypatch):
    """A subclass or wrapper of a layer (LoRA adapters, quantised layers) is not what the native step reproduces:
    the modules run, so the logits are the modules'."""
    model = make(small(variant="Q-K=V", positions="rotary", n_heads=4, tie_embeddings=False))
    x = torch.randint(0, 50, (2, 8))
    _step_logits(model, x)  # plans built while the model was plain
    block = model.backbone.blocks[0]
    with torch.no_grad():
        if where == "block":
            old = block.attn.proj
            block.attn.proj = _Adapted(old.in_features, old.out_features, bias=old.bias is not None)
        else:
            old = model.lm_head
            model.lm_head = _Adapted(old.in_features, old.out_features, bias=False)
    calls = len(native_calls)
    stepped = _step_logits(model, x)
    monkeypatch.setattr(decode_step, "enabled", False)
    torch.testing.assert_close(stepped, _step_logits(model, x), atol=ATOL, rtol=0)
    assert native_calls[calls:] == ([] if where == "block" else ["decode_layers"])  # the blocks still native
