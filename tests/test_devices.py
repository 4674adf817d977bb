"""The one parser of device settings: run.device, `launch.py sample --device`, the process group's
device and the benchmarks."""

import pytest
import torch

from lm_human_preferences.hparams import HParamsError
from lm_human_preferences.language.devices import device_named, parse_device
from lm_human_preferences.runtime import RunHParams


@pytest.mark.parametrize("spec", ["tpu", "mps", "meta", "gpu", "cuda:x", ""])
def test_other_names_are_refused(spec):
    with pytest.raises(ValueError, match="^expected auto, cpu, cuda or cuda:N$"):
        parse_device(spec)


def test_names_as_written_without_asking_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_named("auto") is None
    assert device_named("cuda:1") == torch.device("cuda", 1)
    assert parse_device("cpu") == parse_device("auto") == torch.device("cpu")


def test_cuda_that_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="^CUDA is not available on this machine; use cpu or auto$"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert parse_device("auto") == parse_device("cuda") == torch.device("cuda", 0)
    assert parse_device("cuda", index=1) == parse_device("cuda:1", index=0) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match=r"^cuda:2 is not there: only 2 CUDA device\(s\) are visible$"):
        parse_device("cuda:2")


def test_run_device_names_a_gpu_that_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    hp = RunHParams()
    hp.override_from_dict({"device": "cuda:1"})
    with pytest.raises(HParamsError, match=r"'device': cuda:1 is not there: only 1 CUDA device\(s\) are visible"):
        hp.validate()
    hp.override_from_dict({"device": "mps"})
    with pytest.raises(HParamsError, match="'device': expected auto, cpu, cuda or cuda:N"):
        hp.validate()
