"""Prepare the personal-preference data (Personalized Soups, offline; `lm_human_preferences/personalization.py`).

    python datasets/personal.py queries                  # datasets/personal/*.jsonl
    python datasets/personal.py sft runs/ps_gen_mt/outputs.jsonl datasets/personal/multitask_sft.jsonl
    python datasets/personal.py scores friendly runs/ps_gen_base_friendly/outputs.jsonl ...

`queries` writes, from the offline corpus (a passage's first sentence, at most `--words` words,
then the preference sentences), for the dimensions `--dimensions` (default expertise,tone):
  plain.jsonl           train queries without preferences (reward models' labels, single-objective RLHF)
  <option>.jsonl        train queries asking for one option (a P-Soups policy each)
  pmorl.jsonl           train queries asking for one option of every dimension, combinations drawn uniformly
  test_<options>.jsonl  held-out prompts (the corpus' test split) for each combination, and each option alone
Each line is {"text", "prompt", "preferences"}: a query dataset for PPO and label collection,
and a prompt file for generate.

`sft` writes the multitask SFT baseline's data: for each prompt of an output file (`generate`
with several samples per preference prompt), the sample the `preferences` judge rates highest,
as {"prompt", "response"} lines for train_sft.

`scores` prints, for each output file, the mean score of one option's scripted labeler
(`labelers.PreferenceLabeler`) over its responses, one line a file: `OPTION MEAN FILE`.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences import judges, labelers, personalization  # noqa: E402
from lm_human_preferences.language.checkpoints import atomic_writer  # noqa: E402
from lm_human_preferences.language.offline_corpus import iter_passages  # noqa: E402


def write_queries(out: Path, *, dimensions: list[str], n: int, n_test: int, words: int, seed: int) -> None:
    combos = personalization.combinations(dimensions)
    options = sorted({o for c in combos for o in c})
    train = lambda: iter_passages(seed=seed, split="train")  # noqa: E731 (the same passages for every file)
    personalization.write_preference_queries(out / "plain.jsonl", train(), combos=[[]], n=n, words=words, seed=seed)
    for option in options:
        personalization.write_preference_queries(out / f"{option}.jsonl", train(), combos=[[option]], n=n,
                                                 words=words, seed=seed)
    personalization.write_preference_queries(out / "pmorl.jsonl", train(), combos=combos, n=n, words=words, seed=seed)
    for combo in combos + [[o] for o in options]:
        personalization.write_preference_queries(out / f"test_{'_'.join(combo)}.jsonl",
                                                 iter_passages(seed=seed, split="test"), combos=[combo], n=n_test,
                                                 words=words, seed=seed)
    print(f"wrote {len(options) + 2 + len(combos) + len(options)} files to {out}")


def write_sft(outputs: Path, out: Path) -> None:
    rows = personalization.multitask_sft_rows(judges.read_output_rows(outputs))
    with atomic_writer(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} prompt/response pairs to {out}")


def mean_score(option: str, outputs: Path) -> float:
    """The mean `PreferenceLabeler(option)` score of an output file's responses."""
    rows = judges.read_output_rows(outputs)
    scores = labelers.PreferenceLabeler(option).score([r["response"] for r in rows])
    return sum(scores) / len(scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queries", help="preference-prompted query and prompt files")
    q.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "personal")
    q.add_argument("--dimensions", default="expertise,tone", help="comma-separated: expertise, verbosity, tone")
    q.add_argument("--n", type=int, default=4096, help="train queries per file")
    q.add_argument("--n_test", type=int, default=64, help="held-out prompts per file")
    q.add_argument("--words", type=int, default=10, help="words of a passage's first sentence at most")
    q.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sft", help="multitask SFT data from an output file")
    s.add_argument("outputs", type=Path)
    s.add_argument("out", type=Path)
    m = sub.add_parser("scores", help="mean scripted score of one option over output files")
    m.add_argument("option", choices=list(labelers.PREFERENCES))
    m.add_argument("outputs", type=Path, nargs="+")
    ns = p.parse_args(argv)
    try:
        if ns.command == "scores":
            for path in ns.outputs:
                print(f"{ns.option} {mean_score(ns.option, path):+.3f} {path}")
        elif ns.command == "queries":
            write_queries(ns.out, dimensions=ns.dimensions.split(","), n=ns.n, n_test=ns.n_test, words=ns.words,
                          seed=ns.seed)
        else:
            write_sft(ns.outputs, ns.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
