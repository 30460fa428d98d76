"""Our GGUF container reader against the `gguf` package's GGUFReader, on the real model file."""

import numpy as np
import pytest
from gguf import GGUFReader

from llamaherd.errors import FormatError
from llamaherd.formats.gguf import GGUFFile


def test_matches_gguf_reader(smollm2_path, smollm2_reader):
    ours, ref = GGUFFile(smollm2_path), smollm2_reader  # the gguf package's reader (conftest: parsed once)
    assert isinstance(ref, GGUFReader)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.metadata[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(n) for n in reversed(theirs.shape.tolist()))
        assert np.array_equal(mine.data.reshape(-1), theirs.data.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("cut", [3, 20, 1_000, 2_000_000, -100])
def test_truncated_file_is_a_clear_error(smollm2_path, tmp_path, cut):
    data = smollm2_path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(FormatError, match="truncated|not a GGUF file|not a valid GGUF"):
        GGUFFile(bad)


def test_garbage_after_magic(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + b"\xff" * 64)
    with pytest.raises(FormatError, match="implausible|truncated"):
        GGUFFile(bad)
