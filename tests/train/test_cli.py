"""The command line as a whole: one exit-code table for every command (train/__main__.py), the
`engine-train` console script, and what a training run prints (train/metrics.py: plain lines
when the output is not a terminal, a notice when TensorBoard is asked for but missing)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import train.__main__ as cli
import train.export
from tests.train.conftest import CAPTIONED, REPO, cli_env, run_in_process
from train.metrics import MetricsLog

EXPORT_ARGS = ["export", "--ckpt", "some-run", "--to", "diffusers", "out"]


# ------------------------------------------------------------------------------ exit codes

def test_usage_errors_return_2(capsys):
    # argparse's own errors come back as main()'s return value, like every other outcome
    assert run_in_process(*EXPORT_ARGS, "--no-such-flag") == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert run_in_process("export") == 2  # required arguments missing
    assert "--ckpt" in capsys.readouterr().err
    assert run_in_process("no-such-command") == 2
    assert run_in_process("--help") == 0


def _raising(error: BaseException):
    def command_main(args):
        raise error
    return command_main


@pytest.mark.parametrize("error,message", [
    (ValueError("data.backend = 'dali' needs nvidia.dali"), "export: data.backend = 'dali' needs nvidia.dali"),
    (FileNotFoundError("checkpoint some-run does not exist"), "export: checkpoint some-run does not exist"),
    (FileExistsError(17, "File exists", "/runs/a"), "export: File exists: /runs/a"),
    (NotADirectoryError(20, "Not a directory", "/runs/a/b"), "export: Not a directory: /runs/a/b"),
    (IsADirectoryError(21, "Is a directory", "/runs/a"), "export: Is a directory: /runs/a"),
    (PermissionError(13, "Permission denied", "/runs/locked"), "export: Permission denied: /runs/locked"),
])
def test_bad_input_escaping_a_command_returns_2(monkeypatch, capsys, error, message):
    monkeypatch.setattr(train.export, "main", _raising(error))
    assert cli.main(EXPORT_ARGS) == 2
    assert capsys.readouterr().err == message + "\n"  # one line, no traceback


def test_a_failing_environment_returns_4_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    monkeypatch.setattr(train.export, "main", _raising(OSError(28, "No space left on device", "/some/path")))
    assert cli.main(EXPORT_ARGS) == 4
    assert capsys.readouterr().err == "export: No space left on device: /some/path\n"

    # an OSError without a path still gets one line
    monkeypatch.setattr(train.export, "main", _raising(OSError(5, "Input/output error")))
    assert cli.main(EXPORT_ARGS) == 4
    assert capsys.readouterr().err == "export: [Errno 5] Input/output error\n"

    # anything unclassified is a bug to see, not an exit code to hide it behind
    monkeypatch.setattr(train.export, "main", _raising(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(EXPORT_ARGS)


def test_a_corrupt_cache_is_bad_input(monkeypatch, capsys):
    from engine.data.cache import CacheCorruptError

    monkeypatch.setattr(train.export, "main", _raising(CacheCorruptError("shard s000001: text.npy sha256 mismatch")))
    assert cli.main(EXPORT_ARGS) == 2
    assert capsys.readouterr().err == "export: shard s000001: text.npy sha256 mismatch\n"


def test_interrupt_returns_130_and_commands_keep_their_own_codes(monkeypatch, capsys):
    monkeypatch.setattr(train.export, "main", _raising(KeyboardInterrupt()))
    assert cli.main(EXPORT_ARGS) == 130
    assert capsys.readouterr().err == "export: interrupted\n"
    # what a command returns itself passes through: 1 (the demo's missed bar), 3 (run's non-finite stop)
    for code in (0, 1, 3):
        monkeypatch.setattr(train.export, "main", lambda args, code=code: code)
        assert cli.main(EXPORT_ARGS) == code


# ------------------------------------------------------------------------------ engine-train

def test_console_script_is_the_cli(monkeypatch, capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module_name, _, attribute = scripts["engine-train"].partition(":")
    entry = getattr(__import__(module_name, fromlist=[attribute]), attribute)
    assert callable(entry)
    monkeypatch.setattr(sys, "argv", ["engine-train", "--help"])
    with pytest.raises(SystemExit) as stop:  # the script's exit status is main()'s return value
        entry()
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: engine-train") and "model families and their presets" in out


def _installed_script() -> Path:
    script = Path(sysconfig.get_path("scripts")) / "engine-train"
    if not script.is_file():
        pytest.fail(f"{script} is missing: the package was installed before it had the console script; "
                    f'reinstall it (pip install -e ".[test]")')
    return script


@pytest.mark.parametrize("make_args,named", [
    (lambda tmp: ["run", "--preset", "tiny", "--stage", "2", "--data", tmp / "no-cache", "--out", tmp / "out",
                  *CAPTIONED], "no-cache"),
    (lambda tmp: ["export", "--ckpt", tmp / "no-run", "--to", "diffusers", tmp / "exported"], "no-run"),
])
def test_bad_input_exits_2_from_the_installed_script(tmp_path, make_args, named):
    """A train.py in the working directory takes over `python -m train` (Python puts the working
    directory first on sys.path for -m); `engine-train` still runs the installed CLI."""
    (tmp_path / "train.py").write_text("import sys\nprint('the local train.py')\nsys.exit(99)\n")
    shadowed = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=120)
    assert shadowed.returncode == 99 and "the local train.py" in shadowed.stdout

    args = [str(a) for a in make_args(tmp_path)]
    result = subprocess.run([str(_installed_script()), *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert str(tmp_path / named) in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{args[0]}: ")


# ------------------------------------------------------------------------------ training output

class _Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


RECORD = {"step": 20, "loss": 0.1234, "grad_norm": 0.0561, "lr": 1e-4, "img_per_s": 310.0, "data_wait": 0.03,
          "skipped": 0, "skipped_total": 0}


def _log_one_interval(monkeypatch, folder: Path, terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of a MetricsLog that logs 20 steps, both streams terminals or not."""
    folder.mkdir()
    stdout, stderr = _Stream(terminal), _Stream(terminal)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    log = MetricsLog(folder, rank=0, total_steps=100, start_step=0, tensorboard=False)
    for _ in range(20):
        log.step(0.1234)
    log.write(RECORD)
    log.close()
    monkeypatch.undo()
    return stdout.getvalue(), stderr.getvalue()


