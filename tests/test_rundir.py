"""Run folders never lose work: one writer per run (an OS lock naming its pid), reserved `.partial` names,
no progress deleted without --force, --force replacing atomically, no temporary file in a finished folder.
Each test reproduces one defect of issue 21 (it failed before the fix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import interrupted_run

from bayescomp import rundir
from bayescomp.cli import main
from bayescomp.pipeline import RunError, RunOptions, run
from bayescomp.rundir import commit, lock_holder, prepare

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _one_line_error(result) -> str:
    """The CLI refused cleanly: exit 1, no traceback, one line of output."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < seconds, "the child never got there"
        time.sleep(0.05)


def _interrupted(tmp_path: Path, monkeypatch, **options) -> tuple[RunOptions, Path]:
    opts = RunOptions(model="lenet300", epochs=1, train_subset=200, data_dir=DATA, **options)
    out = tmp_path / "run"
    interrupted_run(opts, out, monkeypatch)
    return opts, out


# ---------------------------------------------------------------------------------------------------------------
# 1. one writer per run


def test_second_writer_is_refused_with_the_holder_s_pid_and_the_first_run_is_untouched(tmp_path):
    out = tmp_path / "o" / "cs"
    work = Path(str(out) + ".partial")
    first = subprocess.Popen([sys.executable, "-m", "bayescomp", "compress", "--epochs", "200", "--train-subset", "200",
                              "--seed", "1", "--out", str(out), "--data-dir", DATA, "--quiet"],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (work / "checkpoint.pt").is_file(), first)  # training, one epoch done
        assert lock_holder(work) == first.pid
        before = (work / "options.json").read_bytes()
        second = CliRunner().invoke(main, ["compress", "--epochs", "1", "--train-subset", "100", "--seed", "2",
                                           "--out", str(out), "--data-dir", DATA, "--quiet"])
        line = _one_line_error(second)
        assert f"in use by process {first.pid}" in line and str(work) in line
        for args in (["--force"], ["--resume"]):  # neither may take a running run's folder
            again = CliRunner().invoke(main, ["compress", "--epochs", "1", "--train-subset", "100", "--seed", "1",
                                              "--out", str(out), "--data-dir", DATA, "--quiet", *args])
            assert f"in use by process {first.pid}" in _one_line_error(again)
        # `prune` of the running run into the run itself, or into its working folder: refused, nothing touched
        for target in (out, work):
            pruned = CliRunner().invoke(main, ["prune", str(work), "--out", str(target), "--data-dir", DATA])
            _one_line_error(pruned)
        # `prune` of another run into the folder of the running one: refused by the lock, before any work
        other = tmp_path / "other"
        other.mkdir()
        pruned = CliRunner().invoke(main, ["prune", str(other), "--out", str(out), "--data-dir", DATA])
        assert f"in use by process {first.pid}" in _one_line_error(pruned)
        assert first.poll() is None, "the first run must still be training"
        assert (work / "options.json").read_bytes() == before and (work / "checkpoint.pt").is_file()
        assert json.loads(before)["seed"] == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed writer's lock died with it: its pid in the file is no obstacle to the next writer
    assert (work / "lock").read_text().strip() == str(first.pid)
    assert lock_holder(work) is None
    with prepare(out, resume=True, force=False) as folder:
        assert (work / "lock").read_text().strip() == str(os.getpid())
        assert folder.work == work and (work / "checkpoint.pt").is_file()


def test_lock_is_exclusive_within_a_process_and_released_by_a_failing_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with prepare(out, resume=False, force=False):
        with pytest.raises(RunError, match=rf"in use by process {os.getpid()} \(this one\)"):
            prepare(out, resume=False, force=True)
    # released: a run that fails (here: after its training) drops the lock, so the resume can take it
    opts, out = _interrupted(tmp_path / "b", monkeypatch)
    assert lock_holder(Path(str(out) + ".partial")) is None
    report = run(opts, out, resume=True, progress=False)
    assert report["epochs"] == 1 and not (out / "lock").exists()


def test_prune_and_finetune_refuse_to_write_into_the_run_they_read(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch)
    work = Path(str(out) + ".partial")
    before = (work / "checkpoint.pt").read_bytes()
    for command in (["prune", str(work)], ["prune", str(out)], ["finetune", str(out), "--epochs", "1"]):
        for target in (out, tmp_path / "." / "run"):
            result = CliRunner().invoke(main, [*command, "--out", str(target), "--data-dir", DATA, "--force"])
            assert "is the run being read" in _one_line_error(result), command
    assert (work / "checkpoint.pt").read_bytes() == before and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. reserved names


@pytest.mark.parametrize("command", [["compress", "--epochs", "1", "--train-subset", "100"], ["prune", "RUN"],
                                     ["finetune", "RUN", "--epochs", "1"]])
@pytest.mark.parametrize("name, message", [("x.partial", "reserved for the working folders"),
                                           ("", "--out is empty"), (".", "names no folder of its own"),
                                           ("sub/..", "names no folder of its own")])
def test_out_names_that_collide_or_name_no_folder_are_refused_before_any_work(tmp_path, monkeypatch, command, name,
                                                                              message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "RUN").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [*command, "--out", name, "--data-dir", DATA])
    assert message in _one_line_error(result)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# 3. no progress lost without --force


