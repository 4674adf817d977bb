import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lm_human_preferences.language import tf_checkpoint as tfc
from lm_human_preferences.language.tf_checkpoint import (
    CheckpointError, crc32c, mask_crc, read_checkpoint, read_index, unmask_crc)
import tf_writer
from tf_writer import write_checkpoint

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "openai-gpt2-124M"


def _reference_crc(data: bytes) -> int:
    return tfc._crc_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # plain bytewise table loop


# ---------------------------------------------------------------- crc32c
@pytest.mark.parametrize("data, expected", [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_answers(data, expected):
    assert crc32c(data) == expected
    assert _reference_crc(data) == expected


@pytest.mark.parametrize("n", [255, 256, 257, 1000, 4099, 65549, 1 << 20, (1 << 20) + 12345])
def test_crc32c_vectorised_path_matches_bytewise(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert crc32c(data) == _reference_crc(data.tobytes())
    assert crc32c(data[n // 3:], crc32c(data[:n // 3])) == crc32c(data)  # continuation


def test_crc32c_large_input_agrees_with_chunked():
    data = np.random.default_rng(1).integers(0, 256, (65 << 20) + 77, dtype=np.uint8)
    crc = 0
    for start in range(0, len(data), 10_000_019):  # odd chunk sizes, different lane layouts
        crc = crc32c(data[start:start + 10_000_019], crc)
    assert crc32c(data) == crc


def test_mask_roundtrip():
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF, 0x80000000):
        assert unmask_crc(mask_crc(crc)) == crc
    assert mask_crc(0) == 0xA282EAD8


# ---------------------------------------------------------------- the real GPT-2 124M index
def _gpt2_shapes():
    shapes = {"model/wte": (50257, 768), "model/wpe": (1024, 768),
              "model/ln_f/g": (768,), "model/ln_f/b": (768,)}
    for i in range(12):
        h = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            shapes[h + ln + "/g"] = shapes[h + ln + "/b"] = (768,)
        for layer, n_in, n_out in (("attn/c_attn", 768, 2304), ("attn/c_proj", 768, 768),
                                   ("mlp/c_fc", 768, 3072), ("mlp/c_proj", 3072, 768)):
            shapes[h + layer + "/w"] = (1, n_in, n_out)
            shapes[h + layer + "/b"] = (n_out,)
    return shapes


@pytest.fixture
def gpt2_index():
    path = FIXTURE / "model.ckpt.index"
    if not path.is_file():
        pytest.skip(f"fixture {path} not present")
    return path


def test_gpt2_124m_index(gpt2_index):
    entries = read_index(gpt2_index)
    assert len(entries) == 148
    assert {n: e.shape for n, e in entries.items()} == _gpt2_shapes()
    assert all(e.dtype == np.float32 and e.tf_dtype == 1 and e.shard_id == 0
               for e in entries.values())
    assert all(e.size == 4 * int(np.prod(e.shape)) for e in entries.values())
    assert sum(e.size for e in entries.values()) == 497_759_232
    offset = 0  # tensors are laid out back to back in the single data shard
    for e in sorted(entries.values(), key=lambda e: e.offset):
        assert e.offset == offset
        offset += e.size
    assert offset == 497_759_232
    header, _ = tfc._read_bundle(gpt2_index)
    assert header == {"num_shards": 1, "big_endian": False}


def test_writer_reproduces_tf_index_bytes(gpt2_index):
    # TF's writer: 256 KiB blocks, restart interval 16, shortest-successor index keys
    data = gpt2_index.read_bytes()
    assert tf_writer._build_table(tfc._read_table(gpt2_index), block_size=1 << 18) == data
    # and each BundleEntryProto re-encodes to exactly the bytes TF wrote
    entries = read_index(gpt2_index)
    for key, value in tfc._read_table(gpt2_index)[1:]:
        e = entries[key.decode()]
        assert tf_writer._encode_entry(e.tf_dtype, e.shape, e.offset, e.size, e.crc32c) == value


@pytest.mark.parametrize("start, limit, expected", [
    (b"abcd", b"abzz", b"abd"), (b"model/h0", b"model/h1", b"model/h0"),
    (b"ab", b"abc", b"ab"), (b"model/wte", None, b"n"), (b"\xff\xffa", None, b"\xff\xffb")])
def test_index_separators(start, limit, expected):
    assert tf_writer._separator(start, limit) == expected


def test_gpt2_124m_missing_shard_is_named(gpt2_index, tmp_path):
    shutil.copy(gpt2_index, tmp_path / "model.ckpt.index")
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt\.data-00000-of-00001"):
        read_checkpoint(tmp_path, names=["model/ln_f/g"])


# ---------------------------------------------------------------- round trips
def _small_tensors():
    rng = np.random.default_rng(0)
    return {
        "model/wte": rng.standard_normal((7, 5)).astype(np.float32),
        "model/h0/attn/c_attn/w": rng.standard_normal((1, 4, 12)).astype(np.float32),
        "model/h0/attn/c_attn/b": rng.standard_normal(12).astype(np.float64),
        "model/h0/attn/c_proj/b": rng.standard_normal(3).astype(np.float16),
        "global_step": np.array(123456789012, dtype=np.int64),  # scalar
        "counts": rng.integers(-1000, 1000, (2, 3), dtype=np.int32),
        "bytes": rng.integers(0, 256, 9, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "big_endian_input": np.arange(6, dtype=">i4").reshape(2, 3),
    }


def _assert_same(got, want):
    assert list(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].shape == arr.shape, name
        assert got[name].dtype == arr.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(got[name], arr)


def test_roundtrip_small(tmp_path):
    tensors = _small_tensors()
    write_checkpoint(tmp_path / "model.ckpt", tensors)
    assert {p.name for p in tmp_path.iterdir()} == {"model.ckpt.index",
                                                    "model.ckpt.data-00000-of-00001"}
    for where in (tmp_path / "model.ckpt", tmp_path / "model.ckpt.index", tmp_path, str(tmp_path)):
        _assert_same(read_checkpoint(where), tensors)
    entries = read_index(tmp_path / "model.ckpt.index")
    assert entries["global_step"].shape == () and entries["global_step"].dtype == np.int64
    assert read_checkpoint(tmp_path, names=["counts"]).keys() == {"counts"}
    with pytest.raises(KeyError, match="nope"):
        read_checkpoint(tmp_path, names=["nope"])


def test_roundtrip_large_tensor(tmp_path):
    big = np.random.default_rng(2).standard_normal((1024, 771)).astype(np.float32)  # ~3 MB
    write_checkpoint(tmp_path / "model.ckpt", {"model/wte": big, "b": np.ones(3, np.float32)})
    _assert_same(read_checkpoint(tmp_path), {"model/wte": big, "b": np.ones(3, np.float32)})
    shard = tmp_path / "model.ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[12 + 2_000_001] ^= 0x01  # "b" comes first (12 bytes); flip deep inside the big tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="'model/wte'"):
        read_checkpoint(tmp_path)
    assert read_checkpoint(tmp_path, names=["b"])["b"].tolist() == [1, 1, 1]


def _index_blocks(index_path):
    data = Path(index_path).read_bytes()
    footer = data[-48:]
    _, pos = tfc._varint(footer, tfc._varint(footer, 0)[1])
    return list(tfc._block_entries(tfc._read_block(data, footer[pos:40], index_path)))


def test_roundtrip_many_tensors_several_blocks(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"model/h{i}/{part}/{p}": rng.standard_normal(i % 5 + 1).astype(np.float32)
               for i in range(25) for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc",
                                               "mlp/c_proj", "ln_1", "ln_2") for p in "wb"}
    assert len(tensors) == 300
    write_checkpoint(tmp_path / "model.ckpt", tensors)
    assert len(_index_blocks(tmp_path / "model.ckpt.index")) > 1
    _assert_same(read_checkpoint(tmp_path / "model.ckpt"), tensors)
    assert list(read_index(tmp_path / "model.ckpt.index")) == sorted(tensors)


def test_checkpoint_state_file(tmp_path):
    tensors = {"a": np.ones(3, np.float32)}
    write_checkpoint(tmp_path / "model.ckpt-100", tensors)
    write_checkpoint(tmp_path / "model.ckpt-200", {"a": np.zeros(3, np.float32)})
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path)  # ambiguous without a `checkpoint` file
    # the recorded path is often absolute on another machine: fall back to its basename
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt-100"\n'
                                         'all_model_checkpoint_paths: "model.ckpt-100"\n')
    _assert_same(read_checkpoint(tmp_path), tensors)


def test_bfloat16_is_read_as_float32(tmp_path):
    want = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (want.view(np.uint32) >> 16).astype("<u2").tobytes()
    entry = tf_writer._encode_entry(14, want.shape, 0, len(raw), mask_crc(crc32c(raw)))
    header = b"\x08\x01"
    (tmp_path / "x.index").write_bytes(tf_writer._build_table([(b"", header), (b"w", entry)]))
    (tmp_path / "x.data-00000-of-00001").write_bytes(raw)
    got = read_checkpoint(tmp_path / "x")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- corruption
@pytest.fixture
def small_ckpt(tmp_path):
    write_checkpoint(tmp_path / "model.ckpt", _small_tensors())
    return tmp_path / "model.ckpt"


def test_flipped_data_byte_names_tensor(small_ckpt):
    shard = Path(f"{small_ckpt}.data-00000-of-00001")
    e = read_index(f"{small_ckpt}.index")["model/h0/attn/c_attn/w"]
    data = bytearray(shard.read_bytes())
    data[e.offset + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"crc32c mismatch for tensor 'model/h0/attn/c_attn/w'"
                       r".*expected 0x[0-9a-f]{8}, got 0x[0-9a-f]{8}") as info:
        read_checkpoint(small_ckpt)
    assert str(shard) in str(info.value)
    got = read_checkpoint(small_ckpt, verify_crc=False)  # opt-out still loads
    assert got["model/h0/attn/c_attn/w"].shape == (1, 4, 12)
    read_checkpoint(small_ckpt, names=["model/wte"])  # untouched tensors are fine


def test_truncated_data_shard(small_ckpt):
    shard = Path(f"{small_ckpt}.data-00000-of-00001")
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(small_ckpt)


def test_missing_shard_names_path(small_ckpt):
    shard = Path(f"{small_ckpt}.data-00000-of-00001")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard).replace(".", r"\.")):
        read_checkpoint(small_ckpt)


