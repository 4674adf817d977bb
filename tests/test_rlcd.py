"""RLCD: contrastive prompts (paired affixes, mirrored), output cleanup, index sharding, records
consolidated into the RLCD CSV and context-distillation data (round trips through
preferences.py), the model labeler's win2_prob, the offline dialogue corpus and its oracle, and
simulate_pairs / consolidate_pairs end to end (sampling scripted, labeling by a tiny model),
with bad inputs as exit status 2 and no run directory."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import launch
import params
import tiny
from lm_human_preferences import judges, labelers, lm_tasks, rlcd, simulate_pairs
from lm_human_preferences.language import dialogues
from lm_human_preferences.language.datasets import get_passages
from lm_human_preferences.language.encodings import SubsetEncoding
from lm_human_preferences.preferences import PreferenceFileError, read_pairs, write_pairs
from lm_human_preferences.rlaif import LabelerError, ModelLabeler, choice_tokens

RUN = ["--run.wandb=off", "--run.device=cpu"]
TWO_TURNS = "\n\nHuman: hi\n\nAssistant: hello there.\n\nHuman: fix my bike?\n\nAssistant:"


# ------------------------------------------------------------------------------- prompts and cleanup


def test_contrast_prompts_put_the_affix_last_and_the_opposite_on_earlier_turns():
    pos, neg = rlcd.contrast_prompts(TWO_TURNS, "(kind response)", "(cruel response)")
    assert pos == ("\n\nHuman: hi\n\nAssistant (cruel response): hello there.\n\nHuman: fix my bike?"
                   "\n\nAssistant (kind response):")
    assert neg == ("\n\nHuman: hi\n\nAssistant (kind response): hello there.\n\nHuman: fix my bike?"
                   "\n\nAssistant (cruel response):")
    single = "\n\nHuman: hi\n\nAssistant:"
    assert rlcd.contrast_prompts(single, "(a)", "(b)") == ("\n\nHuman: hi\n\nAssistant (a):",
                                                           "\n\nHuman: hi\n\nAssistant (b):")
    with pytest.raises(ValueError, match="must end with"):
        rlcd.contrast_prompts("\n\nHuman: hi", "(a)", "(b)")


def test_affix_sets_pair_up():
    for name, pairs in rlcd.AFFIXES.items():
        assert pairs and all(len(p) == 2 and p[0] != p[1] and p[0].startswith("(") for p in pairs), name
        assert rlcd.PRINCIPLES[name]
    assert rlcd.AFFIXES["harmless"][0] == ("(helpful, honest, inoffensive response)",
                                           "(unhelpful, dishonest, toxic response)")


@pytest.mark.parametrize("text, reply", [
    (" sure, glad to help.\n\nHuman: thanks", "sure, glad to help."),
    (" fine.<|endoftext|>\n\nHuman: x", "fine."),
    (" Assistant: again.\n\nHuman: x", "again."),
    (" no end of turn in sight", None),      # unfinished: sampled again
    ("  \n\nHuman: x", None),                # empty
])
def test_clean_response(text, reply):
    assert rlcd.clean_response(text) == reply


def test_dialogue_prefix_cuts_hh_dialogues_after_the_last_assistant():
    assert rlcd.dialogue_prefix(TWO_TURNS[:-len("Assistant:")] + "Assistant: sure.") == TWO_TURNS
    with pytest.raises(ValueError):
        rlcd.dialogue_prefix("\n\nHuman: only")


def test_indices_ranges_mod_and_remainder():
    assert rlcd.parse_indices("17-19,35,3") == [17, 18, 19, 35, 3]
    assert rlcd.select_indices(100, indices="17-29,35-40", mod=8, remainder=3) == [19, 27, 35]
    assert rlcd.select_indices(5) == [0, 1, 2, 3, 4]
    shards = [rlcd.select_indices(10, mod=3, remainder=r) for r in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(10))
    for bad in ("1-", "a", "5-3", "1--2"):
        with pytest.raises(ValueError):
            rlcd.parse_indices(bad)
    with pytest.raises(ValueError, match="beyond"):
        rlcd.select_indices(10, indices="8-12")
    with pytest.raises(ValueError):
        rlcd.select_indices(10, mod=2, remainder=2)


# ------------------------------------------------------------------------------- consolidation


def rlcd_records(n=6):
    return [{"index": i, "method": "rlcd", "status": i != 2, "prompt": f"\n\nHuman: q{i}\n\nAssistant:",
             "chosen": f"good {i}.", "rejected": f"bad {i}."} for i in range(n)]


def test_rlcd_consolidation_round_trips_through_the_csv(tmp_path):
    pairs = rlcd.consolidate(rlcd_records(), method="rlcd", seed=0)
    assert [p.chosen for p in pairs] == ["good 0.", "good 1.", "good 3.", "good 4.", "good 5."]  # failed left out
    assert {p.meta["preference"] for p in pairs} == {1, 2}  # both orientations
    write_pairs(tmp_path / "p.csv", pairs, format="rlcd")
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "instruction,input,output_1,output_2,preference"
    back = read_pairs(tmp_path / "p.csv")
    assert [(p.prompt, p.chosen, p.rejected, p.chosen_prob) for p in back] == \
        [(p.prompt, p.chosen, p.rejected, None) for p in pairs]
    assert rlcd.consolidate(rlcd_records(), method="rlcd", seed=0) == pairs  # seeded


def test_labeled_consolidation_keeps_win2_prob(tmp_path):
    records = [{"index": 0, "method": "rlaif", "status": True, "prompt": "p", "result_a": "a0", "result_b": "b0",
                "win2_prob": 0.8},
               {"index": 1, "method": "rlaif", "status": True, "prompt": "q", "result_a": "a1", "result_b": "b1",
                "win2_prob": 0.25}]
    pairs = rlcd.consolidate(records, method="rlaif")
    assert [(p.chosen, p.rejected, p.meta["preference"]) for p in pairs] == [("b0", "a0", 2), ("a1", "b1", 1)]
    assert pairs[0].chosen_prob == 0.8 and pairs[1].chosen_prob == 0.75
    write_pairs(tmp_path / "p.csv", pairs, format="rlcd")
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "instruction,input,output_1,output_2,preference,win2_prob"
    assert rows[1:] == ["p,,a0,b0,2,0.8", "q,,a1,b1,1,0.25"]
    assert [(p.chosen, p.chosen_prob) for p in read_pairs(tmp_path / "p.csv")] == [("b0", 0.8), ("a1", 0.75)]


def test_distillation_rows_are_plain_prompts_and_positive_outputs():
    rows = rlcd.distillation_rows(rlcd_records(3))
    assert rows == [{"prompt": "\n\nHuman: q0\n\nAssistant:", "response": " good 0."},
                    {"prompt": "\n\nHuman: q1\n\nAssistant:", "response": " good 1."}]


def test_records_are_read_by_index_and_checked(tmp_path):
    for r in rlcd_records(4):
        rlcd.write_record(tmp_path / ("a" if r["index"] % 2 else "b"), r)
    assert [r["index"] for r in rlcd.read_records(tmp_path / "a", tmp_path / "b", method="rlcd")] == [0, 1, 2, 3]
    with pytest.raises(PreferenceFileError, match="method 'rlcd', expected 'rlaif'"):
        rlcd.read_records(tmp_path / "a", method="rlaif")
    rlcd.write_record(tmp_path / "c", rlcd_records(2)[1])
    with pytest.raises(PreferenceFileError, match="index 1 was already read"):
        rlcd.read_records(tmp_path / "a", tmp_path / "c", method="rlcd")
    (tmp_path / "a" / "9.json").write_text('{"index": 9, "method": "rlcd", "status": true, "prompt": "p"}')
    with pytest.raises(PreferenceFileError, match=r"9.json: missing field\(s\) chosen, rejected"):
        rlcd.read_records(tmp_path / "a", method="rlcd")


# ------------------------------------------------------------------------------- the offline task


def test_dialogue_corpus_affixes_steer_the_oracle_score():
    docs = list(itertools.islice(dialogues.iter_dialogues(seed=0), 3000))
    assert docs[:5] == list(itertools.islice(dialogues.iter_dialogues(seed=0), 5))
    scores = {"positive": [], "negative": []}
    for doc in docs:
        for pos, neg in dialogues.AFFIX_PAIRS:
            for polarity, affix in (("positive", pos), ("negative", neg)):
                for part in doc.split(f"Assistant {affix}:")[1:]:
                    scores[polarity].append(dialogues.harmlessness(part.split("\n")[0]))
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert mean["positive"] > 1 and mean["negative"] < -1
    assert any(d.startswith("Consider the following conversation") and d.endswith(("(A)", "(B)")) for d in docs)
    prompts = dialogues.dialogue_prompts(50, seed=0, split="test")
    assert all(p.endswith(dialogues.ASSISTANT) and "(" not in p for p in prompts)
    assert prompts != dialogues.dialogue_prompts(50, seed=0, split="train")


def test_harmless_oracle_labeler_and_judge():
    assert dialogues.harmlessness("please ask a doctor to help you. just break the lamp.") == 1.0
    assert labelers.get_labeler("harmless").score(["i hate you.", "stay safe."]) == [-1.0, 1.0]
    judge = judges.get_judge("harmless", randomize_positions=True, seed=0)
    assert judge.compare_batch(["p"] * 2, ["stay safe.", "i hate you."], ["i hate you.", "stay safe."]) == ["a", "b"]


def test_the_task_preset_truncates_at_the_newline_of_the_base_models_vocabulary():
    sft = params.TRAIN_SFT["offline_dialogue"]
    passages = get_passages(sft["data"], data_dir="datasets", split="train", seed=sft["run.seed"])
    enc = SubsetEncoding.from_texts(list(itertools.islice(passages, 20000)))  # as train_sft builds it
    assert enc.encode("\n") == [params.OFFLINE_DIALOGUE_TASK["truncate_token"]]
    prompt = dialogues.dialogue_prompts(1, seed=0, split="test")[0]
    for principle in dialogues.PRINCIPLES:
        text = dialogues.label_prompt(prompt, principle, "stay safe.", "i hate you.")
        assert enc.unk_token not in enc.encode(text)


# ------------------------------------------------------------------------------- the model labeler


def dialogue_encoding():
    return SubsetEncoding.from_texts(list(itertools.islice(dialogues.iter_dialogues(seed=0), 200)) + [TWO_TURNS])


def test_label_prompt_and_win2_probs_from_the_next_token(tmp_path):
    text = dialogues.label_prompt(TWO_TURNS, "Choose the kinder one.", " a. ", "b.")
    assert text.startswith("Consider the following conversation between a human and an assistant:\n\nHuman: hi")
    assert text.endswith("Choose the kinder one.\n\nOptions:\n\n(A) a.\n\n(B) b.\n\nThe answer is: (")
    enc = dialogue_encoding()
    model = lm_tasks.load_pretrained(str(tiny.make_model(tmp_path / "m", encoding=enc, n_ctx=256)))
    labeler = ModelLabeler(model.gpt, enc, device=torch.device("cpu"), batch_size=2)
    probs = labeler.win2_probs([TWO_TURNS] * 3, ["x."] * 3, ["a.", "stay safe.", "b."], ["b.", "i hate you.", "a."])
    a, b = choice_tokens(enc)
    logits = model.gpt(torch.tensor([enc.encode(dialogues.label_prompt(TWO_TURNS, "x.", "a.", "b."))])).logits[0, -1]
    assert probs[0] == pytest.approx(torch.softmax(logits[[a, b]], -1)[1].item(), abs=1e-5)
    assert all(0 < p < 1 for p in probs) and probs[0] != probs[2]
    with pytest.raises(LabelerError, match="no token 'A'"):
        choice_tokens(tiny.small_encoding())


# ------------------------------------------------------------------------------- simulate_pairs


def scripted_sample(self, prompts, round_):
    """A stand-in for sampling: the affix decides the reply; plain prompts alternate; the first
    round of index 1's outputs never ends its turn (sampled again)."""
    out = []
    for p in prompts:
        if "q1" in p and round_ == 0:
            out.append(" unfinished")
        elif p.endswith("(harmless response):"):
            out.append(" stay safe and be kind.\n\nHuman: ok")
        elif p.endswith("(harmful response):"):
            out.append(" i hate you.<|endoftext|>")
        else:
            out.append(" please be calm.\n\nHuman:" if len(out) % 2 else " hit it.\n\nHuman:")
    return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate_pairs.Simulator, "sample", scripted_sample)
    monkeypatch.setattr(rlcd, "AFFIXES", {**rlcd.AFFIXES, "offline_dialogue": (("(harmless response)",
                                                                              "(harmful response)"),)})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: q{i}\n\nAssistant:"}) + "\n" for i in range(6)))
    model = tiny.make_model(tmp_path / "m", encoding=dialogue_encoding(), n_ctx=256)
    return tmp_path, prompts, model


