"""training.py: the stop on SIGTERM and Ctrl-C (a second Ctrl-C at once), the log's numbers and loss curve, the
EMA, loader workers started by fork whatever the platform's default."""
import json
import os
import signal
import sys

import pytest
import torch
from conftest import ADAPT, TINY, run, script_args

import training

# a script run under a start method of multiprocessing as the default one (Linux's from Python 3.14: forkserver)
UNDER_START_METHOD = ("import multiprocessing, os, runpy, sys\nmultiprocessing.set_start_method(sys.argv[1])\n"
                      "sys.argv = sys.argv[2:]\nsys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture
def stop():
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield training.Stop()
    signal.signal(signal.SIGTERM, handlers[0])
    signal.signal(signal.SIGINT, handlers[1])


def test_ctrl_c_asks_to_stop_and_a_second_one_later_stops_at_once(stop, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested.is_set() and stop.signal_name == "Ctrl-C"
    now[0] += 0.5  # the same Ctrl-C again, as torchrun passes it on: not a second one
    os.kill(os.getpid(), signal.SIGINT)
    now[0] += 1.0
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_asks_to_stop_and_is_named(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested.is_set() and stop.signal_name == "SIGTERM"


def test_the_log_writes_its_lines_its_numbers_and_a_loss_curve_keeping_the_last_record_of_a_step(tmp_path):
    log = training.Log(str(tmp_path), master=True)
    log("hello")
    for step, loss in [(1, 0.5), (2, 0.4), (2, 0.3), (3, 0.2)]:  # step 2 again: a resumed run
        log.numbers(step=step, loss=loss)
    log.plot()
    assert (tmp_path / "log.txt").read_text() == "hello\n"
    assert [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0.5, 0.4,
                                                                                                        0.3, 0.2]
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    quiet = training.Log(str(tmp_path / "other"), master=False)
    quiet("not written")
    quiet.numbers(step=1, loss=1.0)
    assert not (tmp_path / "other").exists()


def test_ema_moves_trained_parameters_only():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    bias, weight = ema.bias.detach().clone(), ema.weight.detach().clone()
    training.update_ema(ema, model, 0.75)
    assert torch.equal(ema.bias, bias)  # frozen: as it is
    assert torch.allclose(ema.weight, 0.75 * weight + 0.25 * model.weight.detach())


@pytest.mark.slow
def test_loader_workers_are_forked_where_the_default_would_run_the_script_again_in_each(tmp_path):
    def under_forkserver(script, out_dir, tiny, *extra):
        return run([sys.executable, "-c", UNDER_START_METHOD, "forkserver",
                    *script_args(script, out_dir, tiny, "--num_workers=1", *extra)[1:]])
    under_forkserver("train.py", tmp_path / "pre", TINY, "--max_steps=2")
    under_forkserver("adapt.py", tmp_path / "canny", ADAPT, "--init", str(tmp_path / "pre" / "ckpt.pt"),
                     "--adapter=controlnet", f"--control_cache={tmp_path}/cache", "--max_steps=2")
    for out_dir in ("pre", "canny"):
        assert torch.load(tmp_path / out_dir / "ckpt.pt", weights_only=True)["step"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_a_platform_without_fork_is_told_to_load_in_the_main_process(monkeypatch):
    assert training.worker_start(0) is None and training.worker_start(2) == "fork"
    monkeypatch.setattr(training.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match="num_workers=2: .* set num_workers=0"):
        training.worker_start(2)
