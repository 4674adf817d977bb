"""Load GPT-2 weights from any of their published forms; save and load our own.

Sources `load_weights` understands:
  * our own model directory: `config.json` (with `"format": "lm_human_preferences"`) +
    `model.safetensors`; trunk keys are the GPT's own (`wte.weight`, `h.0.attn.c_attn.weight`,
    ...), heads live under `heads.` and are returned separately;
  * a Hugging Face GPT-2 directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`), or one of those files on its own;
  * an OpenAI TensorFlow checkpoint directory (`hparams.json` + `model.ckpt.*`), read without
    TensorFlow by `tf_checkpoint.py`.
Nothing is ever unpickled: `.bin` files go through `torch.load(weights_only=True)`.

Our directories are written atomically: into a temporary sibling, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from lm_human_preferences.language.errors import CheckpointError
from lm_human_preferences.language.gpt import GPT, GPTConfig

FORMAT = "lm_human_preferences"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# Conv1D matrices are stored [in, out] by HF and TF; nn.Linear wants [out, in].
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_IGNORED = re.compile(r"(^lm_head\.weight$|\.attn\.bias$|\.attn\.masked_bias$)")
STANDARD_N_HEAD = {768: 12, 1024: 16, 1280: 20, 1600: 25}


@dataclass
class LoadedWeights:
    config: GPTConfig
    trunk: dict[str, torch.Tensor]  # GPT state dict in our layout
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "value.weight"
    meta: dict = field(default_factory=dict)  # the rest of our config.json (kind, encoding, ...)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_failure(error: BaseException) -> str:
    """Why torch.load or safetensors refused a file, in one line."""
    if isinstance(error, pickle.UnpicklingError):
        refused = "; ".join(line.strip() for line in str(error).splitlines()
                            if "GLOBAL" in line or "Unsupported" in line)
        return f"it holds objects other than tensors and plain data, which are never unpickled ({refused})"
    return f"{type(error).__name__}: {one_line(error)}"


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only refuses any pickle payload that is not plain tensors.
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle payload weights_only refused
        raise CheckpointError(f"{path}: not a readable weights file ({load_failure(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def _infer_config(sd: dict[str, torch.Tensor], path: Path, n_head: int | None) -> GPTConfig:
    try:
        n_vocab, n_embd = sd["wte.weight"].shape
        n_ctx = sd["wpe.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]} tensor; is this a GPT-2 checkpoint?") from None
    n_layer = _n_layers(sd)
    n_head = n_head or STANDARD_N_HEAD.get(n_embd)
    if n_head is None:
        raise CheckpointError(f"{path}: cannot tell the number of heads for n_embd={n_embd}; "
                              "put the model's config.json beside it")
    return GPTConfig(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer)


def _n_layers(sd: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("h.")})


def _check_config(cfg: GPTConfig, sd: dict[str, torch.Tensor], where: Path) -> None:
    """The sizes a config file states must be positive integers, and the sizes of its weights:
    checked before a model of those sizes is allocated (n_layer=100000 would take gigabytes)."""
    sizes = cfg.to_dict()
    if not all(type(v) is int and v > 0 for v in sizes.values()) or cfg.n_embd % cfg.n_head:
        raise CheckpointError(f"{where}: bad sizes {sizes} (positive integers expected, n_embd a multiple of "
                              "n_head)")
    wte, wpe = sd.get("wte.weight"), sd.get("wpe.weight")
    if wte is None or wpe is None or wte.dim() != 2 or wpe.dim() != 2:
        raise CheckpointError(f"{where}: its weights have no wte.weight and wpe.weight matrices; "
                              "is this a GPT-2 checkpoint?")
    found = {"n_vocab": wte.shape[0], "n_embd": wte.shape[1], "n_ctx": wpe.shape[0], "n_layer": _n_layers(sd)}
    wrong = [f"{k}={sizes[k]} but the weights have {v}" for k, v in found.items() if sizes[k] != v]
    if wrong:
        raise CheckpointError(f"{where}: does not match its weights ({'; '.join(wrong)})")


def _from_conv1d(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """HF / TF GPT-2 naming and [in, out] matrices -> our layout."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if HF_IGNORED.search(k):
            continue
        if k.endswith(CONV1D):
            if v.dim() != 2:
                raise CheckpointError(f"{path}: {k} has shape {list(v.shape)}, expected a matrix")
            v = v.t()
        out[k] = v.contiguous()
    return out


def _load_hf(path: Path) -> LoadedWeights:
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        files = [p for p in candidates if p.is_file()]
        if not files:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin inside")
        path = files[0]
    sd = _from_conv1d(_read_tensor_file(path), path)
    hf_cfg = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    cfg = _infer_config(sd, path, hf_cfg.get("n_head"))
    _check_config(cfg, sd, folder / CONFIG_FILE if hf_cfg else path)
    return LoadedWeights(config=cfg, trunk=sd)


