import copy
import functools
import http.server
import json
import socket
import threading

import numpy as np
import pytest
import torch

from lm_human_preferences.label_types import BestOfN, ScalarCompare, ScalarRating, SoftPairwise
from lm_human_preferences.labels import (
    OAI_LABEL_URL_BASE,
    LabelFileError,
    cached_label_path,
    labels_to_tensors,
    read_labels,
    resolve_label_source,
    write_labels,
)

SIZES = dict(query_length=3, response_length=2, vocab_size=10, pad_token=12)


def _rows(label_type, n=3):
    rows = []
    for i in range(n):
        row = {"query": [i % 10, 1, 12]}
        for j, field in enumerate(label_type.response_fields):
            row[field] = [(i + j) % 10, 12]
        for field, kind in label_type.target_fields.items():
            row[field] = i % label_type.num_responses if kind == "int" else 0.5 * i - 0.25
        rows.append(row)
    return rows


def _read(path, label_type):
    return read_labels(path, label_type=label_type, **SIZES)


@pytest.mark.parametrize("label_type", [BestOfN(4), BestOfN(2), ScalarRating(), ScalarCompare()])
def test_round_trip(tmp_path, label_type):
    rows = _rows(label_type, n=5)
    path = tmp_path / "sub" / "labels.json"
    write_labels(path, rows, label_type=label_type, **SIZES)
    assert _read(path, label_type) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.json"]

    tensors = labels_to_tensors(rows, label_type=label_type)
    assert set(tensors) == set(label_type.field_kinds)
    assert tensors["query"].dtype == torch.long and tensors["query"].shape == (5, 3)
    for field in label_type.response_fields:
        assert tensors[field].dtype == torch.long and tensors[field].shape == (5, 2)
    for field, kind in label_type.target_fields.items():
        assert tensors[field].shape == (5,)
        assert tensors[field].dtype == (torch.long if kind == "int" else torch.float32)
        assert tensors[field].tolist() == [row[field] for row in rows]


def test_write_accepts_tensors_and_numpy(tmp_path):
    label_type = BestOfN(4)
    rows = _rows(label_type)
    mixed = [{
        "query": torch.tensor(row["query"]),
        "sample0": np.array(row["sample0"], dtype=np.int64),
        "sample1": row["sample1"],
        "sample2": torch.tensor(row["sample2"], dtype=torch.int32),
        "sample3": np.array(row["sample3"], dtype=np.int32),
        "best": torch.tensor(row["best"]) if i % 2 else np.int64(row["best"]),
    } for i, row in enumerate(rows)]
    path = tmp_path / "labels.json"
    write_labels(path, mixed, label_type=label_type, **SIZES)
    assert _read(path, label_type) == rows

    scalar = [{"query": torch.tensor([1, 2, 3]), "sample": np.array([4, 12]), "score": np.float32(0.5)},
              {"query": [1, 2, 3], "sample": [4, 5], "score": torch.tensor(-2.0)}]
    write_labels(path, scalar, label_type=ScalarRating(), **SIZES)
    assert [r["score"] for r in _read(path, ScalarRating())] == [0.5, -2.0]


def test_error_message_format(tmp_path):
    rows = _rows(BestOfN(4))
    rows[1]["sample2"] = [3]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(LabelFileError) as info:
        _read(path, BestOfN(4))
    assert str(info.value) == f"{path}: row 1, field 'sample2': expected 2 token ids, got 1"
    assert isinstance(info.value, ValueError)


def _set(field, value):
    def mutate(row):
        row[field] = value
    return mutate


def _set_token(field, index, value):
    def mutate(row):
        row[field][index] = value
    return mutate


def _delete(field):
    def mutate(row):
        del row[field]
    return mutate


