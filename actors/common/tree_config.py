"""`rollout.tree`: forking-token tree rollouts (actors.driver.tree_rollout), off when absent.

Each prompt's group grows as a tree: `roots` samples, then rounds of branches at the highest-entropy
positions, `branches` continuations at each of `branch_points` positions, until the group holds
`rollout.group_size` leaves (its members) or `token_budget` unique tokens, or `max_rounds` rounds
passed. A branch re-draws the forking token and continues from the shared prefix, which the engine
serves from vLLM's prefix cache.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from actors.common.config_base import StrictModel

__all__ = ["TreeConfig"]


class TreeConfig(StrictModel):
    roots: int = Field(
        2, ge=2, le=1024, description="Independent samples each group starts from (at least 2: a group needs two)."
    )
    branch_points: int = Field(
        2, ge=1, le=1024, description="B: positions branched each round (per group; per leaf with per=trajectory)."
    )
    branches: int = Field(2, ge=1, le=1024, description="N: new continuations at each branch point.")
    per: Literal["group", "trajectory"] = Field(
        "group",
        description="group: the B highest-entropy positions over the whole group's unique tokens; trajectory: the B "
        "highest on each leaf's path (their union).",
    )
    entropy: Literal["engine", "learner"] = Field(
        "engine",
        description="Where the branch points' entropy comes from. engine: from the engine's top `top_logprobs` "
        "log-probs of each position (a lower bound of the entropy, no extra pass); learner: the learner's exact "
        "entropy, a forward pass over each round's new leaves (the engine's is kept beside it and the share of "
        "positions both would choose is reported as tree/branch_agreement).",
    )
    top_logprobs: int = Field(
        20, ge=1, le=20, description="k of the engine's entropy estimate: the log-probs of the k likeliest tokens."
    )
    max_rounds: int = Field(
        8, ge=1, le=64, description="Branch rounds at most; a group that is not full by then trains as it is."
    )
    token_budget: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Unique generated tokens per group after which it stops branching (it then trains on the leaves "
        "it has). None: no budget but the leaf count.",
    )
    prune_lookahead: int = Field(
        0,
        ge=0,
        le=4096,
        description="LATR's pruning: each branch first generates this many tokens; a continuation whose tokens so far "
        "repeat another path from the same fork is dropped (it would be a near-copy) before the survivors are "
        "continued. 0: no pruning.",
    )
    credit: Literal["tree", "flat"] = Field(
        "tree",
        description="tree: each unique token is one loss term with the mean advantage of the leaves below it "
        "(TreeAdv), and the entropy filter counts it once; flat: every leaf is its own sequence with its own "
        "advantage, as if sampled alone.",
    )
