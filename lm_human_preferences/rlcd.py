"""RLCD's data side (Yang et al. 2023, "RLCD: Reinforcement Learning from Contrastive
Distillation"): contrastive prompts, output cleanup, sharding by index, and consolidation of the
simulated data into the RLCD CSV (`preferences.py`'s `rlcd` format) and into context-distillation
SFT data.

    pos, neg = contrast_prompts("\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: help?\\n\\nAssistant:",
                                "(harmless response)", "(harmful response)")
    # pos ends "Assistant (harmless response):", its earlier turn reads "Assistant (harmful response):"
    clean_response(" sure, happy to help.\\n\\nHuman: thanks")          # "sure, happy to help."
    select_indices(100, indices="17-29,35-40", mod=8, remainder=3)     # [19, 27, 35]
    pairs = consolidate(read_records("runs/sim/simulated"), method="rlcd", seed=0)
    write_pairs("pairs.csv", pairs, format="rlcd")

Methods (one record per prompt index, `<index>.json`):
- `rlcd`: the positive prompt's output is chosen, the negative prompt's rejected (a hard label);
  consolidation puts them in a seeded random order (output_1/output_2, `preference` 1 or 2).
- `rlaif`: two outputs of the plain prompt, labeled by a model (`rlaif.py`): `win2_prob`, the
  probability that output 2 (B) is better, read from the next-token probabilities of A and B.
- `rlcd_rescore`: the positive and negative outputs in a random order, labeled as `rlaif`
  (`positive` records which one came from the positive prompt).

A prompt is a dialogue prefix in the Human/Assistant format ending with "\\n\\nAssistant:"
(`dialogues.ASSISTANT`). The positive prompt puts the positive affix on its final Assistant turn
and the negative affix on the earlier ones; the negative prompt mirrors it (so each prompt's
history shows the opposite of what its last turn is asked for, as in the paper's code).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lm_human_preferences.language.checkpoints import atomic_write_bytes
from lm_human_preferences.language.dialogues import AFFIX_PAIRS, ASSISTANT, HUMAN
from lm_human_preferences.language.dialogues import PRINCIPLES as OFFLINE_PRINCIPLES
from lm_human_preferences.preferences import PreferenceFileError, PreferencePair

METHODS = ("rlcd", "rlaif", "rlcd_rescore")
EOT = "<|endoftext|>"

# (positive affix, negative affix) pairs per task; the harmless and helpful ones are the paper's.
AFFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "harmless": (
        ("(helpful, honest, inoffensive response)", "(unhelpful, dishonest, toxic response)"),
        ("(law-abiding, ethical response)", "(illegal, unethical response)"),
        ("(innocent response)", "(prejudiced response)"),
        ("(harmless, helpful response)", "(harmful, unhelpful response)"),
        ("(ethical and moral response)", "(unethical and immoral response)"),
        ("(inoffensive response)", "(offensive response)"),
        ("(correct, conscientious, socially acceptable response)",
         "(incorrect, unconscientious, socially unacceptable response)"),
        ("(simulating a wise, ethical person)", "(simulating a foolish, unethical person)"),
        ("(legal, ethical, moral response)", "(illegal, unethical, immoral response)"),
        ("(age-appropriate, family-friendly response)", "(inappropriate, not-family-friendly response)"),
        ("(thoughtful response)", "(thoughtless response)"),
        ("(politically correct response)", "(racist, sexist, socially biased response)"),
        ("(simulating a very kind person)", "(simulating a really evil person)"),
        ("(harmless, helpful, honest response)", "(harmful, unhelpful, dishonest response)"),
        ("(ethical response)", "(toxic response)"),
        ("(ethically and morally aware response)", "(unethical and immoral response)"),
    ),
    "helpful": (("(giving a helpful response)", "(giving an unhelpful response)"),),
    "offline_dialogue": AFFIX_PAIRS,
}

# The labeler's principles per task (RLAIF, RLCD-Rescore): RLAIF draws one at random, RLCD-Rescore
# takes the one of its affix pair's index (modulo their number).
PRINCIPLES: dict[str, tuple[str, ...]] = {
    "harmless": ("Please choose the response that is the most helpful, honest, and harmless.",
                 "Which of these assistant responses is less harmful? Choose the response that a wise, "
                 "ethical, polite and friendly person would more likely say.",
                 "Choose the response that is less harmful, paying close attention to whether each response "
                 "encourages illegal, unethical or immoral activity."),
    "helpful": ("Please choose the response that is more helpful.",),
    "offline_dialogue": OFFLINE_PRINCIPLES,
}


def affix_with(assistant: str, affix: str) -> str:
    """"\\n\\nAssistant:" -> "\\n\\nAssistant (affix):"."""
    return f"{assistant[:-1]} {affix}:"


def contrast_prompts(prompt: str, positive: str, negative: str) -> tuple[str, str]:
    """(positive prompt, negative prompt) of a dialogue prefix ending with ASSISTANT: the final
    Assistant turn gets the prompt's own affix, every earlier one the opposite affix."""
    if not prompt.endswith(ASSISTANT):
        raise ValueError(f"a dialogue prompt must end with {ASSISTANT!r}; got ...{prompt[-40:]!r}")
    head = prompt[:-len(ASSISTANT)]

    def build(last: str, earlier: str) -> str:
        return head.replace(ASSISTANT, affix_with(ASSISTANT, earlier)) + affix_with(ASSISTANT, last)
    return build(positive, negative), build(negative, positive)


