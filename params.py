"""Named task presets and experiments: plain dicts of dotted keys, no logic.

`launch.py <subcommand> <task> <experiment>` starts from the subcommand's defaults, applies
`TASKS[task]` under `task.`, then `EXPERIMENTS[subcommand][task]`, then the command line.
The values reproduce the original's launch.py (docs/original.md §4 table).
"""

LABELS_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"

BOOKS_TASK = {
    "query_length": 64,
    "query_dataset": "books",
    "response_length": 24,
    "start_text": ".",  # start the context at the beginning of a sentence
    "end_text": ".",  # and end it at the end of one
    "truncate_token": 13,  # '.': completions end at the end of a sentence
    "truncate_after": 16,  # after at least 16 tokens
    "policy.temperature": 0.7,
    "policy.initial_model": "gpt2",
}

CNNDM_TASK = {
    "query_prefix": "Article:\n\n",
    "query_suffix": "\n\nTL;DR:",
    "end_text": "\n",
    "query_dataset": "cnndm",
    "query_length": 500,
    "response_length": 75,
    "start_text": None,
    "truncate_after": 55,
    "truncate_token": 198,  # '\n'
    "policy.temperature": 0.5,
    "policy.initial_model": "gpt2",
}

TLDR_TASK = {
    "query_suffix": "\n\nTL;DR:",
    "query_dataset": "tldr",
    "query_length": 500,
    "response_length": 75,
    "start_text": None,
    "truncate_after": 55,
    "truncate_token": 198,
    "policy.temperature": 0.7,
    "policy.initial_model": "gpt2",
}

# The offline tasks: the same code path at a size a CPU learns in minutes.
OFFLINE_TASK = {
    "query_length": 16,
    "query_dataset": "offline_corpus",
    "response_length": 12,
    "start_text": ".",
    "end_text": None,
    "truncate_token": None,
    "truncate_after": 0,
    "policy.temperature": 0.7,
    "policy.initial_model": "saved_models/offline-gpt",
}

# Personalized Soups offline (docs/personalized_soups.md): queries carry preference sentences,
# written by `python datasets/personal.py queries`; each stage names its own query file.
OFFLINE_PERSONAL_TASK = {**OFFLINE_TASK, "query_length": 24, "start_text": None,
                         "query_dataset": "datasets/personal/pmorl.jsonl"}
# The offline dialogue task (RLCD, docs/rlcd.md): Human/Assistant prompts of the generated
# dialogue corpus; a reply ends at the newline before the next "Human:" turn, and a reply that
# does not end within response_length gets the penalty (the paper's non-termination penalty).
OFFLINE_DIALOGUE_TASK = {
    "query_length": 64,
    "query_dataset": "offline_dialogue_prompts",
    "response_length": 24,
    "start_text": None,
    "end_text": None,
    "truncate_token": 7,  # "\n" in the vocabulary train_sft builds from the dialogue corpus (a test checks it)
    "truncate_after": 1,
    "policy.temperature": 0.7,
    "policy.initial_model": "saved_models/offline-dialogue-gpt",
}

# Length bias (docs/length_bias.md): queries end at a sentence's end and a response is the next
# sentence, cut after its "." (token 1 of the offline model's vocabulary), so responses vary in
# length; one without "." within 24 tokens gets the penalty.
OFFLINE_LENGTH_TASK = {**OFFLINE_TASK, "end_text": ".", "response_length": 24, "truncate_token": 1}

TASKS = {
    "sentiment": BOOKS_TASK,
    "descriptiveness": BOOKS_TASK,
    "cnndm": CNNDM_TASK,
    "tldr": TLDR_TASK,
    "offline_sentiment": OFFLINE_TASK,
    "offline_descriptiveness": OFFLINE_TASK,
    "offline_personal": OFFLINE_PERSONAL_TASK,
    "offline_dialogue": OFFLINE_DIALOGUE_TASK,
    "offline_length": OFFLINE_LENGTH_TASK,
}

_BOOKS_REWARD = {
    "labels.type": "best_of_4",
    "labels.num_train": 4992,
    "batch_size": 32,
    "lr": 5e-5,
    "rollout_batch_size": 512,
    "normalize_samples": 256,
    "normalize_before": True,
    "normalize_after": True,
    "run.seed": 1,
}
_SUMMARIZE_REWARD = {**_BOOKS_REWARD, "labels.num_train": 46000, "batch_size": 16, "lr": 2.5e-5,
                     "rollout_batch_size": 128}
_OFFLINE_REWARD = {
    "labels.type": "best_of_4",
    "labels.num_train": 7936,  # of 8192 collected; the last 256 are held out
    "batch_size": 32,
    "lr": 1e-3,
    "rollout_batch_size": 256,
    "normalize_samples": 512,
    "run.seed": 1,
}

