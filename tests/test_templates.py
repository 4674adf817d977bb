import pytest

from lm_human_preferences.preferences import FORMATS
from lm_human_preferences.templates import TEMPLATES, render


def test_templates():
    assert render("stack", "Q?", "A.") == ("Question: Q?\n\nAnswer: ", "A.")
    assert render("tulu", "hi", "yo") == ("<|user|>\nhi \n<|assistant|>\n", "yo")
    assert render("plain", "a", "b") == ("a", "b")
    meta = {"info": {"subreddit": "tifu", "title": "T"}, "text_field": "post"}
    assert render("summarize", "P", " s", meta) == ("SUBREDDIT: r/tifu\n\nTITLE: T\n\nPOST: P\n\nTL;DR:", " s")
    assert render("dialogue", "Assistant:", "Sure") == ("Assistant:", " Sure")
    assert render("dialogue", "Assistant: ", "Sure") == ("Assistant: ", "Sure")
    context, _ = render("alpaca", "Add.", "3", {"input": "1 2"})
    assert context.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:")
    assert "### Input" not in render("alpaca", "Add.", "3", {"input": ""})[0]
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        render("nope", "a", "b")


def test_every_format_names_a_template():
    assert {fmt.template for fmt in FORMATS.values()} <= set(TEMPLATES)
