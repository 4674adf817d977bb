"""Text templates: how a prompt and a response become the reward model's input.

    context, continuation = render("stack", "How do I sort?", "Use sorted().")
    # ("Question: How do I sort?\n\nAnswer: ", "Use sorted().")

A template returns two texts whose concatenation the model reads: the context (the reward
model's query) and the continuation (its response), so they can be tokenised apart and padded
as queries and responses are. `preferences.FORMATS[name].template` names the template of each
file format's data sets.
"""

from __future__ import annotations

from typing import Callable

ALPACA_HEAD = "Below is an instruction that describes a task"
ALPACA_INPUT = ", paired with an input that provides further context"
ALPACA_TAIL = ". Write a response that appropriately completes the request.\n\n### Instruction:\n"


def _alpaca(prompt: str, response: str, meta: dict) -> tuple[str, str]:
    extra = meta.get("input") or ""
    if extra:
        return f"{ALPACA_HEAD}{ALPACA_INPUT}{ALPACA_TAIL}{prompt}\n\n### Input:\n{extra}\n\n### Response:", response
    return f"{ALPACA_HEAD}{ALPACA_TAIL}{prompt}\n\n### Response:", response


def _summarize(prompt: str, response: str, meta: dict) -> tuple[str, str]:
    if meta.get("text_field") == "article":
        return f"Article:\n\n{prompt}\n\nTL;DR:", response
    info = meta.get("info", {})
    return (f"SUBREDDIT: r/{info.get('subreddit') or ''}\n\nTITLE: {info.get('title') or ''}\n\n"
            f"POST: {prompt}\n\nTL;DR:", response)


def _dialogue(prompt: str, response: str, meta: dict) -> tuple[str, str]:
    joined = prompt and response and not prompt[-1].isspace() and not response[0].isspace()
    return prompt, (" " + response if joined else response)


TEMPLATES: dict[str, Callable[[str, str, dict], tuple[str, str]]] = {
    "plain": lambda prompt, response, meta: (prompt, response),
    "stack": lambda prompt, response, meta: (f"Question: {prompt}\n\nAnswer: ", response),
    "summarize": _summarize,
    "tulu": lambda prompt, response, meta: (f"<|user|>\n{prompt} \n<|assistant|>\n", response),
    "alpaca": _alpaca,
    "dialogue": _dialogue,
}
"""How a prompt and a response become the reward model's input, as (context, continuation)
texts whose concatenation the model reads (context = its query, continuation = its response):
    plain      prompt ‖ response
    stack      "Question: {prompt}\\n\\nAnswer: " ‖ response (StackExchange, the length-bias study)
    summarize  "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {prompt}\\n\\nTL;DR:" ‖ response,
               from meta["info"] (OpenAI's TL;DR format); "Article:\\n\\n{prompt}\\n\\nTL;DR:" for articles
    tulu       "<|user|>\\n{prompt} \\n<|assistant|>\\n" ‖ response (Personalized Soups)
    alpaca     the Alpaca instruction prompt, with meta["input"] when it is not empty ‖ response
    dialogue   the dialogue ‖ response, with one space between them when neither side has one
               ("...\\n\\nAssistant:" ‖ " Sure."; HH-RLHF, RLCD)
Responses are used as they are (summaries in the TL;DR data start with a space)."""


def render(template: str, prompt: str, response: str, meta: dict | None = None) -> tuple[str, str]:
    """(context, continuation) texts of `template` (a name of TEMPLATES) for one response."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template](prompt, response, meta or {})
