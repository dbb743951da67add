"""After ``finish()`` every tracker method refuses with one typed error naming the tracker and the run
(before: a released memoryview's ValueError, or ``OSError: Bad file descriptor`` from flush)."""
from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import AgentProcess
from test_pipeline import wait_points

import flightlog
from flightlog.proto.errors import FlightlogError, TrackerFinished
from flightlog.proto.paths import AgentPaths

#: Every public method of ExperimentTracker with a call that would be valid on a live run (or that is
#: refused before its arguments matter). The test below fails when a public method is missing here.
CALLS: dict[str, Callable[[flightlog.ExperimentTracker], Any]] = {
    "log_metrics": lambda t: t.log_metrics({"loss": 1.0}),
    "log_hyperparameters": lambda t: t.log_hyperparameters({"lr": 0.1}),
    "set_tags": lambda t: t.set_tags({"team": "a"}),
    "log_text": lambda t: t.log_text("note", "hello"),
    "log_image": lambda t: t.log_image("img", [[0, 255]]),
    "log_figure": lambda t: t.log_figure("fig", None),
    "save_checkpoint": lambda t: t.save_checkpoint(None, epoch=1, step=1),
    "get_best_checkpoint": lambda t: t.get_best_checkpoint(),
    "load_checkpoint": lambda t: t.load_checkpoint("best"),
    "should_checkpoint": lambda t: t.should_checkpoint(10),
    "flush": lambda t: t.flush(),
    "progress": lambda t: t.progress(100),
    "log_artifact": lambda t: t.log_artifact(__file__),
    "log_gradient_flow": lambda t: t.log_gradient_flow(None),
    "log_histograms": lambda t: t.log_histograms(None),
    "log_data_distribution": lambda t: t.log_data_distribution(None),
    "log_model_summary": lambda t: t.log_model_summary(None),
    "memory_stats": lambda t: t.memory_stats(),
}
#: Public methods that stay usable: finish() again is a no-op; health() returns finish()'s delivery summary.
ALLOWED_AFTER_FINISH = {"finish", "health"}


def _public_methods() -> set[str]:
    return {name for name, member in inspect.getmembers(flightlog.ExperimentTracker, inspect.isfunction)
            if not name.startswith("_")}


def test_the_table_covers_every_public_method() -> None:
    assert _public_methods() == set(CALLS) | ALLOWED_AFTER_FINISH


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_after_finish_raises_tracker_finished(agent_paths: AgentPaths, base_config: dict,
                                                           method: str) -> None:
    t = flightlog.ExperimentTracker("finished-exp", base_config)
    t.finish()
    with pytest.raises(TrackerFinished, match=rf"tracker 'finished-exp' \({t.run_id}\) is finished: {method}\(\)"):
        CALLS[method](t)
    assert issubclass(TrackerFinished, FlightlogError) and issubclass(TrackerFinished, RuntimeError)
    t.finish()  # a second finish stays a no-op


def test_log_metrics_after_finish_from_another_thread_and_through_a_saved_reference(
        agent_paths: AgentPaths, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("finished-threads", base_config)
    log = t.log_metrics  # the closure, saved before finish (as a training loop may hold it)
    log({"loss": 1.0})
    t.finish()
    with pytest.raises(TrackerFinished, match="is finished"):
        log({"loss": 2.0})
    errors: list[BaseException] = []

    def other() -> None:
        try:
            t.log_metrics({"loss": 3.0}, step=5)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert len(errors) == 1 and isinstance(errors[0], TrackerFinished), errors


def test_the_hot_path_keeps_its_closure(agent_paths: AgentPaths, base_config: dict) -> None:
    """The finished state costs the owner's hot path nothing: log_metrics stays the bare closure."""
    t = flightlog.ExperimentTracker("closure", base_config)
    try:
        assert t.__dict__["log_metrics"] is t._metrics.log_metrics
    finally:
        t.finish()


def test_nothing_logged_after_finish_reaches_the_store(agent: AgentProcess, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("finished-store", base_config)
    t.log_metrics({"loss": 1.0}, step=0)
    t.finish()
    for method in ("log_metrics", "log_text", "set_tags", "flush"):
        with pytest.raises(TrackerFinished):
            CALLS[method](t)
    assert [p["step"] for p in wait_points(agent.paths, t.run_id, 1)] == [0]
