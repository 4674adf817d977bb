"""Which torch device a setting names: `auto`, `cpu`, `cuda` or `cuda:N`. The one parser behind
`--run.device`, `launch.py sample --device`, the process group's device and the benchmarks."""

from __future__ import annotations

import torch

EXPECTED = "expected auto, cpu, cuda or cuda:N"


def device_named(spec: str) -> torch.device | None:
    """The device `spec` names as written (None for `auto`), without asking whether it is there;
    a ValueError for any other name than auto, cpu, cuda and cuda:N."""
    if spec == "auto":
        return None
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(EXPECTED) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(EXPECTED)
    return device


def parse_device(spec: str, *, index: int | None = None) -> torch.device:
    """The device `spec` names, checked to be there: `auto` is CUDA when available, else the CPU;
    `auto` and `cuda` take GPU `index` (None: torch's current one). A ValueError for an unknown
    name, a RuntimeError for CUDA that is not there; their messages start with the problem, for
    the caller to name its setting before it."""
    device = device_named(spec)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine; use cpu or auto")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    if device.index >= torch.cuda.device_count():
        raise RuntimeError(f"cuda:{device.index} is not there: only {torch.cuda.device_count()} CUDA device(s) "
                           f"are visible")
    return device
