"""training.py: the stop on SIGTERM and Ctrl-C (a second Ctrl-C at once), the log's numbers and loss curve, the
EMA."""
import json
import os
import signal

import pytest
import torch

import training


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
