"""Crash-clean on real disks (issue 25, item 4), through the real command line.

* A write the disk refuses - here a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so writes
  fail with EFBIG) - ends every verb with exit 2 and one stderr line naming the path: no
  traceback, the previous output unchanged, no staging left.
* SIGTERM is handled like Ctrl-C: exit 143, one line, staging removed. What a SIGKILL leaves
  (GRAPE-named, of a dead process on this machine) the next run on the same --out removes;
  nothing else is touched.
* A --out that is a mount point is written into, never renamed over (mount detection is
  monkeypatched: tests cannot mount).
* auto_map entries naming files outside the model folder are not copied; --overwrite never
  replaces a hand-written recipe beside or inside the output.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_workspace import RUN_FLAGS, make_workspace

from grape.cli.main import main
from grape.cli.commands.apply import OUTPUT as APPLY_OUTPUT
from grape.outputs import clean_leftovers
from solvers import _io
from solvers._io import DiskError, atomic_write_text, remove_stale_staging, staging_prefix

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CAL_FLAGS = ["--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress"]


# -- the workspace: one of each output, written once -----------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_disk")
    w = make_workspace(root)
    paths = {"root": root, "model": w.model, "data": w.calibration, "heldout": w.heldout,
             "scores": root / "scores.npz", "plan": root / "plan.json",
             "pruned": root / "pruned", "run": root / "run"}
    steps = [
        _calibrate_argv(paths),
        ["solve", "--scores", str(paths["scores"]), "--budget", "0.25", "--out", str(paths["plan"]),
         "--quiet"],
        _apply_argv(paths, paths["pruned"]),
        _run_argv(paths),
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return paths


def _run_argv(ws: dict) -> list[str]:
    return ["run", "--model", str(ws["model"]), "--data", str(ws["data"]), "--eval-data",
            *map(str, ws["heldout"]), "--out", str(ws["run"]), *RUN_FLAGS]


def _apply_argv(ws: dict, out: Path) -> list[str]:
    return ["apply", "--model", str(ws["model"]), "--plan", str(ws["plan"]), "--out", str(out)]


def _calibrate_argv(ws: dict) -> list[str]:
    return ["calibrate", "--model", str(ws["model"]), "--data", str(ws["data"]), "--out",
            str(ws["scores"]), *CAL_FLAGS]


def _resumable(file: Path) -> bool:
    """A calibration checkpoint (OUT.partial/): progress a failed run keeps on purpose, so the
    same command resumes once space is freed (grape run calibrates into its folder too)."""
    return any(part.endswith(".partial") for part in file.parts)


def _hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders, hidden entries included), but the
    resumable calibration checkpoints."""
    found = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in (f for f in files if not _resumable(f)):
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def _leftovers(root: Path) -> list[Path]:
    """Staging files or folders anywhere under `root`: GRAPE's names, and any hidden .tmp/.old."""
    return [p for p in root.rglob(".*")
            if _io.is_staging_name(p.name) or p.suffix in (".tmp", ".old")]


def _error_lines(stderr: str) -> list[str]:
    """stderr lines less transformers' progress bars (they redraw on stderr)."""
    return [line for line in stderr.splitlines()
            if line.strip() and "it/s]" not in line and "Loading weights" not in line]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _staging_name(name: str, pid: int, suffix: str = ".tmp") -> str:
    return staging_prefix(name).replace(f"-{os.getpid()}-", f"-{pid}-") + "abcd_123" + suffix


# -- (a) a file-size limit in every writing verb -------------------------------------------
def _limited(limit: int, argv: list[str]) -> subprocess.CompletedProcess:
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "grape", *argv], cwd=REPO, env=ENV,
                          preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)


# (id, argv builder, file-size limit, the outputs that must stay as they were, the path named)
FAULTS = [
    ("apply", lambda w: _apply_argv(w, w["pruned"]), 100_000, ("pruned",), "pruned"),
    # transformers' save_pretrained: safetensors reports "(os error 27)" in a SafetensorError
    ("apply in memory", lambda w: [*_apply_argv(w, w["pruned"]), "--in-memory"], 100_000,
     ("pruned",), "pruned"),
    # fails saving its resumable checkpoint (torch.save: a RuntimeError around the OSError)
    ("calibrate checkpoint", _calibrate_argv, 8_000, ("scores",), "scores"),
    ("calibrate scores", lambda w: [*_calibrate_argv(w), "--checkpoint-every", "0"], 8_000,
     ("scores",), "scores"),
    ("solve", lambda w: ["solve", "--scores", str(w["scores"]), "--budget", "0.25", "--out",
                         str(w["plan"]), "--quiet"], 1_000, ("plan",), "plan"),
    ("run", _run_argv, 4_000, ("run",), "run"),
]


