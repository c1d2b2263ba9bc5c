"""Generation with the cache equals generation by recomputing the whole prefix."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qkvlab.errors import QkvlabError
from qkvlab.generate import SamplingConfig, generate, sample_next
from qkvlab.models import ModelConfig, build_model

VOCAB = 40


def _model(variant: str, positions: str = "learned", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=48,
                      vocab_size=VOCAB, positions=positions)
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy paths vary
        model.tok_emb.weight.mul_(20)
    return model


def _naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=K=V", "Q-MQA", "Q=X", "Q=K-V+"])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_cached_greedy_equals_recomputing_the_prefix(variant, positions, chunk):
    model = _model(variant, positions)
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0, prefill_chunk=chunk))
    assert out == [_naive_greedy(model, p, 8) for p in PROMPTS]


def test_batched_rows_equal_rows_alone():
    model = _model("Q-K=V", "rotary")
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    together = generate(model, PROMPTS, cfg)
    assert together == [generate(model, [p], cfg)[0] for p in PROMPTS]


def test_stop_token_ends_a_row_and_is_kept():
    model = _model("QKV")
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
    stop = free[0][2]
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0, stop_tokens=(stop,)))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    for row_free, row in zip(free, out, strict=True):
        assert row == (row_free[: row_free.index(stop) + 1] if stop in row_free else row_free)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = _model("Q-K=V")
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, cfg)
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0))
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, top_k=1, seed=0)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(top_p=0.75, seed=0)
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, cfg, gen)) for _ in range(300)}
    assert seen == {0, 1}


def test_too_long_and_bad_tokens_are_refused():
    model = _model("QKV")
    with pytest.raises(QkvlabError, match="max_seq_len"):
        generate(model, [[1] * 40], SamplingConfig(max_new_tokens=20))
    with pytest.raises(QkvlabError, match=f"token id {VOCAB + 1}, outside the vocabulary"):
        generate(model, [[VOCAB + 1]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(QkvlabError, match="top_p"):
        SamplingConfig(top_p=1.5)


class _HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a device result (a scalar read, a data-dependent shape)."""

    WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.WAITS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant, positions", [("QKV", "learned"), ("Q-K=V", "rotary"), ("Q-MQA", "learned")])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, top_k=5, top_p=0.9, seed=1)])
def test_decoding_never_waits_on_the_device(variant, positions, sampling):
    """The host reads the device a fixed number of times per call, not once per token."""
    model = _model(variant, positions)

    def reads(n_new: int) -> int:
        with _HostReads() as mode:
            generate(model, PROMPTS, SamplingConfig(max_new_tokens=n_new, **sampling))
        return mode.count

    assert reads(4) == reads(24)

