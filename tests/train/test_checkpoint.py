"""The checkpoint writer: background files equal foreground ones, snapshots are consistent, errors
surface in the training thread, and a writer killed mid-write leaves the previous checkpoint."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from xmlsparse.atomic import remove_partial_writes
from xmlsparse.train import checkpoint
from xmlsparse.train.checkpoint import CheckpointWriteError, CheckpointWriter, load_checkpoint, rng_state

REPO = Path(__file__).resolve().parents[2]


def training_state(device: str = "cpu") -> dict:
    """A small model's full state after one Adam step: what last.pt holds, with a view and an empty
    tensor besides (they must keep their storage layout through the host copy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6, device=device)).sum().backward()
    optimizer.step()
    weight = model[0].weight.detach()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "rows": weight[1:3],
        "empty": torch.zeros(0, device=device),
        "epoch": 3,
        "history": [0.5, (0.25, "x")],
    }


def test_background_files_are_byte_identical_to_foreground_ones(tmp_path):
    state = training_state()
    foreground = CheckpointWriter(background=False)
    foreground.save({tmp_path / "f-last.pt": state, tmp_path / "f-best.pt": {"model": state["model"]}})
    background = CheckpointWriter(background=True)
    background.save({tmp_path / "b-last.pt": state, tmp_path / "b-best.pt": {"model": state["model"]}})
    background.wait()
    assert (tmp_path / "b-last.pt").read_bytes() == (tmp_path / "f-last.pt").read_bytes()
    assert (tmp_path / "b-best.pt").read_bytes() == (tmp_path / "f-best.pt").read_bytes()
    loaded = load_checkpoint(tmp_path / "b-last.pt")
    # The view still shares its storage with the weight it was taken from, as torch.save keeps it.
    assert loaded["rows"].untyped_storage().data_ptr() == loaded["model"]["0.weight"].untyped_storage().data_ptr()


def test_background_write_holds_the_state_of_the_save_call(tmp_path, monkeypatch):
    """The live tensors change (the next optimizer step) while the write is still in flight."""
    release = threading.Event()
    save = checkpoint.save_checkpoint

    def held_save(state, path):
        release.wait(timeout=30)
        save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", held_save)
    state = training_state()
    expected = {name: tensor.clone() for name, tensor in state["model"].items()}
    writer = CheckpointWriter(background=True)
    writer.save({tmp_path / "last.pt": state})
    for tensor in state["model"].values():
        tensor.add_(1.0)
    state["history"].append(1.0)
    release.set()
    writer.wait()
    written = load_checkpoint(tmp_path / "last.pt")
    for name, tensor in expected.items():
        assert torch.equal(written["model"][name], tensor)
    assert written["history"] == [0.5, (0.25, "x")]


def test_an_error_in_the_writer_thread_is_raised_at_the_next_wait_or_save(tmp_path, monkeypatch):
    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    writer = CheckpointWriter(background=True)
    writer.save({tmp_path / "last.pt": {"step": 1}})
    with pytest.raises(CheckpointWriteError, match="No space left on device") as raised:
        writer.wait()
    assert isinstance(raised.value.__cause__, OSError)
    writer.wait()  # raised once

    writer.save({tmp_path / "last.pt": {"step": 2}})
    with pytest.raises(CheckpointWriteError):
        writer.save({tmp_path / "last.pt": {"step": 3}})
    monkeypatch.undo()
    writer.save({tmp_path / "last.pt": {"step": 4}})  # the writer stays usable
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt") == {"step": 4}


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from xmlsparse.train import checkpoint

    path = Path(sys.argv[1])
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save({path: {"version": 1, "weight": torch.ones(1000)}})
    writer.wait()

    def slow_save(state, handle):
        handle.write(b"half a checkpoint")
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)

    checkpoint.torch.save = slow_save
    writer.save({path: {"version": 2, "weight": torch.zeros(1000)}})
    time.sleep(60)
""")


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last)], env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "writing\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    state = load_checkpoint(last)
    assert state["version"] == 1 and torch.equal(state["weight"], torch.ones(1000))
    partial = list(last.parent.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].read_bytes() == b"half a checkpoint"
    (last.parent / "best.pt").write_bytes(b"kept")
    assert remove_partial_writes(last) == partial
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_is_copied_to_pinned_host_memory(tmp_path):
    state = training_state("cuda")
    writer = CheckpointWriter(background=True)
    snapshot = writer._host_copy({tmp_path / "last.pt": state})[tmp_path / "last.pt"]
    for name, tensor in state["model"].items():
        assert snapshot["model"][name].is_pinned() and torch.equal(snapshot["model"][name], tensor.cpu())
    writer.save({tmp_path / "last.pt": state})
    writer.wait()
    CheckpointWriter(background=False).save({tmp_path / "foreground.pt": state})
    # The background file records host tensors, the foreground one CUDA tensors: both load to the host.
    background, foreground = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "foreground.pt")
    for name, tensor in foreground["model"].items():
        assert torch.equal(background["model"][name], tensor)
    for moments, expected in zip(background["optimizer"]["state"].values(), foreground["optimizer"]["state"].values()):
        assert all(torch.equal(moments[key].cpu(), expected[key].cpu()) for key in expected)
