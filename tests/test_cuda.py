"""What only a CUDA GPU exercises (skipped without one): the whole offline pipeline on the GPU
in its default precision (bf16 autocast, TF32 head), the KV cache reading only written slots,
and the run's precision flags. The first-PPO-ratio test in test_train_policy.py (eager and
with `--run.compile`) and the compiled-blocks test in test_gpt.py also run on cuda when a GPU
is present. Run them with `python -m pytest tests/test_cuda.py
tests/test_gpt.py tests/test_train_policy.py -k "cuda or ratio"`."""

import json

import pytest
import torch

import launch
from lm_human_preferences.language.gpt import GPT, GPTConfig
from lm_human_preferences.language.sample import sample_sequence
from lm_human_preferences.runtime import Run, RunHParams
from test_pipeline import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_pipeline_on_cuda(tmp_path, monkeypatch):
    """SFT, label collection (sampling with the run's generators), reward training (labels on
    the GPU), PPO in bf16 and the evaluation, each stage on cuda."""
    monkeypatch.chdir(tmp_path)
    args = ["pipeline", "offline_sentiment", "gpu", "--eval_queries=128", f"--task.policy.initial_model={tmp_path}/base",
            *TINY, "--run.device=cuda"]
    assert launch.main(args) == 0
    summary = json.loads((tmp_path / "runs" / "gpu" / "summary.json").read_text())
    assert summary["final"]["gold"] > summary["initial"]["gold"] + 0.1, summary


@torch.no_grad()
@pytest.mark.parametrize("bf16", [False, True])
def test_cached_decoding_on_cuda_equals_a_full_forward(bf16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_vocab=300, n_ctx=64, n_embd=64, n_head=4, n_layer=2)).cuda().eval()
    context = torch.randint(0, 300, (3, 9), device="cuda")
    context[0, :4] = 302  # left padding
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = sample_sequence(model, context, length=6, temperature=0.7, pad_token=302, generator=gen)
        full = model(torch.cat([context, out], 1), pad_token=302).logits[:, 8:-1]  # predicts each new token
        cache = model.new_cache(3, 15)
        model(context, pad_token=302, cache=cache, logits=False)
        steps = [model(out[:, i:i + 1], pad_token=302, cache=cache).logits for i in range(5)]
        first = model.lm_logits(model(context, pad_token=302).hidden[:, -1:])
    assert out.device.type == "cuda" and out.shape == (3, 6)
    tol = dict(rtol=0, atol=0.1) if bf16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([first] + steps, 1), full, **tol)


def test_run_sets_tf32_for_bf16_and_restores_it(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    hp = RunHParams()
    hp.override_from_dict({"device": "cuda", "dtype": "bf16", "tf32": True, "wandb": "off", "save_dir": str(tmp_path)})
    run = Run(hp, exp_name="tf32", config=hp)
    try:
        assert torch.backends.cuda.matmul.allow_tf32
        assert run.generator("labels").device.type == run.generator("sample").device.type == "cuda"
        assert run.generator("shuffle").device.type == "cpu"
    finally:
        run.close()
    assert torch.backends.cuda.matmul.allow_tf32 == before
