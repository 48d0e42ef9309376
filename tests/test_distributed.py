"""Data-parallel calibration (grape.calibration.distributed): a 2-process gloo job gives the single-process
scores, in whole-model and layer-sequential mode, also when a rank has no batch, and through
`grape calibrate` started as torchrun starts it; the batch split and the planned subsample are
the single-process ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from grape.calibration.calibrate import CalibrationConfig, calibrate
from grape.calibration.distributed import World, share
from grape.models.loading import load_model
from grape.calibration.observer import ExpertObserver, per_call_quota, sample_plan
from grape.calibration.sequential import calibrate_sequential
from solvers.scores import Scores
from tests.test_sequential import same_scores
from tests.tiny_models import make_tiny, tiny_input_ids

CONFIG = CalibrationConfig(batch_size=2, subsample=24, progress=False)


def test_share_splits_batches_into_contiguous_blocks():
    for count in range(0, 12):
        for size in range(1, 5):
            blocks = [share(count, World(rank, size)) for rank in range(size)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_planned_subsample_is_the_unplanned_one():
    """sample_plan + plan_call (what any rank can compute) take the rows the default observer
    takes when it runs every call in order."""
    model = make_tiny("mixtral")
    ids = tiny_input_ids(7, 12)
    batches = list(ids.split(2))
    quota, per_call = 30, per_call_quota(30, len(batches))
    rows = sample_plan(quota, per_call, [b.numel() for b in batches])
    with torch.no_grad(), ExpertObserver(model, sample_tokens=quota,
                                         sample_per_call=per_call) as default:
        for batch in batches:
            model(batch)
    with torch.no_grad(), ExpertObserver(model, sample_tokens=quota) as planned:
        for b in reversed(range(len(batches))):  # any order: the call number decides
            planned.plan_call(b + 1, rows[b])
            model(batches[b])
    for layer, obs in default.results().items():
        state = planned.layer_state(layer)
        order = sorted(range(len(state.sample_calls)), key=state.sample_calls.__getitem__)
        assert torch.equal(torch.cat([state.samples[i] for i in order]), obs.samples)
    assert sum(rows) == quota


def _rank(rank: int, size: int, port: int, model_dir: str, out: str, argv: list[str]) -> None:
    """One rank, started as torchrun starts it (the environment), joined by the function the
    command uses; the library in both modes, then the command itself."""
    from grape.cli.main import main
    from grape.calibration.distributed import current_world, init_from_env, shutdown

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert init_from_env(use_cuda=False) == World(rank, size, rank, "gloo")
    try:
        ids = tiny_input_ids(7, 16)
        runs = {
            "whole": lambda: calibrate(load_model(model_dir, "cpu"), ids, CONFIG),
            "sequential": lambda: calibrate_sequential(model_dir, ids, CONFIG),
            # one batch for two ranks: rank 1 has nothing to run but takes part
            "one_batch": lambda: calibrate(load_model(model_dir, "cpu"), ids[:2], CONFIG),
        }
        for name, run in runs.items():
            scores = run()
            assert (scores is None) == (rank != 0)
            if scores is not None:
                scores.save(Path(out) / f"{name}.npz")
        assert main(argv) == 0  # grape calibrate under "torchrun": joins the same group
        assert not current_world().distributed  # and leaves it
    finally:
        shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, capfd):
    """Two ranks (as torchrun starts them) give the single-process scores: the library in
    whole-model and sequential mode, a rank without a batch, and `grape calibrate
    --sequential`, where rank 0 alone prints and writes."""
    from grape.cli.main import main
    from tests.test_sequential import _cli

    argv = _cli(tmp_path, "--sequential")
    assert main(argv) == 0
    command_reference = Scores.load(tmp_path / "scores.npz")
    argv[argv.index("--out") + 1] = str(tmp_path / "ranks.npz")
    model_dir = tmp_path / "deepseek"
    make_tiny("deepseek_v3").save_pretrained(model_dir)
    capfd.readouterr()
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(model_dir), str(tmp_path), argv),
                                nprocs=2, join=True)
    out = capfd.readouterr().out
    assert out.count("wrote ") == 1 and "on 2 ranks" in out
    scores = Scores.load(tmp_path / "ranks.npz")
    assert scores.calibration["run"]["world_size"] == 2
    same_scores(scores, command_reference)
    ids = tiny_input_ids(7, 16)
    model = load_model(model_dir, "cpu")
    reference = calibrate(model, ids, CONFIG)
    for name in ("whole", "sequential"):
        scores = Scores.load(tmp_path / f"{name}.npz")
        assert scores.calibration["run"]["world_size"] == 2
        same_scores(scores, reference)
    same_scores(Scores.load(tmp_path / "one_batch.npz"), calibrate(model, ids[:2], CONFIG))
