"""collect_labels under torchrun: the ranks take turns at the batches and rank 0 writes every row,
in query order, the same file a single process writes."""

import json

from dist_utils import run_distributed
# files: test_reliability's tiny model, corpus and configurations (a module fixture)
from test_reliability import files, hparams, policy_config  # noqa: F401

from lm_human_preferences import collect_labels, distributed


def labels_config(files, save_dir) -> dict:
    """13 labels in batches of 4: four batches, the last one partial."""
    return {**{k: v for k, v in policy_config(files, save_dir).items() if k.startswith(("task.", "run."))},
            "num_labels": 13, "batch_size": 4}


def _collect(rank, world_size, config) -> dict:
    sampled = []
    label_batch = collect_labels.label_batch

    def counted(queries, hp, **kwargs):
        sampled.append(kwargs["step"])
        return label_batch(queries, hp, **kwargs)

    collect_labels.label_batch = counted
    out = collect_labels.train(hparams(collect_labels.CollectLabelsHParams, config), exp_name="labels")
    distributed.barrier()  # rank 0 has written the file
    return {"batches": sampled, "labels": json.loads(out.read_text())}


def test_ranks_take_turns_and_write_what_one_process_writes(files, tmp_path):
    rank0, rank1 = run_distributed(_collect, 2, labels_config(files, tmp_path / "two"), timeout=300)
    (one,) = run_distributed(_collect, 1, labels_config(files, tmp_path / "one"), timeout=300)
    assert (rank0["batches"], rank1["batches"], one["batches"]) == ([0, 2], [1, 3], [0, 1, 2, 3])
    assert len(one["labels"]) == 13
    assert rank0["labels"] == rank1["labels"] == one["labels"]