def test_plain_lines_off_a_terminal_and_the_bar_on_one(monkeypatch, tmp_path):
    out, _ = _log_one_interval(monkeypatch, tmp_path / "redirected", terminal=False)
    lines = [line for line in out.splitlines() if re.match(r"step \d+/\d+ ", line)]
    assert len(lines) == 1
    for part in ("step 20/100", "loss 0.1234", "grad norm 0.0561", "lr 0.0001", "310 img/s", "data wait 3%", "eta "):
        assert part in lines[0]

    out, err = _log_one_interval(monkeypatch, tmp_path / "terminal", terminal=True)
    assert out == "" and "20/100" in err  # the progress bar (on stderr) says it; stdout stays clean


def test_training_output_is_plain_lines_when_redirected(capsys, captioned_cache, tmp_path):
    # capsys: stdout and stderr are not terminals, as under nohup or CI
    assert run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out",
                          tmp_path / "out", *CAPTIONED, "--max-steps", 10, "--ckpt-every", 0) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step \d+/\d+ ", line)]
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]  # log.every = 5 in the tiny preset
    assert all("loss " in line and "img/s" in line and "eta " in line for line in lines)


def test_missing_tensorboard_is_one_line_of_notice(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: as if not installed
    log = MetricsLog(tmp_path, rank=0, total_steps=10, start_step=0, tensorboard=True)
    log.write(dict(RECORD, step=5))
    log.close()
    notices = [line for line in capsys.readouterr().out.splitlines() if "tensorboard" in line.lower()]
    assert len(notices) == 1
    assert "not installed" in notices[0] and 'pip install "engine[tensorboard]"' in notices[0]
    assert log.board is None and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1

    # the other ranks of a torchrun job keep no log: no notice, no lines
    other = MetricsLog(tmp_path / "rank1", rank=1, total_steps=10, start_step=0, tensorboard=True)
    other.step(0.1)
    other.write(dict(RECORD, step=5))
    other.message("checkpoint")
    other.close()
    assert capsys.readouterr().out == ""
