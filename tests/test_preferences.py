import csv
import json
import sys
import types

import pytest

from lm_human_preferences.labels import LabelFileError
from lm_human_preferences.preferences import (
    FORMATS,
    PreferenceFileError,
    PreferencePair,
    format_pairs,
    load_hub_pairs,
    read_pairs,
    write_pairs,
)
from lm_human_preferences.templates import render

SUFFIX = {name: ".csv" if fmt.csv else ".jsonl" for name, fmt in FORMATS.items()}


def sample_pairs(format: str) -> list[PreferencePair]:
    """Three pairs as a reader of `format` makes them (meta included), with quotes, commas and
    newlines in the texts."""
    texts = [("how do I sort a list?", "use sorted(xs), it returns a new list", "no idea"),
             ('what is "x, y"?', "a tuple,\nof two", ""),
             ("héllo wörld", " a summary that starts with a space", " another one")]
    pairs = []
    for i, (prompt, chosen, rejected) in enumerate(texts):
        if format == "pairs":
            pairs.append(PreferencePair(prompt, chosen, rejected, [None, 0.75, 0.5][i], {"source": i} if i else {}))
        elif format == "stack":
            pairs.append(PreferencePair(prompt, chosen, rejected, meta={"qid": i, "date": "2020-01-01"}))
        elif format == "summarize":
            info = {"id": f"t{i}", "title": "a title", "subreddit": "tifu", "site": None}
            pairs.append(PreferencePair(prompt, chosen, rejected, meta={
                "info": info, "text_field": "article" if i == 1 else "post",
                "summaries": [{"policy": "sup1", "note": None}, {"policy": "ref", "note": "n"}],
                "choice": i % 2, "worker": "w7", "split": "train", "extra": {"confidence": 8}}))
        elif format == "soups":
            pairs.append(PreferencePair(prompt, chosen, rejected, meta={"preference": "P1A"} if i else {}))
        elif format == "hh":
            dialogue = f"\n\nHuman: {prompt}\n\nAssistant: ok\n\nHuman: and?\n\nAssistant:"
            pairs.append(PreferencePair(dialogue, " " + chosen.replace("\n", " "), " " + rejected))
        elif format == "rlcd":
            pairs.append(PreferencePair(f"\n\nHuman: {prompt}\n\nAssistant:", chosen, rejected, [None, 0.8, 0.1][i],
                                        {"input": ["", "ctx", ""][i], "preference": [1, 2, 1][i]}))
    return pairs


@pytest.mark.parametrize("format", list(FORMATS))
def test_round_trip_every_format(tmp_path, format):
    pairs = sample_pairs(format)
    path = tmp_path / f"prefs{SUFFIX[format]}"
    write_pairs(path, pairs, format=format)
    assert read_pairs(path, format=format) == pairs
    assert read_pairs(path) == pairs  # detected from the suffix or the fields
    text = path.read_text()
    path2 = tmp_path / f"again{SUFFIX[format]}"
    write_pairs(path2, read_pairs(path), format=format)
    assert path2.read_text() == text


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stack_rows(tmp_path):
    """lvwerra/stack-exchange-paired: response_j is the preferred answer."""
    row = {"qid": 5, "question": "Q?", "date": "d", "metadata": ["a"], "response_j": "good", "response_k": "bad"}
    (pair,) = read_pairs(_write_rows(tmp_path / "s.jsonl", [row]))
    assert pair == PreferencePair("Q?", "good", "bad", None, {"qid": 5, "date": "d", "metadata": ["a"]})
    assert json.loads(format_pairs([pair], format="stack")) == row