# apply and solve stay in the quick suite; the other writers are the slow set (CI)
SLOW_FAULTS = ("apply in memory", "calibrate checkpoint", "calibrate scores", "run")


@pytest.mark.parametrize("case, argv, limit, kept, named", [
    pytest.param(*f, marks=[pytest.mark.slow] if f[0] in SLOW_FAULTS else [], id=f[0]) for f in FAULTS])
def test_a_refused_write_is_one_line_and_changes_nothing(ws, case, argv, limit, kept, named):
    outputs = [ws[k] for k in kept]
    outputs += [p.with_name(f"{p.stem}.recipe.yaml") for p in outputs if p.is_file()]
    before = _hashes(*outputs)
    proc = _limited(limit, argv(ws))
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # the output, or a file inside it (a run folder's) or beside it (calibrate's checkpoint)
    assert lines[0].startswith(f"grape {argv(ws)[0]}: error: cannot write '{ws[named]}"), lines[0]
    assert "File too large" in lines[0] and "ulimit" in lines[0], lines[0]
    assert _hashes(*outputs) == before, "the previous output changed"
    assert not _leftovers(ws["root"]), _leftovers(ws["root"])
    # calibrate's OUT.partial/ is resumable progress, kept on purpose: not a leftover
    shutil.rmtree(ws["scores"].with_name("scores.npz.partial"), ignore_errors=True)


def test_the_staged_size_is_named_when_space_runs_out(ws, tmp_path, monkeypatch, capsys):
    """ENOSPC while staging a checkpoint: the message gives what it needs and what is free."""
    import grape.pruning.streaming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(grape.pruning.streaming, "_write_weights", full)
    out = tmp_path / "ckpt"
    assert main(_apply_argv(ws, out)) == 2
    line = _error_lines(capsys.readouterr().err)[0]
    assert f"cannot write {str(out)!r}: No space left on device (needs about " in line
    assert "free there" in line and not out.exists() and not _leftovers(tmp_path)


def test_atomic_open_translates_only_its_own_errors(tmp_path):
    target = tmp_path / "f.json"
    with pytest.raises(DiskError, match=r"cannot write .*f\.json.*No space left"):
        with _io.atomic_open(target) as handle:
            handle.write("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(PermissionError):  # another file's error keeps its own text
        with _io.atomic_open(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "other"))
    assert list(tmp_path.iterdir()) == []


def test_the_cli_names_a_disk_error_no_writer_caught(monkeypatch, capsys, tmp_path):
    """Last resort in grape.cli.main: a refused write wrapped by a library (torch's RuntimeError)."""
    import grape.cli.commands.inspect as inspect_verb

    def fails(args):
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")  # noqa: B904 - as torch.save does

    monkeypatch.setattr(inspect_verb, "run", fails)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"grape inspect: error: a write failed: File too large; "
                                 f"{_io._ADVICE[errno.EFBIG]}"], err


