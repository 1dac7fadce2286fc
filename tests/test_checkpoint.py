"""pipeline.training.checkpoint: atomic folders, newest-complete lookup, retention, state round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import Checkpoints, load_tensors, save_tensors


def write_marker(folder):
    (folder / "state.txt").write_text(folder.name)


def test_save_publishes_complete_folders_and_keeps_newest(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2)
    for step in (10, 20, 30):
        ckpts.save(step, write_marker)
    assert [s for s, _ in ckpts.complete()] == [20, 30]
    assert ckpts.latest() == tmp_path / "checkpoints/step-000030"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_interrupted_save_is_invisible(tmp_path):
    ckpts = Checkpoints(tmp_path / "c", keep=3)
    ckpts.save(5, write_marker)

    def crash(folder):
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpts.save(6, crash)
    assert ckpts.latest().name == "step-000005"
    ckpts.save(7, write_marker)  # the stale temporary is cleaned by retention
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        Checkpoints(tmp_path, keep=0)


def test_optimizer_state_round_trips_through_weights_only_loading(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_tensors(opt.state_dict(), tmp_path / "opt.pt")
    other_opt = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    other_opt.load_state_dict(load_tensors(tmp_path / "opt.pt"))
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_the_resume_rule(tmp_path):
    ckpts = Checkpoints(tmp_path / "c")
    assert ckpts.resume_folder("auto") is None  # nothing yet
    ckpts.save(3, write_marker)
    assert ckpts.resume_folder("auto") == tmp_path / "c/step-000003"
    assert ckpts.resume_folder("never") is None
    assert ckpts.resume_folder("/some/where") == Path("/some/where")
