"""Whether an actor's failure was its Ray node's: a node whose raylet died (SIGKILL, a lost machine, a
preempted VM) first shows as `ActorUnavailableError` on the calls in flight ("socket closed"), which
says nothing about the node; Ray's control store marks the node DEAD only after its health checks
fail (about 15 s by default). `lost_node` waits, within a bound, for Ray's verdict on the actor and
its node, so that the attempt's error names the node and what it held rather than a socket.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["NodeLostError", "lost_node", "NODE_VERDICT_S"]

log = logging.getLogger("forkrl.train")

# how long a failed call waits for Ray to say whether the actor's node died: Ray's default health check
# (3 s period, 5 failures) marks a dead node in 15-30 s
NODE_VERDICT_S = 60.0


class NodeLostError(RuntimeError):
    """An actor of this job was on a Ray node that died (the attempt cannot go on without it)."""


def _resources(node: Any) -> str:
    skip = ("node:", "memory", "object_store", "accelerator_type")
    total = node.resources_total or {}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(total.items()) if not k.startswith(skip)) or "no resources"


def _failed_actor(error: BaseException | None) -> str | None:
    """The id of the actor whose failure this is: the error's own, or one it was raised from."""
    from ray.exceptions import RayActorError

    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, RayActorError) and getattr(error, "actor_id", None):
            return str(error.actor_id)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _died_on_its_own(actor: Any) -> bool:
    """Whether Ray recorded a death of the actor's own (its process exited or was killed, out of memory):
    not its node's, and not the driver's clean-up after the failed call (`ray.kill`, which says nothing
    about why the call failed)."""
    if actor.state != "DEAD":
        return False
    context = (actor.death_cause or {}).get("actor_died_error_context") or {}
    return context.get("reason") not in ("RAY_KILL", "NODE_DIED")


def lost_node(error: BaseException, wait_s: float = NODE_VERDICT_S, poll_s: float = 1.0) -> NodeLostError | None:
    """A NodeLostError naming the node (id, address, resources, Ray's reason) and the actor, when the
    failed actor's node is DEAD; None when the actor died on a live node (its process was killed, it
    raised in its constructor), when Ray cannot say, or when no verdict came within wait_s."""
    actor_id = _failed_actor(error)
    if actor_id is None:
        return None
    from ray.util.state import get_actor, get_node

    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            actor = get_actor(actor_id)
            node = get_node(actor.node_id) if actor is not None and actor.node_id else None
        except Exception as e:  # the state API is down or refuses: no verdict, the original error stands
            log.warning("could not ask Ray where actor %s ran: %s", actor_id, e)
            return None
        if actor is None or node is None:
            return None
        if node.state == "DEAD":
            role = actor.class_name or "an actor"
            return NodeLostError(
                f"Ray node {node.node_id} ({node.node_ip}; {_resources(node)}) died while this job ran: "
                f"{node.state_message or 'no reason given by Ray'}. It held {role} (actor {actor_id})."
            )
        if _died_on_its_own(actor) or time.monotonic() >= deadline:
            return None  # the actor died on a node that is still alive, or no verdict in time
        if not waited:
            log.warning("actor %s (%s) is unreachable; waiting up to %.0f s for Ray to say whether node %s died",
                        actor_id, actor.class_name, wait_s, actor.node_id)  # fmt: skip
            waited = True
        time.sleep(poll_s)
