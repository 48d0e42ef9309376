"""No verb runs a model folder's code unless asked, and none ever prompts (issue 25, item 5).

A config.json whose model_type transformers does not have, with an auto_map naming Python files
of the folder, loads only by running them; with trust_remote_code unset transformers asks on
stdin ("run the custom code? [y/N]"). Every verb that reads a model refuses such a folder in one
line (exit 2) naming the files; only `grape eval --trust-remote-code` loads it, after saying which
files may run. A tokenizer class of the folder's own code (tokenizer_config.json) is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_workspace import make_workspace

from grape.cli.main import main

TIMEOUT = 180
MODEL_TYPE = "grape_unknown_xyz"
AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
PROMPTS = ("[y/N]", "Do you wish to run the custom code")


def grape(argv: list, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    """`python -m grape` with stdin closed: a prompt would fail (or hang until the timeout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_MODULES_CACHE": str(tmp / "hf_modules")}  # where trusted code is copied to
    return subprocess.run([sys.executable, "-m", "grape", *map(str, argv)], cwd=cwd, env=env,
                          text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)


def marker_code(markers: Path, name: str) -> str:
    return f"open({str(markers / name)!r}, 'w').close()\n"


def remote_model(source: Path, target: Path, markers: Path) -> Path:
    """A copy of the tiny qwen3_moe model that loads only through its own code: a config and a
    model class of an unknown type (thin subclasses of the qwen3_moe ones), each file leaving a
    marker when it runs."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type=MODEL_TYPE, auto_map=AUTO_MAP, architectures=["EvilForCausalLM"])
    (target / "config.json").write_text(json.dumps(config))
    (target / "configuration_evil.py").write_text(
        marker_code(markers, "configuration_evil") +
        "from transformers import Qwen3MoeConfig\n\n\n"
        "class EvilConfig(Qwen3MoeConfig):\n"
        f"    model_type = {MODEL_TYPE!r}\n")
    (target / "modeling_evil.py").write_text(
        marker_code(markers, "modeling_evil") +
        "from transformers import Qwen3MoeForCausalLM\n\n"
        "from .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(Qwen3MoeForCausalLM):\n"
        "    config_class = EvilConfig\n")
    return target


def remote_tokenizer(source: Path, target: Path, markers: Path) -> Path:
    """The tokenizer files of `source` alone, with a tokenizer class of the folder's own code."""
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "tokenization_evil.py").write_text(marker_code(markers, "tokenization_evil"))
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    workspace = make_workspace(tmp_path_factory.mktemp("remote_ws"))
    plan = workspace.root / "plan.json"
    scores = workspace.root / "s.npz"
    for argv in (["calibrate", "--model", workspace.model, "--data", workspace.calibration, "--out",
                  scores, "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress"],
                 ["solve", "--scores", scores, "--budget", "9", "--out", plan]):
        assert main([str(a) for a in argv]) == 0
    return workspace