# (label type, mutation of row 1, field named in the error, words expected in the message)
ROW_CASES = {
    "missing query": (BestOfN(4), _delete("query"), "query", "missing"),
    "missing sample2": (BestOfN(4), _delete("sample2"), "sample2", "missing"),
    "missing best": (BestOfN(4), _delete("best"), "best", "missing"),
    "extra field": (BestOfN(4), _set("sample4", [1, 2]), "sample4", "unexpected"),
    "query too short": (BestOfN(4), _set("query", [1, 2]), "query", "expected 3 token ids, got 2"),
    "sample too long": (BestOfN(4), _set("sample3", [1, 2, 3]), "sample3", "expected 2 token ids, got 3"),
    "empty sample": (BestOfN(4), _set("sample0", []), "sample0", "expected 2 token ids, got 0"),
    "tokens not a list": (BestOfN(4), _set("sample1", "1 2"), "sample1", "str"),
    "tokens null": (BestOfN(4), _set("query", None), "query", "null"),
    "negative id": (BestOfN(4), _set_token("sample0", 0, -1), "sample0", "got -1"),
    "id = vocab": (BestOfN(4), _set_token("sample1", 1, 10), "sample1", "got 10"),
    "id > pad": (BestOfN(4), _set_token("query", 2, 13), "query", "got 13"),
    "id between vocab and pad": (BestOfN(4), _set_token("query", 0, 11), "query", "got 11"),
    "bool token": (BestOfN(4), _set_token("query", 0, True), "query", "boolean true"),
    "string token": (BestOfN(4), _set_token("sample2", 0, "5"), "sample2", "str '5'"),
    "float token": (BestOfN(4), _set_token("sample3", 1, 1.0), "sample3", "float 1.0"),
    "nested token": (BestOfN(4), _set_token("sample3", 1, [1]), "sample3", "list"),
    "best = n": (BestOfN(4), _set("best", 4), "best", "[0, 4), got 4"),
    "best negative": (BestOfN(4), _set("best", -1), "best", "got -1"),
    "best bool": (BestOfN(4), _set("best", False), "best", "boolean false"),
    "best float": (BestOfN(4), _set("best", 1.0), "best", "float 1.0"),
    "best string": (BestOfN(4), _set("best", "1"), "best", "str '1'"),
    "best list": (BestOfN(4), _set("best", [1]), "best", "list"),
    "best_of_2 best = 2": (BestOfN(2), _set("best", 2), "best", "[0, 2), got 2"),
    "score string": (ScalarRating(), _set("score", "0.5"), "score", "str"),
    "score NaN string": (ScalarRating(), _set("score", "NaN"), "score", "str 'NaN'"),
    "score bool": (ScalarRating(), _set("score", True), "score", "boolean"),
    "score null": (ScalarRating(), _set("score", None), "score", "null"),
    "score huge number parses to inf": (ScalarRating(), _set("score", "@1e999@"), "score", "float inf"),
    "score NaN literal": (ScalarRating(), _set("score", "@NaN@"), "score", "JSON literal NaN"),
    "score Infinity literal": (ScalarRating(), _set("score", "@Infinity@"), "score", "JSON literal Infinity"),
    "difference -Infinity literal": (
        ScalarCompare(), _set("difference", "@-Infinity@"), "difference", "JSON literal -Infinity"),
    "NaN literal in tokens": (ScalarCompare(), _set_token("sample1", 0, "@NaN@"), "sample1", "JSON literal NaN"),
    "scalar_compare missing sample1": (ScalarCompare(), _delete("sample1"), "sample1", "missing"),
}


def _dump(rows):
    """JSON text; strings "@X@" become the raw literal X (NaN, Infinity, 1e999, ...)."""
    return json.dumps(rows).replace('"@', "").replace('@"', "")


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_row_is_rejected(tmp_path, case):
    label_type, mutate, field, words = ROW_CASES[case]
    rows = _rows(label_type)
    mutate(rows[1])
    path = tmp_path / "bad_labels.json"
    path.write_text(_dump(rows))
    with pytest.raises(LabelFileError) as info:
        _read(path, label_type)
    message = str(info.value)
    assert "bad_labels.json" in message and "row 1" in message and f"'{field}'" in message
    assert words in message


