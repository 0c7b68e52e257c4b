"""Slow, obvious float64 references for the vectorised core (loops, no tricks)."""

import math


def entropy_row(z: list[float], temperature: float) -> float:
    x = [v / temperature for v in z]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return -sum((ei / s) * math.log(ei / s) for ei in e if ei > 0)


def logprob_row(z: list[float], tok: int, temperature: float) -> float:
    x = [v / temperature for v in z]
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return x[tok] - lse


def kept_set(entropies: list[list[float]], valid: list[list[bool]], rho: float) -> set[tuple[int, int]]:
    """Top k = ceil(rho * N) by entropy; ties go to the earliest (row, position)."""
    tokens = [(entropies[b][t], b, t) for b in range(len(entropies)) for t in range(len(entropies[b])) if valid[b][t]]
    n = len(tokens)
    k = min(n, math.ceil(round(rho * n, 9)))
    order = sorted(tokens, key=lambda e: (-e[0], e[1], e[2]))
    return {(b, t) for _, b, t in order[:k]}


def clipped_loss(logp, old, adv, valid, kept, eps_low, eps_high, agg) -> float:
    total, n_sel, n_valid = 0.0, 0, 0
    seq_terms = []
    for b in range(len(logp)):
        s, c = 0.0, 0
        for t in range(len(logp[b])):
            if not valid[b][t]:
                continue
            n_valid += 1
            if not kept[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            term = max(-adv[b] * r, -adv[b] * min(max(r, 1 - eps_low), 1 + eps_high))
            s += term
            c += 1
        total += s
        n_sel += c
        if any(valid[b]):  # a sequence with no valid token is not a sequence of the batch
            seq_terms.append(s / max(c, 1))
    if agg == "token_mean_selected":
        return total / max(n_sel, 1)
    if agg == "token_mean":
        return total / max(n_valid, 1)
    if agg == "seq_mean_token_mean":
        return sum(seq_terms) / max(len(seq_terms), 1)
    # Dr.GRPO: sum / (sequences x longest response); a row with no valid token is padding, not a sequence
    return total / (sum(1 for row in valid if any(row)) * len(logp[0]))


def method_loss(logp, old, adv, valid, kept, rollout, method, eps_low, eps_high, cispo_max, cap, level, mode) -> float:
    """The policy loss of GSPO / CISPO / PPO-clip with the mismatch weight, token_mean_selected: loops.

    Value only (CISPO's value is -w A logp; its gradient is what the learner uses)."""
    total, n_sel = 0.0, 0
    for b in range(len(logp)):
        toks = [t for t in range(len(logp[b])) if valid[b][t]]
        if not toks:
            continue
        seq_log_ratio = sum(logp[b][t] - old[b][t] for t in toks) / len(toks)
        seq_log_w = sum(old[b][t] - rollout[b][t] for t in toks)
        for t in toks:
            if not kept[b][t]:
                continue
            r = math.exp(seq_log_ratio if method == "gspo" else logp[b][t] - old[b][t])
            if method == "cispo":
                term = -min(r, cispo_max) * adv[b] * logp[b][t]
            else:
                term = max(-adv[b] * r, -adv[b] * min(max(r, 1 - eps_low), 1 + eps_high))
            w = math.exp(seq_log_w if level == "sequence" else old[b][t] - rollout[b][t])
            if cap is not None:
                w = (0.0 if w > cap else w) if mode == "mask" else min(w, cap)
            total += term * w
            n_sel += 1
    return total / max(n_sel, 1)