def test_every_flipped_index_byte_is_caught(small_ckpt):
    index = Path(f"{small_ckpt}.index")
    good = index.read_bytes()
    want = read_checkpoint(small_ckpt)
    caught = 0
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        index.write_bytes(bytes(bad))
        try:
            got = read_checkpoint(small_ckpt)
        except CheckpointError as e:
            assert str(index) in str(e)
            caught += 1
            continue
        # only the footer's zero padding is not covered by a checksum, and it is ignored
        assert len(good) - 48 <= i < len(good) - 8, i
        _assert_same(got, want)
    assert caught >= len(good) - 40


def test_bad_magic_and_truncated_index(small_ckpt):
    index = Path(f"{small_ckpt}.index")
    good = index.read_bytes()
    index.write_bytes(good[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="bad magic") as info:
        read_index(index)
    assert str(index) in str(info.value)
    for cut in (10, len(good) // 2, len(good) - 49):
        index.write_bytes(good[:cut])
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(small_ckpt)
        assert str(index) in str(info.value)


def test_compressed_block_is_rejected(tmp_path):
    builder = tf_writer._BlockBuilder()
    builder.add(b"", b"\x08\x01")
    block = builder.finish()
    crc = mask_crc(crc32c(block + b"\x01"))  # valid crc, but type 1 = snappy
    footer = tf_writer._enc_varint(0) + tf_writer._enc_varint(len(block))
    data = block + b"\x01" + struct.pack("<I", crc)
    (tmp_path / "c.index").write_bytes(data + (footer * 2).ljust(40, b"\0")
                                       + struct.pack("<Q", tfc.MAGIC))
    with pytest.raises(CheckpointError, match="compression type 1"):
        read_index(tmp_path / "c.index")


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype"):
        write_checkpoint(tmp_path / "m", {"s": np.array(["x"])})


def test_one_checkpoint_error_class_for_every_reader():
    """The TF reader's error is the one launch.py counts as a user error (exit status 2)."""
    from lm_human_preferences import rundir, run_status
    from lm_human_preferences.language import checkpoints

    assert tfc.CheckpointError is checkpoints.CheckpointError
    assert issubclass(rundir.CheckpointCorrupt, checkpoints.CheckpointError)
    assert checkpoints.CheckpointError in run_status.user_errors()
