"""Bank persistence: round trip, refusal of anything that is not a bank, atomic saves."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from anomaly.backbones import BackboneIdentity
from anomaly.bank import BankError, NormalBank
from anomaly.sources import collect_inputs
from anomaly.spade import SPADE

from imagegen import write_images


@pytest.fixture(scope="module")
def bank(tmp_path_factory, random_resnet18) -> NormalBank:
    folder = tmp_path_factory.mktemp("normals")
    write_images(folder, range(5))
    return SPADE(extractor=random_resnet18, k=3, calibration_images=2).fit(collect_inputs([folder]).items).bank


def test_round_trip_keeps_everything(bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = NormalBank.load(path, expect=bank.identity)
    assert loaded.identity == bank.identity and loaded.paths == bank.paths
    np.testing.assert_array_equal(loaded.global_features, bank.global_features)
    for a, b in zip(loaded.pyramid, bank.pyramid):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.thumbnails, bank.thumbnails)
    np.testing.assert_array_equal(loaded.sizes, bank.sizes)
    np.testing.assert_array_equal(loaded.loo_scores, bank.loo_scores)
    assert loaded.fingerprint == bank.fingerprint
    assert loaded.suggested_tau() == bank.suggested_tau()


def test_file_is_readable_by_the_safetensors_library(bank, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    tensors = safetensors_numpy.load_file(str(path))
    np.testing.assert_array_equal(tensors["global"], bank.global_features)


def test_other_backbone_is_refused(bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    other = BackboneIdentity("efficientnet_lite0", "ImageNet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(BankError, match=r"bank.safetensors: built with resnet18 .* but efficientnet_lite0"):
        NormalBank.load(path, expect=other)


@pytest.mark.parametrize("content, reason", [
    (b"", "too short"),
    (os.urandom(4096), "not a bank file"),
    (b"hello, this is a text file\n" * 10, "not a bank file"),
])
def test_non_banks_give_one_line_errors(tmp_path, content, reason):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(content)
    with pytest.raises(BankError, match=reason) as info:
        NormalBank.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_bank(bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BankError, match="truncated"):
        NormalBank.load(path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "bank.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    assert pickle.loads(path.read_bytes()) and marker.exists()  # the payload really would create the file
    marker.unlink()
    with pytest.raises(BankError):
        NormalBank.load(path)
    assert not marker.exists()
    np_path = tmp_path / "bank.npz"  # also disguised under another extension
    np_path.write_bytes(path.read_bytes())
    with pytest.raises(BankError):
        NormalBank.load(np_path)
    assert not marker.exists()


def test_killed_save_leaves_previous_file_intact(bank, tmp_path):
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from anomaly import tensorfile
        big = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**31,), strides=(0,))
        print("writing", flush=True)
        tensorfile.write({str(path)!r}, {{"big": big}}, {{"format": "spade-bank"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == b"writing"
    deadline = time.time() + 30
    while not any(p.name.startswith(".bank.safetensors.tmp") for p in tmp_path.iterdir()):
        assert time.time() < deadline, "the writer never started its temporary file"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    assert NormalBank.load(path).paths == bank.paths
