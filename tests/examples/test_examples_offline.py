"""A paper config without its data fails once, before any rank starts, with a message that says how to fix it.

No test here touches the network: downloads are either turned off, replaced by a function that fails
the way an offline machine does, or routed through a proxy address nothing listens on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from urllib.error import URLError

import pytest
from launch import run_script
from torchvision import datasets

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples.data import CIFARDataModule, DataUnavailableError  # noqa: E402

PAPER_CONFIG = ROOT / "examples" / "configs" / "table1" / "cifar10_iid_resnet20bn_gmc.yaml"
FIX = "--data.synthetic=true"


def _offline(*args: object, **kwargs: object) -> None:
    raise URLError("[Errno -2] Name or service not known")


def test_missing_data_with_download_off_names_path_download_and_fix(tmp_path: Path) -> None:
    dm = CIFARDataModule(name="cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataUnavailableError) as info:
        dm.ensure_available()
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert datasets.CIFAR10.url in message and "download" in message
    assert FIX in message


def test_failed_download_names_the_url_the_cause_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.CIFAR100, "download", _offline)
    dm = CIFARDataModule(name="cifar100", data_dir=str(tmp_path), download=True)
    for check in (dm.ensure_available, dm.prepare_data):
        with pytest.raises(DataUnavailableError) as info:
            check()
        message = str(info.value)
        assert str(tmp_path / "cifar-100-python") in message
        assert f"the download from {datasets.CIFAR100.url} failed" in message
        assert "Name or service not known" in message
        assert FIX in message


def test_files_on_disk_are_used_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / datasets.CIFAR10.base_folder
    folder.mkdir()
    for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list:
        (folder / name).write_bytes(b"")
    monkeypatch.setattr(datasets.CIFAR10, "download", _offline)
    dm = CIFARDataModule(name="cifar10", data_dir=str(tmp_path), download=True)
    dm.ensure_available()  # no download attempted, so no error
    dm.prepare_data()
    (folder / "test_batch").unlink()
    with pytest.raises(DataUnavailableError):
        dm.ensure_available()


def test_synthetic_needs_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.CIFAR10, "download", _offline)
    CIFARDataModule(name="cifar10", data_dir=str(tmp_path / "none"), synthetic=True).ensure_available()


def test_paper_config_offline_fails_once_before_launching_ranks(tmp_path: Path) -> None:
    """The paper config as shipped (8 devices, download: true) on a machine without network."""
    # urllib honours these: every download attempt is refused at once, network or not.
    proxies = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    env: dict[str, str | None] = {var: "http://127.0.0.1:9" for var in proxies}
    env.update(no_proxy=None, NO_PROXY=None)  # None: removed from the child's environment
    cmd = [ROOT / "examples" / "train.py", "fit", "--config", PAPER_CONFIG]
    start = time.monotonic()
    proc = run_script(cmd, cwd=tmp_path, env=env, timeout=120, check=False)
    output = proc.output
    assert proc.returncode != 0, output[-3000:]
    assert output.count(FIX) == 1, output[-3000:]  # one message, not one per rank
    assert "Traceback" not in output, output[-3000:]
    assert str(tmp_path / "data" / "cifar-10-batches-py") in output
    assert datasets.CIFAR10.url in output
    # No rank was started: Lightning prints this line from every rank it initialises.
    assert "Initializing distributed" not in output
    assert time.monotonic() - start < 100
