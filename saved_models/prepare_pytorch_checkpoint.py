"""Convert GPT-2 weights into this library's model layout (model.safetensors + config.json).

    python saved_models/prepare_pytorch_checkpoint.py --source PATH --out saved_models/gpt2
    python saved_models/prepare_pytorch_checkpoint.py --download gpt2 --out saved_models/gpt2

PATH is a Hugging Face model directory, a model.safetensors, a pytorch_model.bin, or an
OpenAI TensorFlow checkpoint directory (model.ckpt.* + hparams.json). --download fetches
gpt2 / gpt2-medium / gpt2-large / gpt2-xl from the Hugging Face hub (needs network).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences.language.checkpoints import CheckpointError, load_gpt, load_weights, save_model  # noqa: E402
from lm_human_preferences.language.encodings import EncodingError, encoding_from_meta, get_encoding  # noqa: E402
from lm_human_preferences.language.gpt import HF_NAMES  # noqa: E402

HUB_IDS = {name: f"openai-community/{name}" for name in HF_NAMES}


def fail(message: str):
    """A user error: one paragraph on stderr, exit status 2 (as launch.py)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        fail("--download needs the huggingface_hub package: pip install huggingface_hub")
    try:
        return Path(snapshot_download(HUB_IDS[name], allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # offline, hub errors: say what to do instead
        fail(f"could not download {HUB_IDS[name]} ({type(e).__name__}: {e}). "
             "Offline? Copy a converted model directory here, or pass --source with local files.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="HF dir, model.safetensors, pytorch_model.bin, or OpenAI TF checkpoint dir")
    src.add_argument("--download", choices=sorted(HUB_IDS), help="fetch from the Hugging Face hub")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--encoding", default=None,
                   help="tokenizer the model uses (default: the source's own for a model of this library, else gpt2)")
    args = p.parse_args(argv)
    if args.encoding is not None:
        try:
            get_encoding(args.encoding)
        except ValueError as e:
            fail(f"--encoding: {e}")
    source = download(args.download) if args.download else Path(args.source)
    try:
        weights = load_weights(source)
        model = load_gpt(source)
    except CheckpointError as e:
        fail(str(e))
    if weights.meta.get("kind") == "reward":
        fail(f"{source}: is a reward model; convert a language model or a policy")
    encoding = args.encoding or weights.meta.get("encoding") or "gpt2"
    try:
        n_vocab = encoding_from_meta(encoding).n_vocab
    except EncodingError as e:
        fail(f"{source}: cannot build the encoding its config.json names ({e})")
    if n_vocab != model.config.n_vocab:  # still written (its weights load), but no trainer or sampler takes it
        print(f"warning: {source}: the model has {model.config.n_vocab} tokens, its encoding {n_vocab}; training "
              f"and sampling will refuse it (pass the --encoding it was trained with)", file=sys.stderr)
    out = save_model(args.out, gpt=model, meta={"kind": "gpt", "encoding": encoding})
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {model.config})")


if __name__ == "__main__":
    main()