# -- (b, c) killed runs --------------------------------------------------------------------
# apply with its weights staged, then waiting to be killed (READY says when)
STALLED_APPLY = """
import os, sys, time
from pathlib import Path
import grape.pruning.streaming as streaming
write = streaming._write_weights
def stalled(tmp, *args, **kwargs):
    write(tmp, *args, **kwargs)
    Path(os.environ["READY"]).write_text(str(tmp))
    time.sleep(120)
streaming._write_weights = stalled
from grape.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_apply(ws: dict, out: Path, ready: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", STALLED_APPLY, *_apply_argv(ws, out)], cwd=REPO,
                            env={**ENV, "READY": str(ready)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.communicate()[1][-3000:]
    assert Path(ready.read_text()).is_dir()  # the staging folder is there when the signal comes
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigterm_exits_143_with_one_line_and_no_leftovers(ws, tmp_path):
    out = shutil.copytree(ws["pruned"], tmp_path / "ckpt")
    before = _hashes(out)
    proc = _killed_apply(ws, out, tmp_path / "ready", signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == ["grape apply: terminated"], proc.stderr[-3000:]
    assert _hashes(out) == before and not _leftovers(tmp_path)


def test_what_sigkill_leaves_the_next_run_removes(ws, tmp_path, capsys):
    out = shutil.copytree(ws["pruned"], tmp_path / "ckpt")
    proc = _killed_apply(ws, out, tmp_path / "ready", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    staged = _leftovers(tmp_path)
    assert [p.parent for p in staged] == [tmp_path] and staged[0].name.startswith(".ckpt.grape-")
    capsys.readouterr()
    assert main(_apply_argv(ws, out)) == 0
    said = capsys.readouterr().out
    assert "removed 1 leftover(s) of killed runs" in said and str(staged[0]) in said, said
    assert not _leftovers(tmp_path) and (out / "grape_provenance.json").is_file()


def test_only_our_dead_staging_is_removed(tmp_path):
    out = tmp_path / "ckpt"
    (out / "plans").mkdir(parents=True)
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / _staging_name("ckpt", dead), tmp_path / _staging_name("ckpt", dead, ".old"),
             out / _staging_name("checkpoint", dead), out / "plans" / _staging_name("x.json", dead)]
    kept = [tmp_path / _staging_name("ckpt", alive),  # a run in progress
            tmp_path / _staging_name("other", dead),  # another output's
            tmp_path / ".ckpt.abcd_123.tmp",  # not a GRAPE name
            tmp_path / _staging_name("ckpt", dead).replace(_io._HOST, "0" * 8)]  # another machine's
    for path in stale[:3] + kept:
        path.mkdir()
        (path / "shard").write_bytes(b"x" * 1000)
    stale[3].write_text("{}")
    removed, restored = remove_stale_staging(out)
    assert sorted(p for p, _ in removed) == sorted(stale) and not restored
    assert sum(size for _, size in removed) == 3002
    assert all(p.exists() for p in kept)


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "ckpt"
    old = tmp_path / _staging_name("ckpt", _dead_pid(), ".old")
    (old / "ckpt").mkdir(parents=True)
    (old / "ckpt" / "grape_provenance.json").write_text("{}")
    said = []
    clean_leftovers(APPLY_OUTPUT, argparse.Namespace(out=str(out), verb="apply"), said.append)
    assert (out / "grape_provenance.json").read_text() == "{}" and not old.exists()
    assert said[0] == f"grape apply: put back {str(out)!r}, which a killed run had moved aside"


def test_sigterm_handler_is_installed_for_the_verb_only(monkeypatch, capsys, tmp_path):
    import grape.cli.commands.inspect as inspect_verb

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(inspect_verb, "run", terminated)
    assert main(["inspect", str(tmp_path)]) == 143
    assert _error_lines(capsys.readouterr().err) == ["grape inspect: terminated"]
    assert signal.getsignal(signal.SIGTERM) == before


# -- (d) a mount point is written into -------------------------------------------------------
def _as_mount_point(monkeypatch, mount: Path) -> None:
    """os.path.ismount says yes for `mount`, and renaming anything onto it fails as it would."""
    real_ismount, real_replace = os.path.ismount, os.replace

    def ismount(path):
        return Path(path).absolute() == mount or real_ismount(path)

    def replace(src, dst, *args, **kwargs):
        if Path(dst).absolute() == mount or Path(src).absolute() == mount:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os.path, "ismount", ismount)
    monkeypatch.setattr(os, "replace", replace)


def test_a_mount_point_is_written_into_not_renamed_over(ws, tmp_path, monkeypatch):
    mount = shutil.copytree(ws["pruned"], tmp_path / "mnt")
    (mount / "stale-shard.safetensors").write_bytes(b"old")  # the previous output's, not the new
    (mount / "grape_plan.json").write_text("{}")
    inode = mount.stat().st_ino
    _as_mount_point(monkeypatch, mount)
    assert main(_apply_argv(ws, mount)) == 0
    assert mount.stat().st_ino == inode  # the same folder: filled, not replaced
    assert sorted(p.name for p in mount.iterdir()) == sorted(p.name for p in ws["pruned"].iterdir())
    plan = "grape_plan.json"
    assert (mount / plan).read_bytes() == (ws["pruned"] / plan).read_bytes()
    assert not _leftovers(tmp_path)


def test_a_busy_rename_is_one_line_and_keeps_the_previous_output(ws, tmp_path, monkeypatch, capsys):
    """An undetected mount point (or a busy folder): the rename fails with EBUSY; the previous
    output is put back, the staging removed."""
    out = shutil.copytree(ws["pruned"], tmp_path / "ckpt")
    before = _hashes(out)
    real_replace = os.replace

    def busy(src, dst, *args, **kwargs):
        if Path(dst).absolute() == out and _io.is_staging_name(Path(src).name):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", busy)
    assert main(_apply_argv(ws, out)) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"grape apply: error: cannot write {str(out)!r}: Device or resource busy; "
                     f"{_io._ADVICE[errno.EBUSY]}"], lines
    assert _hashes(out) == before and not _leftovers(tmp_path)


# -- (e) auto_map code outside the model folder ----------------------------------------------
def test_auto_map_code_outside_the_model_folder_is_not_copied(ws, tmp_path, capsys):
    model = shutil.copytree(ws["model"], tmp_path / "model")
    (tmp_path / "outside.py").write_text("SECRET = 1\n")
    (tmp_path / "abs_secret.py").write_text("SECRET = 2\n")
    (model / "inside.py").write_text("class Model: pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "../outside.Model",
                          "AutoModelForSequenceClassification": f"{tmp_path}/abs_secret.Model",
                          "AutoModelForTokenClassification": "inside.Model"}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "pruned"
    capsys.readouterr()
    assert main(["apply", "--model", str(model), "--plan", str(ws["plan"]), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert (out / "inside.py").is_file()
    assert not (out / "outside.py").exists() and not (out / "abs_secret.py").exists()
    assert "'../outside.Model' names a file outside the model folder; not copied" in said


# -- (f) --overwrite and a hand-written recipe -----------------------------------------------
def test_overwrite_never_replaces_a_hand_written_recipe(ws, tmp_path, capsys):
    mine = "# my recipe\nsolve:\n  budget: 0.5\n"
    recipe = tmp_path / "p.recipe.yaml"
    recipe.write_text(mine)
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "run.recipe.yaml").write_text(mine)
    for argv in (["solve", "--scores", str(ws["scores"]), "--budget", "0.25", "--quiet",
                  "--out", str(tmp_path / "p.json")],
                 [*_run_argv({**ws, "run": folder})]):
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main([*argv, *extra]) == 2, (argv, extra)
            lines = _error_lines(capsys.readouterr().err)
            assert len(lines) == 1 and "which grape did not write" in lines[0], lines
    assert recipe.read_text() == mine and (folder / "run.recipe.yaml").read_text() == mine
    assert not (tmp_path / "p.json").exists() and sorted(os.listdir(folder)) == ["run.recipe.yaml"]


def test_a_resolved_recipe_is_still_replaced(ws, tmp_path):
    argv = ["solve", "--scores", str(ws["scores"]), "--budget", "0.25", "--quiet", "--out",
            str(tmp_path / "p.json")]
    assert main(argv) == 0 and main([*argv, "--overwrite"]) == 0
    atomic_write_text(tmp_path / "q.json", "{}")  # a file of yours: --overwrite replaces it
    assert main([*argv[:-1], str(tmp_path / "q.json"), "--overwrite"]) == 0


def test_a_resumed_calibration_removes_a_killed_runs_temporary_files(tmp_path):
    """A killed calibrate leaves its half-written checkpoint file or hidden-states scratch in
    OUT.partial/; the run that resumes there removes them."""
    from grape.calibration import resume

    folder = tmp_path / "scores.npz.partial"
    folder.mkdir()
    (folder / resume.MANIFEST).write_text(json.dumps({"key": "k"}) + "\n")
    stale = folder / _staging_name("hidden", _dead_pid())
    stale.write_bytes(b"x" * 4096)
    said = []
    resume._prepare(folder, "k", said.append)
    assert not stale.exists() and (folder / resume.MANIFEST).is_file()
    assert said[-1].startswith("grape calibrate: removed 1 temporary file(s) of a killed run "
                               "(4.00 KiB)")
