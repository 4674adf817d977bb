"""Length balancing, random-pair augmentation (R-DA), cartography and confidence-based
truncation (length_data.py), and the prep_pairs and cartography commands, on hand-made pairs."""

import json
import math

import pytest

import launch
from lm_human_preferences import length_data
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair, read_pairs, write_pairs


def words(n: int) -> str:
    return " ".join(["w"] * n)


def pair_of(diff: int, base: int = 20, prompt: str = "p") -> PreferencePair:
    """A pair whose chosen response has `diff` words more than the rejected one."""
    return PreferencePair(prompt, words(base + max(diff, 0)), words(base + max(-diff, 0)))


DIFFS = [5, 5, 5, -3, -15, 12, 0, 250]


def test_length_bin_edges():
    assert [length_data.length_bin(d) for d in (1, 10, 11, 0, -1, -10, -11, 200, -199)] == \
        [0, 0, 1, -1, -1, -2, -2, 19, -20]
    assert length_data.length_bin(201) is None and length_data.length_bin(-200) is None


def test_balance_keeps_mirrored_bins_equal_and_ties_apart():
    pairs = length_data.with_uids([pair_of(d) for d in DIFFS])
    balanced = length_data.balance_by_length(pairs, seed=0)
    # the tie kept; (0, 10] three 5s, mirror [-10, 0) -3 -> 1 + 1; (10, 20] 12, [-20, -10) -15 -> 1 + 1; 250 dropped
    kept = [int(p.meta["uid"]) for p in balanced]
    assert len(kept) == 5 and {3, 4, 5, 6} <= set(kept) and len({0, 1, 2} & set(kept)) == 1
    assert length_data.longer_wins(balanced) == 0.5


def test_balance_with_the_released_bins():
    pairs = length_data.with_uids([pair_of(d) for d in DIFFS])
    balanced = length_data.balance_by_length(pairs, seed=0, ties="released")
    # bins: (-10, 0] holds -3 and 0, mirror (0, 10] three 5s -> 2 + 2; (-20, -10] -15, mirror (10, 20] 12 -> 1 + 1;
    # 250 is out of range
    kept = [int(p.meta["uid"]) for p in balanced]
    assert len(kept) == 6 and kept == sorted(kept)
    assert {3, 4, 5, 6} <= set(kept) and 7 not in set(kept)
    assert len({0, 1, 2} & set(kept)) == 2
    diffs = [DIFFS[i] for i in kept]
    assert sum(d > 0 for d in diffs) == 3 and sum(d < 0 for d in diffs) == 2  # the tie (0) counts as shorter
    assert length_data.longer_wins(balanced) == pytest.approx(3.5 / 6)
    assert length_data.balance_by_length(pairs, seed=0, ties="released") == balanced  # seeded
    assert length_data.longer_wins(pairs) == pytest.approx(5.5 / 8)


def test_balance_with_a_token_length_and_other_bins():
    pairs = [pair_of(d) for d in (1, 2, -1, 3, 4)]
    balanced = length_data.balance_by_length(pairs, width=2, max_diff=4, seed=1, ties="released")
    # width 2: (0, 2] holds 1, 2; (-2, 0] holds -1 -> one each; (2, 4] holds 3, 4 without a mirror -> none
    assert len(balanced) == 2 and pairs[2] in balanced
    by_chars = length_data.balance_by_length(pairs, length=len, width=2, max_diff=4, ties="released")  # 2 a word
    assert len(by_chars) == 2
    with pytest.raises(ValueError, match="width >= 1"):
        length_data.balance_by_length(pairs, width=0)
    with pytest.raises(ValueError, match="ties must be 'apart' or 'released'"):
        length_data.balance_by_length(pairs, ties="mirror")


