"""Prepare the `tldr` query dataset: `python datasets/tldr.py` → `datasets/tldr/train.jsonl`.

Source: the exact Reddit TL;DR subsets OAI trained on, `{train,valid}-subset.json` from
https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/ (a JSON list of posts
from Webis-TLDR-17; field `content` = the post without its TL;DR), read with HF `datasets`.
OAI has no test split: its `test` mode read `valid`, so use `--split valid`. Cleaning as in
OAI's `tldr.py`: `ftfy.fix_text` when ftfy is installed, runs of 3+ newlines collapse to one
blank line, strip. The 2019 code used the post body only (no "SUBREDDIT:/TITLE:/POST:"
header; that format is the 2020 summarize-from-feedback one). The task appends "\\n\\nTL;DR:".

If that file is unreachable, any copy of Webis-TLDR-17 works (same `content` field), e.g. the
`reddit-3.8million-corpus-webis-tldr-17.parquet` file of the hub dataset `webis/tldr-17`:
`python datasets/tldr.py --source reddit-3.8million-corpus-webis-tldr-17.parquet`; other data
with another field: `--source posts.jsonl --text-field body`.
"""

import sys
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences.language.prepare import clean_passage, prepare_main  # noqa: E402

OAI_TLDR_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/{split}-subset.json"


def tldr_passages(posts: Iterable[str]) -> Iterator[str]:
    return map(clean_passage, posts)


if __name__ == "__main__":
    prepare_main("tldr", default_out_dir=Path(__file__).resolve().parent, hub_id=None,
                 default_source=OAI_TLDR_URL, text_field="content", to_passages=tldr_passages,
                 description=__doc__.splitlines()[0])
