"""How the control plane reads a failed attempt: which failures are restarted without progress, and
the reason it shows (pure functions of Ray's message and the driver's log)."""

from __future__ import annotations

from service.failures import failure_reason, infrastructure_failure

HEAD = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
TRACE = """Traceback (most recent call last):
  File "actors/train.py", line 97, in train
    raise value
ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.
\tclass_name: Learner
\tactor_id: 9fde
The actor is dead because its worker process has died.
\x1b[36m(RolloutEngine pid=2160)\x1b[0m INFO [shutdown] MPClient: complete
"""


def test_the_reason_is_the_last_exception_with_its_actor():
    # Ray's message holds only the log's last lines (shutdown noise); the driver's log has the traceback
    msg = HEAD + "\x1b[36m(RolloutEngine pid=2160)\x1b[0m INFO [shutdown] MPClient: complete\n(raylet) A worker died"
    got = failure_reason(msg, TRACE)
    assert got.splitlines() == [
        "Job entrypoint command failed with exit code 1",
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
        "\tclass_name: Learner",
        "\tactor_id: 9fde",
    ]
    # without the log: the exception in the message, else the message's last lines, ANSI colours removed
    assert "class_name: Learner" in failure_reason(HEAD + TRACE)
    plain = failure_reason(msg)
    assert plain.splitlines()[1] == "(RolloutEngine pid=2160) INFO [shutdown] MPClient: complete"
    assert failure_reason("Job supervisor actor died: gone") == "Job supervisor actor died: gone"
    assert failure_reason("") == "no reason given by Ray"
    assert len(failure_reason(HEAD + "x" * 5000, limit=100)) == 100


def test_deaths_and_timeouts_are_restarted_a_job_s_own_error_is_not():
    for msg in (
        "Job entrypoint command failed with exit code 137, last available logs: Killed",  # SIGKILL via the shell
        "Job entrypoint command failed with exit code -9",
        "ray.exceptions.ActorDiedError: The actor died unexpectedly",
        "Job supervisor actor died: The actor died unexpectedly",
        "TimeoutError: weight sync to the rollout engines did not finish in 120 s (learner.weight_sync_timeout_s)",
    ):
        assert infrastructure_failure(msg), msg
    for msg in (
        "Job entrypoint command failed with exit code 1: FileNotFoundError: no such model",
        "Job entrypoint command failed with exit code 2",
        "Job entrypoint command failed with exit code 13",  # not a signal
        "ValueError: verifier failed",
    ):
        assert not infrastructure_failure(msg), msg


def test_a_lost_node_is_the_reason_and_is_restarted():
    """The driver raises NodeLostError from the call that lost its actor (actors/driver/nodes.py): the
    reason is that line (the node, what it had, what it held), not the socket error before it."""
    log = """ray.exceptions.ActorUnavailableError: The actor 6f1a is unavailable: RpcError: Socket closed.

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "actors/train.py", line 68, in main
    raise lost from e
actors.driver.nodes.NodeLostError: Ray node 1639ae (10.0.0.7; 2 CPU, 2 forkrl_learner) died while this job ran: \
health check failed due to missing too many heartbeats. It held Learner (actor 6f1a).
"""
    got = failure_reason(HEAD + "(raylet) shutdown", log)
    assert got.splitlines()[1].startswith("actors.driver.nodes.NodeLostError: Ray node 1639ae (10.0.0.7; 2 CPU")
    assert infrastructure_failure(got)
    assert infrastructure_failure("NodeLostError: x")
