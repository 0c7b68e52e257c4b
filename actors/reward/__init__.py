"""Reward: verifiers (numeric, math, regex, code in a bubblewrap sandbox, plugins) and the pool of
CPU actors that scores completions with them."""