@pytest.mark.parametrize("case", [c for c in ROW_CASES if "literal" not in c and "inf" not in c])
def test_write_rejects_bad_rows_without_leaving_files(tmp_path, case):
    label_type, mutate, field, words = ROW_CASES[case]
    rows = _rows(label_type)
    mutate(rows[1])
    path = tmp_path / "out.json"
    with pytest.raises(LabelFileError) as info:
        write_labels(path, rows, label_type=label_type, **SIZES)
    assert "out.json" in str(info.value) and "row 1" in str(info.value) and f"'{field}'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_write_rejects_non_finite_scores(tmp_path, value):
    rows = _rows(ScalarRating())
    rows[2]["score"] = value
    path = tmp_path / "out.json"
    path.write_text("previous contents")
    with pytest.raises(LabelFileError, match=r"out\.json: row 2, field 'score': expected a finite number"):
        write_labels(path, rows, label_type=ScalarRating(), **SIZES)
    assert path.read_text() == "previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_bad_row_that_is_not_an_object(tmp_path):
    rows = _rows(BestOfN(4))
    rows[2] = [1, 2, 3]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(LabelFileError, match=r"labels\.json: row 2: expected an object with fields query, sample0"):
        _read(path, BestOfN(4))


def test_every_row_is_validated(tmp_path):
    rows = _rows(BestOfN(4), n=50)
    rows[49]["best"] = 7
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(LabelFileError, match="row 49, field 'best'"):
        _read(path, BestOfN(4))


