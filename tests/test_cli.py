"""The command line contract: files written, rows kept, errors one line, exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anomaly import cli, search
from anomaly.cli import main

import hostile
from imagegen import png_bytes, texture, write_images

BACKBONE = ["--backbone", "efficientnet_lite0", "--k", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    write_images(root / "train" / "good", range(6))
    path = root / "bank.safetensors"
    assert main(["fit", str(root / "train"), "--bank", str(path), *BACKBONE]) == 0
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_score_writes_rows_maps_and_provenance(bank_path, tmp_path, capsys):
    test = tmp_path / "test"
    write_images(test / "good", [10, 11], size=70)
    write_images(test / "bad", [12], defect=True, size=90)
    (test / "bad" / "broken.png").write_bytes(hostile.truncated_png())
    single = tmp_path / "single.png"
    single.write_bytes(png_bytes(texture(13, size=50)))
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    code = main(["score", "--bank", str(bank_path), "--k", "3", "--maps", str(maps), "--out", str(out),
                 str(test), str(single)])
    assert code == 1  # one unreadable input
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "score", "anomalous", "error"]
    by_path = {row["path"]: row for row in rows}
    assert set(by_path) == {str(test / "bad" / "broken.png"), str(test / "bad" / "img_012.png"),
                            str(test / "good" / "img_010.png"), str(test / "good" / "img_011.png"), str(single)}
    broken = by_path[str(test / "bad" / "broken.png")]
    assert broken["score"] == "" and "truncated" in broken["error"]
    good = [r for r in rows if not r["error"]]
    assert all(float(r["score"]) > 0 and r["anomalous"] in ("0", "1") for r in good)
    m = np.load(maps / "bad" / "img_012.npy", allow_pickle=False)
    assert m.shape == (90, 90) and m.dtype == np.float32
    assert np.load(maps / "single.npy").shape == (50, 50)
    assert not (maps / "bad" / "broken.npy").exists()
    provenance = json.loads(out.with_name("scores.csv.json").read_text())
    assert provenance["backbone"] == "efficientnet_lite0" and provenance["k"] == 3
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err


@pytest.mark.parametrize("seconds, said", [(0.0, False), (1.0, True)])
def test_a_slow_first_compile_is_announced(bank_path, tmp_path, capsys, monkeypatch, seconds, said):
    """Maps prepare the pixel search first; when that takes long (a first run compiling its loops) a line
    says so, and when it is quick (loops cached on disk) nothing is said."""
    calls = []
    monkeypatch.setattr(cli, "COMPILE_NOTICE_AFTER_S", 0.5)
    monkeypatch.setattr(search, "warm_up", lambda precision: (calls.append(precision), time.sleep(seconds)))
    test = tmp_path / "test"
    write_images(test, [10])
    assert main(["score", str(test), "--bank", str(bank_path), "--out", str(tmp_path / "s.csv"),
                 "--maps", str(tmp_path / "maps"), *BACKBONE]) == 0
    assert calls == ["auto"]
    err = capsys.readouterr().err
    assert ("compiling the pixel search (first run on this machine" in err) == said, err
    main(["score", str(test), "--bank", str(bank_path), "--out", str(tmp_path / "s.csv"), *BACKBONE])
    assert calls == ["auto"]  # no maps: nothing to prepare


def test_tau_decides_anomalous(bank_path, tmp_path):
    write_images(tmp_path / "t", [20, 21])
    out = tmp_path / "s.csv"
    assert main(["score", "--bank", str(bank_path), "--tau", "0", "--out", str(out), str(tmp_path / "t")]) == 0
    assert {r["anomalous"] for r in read_rows(out)} == {"1"}
    assert main(["score", "--bank", str(bank_path), "--tau", "1e30", "--out", str(out), str(tmp_path / "t")]) == 0
    assert {r["anomalous"] for r in read_rows(out)} == {"0"}


@pytest.mark.parametrize("args, message", [
    (["--tau", "nan"], "--tau must be a finite number"),
    (["--tau", "-1"], "--tau must be a finite number"),
    (["--k", "0"], "k must be an integer >= 1"),
])
def test_bad_parameters_are_one_line_errors(bank_path, tmp_path, capsys, args, message):
    assert main(["score", "--bank", str(bank_path), *args, "--out", str(tmp_path / "o.csv"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_warnings_are_one_line_each(bank_path, tmp_path, capsys, no_native_bf16):
    """bf16 forced on a CPU without it warns once, as one line like the command's other messages."""
    write_images(tmp_path / "test", [3])
    assert main(["score", "--bank", str(bank_path), "--precision", "bf16", "--out", str(tmp_path / "o.csv"),
                 str(tmp_path / "test")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "bfloat16" in line]
    assert lines == ["warning: bf16 ranking asked for, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                     "torch emulates it, many times slower than fp32 ranking, for the same answers"]


def test_not_a_bank_and_other_backbone(bank_path, tmp_path, capsys):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"definitely not a bank")
    assert main(["score", "--bank", str(fake), str(tmp_path)]) == 2
    assert f"error: {fake}: not a bank file" in capsys.readouterr().err
    code = main(["score", "--bank", str(bank_path), "--backbone", "resnet18", "--weights", "random", str(tmp_path)])
    assert code == 2
    assert "built with efficientnet_lite0" in capsys.readouterr().err


def test_hostile_batch_never_stops_scoring(bank_path, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, content in hostile.hostile_files().items():
        (folder / name).write_bytes(content)
    out = tmp_path / "h.csv"
    assert main(["score", "--bank", str(bank_path), "--out", str(out), str(folder)]) == 1
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    for name, reason in hostile.expected_reasons().items():
        if Path(name).suffix.lower() not in {".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp", ".webp"}:
            continue  # a folder walk only picks image extensions
        row = rows[name]
        if reason is None:
            assert row["error"] == "" and float(row["score"]) >= 0, name
        else:
            assert reason in row["error"] and "\n" not in row["error"], name


def test_fit_on_empty_folder_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty"), "--bank", str(tmp_path / "b.safetensors"), *BACKBONE]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and "no normal image could be read" in err
    assert not (tmp_path / "b.safetensors").exists()


def test_evaluate_prints_metrics_json(tmp_path, capsys):
    from anomaly.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "demo", n_train=8, n_test_good=3, n_test_defect=3, size=96)
    assert main(["evaluate", str(root), *BACKBONE]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("image_auroc_knn", "image_auroc_map_max", "pixel_auroc", "pro"):
        assert 0.0 <= report[key] <= 1.0
    assert report["backbone"] == "efficientnet_lite0" and report["seconds"]["fit"] >= 0
    assert report["per_defect"]


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "anomaly", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "fit" in proc.stdout and "evaluate" in proc.stdout