def _load_tf(folder: Path) -> LoadedWeights:
    from lm_human_preferences.language import tf_checkpoint

    hp = _read_json(folder / "hparams.json")
    try:
        cfg = GPTConfig(n_vocab=hp["n_vocab"], n_ctx=hp["n_ctx"], n_embd=hp["n_embd"],
                        n_head=hp["n_head"], n_layer=hp["n_layer"])
    except KeyError as e:
        raise CheckpointError(f"{folder / 'hparams.json'}: missing key {e.args[0]}") from None
    names = {"g": "weight", "b": "bias", "w": "weight"}
    sd = {}
    try:
        arrays = tf_checkpoint.read_checkpoint(str(folder))
    except (FileNotFoundError, CheckpointError) as e:
        raise CheckpointError(f"{folder}: cannot read the TensorFlow checkpoint ({e})") from None
    for name, arr in arrays.items():
        parts = name.split("/")
        if parts[0] != "model":
            continue
        if parts[1] in ("wte", "wpe"):
            sd[f"{parts[1]}.weight"] = torch.from_numpy(arr.copy())
            continue
        if parts[1].startswith("h"):
            parts[1] = "h." + parts[1][1:]
        tensor = torch.from_numpy(arr.copy())
        if parts[-1] == "w":
            tensor = tensor.squeeze(0)  # [1, in, out] -> [in, out]
        sd[".".join(parts[1:-1] + [names[parts[-1]]])] = tensor
    sd = _from_conv1d(sd, folder)
    _check_config(cfg, sd, folder / "hparams.json")
    return LoadedWeights(config=cfg, trunk=sd)


def _load_own(folder: Path, meta: dict) -> LoadedWeights:
    sd = _read_tensor_file(folder / WEIGHTS_FILE)
    try:
        cfg = GPTConfig.from_dict(meta["gpt"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad 'gpt' section ({e})") from None
    trunk = {k: v for k, v in sd.items() if not k.startswith("heads.")}
    _check_config(cfg, trunk, folder / CONFIG_FILE)
    heads = {k.removeprefix("heads."): v for k, v in sd.items() if k.startswith("heads.")}
    return LoadedWeights(config=cfg, trunk=trunk, heads=heads,
                         meta={k: v for k, v in meta.items() if k != "gpt"})


def load_weights(source: str | os.PathLike) -> LoadedWeights:
    """Read weights from our directory, a HF directory or file, or an OpenAI TF checkpoint."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "hparams.json").is_file() and list(path.glob("*.ckpt.index")):
            return _load_tf(path)
        if (path / CONFIG_FILE).is_file():
            meta = _read_json(path / CONFIG_FILE)
            if meta.get("format") == FORMAT:
                return _load_own(path, meta)
        return _load_hf(path)
    if path.suffix in (".safetensors", ".bin", ".pt"):
        return _load_hf(path)
    raise CheckpointError(f"{path}: expected a model directory, a .safetensors or a .bin file")


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped tensors."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(want[k].shape)}"
              for k in sorted(set(want) & set(sd)) if sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))


def build_gpt(weights: LoadedWeights, source) -> GPT:
    """A GPT (on CPU, fp32) of `weights`' config with its trunk weights, checked against it; the
    one place a model is built from loaded weights (`source` names them in errors)."""
    model = GPT(weights.config)
    sd = {k: v.float() for k, v in weights.trunk.items()}
    check_state_dict(model, sd, source)
    model.load_state_dict(sd)
    return model


def load_gpt(source: str | os.PathLike) -> GPT:
    """A GPT (on CPU, fp32) with the trunk weights of any source `load_weights` reads."""
    return build_gpt(load_weights(source), source)


def plain_file_mode() -> int:
    """The permissions a plain `open` gives a new file under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_file_beside(target: Path) -> tuple[int, str]:
    """(fd, path) of a new empty file in `target`'s directory to write and then rename over it,
    with `plain_file_mode` (mkstemp's own 0600 would leave a model or config, once renamed,
    readable by its owner alone)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.fchmod(fd, plain_file_mode())
    return fd, tmp


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", **open_args) -> Iterator[IO]:
    """A file opened in `mode` to write `path` through: a temporary file beside it (created with
    its directory), synced and renamed over `path` when the block ends, removed when the block
    raises. A crash leaves the old file or the new one, never a part. The one way this library
    writes a file whole (models, checkpoints, run files, labels, data sets, reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` with `atomic_writer`. An OSError names `path`."""
    try:
        with atomic_writer(path) as f:
            f.write(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def save_model(out_dir: str | os.PathLike, *, gpt: GPT, heads: dict[str, torch.Tensor] | None = None,
               meta: dict | None = None) -> Path:
    """Write `model.safetensors` then `config.json` into `out_dir`, each atomically (temp + rename)."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in gpt.state_dict().items()}
    for k, v in (heads or {}).items():
        tensors[f"heads.{k}"] = v.detach().to("cpu", torch.float32).contiguous().reshape(v.shape)
    config = {"format": FORMAT, **(meta or {}), "gpt": gpt.config.to_dict()}
    # Serialized in memory and written by Python, so a full or read-only disk is an OSError naming
    # the file (safetensors' own file writer reports it as a SafetensorError).
    atomic_write_bytes(out_dir / WEIGHTS_FILE, save_safetensors(tensors))
    atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out_dir
