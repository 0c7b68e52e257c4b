"""Rewards for the toy tasks of the Ray tests (loaded by the reward actors as plugins)."""


def lowercase_fraction(completion: str, answer: str, prompt: object) -> float:
    """Share of the completion's characters that are ASCII lowercase letters: a dense, learnable
    signal even for a random model, whose groups are then never all equal."""
    if not completion:
        return 0.0
    return sum("a" <= c <= "z" for c in completion) / len(completion)


def moody_environment(state):
    """A plugin environment that fails in each way a user's may (the reward worker contains each):
    it raises, hangs, answers well, or returns something that is not an Observation."""
    import time

    from actors.common.episode import Observation

    action = state.actions[-1]
    if action == "raise":
        raise RuntimeError("the tool broke")
    if action == "hang":
        time.sleep(5)
    if action == "hello":
        return Observation("HELLO", reward=0.5)
    return "not an observation"


def counting_environment(state):
    """Answers every call with how many it has answered before (a short observation)."""
    from actors.common.episode import Observation

    return Observation(f"#{len(state.observations)}")
