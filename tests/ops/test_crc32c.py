"""knnclip._C.crc32c against a bit-by-bit reference written from the CRC-32C definition."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import knnclip._C as C


def crc32c_bitwise(data: bytes, value: int = 0) -> int:
    """Reflected CRC-32C, polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF: one bit at a time."""
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("implementation", ["auto", "table"])
def test_published_check_values(implementation: str) -> None:
    # RFC 3720 (iSCSI) appendix B.4 and the catalogue's "check" value for CRC-32C.
    assert C.crc32c(b"123456789", implementation=implementation) == 0xE3069283
    assert C.crc32c(bytes(32), implementation=implementation) == 0x8A9136AA
    assert C.crc32c(b"\xff" * 32, implementation=implementation) == 0x62A8AB43
    assert C.crc32c(bytes(range(32)), implementation=implementation) == 0x46DD794E
    assert C.crc32c(b"", implementation=implementation) == 0


@given(st.binary(max_size=300), st.integers(0, 300), st.sampled_from(["auto", "table"]))
def test_matches_bitwise_reference_and_extends(data: bytes, cut: int, implementation: str) -> None:
    expected = crc32c_bitwise(data)
    assert C.crc32c(data, implementation=implementation) == expected
    cut = min(cut, len(data))
    head = C.crc32c(data[:cut], implementation=implementation)
    assert C.crc32c(data[cut:], head, implementation=implementation) == expected


def test_accepts_numpy_and_memoryview_and_rejects_strided() -> None:
    a = np.arange(1000, dtype=np.float32)
    assert C.crc32c(a) == crc32c_bitwise(a.tobytes())
    assert C.crc32c(memoryview(a.tobytes())[3:]) == crc32c_bitwise(a.tobytes()[3:])
    with pytest.raises(ValueError, match="C-contiguous"):
        C.crc32c(a[::2])
    with pytest.raises(ValueError, match="implementation"):
        C.crc32c(b"x", implementation="fast")


def test_f16_to_f32_is_exact_and_validates() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**16, 300_001, dtype=np.uint16)  # every kind of float16: subnormals, Inf, NaN
    src = bits.view(np.float16)
    out = np.empty(src.shape, np.float32)
    C.f16_to_f32(src, out)
    np.testing.assert_array_equal(
        out.view(np.uint32)[~np.isnan(out)], src.astype(np.float32).view(np.uint32)[~np.isnan(out)]
    )
    assert np.array_equal(np.isnan(out), np.isnan(src))
    with pytest.raises(TypeError, match="float16"):
        C.f16_to_f32(out, out)
    with pytest.raises(ValueError, match="elements"):
        C.f16_to_f32(src[:10], out)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.f16_to_f32(src[::2], out[: len(src[::2])])
