"""The NAS zoo: MNIST-1D generated locally, architectures as data, the reference figures."""

from __future__ import annotations

import pytest
import torch

from search_spaces.mnist1d_nets import (
    REFERENCE_CNN,
    REFERENCE_MLP,
    ConvLayer,
    Mnist1dNet,
    NetSpec,
    parameter_count,
)
from search_spaces.nas_zoo import mnist1d_arrays, mnist1d_task, train_net


def test_mnist1d_is_generated_with_the_papers_shapes():
    data = mnist1d_arrays()
    assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
    task = mnist1d_task()
    assert len(task.search) == len(task.test) == 500
    assert {item.label for item in task.test} == set(range(10))


def test_specs_round_trip_and_build_the_reference_sizes():
    assert parameter_count(Mnist1dNet(REFERENCE_CNN)) == 5210
    assert parameter_count(Mnist1dNet(REFERENCE_MLP)) == 15210
    with pytest.raises(ValueError, match="shrinks to nothing"):
        Mnist1dNet(NetSpec(convs=(ConvLayer(4, 45, 1),)))


def test_training_is_deterministic_and_learns():
    first, second = train_net(REFERENCE_MLP, steps=200), train_net(REFERENCE_MLP, steps=200)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values(), strict=True))
    from fitness.classifier import ClassifierEvaluator

    task = mnist1d_task()
    assert ClassifierEvaluator(first).evaluate(task.name, task.search).accuracy > 0.3


@pytest.mark.slow
def test_reference_models_reach_the_published_accuracy(tmp_path):
    from search_spaces.nas_zoo import build_nas_zoo

    zoo = build_nas_zoo(tmp_path)
    for entry in zoo.models.values():
        assert entry.accuracy >= entry.published - 0.04, entry
