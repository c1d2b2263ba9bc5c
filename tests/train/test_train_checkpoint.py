"""Checkpoints: atomic, tied weights stored once, verified before loading, refused when damaged."""

from __future__ import annotations

import json

import pytest
import torch
from toy_task import ToyTask
from trainkit import toy_config

from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.models.config import preset
from qkvlab.models.io import load_model
from qkvlab.train import checkpoint as ckpt
from qkvlab.train.trainer import train


def _model():
    return ToyTask().build_model(ToyTask().model_config("QKV"))


def _save(path, model, step=3):
    return ckpt.save_checkpoint(path, model.state_dict(), {"step": step, "note": [1, 2.5, "x"]})


def test_round_trip_stores_tied_weights_once(tmp_path):
    model = _model()
    path = _save(tmp_path / "checkpoints" / "step_3", model)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "state.pt"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == len(model.state_dict()) - 1  # head.weight is tok_emb.weight
    weights, state = ckpt.load_checkpoint(path)
    assert state["step"] == 3 and state["note"] == [1, 2.5, "x"]
    fresh = _model()
    fresh.load_state_dict(weights)
    assert fresh.head.weight is fresh.tok_emb.weight
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-7]), "truncated"),
    (lambda d: (d / "state.pt").write_bytes(b"\0" + (d / "state.pt").read_bytes()[1:]), "state.pt does not match"),
    (lambda d: (d / "manifest.json").unlink(), "incomplete: manifest.json is missing"),
    (lambda d: (d / "model.safetensors").unlink(), "incomplete: model.safetensors is missing"),
    (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest.json"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = _save(tmp_path / "step_3", _model())
    damage(path)
    with pytest.raises(QkvlabError, match=message):
        ckpt.load_checkpoint(path)


def test_a_run_refuses_to_resume_from_a_damaged_checkpoint(tmp_path):
    cfg = toy_config(tmp_path / "run", "train.steps=16")
    train(cfg, task=ToyTask())
    (tmp_path / "run" / "summary.json").unlink()  # as if killed before the end
    weights = tmp_path / "run" / "checkpoints" / "step_16" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(QkvlabError, match=r"step_16' is corrupt: model.safetensors does not match its sha256"):
        train(cfg, task=ToyTask())


def test_failed_write_leaves_nothing_and_prune_keeps_the_newest(tmp_path, monkeypatch):
    model = _model()
    for step in (1, 2, 3):
        _save(ckpt.checkpoint_path(tmp_path, step), model, step)
    _save(ckpt.checkpoint_path(tmp_path, 3), model, 3)  # rewriting a step replaces it whole
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(QkvlabError, match="could not write .*step_4: disk full"):
        _save(ckpt.checkpoint_path(tmp_path, 4), model, 4)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2", "step_3"]
    (root / ".step_9.tmp-x").mkdir()  # left by a killed writer
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_3"


def test_run_checkpoints_load_as_models(tmp_path):
    model = build_model(preset("tiny", variant="Q-K=V"))
    meta = {"qkvlab.model_config": json.dumps(model.config.to_dict())}
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 2), model.state_dict(), {"step": 2}, meta)
    loaded = load_model(tmp_path)  # a run directory: its newest checkpoint
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(loaded(x), model.eval()(x))


def test_exports_are_verified_like_checkpoints(tmp_path):
    from qkvlab.models.io import save_model
    from qkvlab.weights import MANIFEST, verify_weights

    model = build_model(preset("tiny", variant="Q-K=V"))
    out = save_model(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MANIFEST, "model.safetensors"]
    assert set(verify_weights(out)["files"]) == {"model.safetensors"}
    (out / "config.json").write_text("{}")  # the readable copy is not what loads
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(load_model(out)(x), model.eval()(x))
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a tensor: safetensors would read it without complaint
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(QkvlabError, match=r"model '.*export' is corrupt: model.safetensors does not match its sha256"):
        load_model(out)
    (out / MANIFEST).unlink()  # an export from before manifests: read as it is
    load_model(out)


def test_a_checkpoint_is_refused_without_its_manifest_even_when_the_weights_are_whole(tmp_path):
    path = _save(tmp_path / "checkpoints" / "step_3", _model())
    (path / "manifest.json").unlink()
    with pytest.raises(QkvlabError, match="checkpoint .* is incomplete: manifest.json is missing; delete it"):
        load_model(tmp_path)
