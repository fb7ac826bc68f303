"""memprofile.units: the one formatter and parser of byte sizes (qlora.util.sizes re-exports them)."""
import subprocess
import sys

import pytest

from memprofile.units import SizeError, human, parse_size


@pytest.mark.parametrize("n, digits, text", [(None, 2, "-"), (0, 2, "0 B"), (512, 2, "512 B"), (1536, 2, "1.50 KiB"),
                                             (3 * 2**20, 1, "3.0 MiB"), (24 * 2**30, 2, "24.00 GiB"),
                                             (-2**30, 2, "-1.00 GiB")])
def test_human(n, digits, text):
    assert human(n, digits=digits) == text


@pytest.mark.parametrize("text, n", [("24GiB", 24 * 2**30), ("2GB", 2 * 10**9), ("512MB", 512 * 10**6), ("1e9", 10**9),
                                     ("64 kib", 64 * 2**10), (" 1.5TiB ", int(1.5 * 2**40)), ("100B", 100), (4096, 4096)])
def test_parse_size(text, n):
    assert parse_size(text) == n
    assert parse_size(human(n, digits=6).replace(" ", "")) == pytest.approx(n, rel=1e-6)


@pytest.mark.parametrize("text, words", [("lots", "not understood"), ("0GB", "must be positive"), ("-1", "positive"),
                                         ("1e999GB", "not understood")])
def test_parse_size_errors_qlora_raises_as_qlora_errors(text, words):
    from qlora.errors import QLoRAError
    from qlora.util.sizes import parse_size as qlora_parse_size
    with pytest.raises(SizeError, match=words):
        parse_size(text)
    with pytest.raises(QLoRAError, match=words):
        qlora_parse_size(text)


def test_units_and_qlora_sizes_import_no_torch():
    code = "import sys, memprofile.units, qlora.util.sizes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
