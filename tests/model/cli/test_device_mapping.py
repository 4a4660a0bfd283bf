"""Under torchrun, ``--device cuda`` is this rank's own GPU (``cuda:LOCAL_RANK``) for every command, with a
mocked ``torch.cuda`` (no GPU here): otherwise every rank of ``train``, ``prepare`` and ``train-lora`` would land
on GPU 0."""

from __future__ import annotations

import pytest
import torch

from swift_model.cli.training import _device
from swift_model.generation.distributed import resolve_device, torchrun_env


@pytest.fixture
def four_gpus(monkeypatch):
    """``torch.cuda`` saying four GPUs, recording ``set_device``; the torchrun environment of rank 5 of 8 (local
    rank 1 on the second machine)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    for key, value in dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8").items():
        monkeypatch.setenv(key, value)
    return calls


def test_training_commands_take_the_local_rank_gpu(four_gpus):
    assert _device("cuda") == torch.device("cuda", 1)
    assert four_gpus == [torch.device("cuda", 1)]  # and it is the current device (NCCL's collectives run there)
    assert _device("cpu") == torch.device("cpu")
    assert _device(None) is None  # the command's own default (the trainer's is cuda:LOCAL_RANK too)


def test_generate_takes_the_local_rank_gpu(four_gpus):
    assert resolve_device("cuda", torchrun_env()) == torch.device("cuda", 1)
    assert resolve_device(None, torchrun_env()) == torch.device("cuda", 1)


def test_one_named_gpu_for_several_ranks_is_refused(four_gpus):
    with pytest.raises(ValueError, match="would put every rank on one GPU"):
        _device("cuda:0")
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        _device("gpu")


def test_trainer_default_device_is_the_local_rank_gpu(four_gpus):
    from swift_model.training.trainer import default_device

    assert default_device() == torch.device("cuda", 1)


def test_nccl_group_is_bound_to_the_rank_gpu(four_gpus, monkeypatch):
    """The trainer's process group under torchrun gets ``device_id`` = this rank's GPU (NCCL then never
    touches GPU 0 from rank 5)."""
    import torch.distributed as dist

    from swift_model.training import trainer

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    assert trainer.init_distributed(torch.device("cuda", 1))
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
