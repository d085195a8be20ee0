"""NCCL on two GPUs: the bitwise resume of test_ddp_pipeline, on the CUDA backend."""

import pytest
import torch

from baton.run import pipeline as pl

from ..flows.helpers import assert_same_training_result
from .helpers import config, latest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_two_gpus_resume_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    nccl = {"launcher.backend": "nccl"}
    reference = config(tmp_path / "reference", 2, **nccl)
    pl.run(reference)
    resumed = config(tmp_path / "resumed", 2, **{**nccl, "train.max_epochs": 2})
    pl.run(resumed)
    pl.run(resumed.model_copy(update={"train": reference.train}))
    assert latest(resumed)["meta"]["world_size"] == 2
    assert_same_training_result(latest(reference), latest(resumed))