@pytest.fixture()
def evil(ws, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    return {"model": remote_model(ws.model, tmp_path / "evil", markers),
            "tokenizer": remote_tokenizer(ws.model, tmp_path / "evil_tok", markers),
            "markers": markers, "tmp": tmp_path}


def _ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


def _refused(proc, *named: str) -> str:
    """Exit 2, one line on stderr naming `named`, no prompt anywhere."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p in proc.stdout + proc.stderr for p in PROMPTS)
    assert all(n in lines[0] for n in named), lines[0]
    return lines[0]


def verb_argv(verb: str, ws, model: Path, out: Path, tokenizer: Path | None = None) -> list:
    tok = ["--tokenizer", tokenizer] if tokenizer else []
    heldout = [str(p) for p in ws.heldout]
    return {
        "calibrate": ["calibrate", "--model", model, *tok, "--data", ws.calibration, "--out",
                      out / "s.npz", "--samples", "4", "--seq-len", "32", "--subsample", "32",
                      "--no-progress"],
        "eval": ["eval", "--model", model, *tok, "--data", *heldout, "--out", out / "ev",
                 "--seq-len", "32", "--no-progress"],
        "apply": ["apply", "--model", model, "--plan", ws.root / "plan.json", "--out", out / "ck"],
        "run": ["run", "--model", model, *tok, "--data", ws.calibration, "--eval-data", *heldout,
                "--out", out / "run", "--device", "cpu", "--no-progress"],
    }[verb]


@pytest.mark.parametrize("verb", ["calibrate", *(pytest.param(v, marks=pytest.mark.slow)
                                                for v in ("eval", "apply", "run"))])
def test_a_remote_code_model_is_refused_in_one_line(verb, ws, evil):
    proc = grape(verb_argv(verb, ws, evil["model"], evil["tmp"] / "out"), evil["tmp"], evil["tmp"])
    line = _refused(proc, "modeling_evil.py", "configuration_evil.py", MODEL_TYPE,
                    "--trust-remote-code", str(evil["model"]))
    assert line.startswith(f"grape {verb}: error:")
    assert _ran(evil["markers"]) == []


def test_inspect_describes_a_remote_code_model_without_running_it(evil):
    proc = grape(["inspect", evil["model"]], evil["tmp"], evil["tmp"])
    assert proc.returncode == 0, proc.stderr
    assert "modeling_evil.py" in proc.stdout and "not in transformers" in proc.stdout
    assert _ran(evil["markers"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["calibrate", "eval"])
def test_a_remote_code_tokenizer_is_refused_in_one_line(verb, ws, evil):
    argv = verb_argv(verb, ws, ws.model, evil["tmp"] / "out", tokenizer=evil["tokenizer"])
    proc = grape(argv, evil["tmp"], evil["tmp"])
    _refused(proc, "tokenization_evil.py", "--trust-remote-code", "--tokenizer")
    assert _ran(evil["markers"]) == []


@pytest.mark.slow
def test_eval_runs_remote_code_only_when_trusted_and_says_which(ws, evil):
    argv = verb_argv("eval", ws, evil["model"], evil["tmp"] / "out") + ["--trust-remote-code"]
    proc = grape(argv, evil["tmp"], evil["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = [line for line in proc.stdout.splitlines() if "--trust-remote-code" in line]
    assert len(notice) == 1 and "modeling_evil.py" in notice[0] and "configuration_evil.py" in notice[0]
    assert not any(p in proc.stdout + proc.stderr for p in PROMPTS)
    assert _ran(evil["markers"]) == ["configuration_evil", "modeling_evil"]
    recorded = json.loads((evil["tmp"] / "out" / "ev" / "eval_config.json").read_text())
    assert recorded["trust_remote_code"] is True


def test_the_python_loader_refuses_remote_code_too(evil):
    from grape.models.loading import load_model, load_tokenizer
    from grape.models.files import RemoteCodeError

    with pytest.raises(RemoteCodeError, match="modeling_evil.py"):
        load_model(evil["model"], device="cpu")
    with pytest.raises(RemoteCodeError, match="tokenization_evil.py"):
        load_tokenizer(evil["tokenizer"])
    assert _ran(evil["markers"]) == []


def test_a_grape_checkpoint_with_an_auto_map_is_not_remote_code(ws, tmp_path):
    """GRAPE's own non-uniform checkpoints name modeling_grape_pruned.py in their auto_map, but
    their model type is built in: they load with transformers' classes, no flag needed."""
    from grape.models.files import check_model_dir, model_code_files

    config = json.loads((ws.model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_grape_pruned.GrapePrunedForCausalLM"}
    assert model_code_files(config) == []
    target = tmp_path / "m"
    shutil.copytree(ws.model, target)
    (target / "config.json").write_text(json.dumps(config))
    assert check_model_dir(target)["model_type"] == config["model_type"]