def test_rerun_without_resume_keeps_the_interrupted_run_and_force_starts_afresh(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch)
    work = Path(str(out) + ".partial")
    before = (work / "checkpoint.pt").read_bytes()
    args = ["compress", "--epochs", "1", "--train-subset", "100", "--seed", "3", "--out", str(out), "--data-dir", DATA,
            "--quiet"]
    line = _one_line_error(CliRunner().invoke(main, args))
    assert "holds an interrupted run (checkpoint.pt" in line and "--resume" in line and "--force" in line
    assert (work / "checkpoint.pt").read_bytes() == before
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["seed"] == 3 and not work.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. a kill while the result is written, then --resume: no temporary file reaches the finished folder

_KILLED_WRITING = textwrap.dedent(r"""
    import os
    import sys

    from bayescomp import pipeline
    from bayescomp.train import checkpoint

    real_fsync = os.fsync

    def fsync(fd):  # the kill: half way through writing report.json, its temp file on disk
        if ".report.json." in os.readlink(f"/proc/self/fd/{fd}"):
            os._exit(9)
        real_fsync(fd)

    checkpoint.os.fsync = fsync
    opts = pipeline.RunOptions(model="lenet300", epochs=1, train_subset=200, data_dir=sys.argv[2])
    pipeline.run(opts, sys.argv[1], progress=False)
""")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find the file being written")
def test_kill_while_writing_the_result_then_resume_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "run"
    work = Path(str(out) + ".partial")
    script = tmp_path / "child.py"
    script.write_text(_KILLED_WRITING)
    proc = subprocess.run([sys.executable, str(script), str(out), DATA], env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr.decode()
    left = {p.name for p in work.iterdir()}
    assert any(n.startswith(".report.json.") and n.endswith(".tmp") for n in left), left
    (work / ".checkpoint.pt.link.tmp").write_bytes((work / "checkpoint.pt").read_bytes())  # a killed rotation's
    opts = RunOptions(model="lenet300", epochs=1, train_subset=200, data_dir=DATA)
    report = run(opts, out, resume=True, progress=False)
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.endswith(".tmp")], names
    assert "lock" not in names and "checkpoint.pt" not in names and "options.json" not in names
    assert json.loads((out / "report.json").read_text())["test_error"] == report["test_error"]


def test_temporary_files_are_never_renamed_into_a_finished_folder(tmp_path):
    with prepare(tmp_path / "run", resume=False, force=False) as folder:
        (folder.work / "report.json").write_text("{}")
        (folder.work / ".model.pt.x1y2.tmp").write_bytes(b"half")
        commit(folder)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.json"]


def test_resume_completes_a_move_that_a_kill_interrupted(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "report.json").write_text(json.dumps({"model": "lenet300"}))  # complete result, checkpoints discarded
    with prepare(tmp_path / "run", resume=True, force=False) as folder:
        assert folder.interrupted_move
        commit(folder)
    assert (tmp_path / "run" / "report.json").is_file() and not work.exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. --force replaces atomically

_KILLED_BETWEEN_RENAMES = textwrap.dedent(r"""
    import os
    import sys
    from pathlib import Path

    from bayescomp import rundir

    folder = rundir.prepare(sys.argv[1], resume=False, force=True)
    (folder.work / "report.json").write_text("new")
    real_replace = os.replace

    def replace(src, dst):  # the kill: the old folder is aside, the new one not yet in
        if Path(src) == folder.work:
            os._exit(9)
        real_replace(src, dst)

    rundir.os.replace = replace
    rundir.commit(folder)
""")


def test_kill_between_the_renames_of_force_loses_neither_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("old")
    script = tmp_path / "child.py"
    script.write_text(_KILLED_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    asides = list(tmp_path.glob(".run.replaced.*"))
    assert len(asides) == 1 and (asides[0] / "report.json").read_text() == "old"
    assert (tmp_path / "run.partial" / "report.json").read_text() == "new"


def test_force_puts_the_old_folder_back_when_the_new_one_cannot_be_moved_in(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("old")
    folder = prepare(out, resume=False, force=True)
    (folder.work / "report.json").write_text("new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == folder.work:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", failing)
    with pytest.raises(OSError):
        commit(folder)
    folder.release()
    assert (out / "report.json").read_text() == "old" and (folder.work / "report.json").read_text() == "new"
    monkeypatch.setattr(rundir.os, "replace", real)
    commit(prepare(out, resume=True, force=True))  # the complete result is moved in on resume
    assert (out / "report.json").read_text() == "new" and not list(tmp_path.glob(".run.replaced.*"))



def test_without_flock_a_lock_file_of_a_dead_process_is_stale_and_a_live_one_holds(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # a file system without flock: the pid in the file decides
    work = tmp_path / "run.partial"
    work.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / "lock").write_text(f"{dead.pid}\n")
    with prepare(tmp_path / "run", resume=False, force=False):
        assert (work / "lock").read_text().strip() == str(os.getpid())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "lock").write_text(f"{alive.pid}\n")
        with pytest.raises(RunError, match=f"in use by process {alive.pid}"):
            prepare(tmp_path / "run", resume=False, force=False)
        assert lock_holder(work) == alive.pid
    finally:
        alive.kill()
        alive.wait()


def test_a_complete_result_left_by_an_interrupted_move_is_kept_without_force(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "report.json").write_text("{}")
    with pytest.raises(RunError, match="complete result of a run whose final move was interrupted"):
        prepare(tmp_path / "run", resume=False, force=False)
    assert (work / "report.json").read_text() == "{}"
    with prepare(tmp_path / "run", resume=False, force=True):
        assert [p.name for p in work.iterdir()] == ["lock"]