TRAIN_REWARD = {
    "sentiment": {**_BOOKS_REWARD, "labels.source": LABELS_URL + "sentiment/offline_5k.json"},
    "descriptiveness": {**_BOOKS_REWARD, "labels.source": LABELS_URL + "descriptiveness/offline_5k.json"},
    "cnndm": {**_SUMMARIZE_REWARD, "labels.source": LABELS_URL + "cnndm/online_45k.json"},
    "tldr": {**_SUMMARIZE_REWARD, "labels.source": LABELS_URL + "tldr/online_45k.json"},
    "offline_sentiment": _OFFLINE_REWARD,
    "offline_descriptiveness": _OFFLINE_REWARD,
    # one reward model per preference, on labels of queries without preferences
    "offline_personal": {**_OFFLINE_REWARD, "labels.num_train": 1792,
                         "task.query_dataset": "datasets/personal/plain.jsonl"},
    # Simulated pairs (simulate_pairs' pairs.csv) with soft labels where the CSV has win2_prob.
    "offline_dialogue": {"labels.type": "soft_preference", "labels.template": "dialogue", "labels.num_train": 768,
                         "batch_size": 32, "lr": 5e-4, "rollout_batch_size": 128, "normalize_samples": 256,
                         "run.seed": 1},
    # preference pairs a judge labeled (prep_pairs --from_outputs); --labels.source names them
    "offline_length": {**_OFFLINE_REWARD, "labels.type": "preference", "labels.num_train": 1152},
}

_BOOKS_POLICY = {
    "ppo.lr": 1e-5,
    "ppo.total_episodes": 1_000_000,
    "ppo.batch_size": 512,
    "rewards.kl_coef": 0.15,
    "rewards.adaptive_kl": "on",
    "rewards.adaptive_kl.target": 6.0,
    "run.seed": 1,
}
_SUMMARIZE_POLICY = {
    "ppo.lr": 2e-6,
    "ppo.total_episodes": 1_000_000,
    "ppo.batch_size": 32,
    # The original set a nonexistent `rewards.whiten`; the intent is no reward whitening.
    "ppo.whiten_rewards": False,
    "run.seed": 1,
}
_OFFLINE_POLICY = {
    "ppo.lr": 1e-4,
    "ppo.total_episodes": 8192,
    "ppo.batch_size": 64,
    "ppo.nminibatches": 4,
    "rewards.kl_coef": 0.1,
    "rewards.adaptive_kl": "on",
    "rewards.adaptive_kl.target": 4.0,
    "rewards.adaptive_kl.horizon": 1000,
    "run.seed": 1,
}

TRAIN_POLICY = {
    "sentiment": _BOOKS_POLICY,
    "descriptiveness": _BOOKS_POLICY,
    "cnndm": {**_SUMMARIZE_POLICY, "rewards.kl_coef": 0.01},
    "tldr": {**_SUMMARIZE_POLICY, "rewards.kl_coef": 0.03},
    "offline_sentiment": _OFFLINE_POLICY,
    "offline_descriptiveness": _OFFLINE_POLICY,
    "offline_personal": {**_OFFLINE_POLICY, "ppo.total_episodes": 4096},
    # AlpacaFarm's options as the paper used them: the KL estimate clamped at zero, responses
    # ending at the next Human turn (with the task's penalty when a reply does not end); the
    # rewards are whitened without a shift (the original's ppo.whiten_rewards already is).
    # β starts at 0.05 and adapts toward the offline preset's KL target of 4.
    "offline_dialogue": {**_OFFLINE_POLICY, "ppo.total_episodes": 512,
                         "rewards.kl_coef": 0.05, "ppo.kl_estimator": "k1_clamped",
                         "task.stop_text": "\n\nHuman:"},
    "offline_length": _OFFLINE_POLICY,
}
# P-MORL and the P-Soups policies (one preference each): LoRA, as in the paper
TRAIN_PMORL = {"offline_personal": {**_OFFLINE_POLICY, "ppo.total_episodes": 4096, "ppo.lr": 2e-3, "lora": "on",
                                    "lora.rank": 4, "lora.alpha": 16.0}}

_OFFLINE_SFT = {
    "data": "offline_corpus",
    "encoding": "gpt2-subset",
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.n_embd": 64,
    "model.n_ctx": 64,
    "seq_length": 64,
    "batch_size": 32,
    "steps": 600,
    "lr": 3e-3,
    "run.seed": 1,
}

TRAIN_SFT = {"offline_sentiment": _OFFLINE_SFT, "offline_descriptiveness": _OFFLINE_SFT, "offline_length": _OFFLINE_SFT,
             # the multitask SFT baseline (docs/personalized_soups.md)
             "offline_personal": {"data": "datasets/personal/multitask_sft.jsonl",
                                  "initial_model": "saved_models/offline-gpt", "seq_length": 40, "batch_size": 32,
                                  "steps": 100, "lr": 3e-4, "warmup_steps": 10, "eval_interval": 50, "run.seed": 1},
             # the dialogue base model: longer rows (a labeling document is up to ~150 tokens)
             "offline_dialogue": {**_OFFLINE_SFT, "data": "offline_dialogue", "model.n_ctx": 160,
                                  "seq_length": 160, "model.n_embd": 96, "steps": 500}}

SIMULATE_PAIRS = {"offline_dialogue": {"affixes": "offline_dialogue", "length": 24, "batch_size": 128,
                                       "run.seed": 1}}

COLLECT_LABELS = {
    "offline_sentiment": {"labeler": "sentiment", "num_labels": 8192, "batch_size": 256, "run.seed": 1},
    "offline_descriptiveness": {"labeler": "descriptiveness", "num_labels": 8192, "batch_size": 256, "run.seed": 1},
    "offline_personal": {"labeler": "friendly", "num_labels": 2048, "batch_size": 256, "run.seed": 1,
                         "task.query_dataset": "datasets/personal/plain.jsonl"},
}

EXPERIMENTS = {"train_sft": TRAIN_SFT, "collect_labels": COLLECT_LABELS, "train_reward": TRAIN_REWARD,
               "train_policy": TRAIN_POLICY, "train_pmorl": TRAIN_PMORL,
               "simulate_pairs": SIMULATE_PAIRS}
