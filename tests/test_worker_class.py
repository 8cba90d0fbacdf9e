"""asyncmodels' worker classes, in process: when recovery runs, and that it never blocks a stop."""

from __future__ import annotations

import time

import pytest
from rq.exceptions import StopRequested

from asyncmodels import worker as worker_module
from asyncmodels.worker import SimpleWorker, Worker


@pytest.mark.parametrize("worker_class", [Worker, SimpleWorker])
def test_recovery_is_due_at_start_then_once_per_interval(worker_class: type[Worker]) -> None:
    rq_worker = worker_class.__new__(worker_class)  # the timing logic needs no Redis
    assert rq_worker._recovery_due()  # never ran: due at once
    rq_worker._asyncmodels_last_recovery = time.monotonic()
    assert not rq_worker._recovery_due()
    rq_worker._asyncmodels_last_recovery = time.monotonic() - rq_worker._recovery_interval()
    assert rq_worker._recovery_due()


def test_a_warm_shutdown_during_a_recovery_pass_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop_requested_mid_pass() -> None:
        raise StopRequested

    monkeypatch.setattr(worker_module, "recover_stranded_calls", stop_requested_mid_pass)
    rq_worker = Worker.__new__(Worker)
    with pytest.raises(StopRequested):
        rq_worker.run_recovery()


def test_other_recovery_errors_never_stop_the_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_pass() -> None:
        raise RuntimeError("recovery bug")

    monkeypatch.setattr(worker_module, "recover_stranded_calls", broken_pass)
    Worker.__new__(Worker).run_recovery()
    assert "Recovery pass failed" in caplog.text
