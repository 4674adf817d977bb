"""Functions of your own, named on the command line as `module:function`: load them, call them
on decoded text, and check what they return.

    fn = load_function("examples/rewards.py:keyword_reward", key="rewards.function")
    score_fn = text_score_fn("examples/rewards.py:keyword_reward", key="rewards.function", encoding=enc)
    scores = check_scores(fn(queries, responses), n=len(responses), spec=..., key=...)  # (n,) fp32

`module` is a dotted module name, imported from the current directory (as `python -m` would)
or from the installed packages, or the path of a `.py` file; `function` is any callable in it
(`Class.method` works too). Every problem is an `HParamsError` naming the setting (`key`), the
function and what was expected: at load time a module that cannot be imported, a missing
attribute or one that is not callable; at call time a result that is not one finite number per
text.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lm_human_preferences.hparams import HParamsError

SPEC_FORM = "MODULE:FUNCTION or path/to/file.py:FUNCTION"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_function(spec: str, *, key: str) -> Callable:
    """The callable that `spec` ("module:function" or "path/to/file.py:function") names."""
    module_name, _, attr = str(spec).rpartition(":")
    if not module_name or not attr:
        raise HParamsError(f"expected {SPEC_FORM}, got {spec!r}", key=key)
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name).expanduser(), key=key)
    elif _MODULE_NAME.fullmatch(module_name):
        module = _import_module(module_name, key=key)
    else:
        raise HParamsError(f"{module_name!r} is neither a module name (like my_rewards or package.module) nor "
                           f"a .py file; expected {SPEC_FORM}", key=key)
    value, parts = module, attr.split(".")
    for i, part in enumerate(parts):
        if not hasattr(value, part):
            owner = module_name if module_name.endswith(".py") or i else \
                f"module {module_name} ({getattr(module, '__file__', None) or 'built in'})"
            owner += ":" + ".".join(parts[:i]) if i else ""
            names = [n for n in dir(value) if not n.startswith("_") and callable(getattr(value, n, None))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
            raise HParamsError(f"{owner} has no attribute {part!r}{hint}", key=key)
        value = getattr(value, part)
    if not callable(value):
        raise HParamsError(f"{spec} is a {type(value).__name__}, not a function", key=key)
    return value


def _import_module(name: str, *, key: str):
    """`import name` with the current directory first on sys.path for the duration of the import."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise HParamsError(f"no module named {e.name!r} in the current directory ({cwd}) or the installed "
                               f"packages; expected {SPEC_FORM}", key=key) from None
        raise HParamsError(f"importing {name} failed: {type(e).__name__}: {e}", key=key) from e
    except Exception as e:  # an error in the module's own code
        raise HParamsError(f"importing {name} failed: {type(e).__name__}: {_one_line(e)}", key=key) from e
    finally:
        if added:
            sys.path.remove(cwd)


@functools.lru_cache(maxsize=None)
def _load_file(path: Path):
    """The module of a `.py` file (an absolute path), executed once per process under a name of
    its own, so that a file named like an installed module does not replace it."""
    name = f"lm_human_preferences_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_file(path: Path, *, key: str):
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise HParamsError(f"{path} {state}; expected {SPEC_FORM}", key=key)
    try:
        return _load_file(path.resolve())
    except Exception as e:  # an error in the file's own code
        raise HParamsError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}", key=key) from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_scores(values, *, n: int, spec: str, key: str, what: str = "response") -> torch.Tensor:
    """`values` (a list or tuple of numbers, or a 1-D tensor or array) as an (n,) fp32 CPU tensor,
    or an HParamsError saying how it differs from one finite number per `what`."""
    expected = f"expected a list of {n} finite numbers, one per {what} (or a 1-D tensor or array of them)"
    if isinstance(values, (list, tuple)):
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise HParamsError(f"{spec} returned a {type(values).__name__} whose item {i} is {_describe(v)}; "
                                   f"{expected}", key=key)
        array = np.array([float(v) for v in values], dtype=np.float64)
    elif isinstance(values, (torch.Tensor, np.ndarray)):
        array = values
        if isinstance(values, torch.Tensor):
            array = values.detach().cpu()
            array = (array.double() if array.is_floating_point() else array).numpy()  # bf16 has no numpy dtype
        if array.dtype.kind not in "fiu":  # not a real number (bool, complex, str, object, ...)
            kind = "a tensor" if isinstance(values, torch.Tensor) else "an array"
            raise HParamsError(f"{spec} returned {kind} of dtype {values.dtype}; {expected}", key=key)
    else:
        raise HParamsError(f"{spec} returned {_describe(values)}; {expected}", key=key)
    if array.shape != (n,):
        got = f"{len(array)} scores" if array.ndim == 1 else f"an array of shape {array.shape}"
        raise HParamsError(f"{spec} returned {got} for {n} {what}s; {expected}", key=key)
    with np.errstate(over="ignore"):
        scores = torch.from_numpy(array.astype(np.float32))
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise HParamsError(f"{spec} returned {array[i].item()} for {what} {i}; {expected}, within float32 range",
                           key=key)
    return scores


def text_score_fn(spec: str, *, key: str, encoding) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `train_policy.ScoreFn` from `fn(queries: list[str], responses: list[str]) -> scores`: the
    raw queries (B, Lq) and truncated responses (B, Lr) are decoded without their padding, the
    scores checked (`check_scores`) and returned as (B,) fp32 on the responses' device."""
    fn = load_function(spec, key=key)

    def score(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        texts = encoding.decode_batch(responses.tolist())
        scores = fn(encoding.decode_batch(queries.tolist()), texts)
        return check_scores(scores, n=len(texts), spec=spec, key=key).to(responses.device)

    return score
