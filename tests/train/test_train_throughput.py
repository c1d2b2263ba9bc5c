"""Training-step FLOPs and MFU in the training log, the GPU peak table, and `train.compile`."""

from __future__ import annotations

import math

import pytest
import torch
from toy_task import SEQ, VOCAB, ToyTask
from trainkit import final_weights, losses, toy_config

from qkvlab.cost import macs
from qkvlab.errors import QkvlabError
from qkvlab.models import build_model
from qkvlab.models.config import ModelConfig
from qkvlab.train.metrics import read_metrics
from qkvlab.train.throughput import GPUS, gpu_from_name, peak_flops, rates
from qkvlab.train.trainer import train


class ToyDecoderTask(ToyTask):
    """The toy mapping learned by a real qkvlab decoder (causal SDPA), without dropout."""

    def model_config(self, variant: str, preset: str = "quick") -> ModelConfig:
        return ModelConfig(kind="decoder", variant=variant, n_layers=2, d_model=16, n_heads=2, max_seq_len=SEQ,
                           vocab_size=VOCAB, dropout=0.0)

    def build_model(self, cfg: ModelConfig) -> torch.nn.Module:
        return build_model(cfg)


def test_gpu_names_map_to_their_dense_bf16_peaks():
    assert gpu_from_name("NVIDIA A100-SXM4-80GB") is GPUS["a100"]
    assert gpu_from_name("NVIDIA H100 80GB HBM3") is GPUS["h100"]
    assert gpu_from_name("NVIDIA H100 PCIe") is GPUS["h100-pcie"]
    assert gpu_from_name("NVIDIA GeForce RTX 3090") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12


def test_rates_give_mfu_only_with_a_peak():
    assert rates(None, 1.0, 1e12) == {}
    assert rates(4e12, 2.0, None) == {"tflops_per_s": 2.0}
    assert rates(4e12, 2.0, 8e12) == {"tflops_per_s": 2.0, "mfu": 0.25}


def test_step_flops_of_the_toy_model_are_three_forwards(tmp_path):
    # forward: mix (B T d d) + tied head (B T d V) multiply-adds; backward twice the forward
    B, d = 8, 16
    summary = train(toy_config(tmp_path / "r", "train.steps=2"), task=ToyTask())
    assert summary["step_flops"] == 3 * 2 * (B * SEQ * d * d + B * SEQ * d * VOCAB)


@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q-MQA"])
def test_step_flops_of_a_decoder_match_the_cost_model(tmp_path, variant):
    """Counted FLOPs (CPU SDPA forward and backward included) = 3 x 2 x the cost model's MACs, and
    gradient accumulation splits the same work into micro-steps."""
    task = ToyDecoderTask()
    cfg = task.model_config(variant)
    expected = 3 * 2 * macs(cfg, variant, seq_len=SEQ, batch=8)["total"]
    one = train(toy_config(tmp_path / "a", f"variant={variant}", "train.steps=2"), task=task)
    two = train(toy_config(tmp_path / "b", f"variant={variant}", "train.steps=2", "train.grad_accum=2"), task=task)
    assert one["step_flops"] == two["step_flops"] == expected


def test_train_log_has_achieved_flops_and_mfu_with_a_peak(tmp_path):
    train(toy_config(tmp_path / "a", "train.steps=3"), task=ToyTask())
    plain = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    assert all(r["tflops_per_s"] > 0 and "mfu" not in r for r in plain)  # CPU: no known peak
    train(toy_config(tmp_path / "b", "train.steps=3", "train.peak_tflops=0.001"), task=ToyTask())
    records = read_metrics(tmp_path / "b" / "metrics.jsonl", "train")
    assert len(records) == 3
    for r in records:
        assert math.isclose(r["mfu"], r["tflops_per_s"] / 0.001, rel_tol=1e-9)


def test_counting_flops_leaves_training_unchanged(tmp_path):
    """The throwaway counting pass must not touch gradients, RNG or weights: two runs agree bit for bit
    (dropout on), and equal runs still resume exactly (tested elsewhere)."""
    a = train(toy_config(tmp_path / "a", "train.steps=4"), task=ToyTask())
    b = train(toy_config(tmp_path / "b", "train.steps=4", "train.peak_tflops=1"), task=ToyTask())
    assert a["train_loss"] == b["train_loss"]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("value", ["0", "-3", "fast"])
def test_bad_peak_is_refused(tmp_path, value):
    with pytest.raises(QkvlabError, match="train.peak_tflops"):
        toy_config(tmp_path / "r", f"train.peak_tflops={value}")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_checkpoint_keys(tmp_path):
    task = ToyDecoderTask()
    train(toy_config(tmp_path / "eager", "train.steps=4", "variant=Q-K=V"), task=task)
    train(toy_config(tmp_path / "compiled", "train.steps=4", "variant=Q-K=V", "train.compile=true"), task=task)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in eager] == [s for s, _ in compiled]
    for (_, a), (_, b) in zip(eager, compiled, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)
    we, wc = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert we.keys() == wc.keys()
    assert all(torch.allclose(we[k], wc[k], atol=1e-4) for k in we)