def dialogue_prefix(text: str) -> str:
    """An HH-RLHF dialogue cut after its last "Assistant:" (the final reply removed)."""
    marker = ASSISTANT.strip()
    if marker not in text:
        raise ValueError(f"no {marker!r} in the dialogue ...{text[-60:]!r}")
    return text[:text.rindex(marker) + len(marker)]


def clean_response(text: str) -> str | None:
    """The reply of a sampled continuation, or None when it is unusable (then it is sampled
    again): the text up to the next Human turn or end-of-text, which must come (a reply that
    runs to the length limit is unfinished); a stray "Assistant:" at its start is dropped
    (everything up to it); the rest is stripped and must not be empty."""
    ends = [i for i in (text.find(HUMAN.strip()), text.find(EOT)) if i >= 0]
    if not ends:
        return None
    reply = text[:min(ends)]
    marker = ASSISTANT.strip()
    if marker in reply:
        reply = reply[reply.index(marker) + len(marker):]
    reply = reply.strip()
    return reply or None


def parse_indices(spec: str) -> list[int]:
    """"17-29,35-40" -> [17, ..., 29, 35, ..., 40] (ranges inclusive); ValueError when malformed."""
    out = []
    for part in spec.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(f"indices {spec!r}: expected numbers and ranges like 17-29,35-40, got {part!r}")
        start, end = int(bounds[0]), int(bounds[-1])
        if end < start:
            raise ValueError(f"indices {spec!r}: range {part!r} ends before it starts")
        out.extend(range(start, end + 1))
    return out


def select_indices(n: int, *, indices: str = "", mod: int = 1, remainder: int = 0) -> list[int]:
    """The prompt indices one process simulates: those of `indices` (empty: all n), in order,
    without repeats, below n, that are `remainder` modulo `mod`."""
    if mod < 1 or not 0 <= remainder < mod:
        raise ValueError(f"need indices_mod >= 1 and 0 <= indices_remainder < indices_mod, got {mod} and {remainder}")
    chosen = list(dict.fromkeys(parse_indices(indices))) if indices else list(range(n))
    beyond = [i for i in chosen if i >= n]
    if beyond:
        raise ValueError(f"indices {indices!r}: {beyond[0]} is beyond the {n} prompts (0-based)")
    return [i for i in chosen if i % mod == remainder]


# ------------------------------------------------------------------------------- records

_FIELDS = {"rlcd": ("chosen", "rejected"), "rlaif": ("result_a", "result_b", "win2_prob"),
           "rlcd_rescore": ("result_a", "result_b", "win2_prob", "positive")}


def write_record(directory, record: dict) -> Path:
    """`<directory>/<index>.json`, atomically."""
    path = Path(directory) / f"{record['index']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record) + "\n").encode())
    return path


def read_records(*directories, method: str) -> list[dict]:
    """Every `<index>.json` record of `directories`, by index; a record of another method, an
    index found twice, or a malformed file is a PreferenceFileError naming the file."""
    records: dict[int, dict] = {}
    for directory in directories:
        if not Path(directory).is_dir():
            raise PreferenceFileError(f"{directory}: no such directory of simulated records")
        for path in sorted(Path(directory).glob("*.json")):
            record = _read_record(path, method)
            if record["index"] in records:
                raise PreferenceFileError(f"{path}: index {record['index']} was already read from another directory")
            records[record["index"]] = record
    return [records[i] for i in sorted(records)]


def _read_record(path: Path, method: str) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PreferenceFileError(f"{path}: unreadable simulated record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("index"), int) or "status" not in record:
        raise PreferenceFileError(f"{path}: expected an object with an integer 'index' and a 'status'")
    if record.get("method") != method:
        raise PreferenceFileError(f"{path}: a record of method {record.get('method')!r}, expected {method!r}")
    if record["status"]:
        missing = [f for f in ("prompt",) + _FIELDS[method] if f not in record]
        if missing:
            raise PreferenceFileError(f"{path}: missing field(s) {', '.join(missing)} of a {method} record")
    return record


def consolidate(records: list[dict], *, method: str, seed: int = 0) -> list[PreferencePair]:
    """The preference pairs of the successful records, in index order, with the RLCD CSV's
    orientation in `meta["preference"]`: `rlcd` pairs in a seeded random order and hard labels;
    `rlaif`/`rlcd_rescore` with output_1 = A, output_2 = B, preference 2 when win2_prob > 0.5 and
    the soft label `chosen_prob` = P(chosen wins)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    rng = random.Random(seed)
    pairs = []
    for r in (r for r in records if r["status"]):
        if method == "rlcd":
            preference = 1 if rng.random() < 0.5 else 2
            pairs.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"], None,
                                        {"input": "", "preference": preference}))
            continue
        win2 = float(r["win2_prob"])
        preference = 2 if win2 > 0.5 else 1
        chosen, rejected = (r["result_b"], r["result_a"]) if preference == 2 else (r["result_a"], r["result_b"])
        pairs.append(PreferencePair(r["prompt"], chosen, rejected, win2 if preference == 2 else 1.0 - win2,
                                    {"input": "", "preference": preference}))
    return pairs


def distillation_rows(records: list[dict]) -> list[dict]:
    """Context distillation SFT data (train_sft's prompt/response .jsonl rows): each successful
    `rlcd` record's prompt without affixes and its positive prompt's output."""
    return [{"prompt": r["prompt"], "response": " " + r["chosen"]} for r in records
            if r["status"] and r.get("method") == "rlcd"]


def write_jsonl(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
