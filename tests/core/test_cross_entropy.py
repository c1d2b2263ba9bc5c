"""`qkvlab.nn.cross_entropy.linear_cross_entropy` and `GPT(x, targets=y)`: the output layer's cross-entropy in
chunks of rows equals `F.cross_entropy` on the full logits, loss and gradients, however the rows are chunked."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.errors import QkvlabError
from qkvlab.nn.cross_entropy import linear_cross_entropy
from qkvlab.nn.linear import Linear
from tests.core.helpers import make, small


def _pair(h, w, t, reduction, scale=1.0, **kw):
    """(loss, grad h, grad w) of ours and of F.cross_entropy on the full logits, for `scale * loss`."""
    out = []
    for fn in (lambda: linear_cross_entropy(h, w, t, reduction=reduction, **kw),
               lambda: F.cross_entropy(h @ w.T, t, reduction=reduction)):
        h.grad = w.grad = None
        loss = fn()
        (scale * loss).backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), c=st.integers(1, 9), v=st.integers(2, 40), rows=st.integers(1, 80),
       ignored_tenths=st.integers(0, 9), mean=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_equals_full_cross_entropy_in_float64(n, c, v, rows, ignored_tenths, mean, seed):
    g = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(v, c, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored_tenths / 10] = -100
    t[0] = 1  # at least one counted target (all ignored: below)
    ours, ref = _pair(h, w, t, "mean" if mean else "sum", scale=2.5, chunk_rows=rows)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_and_batched_rows_match():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 300, 32, generator=g).requires_grad_()  # (B, T, C)
    w = (torch.randn(1000, 32, generator=g) / 4).requires_grad_()
    t = torch.randint(0, 1000, (4, 300), generator=g)
    losses, grads = [], []
    for fn in (lambda: linear_cross_entropy(h, w, t, chunk_rows=128),
               lambda: F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten())):
        h.grad = w.grad = None
        loss = fn()
        loss.backward()
        losses.append(loss.item())
        grads.append((h.grad.clone(), w.grad.clone()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backward_twice_adds_the_gradient_twice():
    """The backward scales what the forward kept without changing it: a retained graph run twice doubles."""
    h = torch.randn(10, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    t = torch.randint(0, 7, (10,))
    loss = linear_cross_entropy(h, w, t, chunk_rows=3)
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * once)


def test_every_target_ignored_gives_zero_not_nan():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_without_gradients_only_the_loss():
    h, w, t = torch.randn(9, 4), torch.randn(6, 4), torch.randint(0, 6, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_rows=2)
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.T, t).item(), rel=1e-6)


def test_bf16_autocast_is_close_to_float32_and_keeps_weight_gradients_float32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g).requires_grad_()
    w = (torch.randn(100, 32, generator=g) / 4).requires_grad_()
    t = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    ref = F.cross_entropy(h.detach() @ w.detach().T, t)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("bad", [dict(reduction="none"), dict(chunk_rows=0), dict(targets=torch.zeros(3))])
def test_bad_arguments_are_one_line_errors(bad):
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    t = bad.pop("targets", torch.zeros(4, dtype=torch.long))
    with pytest.raises(QkvlabError):
        linear_cross_entropy(h, w, t, **bad)


@pytest.mark.parametrize("cfg", [dict(), dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
                                              tie_embeddings=False, variant="Q-K=V/GQA-2")],
                         ids=["gpt2-tied", "llama-untied"])
def test_model_targets_equal_the_loss_on_its_logits(cfg):
    """`GPT(x, targets=y)`: the same loss and the same gradient on every parameter as cross-entropy on the logits
    (tied embeddings: the output layer's gradient lands on the embedding)."""
    model = make(small(**cfg)).train()
    x = torch.randint(0, 50, (3, 20))
    y = torch.randint(0, 50, (3, 20))
    y[0, :5] = -100
    losses, grads = [], []
    for fn in (lambda: model(x, targets=y), lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten())):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_with_a_wrapped_output_layer_takes_the_plain_loss():
    class Scaled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = make(small()).train()
    head = Scaled(64, 50, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert model(x, targets=y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_targets_refuse_a_cache():
    model = make(small())
    with pytest.raises(QkvlabError, match="targets"):
        ids = torch.zeros(1, 2, dtype=torch.long)
        model(ids, cache=model.make_cache(1), targets=ids)


@pytest.mark.slow
def test_compiled_model_gives_the_same_loss_and_gradients():
    """`train.compile=true` runs `torch.compile(model)(x, targets=y)`: the autograd Function traces."""
    model = make(small()).train()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    grads = []
    for m in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        loss = m(x, targets=y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