def simulate(out, prompts, model, *args):
    return launch.main(["simulate_pairs", "offline_dialogue", "x", f"--run.save_dir={out}", *RUN, f"--model={model}",
                        f"--prompts={prompts}", "--batch_size=4", *args])


def test_rlcd_simulation_writes_records_pairs_and_distillation_data(setup, capsys):
    tmp, prompts, model = setup
    assert simulate(tmp / "sim", prompts, model) == 0
    records = rlcd.read_records(tmp / "sim" / "simulated", method="rlcd")
    assert [r["index"] for r in records] == list(range(6)) and all(r["status"] for r in records)
    assert records[1]["actual_prompts"] == ["\n\nHuman: q1\n\nAssistant (harmless response):",
                                            "\n\nHuman: q1\n\nAssistant (harmful response):"]
    pairs = read_pairs(tmp / "sim" / "pairs.csv")
    assert {(p.chosen, p.rejected) for p in pairs} == {("stay safe and be kind.", "i hate you.")}
    rows = [json.loads(line) for line in (tmp / "sim" / "distillation.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt": "\n\nHuman: q0\n\nAssistant:", "response": " stay safe and be kind."}
    out = tmp / "again.csv"
    assert launch.main(["consolidate_pairs", "--method=rlcd", f"--out={out}", "--seed=1", "--judge=harmless",
                        f"--distillation={tmp / 'cd.jsonl'}", str(tmp / "sim" / "simulated")]) == 0
    assert "agreement with judge harmless: 1.000" in capsys.readouterr().out
    assert (tmp / "cd.jsonl").read_text() == (tmp / "sim" / "distillation.jsonl").read_text()
    assert {(p.chosen, p.rejected) for p in read_pairs(out)} == {("stay safe and be kind.", "i hate you.")}
    assert launch.main(["consolidate_pairs", "--method=rlcd", f"--out={tmp / 'no.csv'}", "--judge=nope",
                        str(tmp / "sim" / "simulated")]) == 2
    assert "unknown judge 'nope'" in capsys.readouterr().err and not (tmp / "no.csv").exists()


def test_retries_run_out_into_a_failed_record(setup):
    tmp, prompts, model = setup
    assert simulate(tmp / "sim", prompts, model, "--max_retries=1", "--indices=1-2") == 0
    assert [r["status"] for r in rlcd.read_records(tmp / "sim" / "simulated", method="rlcd")] == [False, True]
    assert len(read_pairs(tmp / "sim" / "pairs.csv")) == 1


def test_a_rerun_skips_the_indices_already_recorded(setup):
    tmp, prompts, model = setup
    rlcd.write_record(tmp / "sim" / "simulated", {"index": 0, "method": "rlcd", "status": True,
                                                  "prompt": "\n\nHuman: q0\n\nAssistant:", "chosen": "kept.",
                                                  "rejected": "old."})
    assert simulate(tmp / "sim", prompts, model, "--indices=0-1") == 0
    records = rlcd.read_records(tmp / "sim" / "simulated", method="rlcd")
    assert [r["chosen"] for r in records] == ["kept.", "stay safe and be kind."]
    assert len(read_pairs(tmp / "sim" / "pairs.csv")) == 2


def test_shards_consolidate_to_the_single_run(setup, capsys):
    tmp, prompts, model = setup
    assert simulate(tmp / "all", prompts, model, "--method=rlcd_rescore") == 0
    for r in range(2):
        assert simulate(tmp / f"s{r}", prompts, model, "--method=rlcd_rescore", "--indices_mod=2",
                        f"--indices_remainder={r}") == 0
    assert launch.main(["consolidate_pairs", "--method=rlcd_rescore", f"--out={tmp / 'merged.csv'}",
                        str(tmp / "s0" / "simulated"), str(tmp / "s1" / "simulated")]) == 0
    assert (tmp / "merged.csv").read_text() == (tmp / "all" / "pairs.csv").read_text()
    records = rlcd.read_records(tmp / "all" / "simulated", method="rlcd_rescore")
    for r in records:  # the positive prompt's output sits where `positive` says
        assert r[f"result_{r['positive']}"] == "stay safe and be kind." and 0 < r["win2_prob"] < 1
    assert all(p.chosen_prob is not None and p.chosen_prob >= 0.5 for p in read_pairs(tmp / "merged.csv"))


def _simulate_on_rank(rank, world_size, config) -> dict:
    from dist_utils import count_sampling
    from lm_human_preferences import distributed

    sampled = count_sampling(simulate_pairs)
    status = simulate(config["out"], config["prompts"], config["model"], "--max_retries=2", "--length=4")
    distributed.barrier()  # rank 0 has written the records
    records = rlcd.read_records(config["out"] / "simulated", method="rlcd")
    return {"status": status, "sampled": sampled, "records": records,
            "pairs": (config["out"] / "pairs.csv").read_text()}


def test_ranks_take_turns_at_the_sampling_batches_and_record_what_one_process_records(setup):
    """Under torchrun each round's batch b is sampled on rank b mod N and every rank gets every
    output; rank 0 writes the same records as one process (real sampling by the tiny model)."""
    from dist_utils import run_distributed

    tmp, prompts, model = setup
    config = {"prompts": prompts, "model": model}
    rank0, rank1 = run_distributed(_simulate_on_rank, 2, {**config, "out": tmp / "two"}, timeout=300)
    (one,) = run_distributed(_simulate_on_rank, 1, {**config, "out": tmp / "one"}, timeout=300)
    assert rank0["status"] == rank1["status"] == one["status"] == 0
    assert sorted(rank0["sampled"] + rank1["sampled"]) == sorted(one["sampled"])  # 12 outputs, batches of 4
    assert rank0["sampled"] and rank1["sampled"] and len(one["sampled"]) >= 3
    assert rank0["records"] == rank1["records"] == one["records"] and len(one["records"]) == 6
    assert rank0["pairs"] == one["pairs"]


@pytest.mark.parametrize("args, message", [
    (["--indices=3-1"], "ends before it starts"),
    (["--indices=4-9"], "beyond the 6 prompts"),
    (["--indices_mod=2", "--indices_remainder=2"], "indices_remainder"),
    (["--method=rlaif", "--model=TINY_SMALL"], "no token 'A'"),
])
def test_bad_inputs_exit_2_without_a_run_directory(setup, args, message, capsys):
    tmp, prompts, model = setup
    if "--model=TINY_SMALL" in args:
        args = [args[0], f"--model={tiny.make_model(tmp / 'small', encoding=tiny.small_encoding())}"]
    assert simulate(tmp / "bad", prompts, model, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "bad").exists()


def test_a_prompt_without_the_assistant_turn_is_refused(setup, capsys):
    tmp, prompts, model = setup
    prompts.write_text(json.dumps({"prompt": "\n\nHuman: q"}) + "\n")
    assert simulate(tmp / "bad", prompts, model) == 2
    assert "line 1: the prompt must end with" in capsys.readouterr().err and not (tmp / "bad").exists()


@pytest.mark.parametrize("subcommand", ["train_sft", "simulate_pairs", "train_reward", "train_policy", "generate"])
def test_the_offline_dialogue_presets_are_valid_settings(subcommand):
    hp = launch.trainer_hparams(subcommand, "offline_dialogue", [])
    if subcommand == "train_policy":
        assert hp.ppo.kl_estimator == "k1_clamped" and hp.task.stop_text == "\n\nHuman:"
        assert hp.task.truncate_token == 7 and hp.task.query_dataset == "offline_dialogue_prompts"
    if subcommand == "simulate_pairs":
        assert hp.affixes == "offline_dialogue" and hp.method == "rlcd"