def test_summarize_rows(tmp_path):
    """OpenAI summarize-from-feedback comparisons: `choice` indexes the preferred summary; rows
    from the hub carry both `post` and `article`, one of them null."""
    row = {"info": {"id": "x", "post": None, "article": "The article.", "title": None, "site": "dm"},
           "summaries": [{"text": " first", "policy": "a", "note": None}, {"text": " second", "policy": "b", "note": None}],
           "choice": 1, "worker": "w", "batch": "b1", "split": "valid1", "extra": {"confidence": None}}
    (pair,) = read_pairs(_write_rows(tmp_path / "c.jsonl", [row]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The article.", " second", " first")
    assert json.loads(format_pairs([pair], format="summarize")) == row
    assert render("summarize", pair.prompt, pair.chosen, pair.meta) == ("Article:\n\nThe article.\n\nTL;DR:", " second")


def test_soups_rows_as_json_list(tmp_path):
    """Personalized Soups' files are JSON lists; completion_a is the preferred one."""
    path = tmp_path / "p1a.json"
    path.write_text(json.dumps([{"user_input": "u", "completion_a": "a", "completion_b": "b"}]))
    assert read_pairs(path) == [PreferencePair("u", "a", "b")]


def test_rlcd_orientation(tmp_path):
    """preference names the preferred output; win2_prob is the probability that output_2 wins."""
    path = tmp_path / "sim.csv"
    path.write_text("instruction,input,output_1,output_2,preference,win2_prob\n"
                    "p1,,one,two,1,0.25\n"
                    "p2,,one,two,2,0.75\n")
    first, second = read_pairs(path)
    assert (first.chosen, first.rejected, first.chosen_prob) == ("one", "two", 0.75)
    assert (second.chosen, second.rejected, second.chosen_prob) == ("two", "one", 0.75)
    hard = tmp_path / "hard.csv"
    hard.write_text("instruction,input,output_1,output_2,preference\np,in,one,two,2\n")
    assert read_pairs(hard) == [PreferencePair("p", "two", "one", None, {"input": "in", "preference": 2})]


def test_hh_splits_at_the_last_assistant_turn(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: a good one",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"}
    (pair,) = read_pairs(_write_rows(tmp_path / "hh.jsonl", [row]))
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" a good one", " no")
    assert render("dialogue", pair.prompt, pair.chosen) == (pair.prompt, " a good one")


@pytest.mark.parametrize("rows,message", [
    ([{"question": "q", "response_j": 3, "response_k": "k"}], r"line 1, field 'response_j': expected a string, got int 3"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}], r"line 2, field 'rejected': missing"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_prob": 1.5}], r"line 1, field 'chosen_prob': expected a probability"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r", "score": 1}], r"line 1, field 'score': unexpected field"),
    ([{"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2}], r"line 1, field 'choice': expected 0 or 1"),
    ([{"info": {"post": "p"}, "summaries": [{"text": "a"}], "choice": 0}], r"line 1, field 'summaries': expected a list of 2"),
    ([{"info": {"post": "p"}, "summaries": [{"text": "a"}, {}], "choice": 0}], r"line 1, field 'summaries\[1\].text': missing"),
    ([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"}], r"line 1, field 'rejected'"),
    ([{"what": 1}], r"line 1: unknown preference format with fields what"),
    (["text"], r"line 1: expected a JSON object, got str 'text'"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, rows, message):
    path = _write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreferenceFileError, match=rf"bad\.jsonl: {message}"):
        read_pairs(path)


@pytest.mark.parametrize("text,message", [
    ("instruction,input,output_1,output_2\np,,a,b\n", r"line 1: expected a CSV header .* missing preference"),
    ("instruction,input,output_1,output_2,preference\np,,a,b,3\n", r"row 1 \(line 2\), field 'preference': expected 1 or 2"),
    ("instruction,input,output_1,output_2,preference\np,,a,b,1\np,,a,b\n", r"row 2 \(line 3\): expected 5 values .* got 4"),
    ("instruction,input,output_1,output_2,preference,win2_prob\np,,a,b,1,high\n", r"row 1 \(line 2\), field 'win2_prob'"),
    ("instruction,input,output_1,output_2,preference\n", r"expected at least one row"),
])
def test_csv_errors_name_file_row_and_field(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PreferenceFileError, match=rf"bad\.csv: {message}"):
        read_pairs(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(PreferenceFileError, match="cannot read preference file"):
        read_pairs(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p"\n')
    with pytest.raises(PreferenceFileError, match=r"broken\.jsonl: line 1: invalid JSON"):
        read_pairs(broken)
    with pytest.raises(PreferenceFileError, match="unknown preference format 'xml'"):
        read_pairs(broken, format="xml")
    assert issubclass(PreferenceFileError, LabelFileError)  # a user error of launch.py


def test_invalid_pairs_write_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(PreferenceFileError, match=r"out\.jsonl: pair 1, field 'chosen_prob': expected a probability"):
        write_pairs(path, [PreferencePair("p", "c", "r"), PreferencePair("p", "c", "r", 2.0)])
    with pytest.raises(PreferenceFileError, match=r"pair 0: the hh format needs a prompt ending in"):
        write_pairs(path, [PreferencePair("p", "c", "r")], format="hh")
    assert list(tmp_path.iterdir()) == []


def test_rlcd_file_reads_with_csv_module(tmp_path):
    """What write_pairs makes is an ordinary CSV (quotes, commas and newlines in fields)."""
    path = tmp_path / "out.csv"
    write_pairs(path, sample_pairs("rlcd"), format="rlcd")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["output_2"] == "a tuple,\nof two" and rows[1]["preference"] == "2" and rows[1]["win2_prob"] == "0.8"
    assert rows[2]["win2_prob"] == "0.9"  # preference 1 with chosen_prob 0.1: 1 - 0.1


def test_load_hub_pairs_through_datasets(monkeypatch):
    """The hub reader converts rows with the format's reader (a stand-in `datasets` module: no network)."""
    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return [{"qid": 1, "question": "q", "response_j": "j", "response_k": "k"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_hub_pairs("lvwerra/stack-exchange-paired", split="test") == [PreferencePair("q", "j", "k", None, {"qid": 1})]
    assert calls == [("lvwerra/stack-exchange-paired", {"split": "test", "data_dir": "data/reward"})]
    with pytest.raises(PreferenceFileError, match="no reader for hub data set 'me/mine'"):
        load_hub_pairs("me/mine")