FILE_CASES = {
    "truncated": (lambda text: text[: len(text) // 2].encode(), ["invalid JSON", "line 1, column"]),
    "truncated multi-line": (lambda text: text.replace("}, ", "},\n")[:-30].encode(), ["line 3, column"]),
    "empty file": (lambda text: b"", ["invalid JSON", "line 1, column 1"]),
    "empty list": (lambda text: b"[]", ["empty list"]),
    "not a list": (lambda text: json.dumps({"rows": json.loads(text)}).encode(), ["expected a JSON list", "object"]),
    "a bare number": (lambda text: b"3", ["expected a JSON list", "int 3"]),
    "non-UTF-8": (lambda text: text.encode().replace(b'"best"', b'"b\xffst"'), ["UTF-8", "0xff"]),
    "latin-1 text": (lambda text: text.encode().replace(b"[", "[\"caf\xe9\", ".encode("latin-1"), 1),
                     ["UTF-8", "0xe9"]),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_file_is_rejected(tmp_path, case):
    make, words = FILE_CASES[case]
    path = tmp_path / "broken.json"
    path.write_bytes(make(json.dumps(_rows(BestOfN(4)))))
    with pytest.raises(LabelFileError) as info:
        _read(path, BestOfN(4))
    assert str(info.value).startswith(f"{path}: ")
    for word in words:
        assert word in str(info.value)


def test_missing_file_for_read(tmp_path):
    with pytest.raises(LabelFileError, match="nope.json: cannot read"):
        _read(tmp_path / "nope.json", BestOfN(4))


def test_write_empty_rows_creates_nothing(tmp_path):
    with pytest.raises(LabelFileError, match="empty list"):
        write_labels(tmp_path / "out.json", [], label_type=BestOfN(4), **SIZES)
    assert list(tmp_path.iterdir()) == []


# --- resolve_label_source ---------------------------------------------------------------------

# The original's label files, below OAI_LABEL_URL_BASE (params.py's presets name them).
ORIGINAL_LABEL_FILES = {
    "sentiment": "sentiment/offline_5k.json",
    "descriptiveness": "descriptiveness/offline_5k.json",
    "cnndm": "cnndm/online_45k.json",
    "tldr": "tldr/online_45k.json",
}


def test_constants():
    assert OAI_LABEL_URL_BASE == "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"


def test_resolve_local_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text("[]")
    assert resolve_label_source(path, cache_dir=tmp_path / "cache") == path
    assert resolve_label_source(str(path), cache_dir=tmp_path / "cache") == path
    with pytest.raises(LabelFileError, match="missing.json does not exist"):
        resolve_label_source(tmp_path / "missing.json", cache_dir=tmp_path / "cache")
    with pytest.raises(LabelFileError, match="not a regular file"):
        resolve_label_source(tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cache_path_keeps_task_folder(tmp_path):
    for task, tail in ORIGINAL_LABEL_FILES.items():
        assert cached_label_path(OAI_LABEL_URL_BASE + tail, cache_dir=tmp_path) == tmp_path / task / tail.split("/")[1]
    assert cached_label_path("http://host/a/b/c/task/x.json?sig=1", cache_dir=tmp_path) == tmp_path / "task" / "x.json"
    with pytest.raises(LabelFileError):
        cached_label_path("http://host/", cache_dir=tmp_path)


def test_resolve_uses_existing_cache_without_network(tmp_path, monkeypatch):
    cached = tmp_path / "sentiment" / "offline_5k.json"
    cached.parent.mkdir()
    cached.write_text("[]")

    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    url = OAI_LABEL_URL_BASE + ORIGINAL_LABEL_FILES["sentiment"]
    assert resolve_label_source(url, cache_dir=tmp_path) == cached


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def label_server(tmp_path):
    """An http.server on 127.0.0.1 serving tmp_path/served; yields (base_url, request paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path.endswith("/short.json"):  # promises 1000 bytes, sends 10, hangs up
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'[{"query":')
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_resolve_downloads_once_then_caches(tmp_path, no_proxy, label_server):
    base, root, requests = label_server
    rows = _rows(BestOfN(4), n=4)
    (root / "labels" / "sentiment").mkdir(parents=True)
    write_labels(root / "labels" / "sentiment" / "offline_5k.json", rows, label_type=BestOfN(4), **SIZES)
    url = base + "labels/sentiment/offline_5k.json"
    cache = tmp_path / "cache"

    path = resolve_label_source(url, cache_dir=cache)
    assert path == cache / "sentiment" / "offline_5k.json"
    assert _read(path, BestOfN(4)) == rows
    assert requests == ["/labels/sentiment/offline_5k.json"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["offline_5k.json"]  # no tmp left

    assert resolve_label_source(url, cache_dir=cache) == path
    assert len(requests) == 1  # second call served from the cache


def test_resolve_http_error_leaves_nothing(tmp_path, no_proxy, label_server):
    base, _, requests = label_server
    cache = tmp_path / "cache"
    with pytest.raises(LabelFileError) as info:
        resolve_label_source(base + "task/absent.json", cache_dir=cache)
    message = str(info.value)
    assert "404" in message and str(cache / "task" / "absent.json") in message
    assert requests == ["/task/absent.json"]
    assert not cache.exists()  # nothing created, not even the folder


def test_resolve_short_download_is_not_cached(tmp_path, no_proxy, label_server):
    base, _, _ = label_server
    cache = tmp_path / "cache"
    with pytest.raises(LabelFileError) as info:
        resolve_label_source(base + "task/short.json", cache_dir=cache, timeout=5)
    assert str(cache / "task" / "short.json") in str(info.value)
    assert list((cache / "task").iterdir()) == []  # neither the file nor its tmp


def test_resolve_unreachable_url_explains_manual_placement(tmp_path, no_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/x/y.json"
    cache = tmp_path / "cache"
    with pytest.raises(LabelFileError) as info:
        resolve_label_source(url, cache_dir=cache, timeout=5)
    message = str(info.value)
    assert url in message
    assert str(cache / "x" / "y.json") in message
    assert "--labels.source=PATH" in message
    assert "refused" in message.lower() or "errno" in message.lower()
    assert not cache.exists()


def test_labels_to_tensors_matches_rows():
    rows = _rows(BestOfN(4), n=2)
    tensors = labels_to_tensors(copy.deepcopy(rows), label_type=BestOfN(4))
    assert tensors["query"].tolist() == [r["query"] for r in rows]
    assert tensors["best"].tolist() == [0, 1]
    with pytest.raises(ValueError):
        labels_to_tensors([], label_type=BestOfN(4))


def test_soft_pairwise_labels_round_trip_and_check_probabilities(tmp_path):
    label_type = SoftPairwise()
    rows = [{"query": [1, 2, 12], "chosen": [3, 12], "rejected": [4, 5], "chosen_prob": p} for p in (1, 0.75, 0.0)]
    path = tmp_path / "soft.json"
    write_labels(path, rows, label_type=label_type, **SIZES)
    assert _read(path, label_type) == rows
    tensors = labels_to_tensors(rows, label_type=label_type)
    assert tensors["chosen_prob"].dtype == torch.float32 and tensors["chosen_prob"].tolist() == [1.0, 0.75, 0.0]
    assert set(tensors) == {"query", "chosen", "rejected", "chosen_prob"}
    for bad in (1.5, -0.1, "0.5", None):
        rows[1]["chosen_prob"] = bad
        path.write_text(json.dumps(rows))
        with pytest.raises(LabelFileError, match=r"soft\.json: row 1, field 'chosen_prob': expected a probability"):
            _read(path, label_type)
