"""Rewards for the toy tasks of the Ray tests (loaded by the reward actors as plugins)."""


def lowercase_fraction(completion: str, answer: str, prompt: object) -> float:
    """Share of the completion's characters that are ASCII lowercase letters: a dense, learnable
    signal even for a random model, whose groups are then never all equal."""
    if not completion:
        return 0.0
    return sum("a" <= c <= "z" for c in completion) / len(completion)