def test_random_pair_augmentation_counts():
    pairs = length_data.with_uids([PreferencePair(f"q{i % 4}", f"good {i}", f"bad {i}") for i in range(8)])
    out = length_data.random_pair_augment(pairs, ratio=0.25, seed=3)
    assert out[:8] == pairs and len(out) == 10  # int(8 * 0.25) = 2 appended
    chosen_of = {p.chosen: p.prompt for p in pairs}
    for new in out[8:]:
        source = pairs[int(new.meta["uid"].split(":")[0])]
        assert new.meta["rda"] is True and new.meta["uid"].endswith(":rda")
        assert (new.prompt, new.chosen) == (source.prompt, source.chosen)
        assert new.rejected in chosen_of and chosen_of[new.rejected] != new.prompt
    assert len(length_data.random_pair_augment(pairs, ratio=0.3)) == 10  # int(2.4)
    assert length_data.random_pair_augment(pairs, ratio=0.0) == pairs
    with pytest.raises(ValueError, match="two different prompts"):
        length_data.random_pair_augment([PreferencePair("q", "a", "b")] * 4, ratio=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        length_data.random_pair_augment(pairs, ratio=1.5)


def visit(epoch, step, uid, margin):
    return {"epoch": epoch, "step": step, "uid": uid, "r_chosen": margin + 1.0, "r_rejected": 1.0}


def test_cartography_statistics_by_hand():
    rows = [visit(2, 9, "a", 2.0), visit(0, 1, "a", 0.5), visit(1, 5, "a", 1.0),  # out of order
            visit(0, 0, "b", -1.0), visit(1, 4, "b", 0.5), visit(2, 8, "b", -0.5), visit(3, 12, "b", 1.5)]
    stats = length_data.cartography(rows)
    # a: first visit (0.5) skipped -> [1, 2]: mean 1.5, sample std sqrt(0.5)
    assert stats["a"] == length_data.CartographyStats(1.5, math.sqrt(0.5), 1.0, 3)
    # b: [0.5, -0.5, 1.5]: mean 0.5, sample std 1, 2 of 3 correct
    b = stats["b"]
    assert (b.confidence, b.variability, b.correct, b.visits) == (pytest.approx(0.5), pytest.approx(1.0),
                                                                   pytest.approx(2 / 3), 4)
    assert length_data.select_uids(stats, max_confidence=1.0) == ["b"]
    assert length_data.select_uids(stats, min_confidence=1.0) == ["a"]
    with pytest.raises(ValueError, match="'c' has 2 logged visits; cartography needs at least 3"):
        length_data.cartography(rows + [visit(0, 2, "c", 1.0), visit(1, 6, "c", 1.0)])


def test_keep_uids(tmp_path):
    pairs = [pair_of(d) for d in (1, 2, 3)]
    path = tmp_path / "keep.txt"
    path.write_text('0\n"2"\n\n')
    assert length_data.read_uids(path) == {"0", "2"}
    assert length_data.keep_uids(pairs, {"0", "2"}) == [pairs[0], pairs[2]]
    with pytest.raises(PreferenceFileError, match="1 uid\\(s\\) name no pair of the file, e.g. '7'"):
        length_data.keep_uids(pairs, {"0", "7"})
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(PreferenceFileError, match="holds no uids"):
        length_data.read_uids(tmp_path / "empty.txt")


def test_pairs_from_outputs_with_a_length_biased_judge():
    from lm_human_preferences.judges import get_judge

    rows = [{"prompt": "p", "response": "the dog.", "sample": 0},
            {"prompt": "p", "response": "the dog sat by the old wooden door.", "sample": 1},
            {"prompt": "q", "response": "a cat sat on the long road.", "sample": 0},
            {"prompt": "q", "response": "a cat.", "sample": 1},
            {"prompt": "q", "response": "left without a partner.", "sample": 2}]
    pairs = length_data.pairs_from_outputs(rows, get_judge("length_biased"))
    assert [(p.prompt, p.chosen, p.meta["samples"]) for p in pairs] == [
        ("p", "the dog sat by the old wooden door.", [1, 0]), ("q", "a cat sat on the long road.", [0, 1])]
    with pytest.raises(PreferenceFileError, match="no prompt with two samples"):
        length_data.pairs_from_outputs(rows[:1], get_judge("length_biased"))


def test_prep_pairs_and_cartography_commands(tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    write_pairs(source, [pair_of(d, prompt=f"q{i % 3}") for i, d in enumerate(DIFFS)])
    out = tmp_path / "out.jsonl"
    assert launch.main(["prep_pairs", str(out), f"--pairs={source}", "--balance_len", "--rand_ratio=0.5",
                        "--released_bins"]) == 0
    written = read_pairs(out)
    assert len(written) == 6 + 3 and sum(bool(p.meta.get("rda")) for p in written) == 3
    assert launch.main(["prep_pairs", str(out), f"--pairs={source}", "--balance_len"]) == 0
    assert len(read_pairs(out)) == 5
    assert "8 pairs, longer wins 0.688" in capsys.readouterr().out
    log = tmp_path / "pair_scores.jsonl"
    log.write_text("".join(json.dumps(visit(e, e * 10 + u, str(u), float(u * e))) + "\n"
                           for e in range(3) for u in range(8)))
    carto = tmp_path / "carto"
    assert launch.main(["cartography", str(log), str(carto), "--max_confidence=3"]) == 0
    assert (carto / "cartography.png").is_file()
    assert (carto / "keep_uids.txt").read_text().split() == ["0", "1", "2"]  # confidence 1.5 u: 0, 1.5, 3, ...
    first = json.loads((carto / "cartography.jsonl").read_text().splitlines()[1])
    assert first == {"uid": "1", "confidence": 1.5, "variability": pytest.approx(math.sqrt(0.5)), "correct": 1.0,
                     "visits": 3}
    kept = tmp_path / "kept.jsonl"
    assert launch.main(["prep_pairs", str(kept), f"--pairs={source}", f"--keep_uids={carto / 'keep_uids.txt'}"]) == 0
    assert [p.meta["uid"] for p in read_pairs(kept)] == ["0", "1", "2"]


@pytest.mark.parametrize("args,message", [
    (["prep_pairs", "OUT"], "give exactly one of --pairs=FILE and --from_outputs=FILE"),
    (["prep_pairs", "OUT", "--from_outputs=PAIRS"], "--from_outputs needs --judge=NAME"),
    (["prep_pairs", "OUT", "--pairs=PAIRS", "--rand_ratio=2"], "rand_ratio must be in [0, 1], got 2.0"),
    (["prep_pairs", "OUT", "--pairs=PAIRS", "--length_unit=chars"], "unknown length unit 'chars'"),
    (["cartography", "LOG", "OUT"], "pair '0' has 1 logged visits"),
])
def test_command_errors_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    source = tmp_path / "pairs.jsonl"
    write_pairs(source, [pair_of(d, prompt=f"q{i}") for i, d in enumerate(DIFFS)])
    (tmp_path / "log.jsonl").write_text(json.dumps(visit(0, 0, "0", 1.0)) + "\n")
    names = {"OUT": str(tmp_path / "out"), "PAIRS": str(source), "LOG": str(tmp_path / "log.jsonl")}
    argv = [a.replace("PAIRS", names["PAIRS"]) if "=" in a else names.get(a, a) for a in args]
    assert launch.main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_offline_length_preset():
    hp = launch.trainer_hparams("train_reward", "offline_length", [])
    assert (hp.labels.type, hp.task.truncate_token, hp.task.end_text, hp.task.response_length) == ("preference", 1, ".", 24)
    assert launch.trainer_hparams("train_policy", "offline_length", []).task.truncate_token == 1
