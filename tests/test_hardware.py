"""engine.hardware: datasheet peaks by GPU name, git provenance, the median timer, the NVML energy counter."""

import itertools
import subprocess
import sys
import time

import pytest
import torch

from engine import hardware


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 PCIE 80GB", 756.0),  # matched whatever the case
    ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("Tesla V100-SXM2-16GB", None),
    ("", None),
    (None, None),
])
def test_datasheet_peak_by_name(name, tflops):
    assert hardware.datasheet_peak_tflops(name) == tflops


def test_datasheet_peak_of_a_device():
    assert hardware.datasheet_peak_tflops(torch.device("cpu")) is None
    assert hardware.A100_DENSE_BF16_TFLOPS == hardware.datasheet_peak_tflops("NVIDIA A100-SXM4-40GB")


@pytest.mark.gpu
def test_datasheet_peak_of_a_cuda_device():
    device = torch.device("cuda")
    assert hardware.datasheet_peak_tflops(device) == hardware.datasheet_peak_tflops(torch.cuda.get_device_name(device))


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_commit_of_a_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_GIT_COMMIT", raising=False)
    try:
        _git(tmp_path, "init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "a")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert hardware.read_git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("b")
    assert hardware.read_git_commit(str(tmp_path)) == head + "-dirty"
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find tmp_path's repository
    assert hardware.read_git_commit(outside) is None


def test_git_commit_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_GIT_COMMIT", "abc1234")
    assert hardware.read_git_commit() == "abc1234"
    assert hardware.read_git_commit(tmp_path) == "abc1234"
    monkeypatch.setenv("ENGINE_GIT_COMMIT", "")  # empty: read from the repository
    assert hardware.read_git_commit(tmp_path / "missing") is None


def test_median_seconds_on_the_cpu():
    """Each timed call is timed on its own, after the untimed warm-up calls; the median of the
    repeats is returned."""
    durations = iter([0.2, 0.2, 0.001, 0.05, 0.002])  # two warm-ups, then three timed calls
    calls = itertools.count()

    def fn():
        next(calls)
        time.sleep(next(durations))

    seconds = hardware.median_seconds(fn, "cpu", repeats=3, warmup=2)
    assert next(calls) == 5
    assert 0.002 <= seconds < 0.05
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        hardware.median_seconds(fn, torch.device("cpu"), repeats=0)


@pytest.mark.gpu
def test_median_seconds_on_the_gpu():
    a = torch.randn(2048, 2048, device="cuda")
    seconds = hardware.median_seconds(lambda: a @ a, torch.device("cuda"), repeats=5, warmup=1)
    assert 0 < seconds < 1


def test_bench_uses_these():
    """bench/hardware.py (on sys.path through tests/conftest.py) re-exports the engine's functions."""
    import hardware as bench_hardware

    for name in ("datasheet_peak_tflops", "median_seconds", "read_git_commit", "A100_DENSE_BF16_TFLOPS"):
        assert getattr(bench_hardware, name) is getattr(hardware, name), name


class _FakeNvml:
    """pynvml's calls that hardware.open_energy_counter makes, answering from fixed numbers."""

    class NVMLError(Exception):
        pass

    def __init__(self, readings=(), init_fails=False, counter_fails=False):
        self.readings, self.init_fails, self.counter_fails = iter(readings), init_fails, counter_fails
        self.open = 0

    def nvmlInit(self):
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle == ("gpu", 0)
        if self.counter_fails:
            raise self.NVMLError("Not Supported")
        return next(self.readings)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000  # mW

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"


def test_nvml_counter_opens_reads_and_fails_softly(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu = torch.device("cuda", 0)  # never touched: torch finds no CUDA here, so NVML's index 0 is used
    assert hardware.open_energy_counter("cpu").reason == "no NVML energy counter on a cpu device"

    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    missing = hardware.open_energy_counter(gpu)
    assert not missing.available and missing.read_mj() is None
    assert missing.reason == "pynvml is not importable (pip install nvidia-ml-py)"
    assert missing.info == dict(available=False, reason=missing.reason)

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(init_fails=True))  # no driver
    assert hardware.open_energy_counter(gpu).reason == "NVML did not initialise: NVMLError: Driver Not Loaded"

    fake = _FakeNvml(counter_fails=True)  # a GPU without the counter
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    unsupported = hardware.open_energy_counter(gpu)
    assert unsupported.reason == "the NVML energy counter cannot be read: NVMLError: Not Supported"
    assert fake.open == 0  # shut down again

    fake = _FakeNvml(readings=[10, 2_000, 7_000])  # the probe read, then two readings, then it runs dry
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counter = hardware.open_energy_counter(gpu)
    assert counter.available and counter.reason is None
    assert counter.info["gpu_name"] == "NVIDIA H100 80GB HBM3" and counter.info["power_limit_w"] == 700.0
    assert counter.info["default_power_limit_w"] is None  # a query the fake lacks: a null fact, no failure
    assert counter.info["driver_version"] == "580.159.04" and counter.info["nvml_device_matched_by"] == "index"
    assert [counter.read_mj(), counter.read_mj()] == [2_000, 7_000]
    assert counter.read_mj() is None and counter.reason.startswith("reading the NVML energy counter failed")
    counter.close()
    assert fake.open == 0


def test_nvml_finds_torchs_gpu_by_uuid(monkeypatch):
    class ByUuid(_FakeNvml):
        def nvmlDeviceGetHandleByUUID(self, uuid):
            if uuid != b"GPU-1234-abcd":  # an older nvidia-ml-py: bytes only
                raise TypeError("bytes or integer address expected instead of str instance")
            return ("gpu", 0)

        def nvmlDeviceGetHandleByIndex(self, index):
            raise AssertionError("the UUID must decide")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"uuid": "1234-abcd"})())
    monkeypatch.setitem(sys.modules, "pynvml", ByUuid(readings=[1, 2]))
    counter = hardware.open_energy_counter(torch.device("cuda", 3))
    assert counter.available and counter.info["nvml_device_matched_by"] == "uuid"
    # no UUID and a visibility mask that renumbers the GPUs: no guessing by index
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: object())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert "cannot match CUDA device 3" in hardware.open_energy_counter(torch.device("cuda", 3)).reason
