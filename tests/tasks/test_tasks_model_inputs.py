"""Every task says which part of its batch the model reads, and that part runs through its model."""

import pytest
import torch

from qkvlab.models import build_model
from qkvlab.tasks.registry import SUITES, data_for, get_task


@pytest.mark.parametrize("name", SUITES["quick"])
def test_model_inputs_feed_the_tasks_model(name, fetched):
    for dataset in data_for([name]):
        fetched(dataset)
    task = get_task(name)
    config = task.model_config("Q-K=V", "tiny")
    task.setup(config, "tiny")
    model = build_model(config).eval()
    inputs = task.model_inputs(task.train_batch(0, 2, seed=0))
    with torch.no_grad():
        out = model(inputs)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
