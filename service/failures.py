"""A failed attempt, in words: whether Ray's message points at the infrastructure (a death, a timeout)
rather than at the job's own error, and the few lines a person needs from the message and the log."""

from __future__ import annotations

import re

__all__ = ["failure_reason", "infrastructure_failure"]

# what says the failure was the cluster's, not the job's own: a process killed by a signal, an actor,
# worker, node or the job's supervisor that died, memory, a timeout
_INFRA = re.compile(
    r"exit code (-\d+|129|13\d|14\d|15\d)\b|ActorDiedError|RayActorError|ActorUnavailableError|NodeDiedError|"
    r"NodeLostError|WorkerCrashedError|OutOfMemoryError|supervisor|raylet|node .* died|TimeoutError|timed out|"
    r"weight_sync_timeout_s",
    re.IGNORECASE,
)


def infrastructure_failure(message: str) -> bool:
    """Whether Ray's failure message points at a death or a timeout rather than at the job's own error
    (a job that made no progress is restarted only for these)."""
    return bool(_INFRA.search(message))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Exit)\b[^\n]*:")


def failure_reason(message: str, log: str = "", limit: int = 1500) -> str:
    """What a person needs from a failed attempt: the first line of Ray's message (how it ended) and the
    driver's last exception with Ray's details under it (`class_name: Learner` names the actor that
    died), looked for in the driver's log (Ray's message carries only its last 10 lines, often the
    engines' shutdown), else the message's last lines; at most `limit` characters."""
    head, _, tail = message.strip().partition(", last available logs")
    tail_lines = tail.splitlines()[1:]  # after "(truncated to N chars):"
    block: list[str] = []
    for text in (log, "\n".join(tail_lines)):
        lines = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines() if ln.strip()]
        where = next((i for i in range(len(lines) - 1, -1, -1) if _EXCEPTION.match(lines[i])), None)
        if where is not None:
            block = [lines[where]] + [ln for ln in lines[where + 1 : where + 8] if ln.startswith(("\t", " "))]
            break
    if not block:
        block = [_ANSI.sub("", ln).rstrip() for ln in tail_lines if ln.strip()][-8:]
    text = "\n".join([head.strip(), *block]).strip()
    return text[:limit] if text else "no reason given by Ray"
