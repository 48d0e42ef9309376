"""Outputs are checked against the files the inputs really read, not only their paths (issue 25,
item 2): a model folder laid out like the Hugging Face cache (snapshots/REV/* are symlinks into
blobs/) keeps its blobs whatever --out names, and a hard link of an input is found by inode.

Each refusal goes through the real command line: exit 2, one line naming the input, and every
file of the workspace (the link targets included) unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from cli_workspace import make_workspace

from grape.cli.main import main
from grape.outputs import OutputError, check_not_input


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny model stored as the Hub cache stores it, its scores and plan."""
    root = tmp_path_factory.mktemp("links")
    ws = make_workspace(root / "ws")
    repo = root / "models--tiny--moe"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(ws.model.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    scores, plan = root / "scores.npz", root / "plan.json"
    assert main(["calibrate", "--model", str(snapshot), "--data", str(ws.calibration), "--out",
                 str(scores), "--samples", "4", "--seq-len", "32", "--subsample", "32",
                 "--no-progress", "--no-reconstruction"]) == 0
    assert main(["solve", "--scores", str(scores), "--budget", "0.25", "--out", str(plan),
                 "--quiet"]) == 0
    return {"root": root, "snapshot": snapshot, "blobs": blobs, "data": ws.calibration,
            "scores": scores, "plan": plan}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _refused(cache: dict, capsys, argv: list[str], phrase: str) -> None:
    before = _digests(cache["root"])
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[0], lines[0]
    assert _digests(cache["root"]) == before, "a refused command changed an input"


def test_apply_over_the_blobs_of_a_linked_model_is_refused(cache, capsys):
    """The reproduction: --out on the link targets with --overwrite replaced the real files."""
    argv = ["apply", "--model", str(cache["snapshot"]), "--plan", str(cache["plan"]),
            "--out", str(cache["blobs"]), "--overwrite"]
    _refused(cache, capsys, argv, "reads through a link")


def test_a_folder_around_the_blobs_is_refused_too(cache, capsys):
    argv = ["apply", "--model", str(cache["snapshot"]), "--plan", str(cache["plan"]),
            "--out", str(cache["blobs"].parent / "blobs"), "--overwrite"]
    _refused(cache, capsys, argv, "--model")
    argv[-2] = str(cache["root"] / "models--tiny--moe")  # contains blobs/ and snapshots/
    _refused(cache, capsys, argv, "--model")


def test_eval_into_the_blobs_is_refused(cache, capsys):
    argv = ["eval", "--model", str(cache["snapshot"]), "--data", str(cache["data"]),
            "--out", str(cache["blobs"]), "--overwrite"]
    _refused(cache, capsys, argv, "reads through a link")


def test_a_hard_link_of_the_data_is_found_by_inode(cache, tmp_path, capsys):
    out = tmp_path / "evalout"
    out.mkdir()
    os.link(cache["data"], out / "calibration.jsonl")
    with pytest.raises(OutputError, match="hard link"):
        check_not_input(out, {"--data": cache["data"]})
    scores_link = tmp_path / "scores-link.npz"
    os.link(cache["scores"], scores_link)
    with pytest.raises(OutputError, match="hard link"):
        check_not_input(scores_link, {"--scores": cache["scores"]})


def test_a_symlinked_data_file_protects_its_target(cache, tmp_path):
    target_dir = tmp_path / "real"
    target_dir.mkdir()
    real = target_dir / "text.jsonl"
    shutil.copyfile(cache["data"], real)
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    for out in (target_dir, real):
        with pytest.raises(OutputError, match="destroy"):
            check_not_input(out, {"--data": link})


def test_unrelated_outputs_still_pass(cache, tmp_path):
    check_not_input(tmp_path / "new", {"--model": cache["snapshot"], "--data": cache["data"]})
    out = tmp_path / "ckpt"
    assert main(["apply", "--model", str(cache["snapshot"]), "--plan", str(cache["plan"]),
                 "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
