"""The study's checkpoints (torch.save, GPT-2 naming, nn.Linear layout) import with identical logits,
cached decoding included; the activation (exact or tanh GELU) is part of the config, per preset."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from qkvlab.arch import PRESETS, ModelConfig
from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.interop.paper import load_paper, paper_from_state_dict
from qkvlab.models import build_model
from qkvlab.models.io import load_model

from .helpers import cached_logits, save_paper_checkpoint, to_paper_state

IDX = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(variant: str, **kw):
    cfg = ModelConfig(variant=variant, n_layers=2, d_model=32, n_heads=4, max_seq_len=16, vocab_size=50,
                      activation="gelu", init_std=0.3, **kw)
    return build_model(cfg, seed=0).eval()


def _strip(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


# (variant, exported fused as c_attn, other module names, --variant needed)
CASES = [
    ("QKV", True, None, None), ("QKV", False, None, None), ("GQA-2", True, None, None), ("MQA", False, None, None),
    ("Q-K=V", False, None, None), ("Q-GQA-2", False, None, None), ("Q-MQA", False, None, None),
    ("Q=K-V", False, None, None), ("Q=K-V", False, {"k": "c_k", "v": "c_v"}, "Q=K-V"),
    ("Q=K=V", False, None, None), ("Q=K=V", False, {"k": "c_kv"}, "Q=K=V"),
    ("Q=X", False, None, "Q=X"), ("Q=X-K=V", False, None, "Q=X-K=V"), ("Q=X/GQA-2", False, None, None),
]


@pytest.mark.parametrize("variant, fused, names, asked", CASES)
def test_paper_checkpoint_imports_with_identical_logits_and_cache(tmp_path, variant, fused, names, asked):
    src = _model(variant)
    save_paper_checkpoint(src, tmp_path / "ckpt.pt", fused=fused, names=names)
    ours = load_paper(tmp_path / "ckpt.pt", asked)
    assert ours.config.variant == src.config.variant
    assert ours.config.activation == "gelu" and ours.config.tie_embeddings
    with torch.no_grad():
        want = src(IDX)
        torch.testing.assert_close(ours(IDX), want, **TOL)
    torch.testing.assert_close(cached_logits(ours, IDX, (5, 1, 1, 2, 3)), want, **TOL)


def test_detected_variant_then_converted(tmp_path):
    src = _model("QKV")
    save_paper_checkpoint(src, tmp_path / "ckpt.pt", fused=True)
    model = load_paper(tmp_path / "ckpt.pt", "Q-GQA-2")
    assert model.config.variant == "Q-GQA-2" and model.config.activation == "gelu"


def test_paper_sizes_need_no_head_count():
    """Without a saved config, the depth and width of a paper preset give its head count."""
    cfg = PRESETS["paper-300m"]
    state = {"wte.weight": torch.zeros(8, cfg.d_model), "wpe.weight": torch.zeros(4, cfg.d_model),
             "h.19.ln_1.weight": torch.zeros(1)}
    with pytest.raises(QkvlabError, match="h.0.attn has projections none"):  # got past the head count
        paper_from_state_dict(state)
    state = {"wte.weight": torch.zeros(8, 32), "wpe.weight": torch.zeros(4, 32), "h.0.ln_1.weight": torch.zeros(32)}
    with pytest.raises(QkvlabError, match="--n-heads"):
        paper_from_state_dict(state)


def _state(variant="Q-K=V"):
    return _strip(to_paper_state(_model(variant)))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("h.1.ln_2.weight"), r"'h\.1\.ln_2\.weight' is missing"),
    (lambda s: s.__setitem__("h.1.attn.c_kv.weight", torch.zeros(24, 32)), r"'h\.1\.attn\.c_kv\.weight' has shape"),
    (lambda s: s.__setitem__("h.0.mlp.c_proj.bias", torch.zeros(33)), r"'h\.0\.mlp\.c_proj\.bias' has shape"),
    (lambda s: s.__setitem__("h.0.attn.rel_bias", torch.zeros(3)), "rel_bias"),
    (lambda s: s.__setitem__("h.1.attn.extra.weight", torch.zeros(3)), r"'h\.1\.attn\.extra\.weight'"),
    (lambda s: s.pop("h.0.attn.c_q.weight"), r"'h\.0\.attn\.c_q\.weight' is missing"),
])
def test_bad_state_dicts_name_the_key(edit, message):
    state = _state()
    edit(state)
    with pytest.raises(QkvlabError, match=message):
        paper_from_state_dict(state, n_heads=4)


def test_ambiguous_projections_ask_for_the_variant():
    state = _strip(to_paper_state(_model("Q=X")))
    with pytest.raises(QkvlabError, match=r"c_k and c_v .*Q=K-V .*Q=X .*--variant"):
        paper_from_state_dict(state, n_heads=4)
    with pytest.raises(QkvlabError, match="Q=K-V"):
        paper_from_state_dict(state, "Q-K=V", n_heads=4)  # a target that does not say which one


def test_checkpoint_files(tmp_path):
    src = _model("QKV")
    sd = to_paper_state(src, fused=True, prefix="module._orig_mod.")
    torch.save({"model_state_dict": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(QkvlabError, match="--trust-pickle"):
        load_paper(tmp_path / "pickled.pt", n_heads=4)
    with torch.no_grad():
        torch.testing.assert_close(load_paper(tmp_path / "pickled.pt", n_heads=4, trust_pickle=True)(IDX), src(IDX))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(QkvlabError, match="cannot read"):
        load_paper(tmp_path / "garbage.pt")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(QkvlabError, match="model_state_dict"):
        load_paper(tmp_path / "nostate.pt")
    with pytest.raises(QkvlabError, match="not a checkpoint file"):
        load_paper(tmp_path)


def test_cli_imports_and_refuses_bad_input(tmp_path, capsys):
    src = _model("Q-K=V")
    save_paper_checkpoint(src, tmp_path / "ckpt.pt")
    out = tmp_path / "imported"
    assert main(["convert", "--from", "paper", str(tmp_path / "ckpt.pt"), "--variant", "Q-K=V", "--out", str(out)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(IDX), src(IDX), **TOL)
    capsys.readouterr()
    bad = [
        (["--variant", "Q-K=V", "--out", str(out)], "--force"),  # existing output
        (["--variant", "Q=Y", "--out", str(tmp_path / "a")], "'Q=Y'"),
        (["--variant", "Q-K=V", "--out", str(tmp_path / "b"), "--n-heads", "0"], "--n-heads"),
        (["--variant", "Q-K=V", "--out", str(tmp_path / "c"), "--n-heads", "5"], "n_heads=5"),
    ]
    for extra, message in bad:
        assert main(["convert", "--from", "paper", str(tmp_path / "ckpt.pt"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["convert", str(out), "--variant", "QKV", "--n-heads", "4", "--out", str(tmp_path / "d")]) == 2
    assert "--from paper only" in capsys.readouterr().err


def test_activation_per_preset():
    assert PRESETS["paper-300m"].activation == PRESETS["paper-1.2b"].activation == "gelu"
    assert PRESETS["tiny"].activation == "gelu_tanh"  # the default: saved configs without the field
    assert ModelConfig(**{k: v for k, v in PRESETS["tiny"].to_dict().items() if k != "activation"}).activation \
        == "gelu_tanh"
    with pytest.raises(QkvlabError, match="activation 'relu'"):
        ModelConfig(activation="relu")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 3
    exact, tanh = _model("QKV"), _model("QKV").__class__(_model("QKV").config.replace(activation="gelu_tanh"), seed=0)
    mlp_exact, mlp_tanh = exact.backbone.blocks[0].mlp, tanh.backbone.blocks[0].mlp
    mlp_tanh.load_state_dict(mlp_exact.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mlp_exact(x), mlp_exact.proj(F.gelu(mlp_exact.fc(x))))
        torch.testing.assert_close(mlp_tanh(x), mlp_exact.proj(F.gelu(mlp_exact.fc(x), approximate="tanh")))
        assert (mlp_exact(x) - mlp_tanh(x)).abs().max() > 1e-5
