"""Training devices: names checked, an absent device one clear error before anything is stored, workers
pinned to GPUs, mixed precision; and on a machine with a GPU (marked `cuda`), a real training step there."""

import os

import pytest
import torch

from nas.batches import Batches
from nas.cli import main
from nas.config import ConfigError
from nas.data import load_dataset
from nas.devices import autocast_dtype, parse_device, resolve_device
from nas.recipe import TrainRecipe
from nas.search import worker_env
from nas.study import load_study_config
from nas.trainer import train

from archs import tiny, tiny_moe

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_device_names_are_checked_for_form():
    for good in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        parse_device(good)
    for bad in ("gpu", "cuda:x", "mps:0", "", 0):
        with pytest.raises(ConfigError, match="device"):
            parse_device(bad)
    with pytest.raises(ConfigError, match="evaluator.device"):
        load_study_config("smoke", evaluator={"steps": 5, "device": "gpu"})
    assert resolve_device("cpu") == torch.device("cpu")


@no_gpu
@pytest.mark.parametrize("argv", [
    ["search", "--config", "smoke", "--device", "cuda"],
    ["search", "--config", "smoke", "--devices", "cuda:0,cuda:1"],
    ["superclasses", "--data", "synthetic:size=8,train=50,test=10", "--groups", "2", "--device", "cuda:1"],
], ids=["search", "search-devices", "superclasses"])
def test_an_absent_device_is_one_clear_error_and_nothing_is_stored(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--results-dir", str(tmp_path / "results")] if argv[0] == "search" else []
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"vmoe-nas {argv[0]}: error: device: cuda") and "not available here; found cpu" in err[0]
    assert list(tmp_path.iterdir()) == []  # no results folder, no log, no storage, no cache


def test_worker_env_pins_each_worker_to_one_gpu_round_robin(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    seen = []
    for index in range(3):
        with worker_env(index, ["cuda:2", "cuda:0"]):
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["2", "0", "2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    with worker_env(0, []):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    with pytest.raises(ConfigError, match="devices"):
        load_study_config("smoke", devices=["cpu"])
    with pytest.raises(ConfigError, match="devices"):
        load_study_config("smoke", devices=["cuda:0", "cuda:1"], evaluator={"steps": 5, "device": "cpu"})


def test_precision_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("auto", torch.device("mps")) == torch.float16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(precision):
    data = load_dataset("synthetic:size=8,classes=8,groups=4,train=400,test=10")
    result = train(tiny_moe(num_classes=8), data, TrainRecipe(steps=6, batch_size=32, eval_every=3, num_threads=1,
                                                              precision=precision))
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_curve)


@pytest.mark.cuda
@needs_gpu
def test_a_training_step_on_the_gpu_matches_the_cpu_batches():
    data = load_dataset("synthetic:size=8,classes=8,groups=4,train=400,test=10")
    on_gpu, on_cpu = (Batches(data, 32, seed=1, augment=True, device=d) for d in ("cuda", "cpu"))
    images, labels = on_gpu.at(3)
    assert images.is_cuda and labels.is_cuda
    assert torch.allclose(images.cpu(), on_cpu.at(3)[0]) and torch.equal(labels.cpu(), on_cpu.at(3)[1])
    for cfg in (tiny(num_classes=8), tiny_moe(num_classes=8)):
        result = train(cfg, data, TrainRecipe(steps=4, batch_size=32, eval_every=2, device="cuda"))
        assert result.steps == 4 and next(result.model.parameters()).device.type == "cpu"
        assert 0 <= result.val_accuracy <= 1
