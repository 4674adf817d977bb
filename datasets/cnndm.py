"""Prepare the `cnndm` query dataset: `python datasets/cnndm.py` → `datasets/cnndm/train.jsonl`.

Source: CNN/DailyMail from the Hugging Face hub (`abisee/cnn_dailymail`, config `3.0.0`, field
`article`; splits train/validation/test). OAI read the original `.story` files; the hub copy
has the same articles with paragraph breaks flattened to spaces. Each article is cleaned the
way OAI's `clean_up_start` intended: the "By . Author . PUBLISHED: . ... UPDATED: . <time,
date> ." Daily Mail header and the "(CNN) --" / "(CNN)" dateline are cut, curly single quotes
become "'", `ftfy.fix_text` runs when ftfy is installed (OAI always ran it), runs of 3+
newlines collapse to one blank line, and the text is stripped.

Offline or from your own copy: `python datasets/cnndm.py --source cnndm_train.parquet`.
"""

import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_human_preferences.language.prepare import clean_passage, prepare_main  # noqa: E402

# Daily Mail headers: "By . Name . PUBLISHED: . 14:11 EST, 25 October 2013 . | . UPDATED: . 15:36 EST,
# 25 October 2013 . " or "By . Name . Last updated at 3:32 PM on 24th October 2011 . "
_HEADERS = [
    re.compile(r"^.{0,400}?UPDATED:\s*\.?\s*\d{1,2}:\d{2}\b[^.]{0,60}?\b20\d\d\s*\.\s*", re.S),
    re.compile(r"^By \.[^.]{0,100}\.\s*"),
    re.compile(r"^Last updated at [^.]{0,60}?\b20\d\d\s*\.\s*"),
]


def clean_article(text: str) -> str:
    for header in _HEADERS:
        text = header.sub("", text)
    text = re.split(r"\(CNN\) +--", text)[-1]  # "LONDON, England (CNN) -- "
    text = re.split(r"\(CNN\)", text[:100])[-1] + text[100:]  # "(CNN)The ..."
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return clean_passage(text)


def cnndm_passages(articles: Iterable[str]) -> Iterator[str]:
    return map(clean_article, articles)


if __name__ == "__main__":
    prepare_main("cnndm", default_out_dir=Path(__file__).resolve().parent, hub_id="abisee/cnn_dailymail",
                 hub_config="3.0.0", text_field="article", to_passages=cnndm_passages,
                 description=__doc__.splitlines()[0])
