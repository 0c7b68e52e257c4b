"""Hidden states at the positions that predict each response token, for one micro-batch.

Two ways to the same numbers (up to float rounding), chosen by `learner.share_prompt`:
- full: every sequence runs whole (prompt + response, right-padded to the micro-batch's width).
- shared: the completions of one prompt share a single forward of that prompt. Its keys and values
  are repeated once per completion and the responses run on top of them; gradients flow back
  through the repeat into the one prompt forward, so the update equals the full path's. With 8
  completions of a 50-token prompt and 32-token responses a group costs 50 + 8 x 31 = 298 token
  positions instead of 8 x 82 = 656.
Response token j of a sequence with prompt length P is predicted by the hidden state at position
P - 1 + j: the prompt's last position for j = 0, the response's position j - 1 after that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["prompt_runs", "response_hidden_full", "response_hidden_shared"]


def prompt_runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """[start, stop) of each run of identical consecutive prompts (a group, or part of one)."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def response_hidden_full(base: Any, mb: dict[str, Any]) -> torch.Tensor:
    """[B, T, H] from whole sequences: input_ids / attention_mask [B, L], gather_pos [B, T]."""
    hidden = base(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)[0]  # [B, L, H]
    idx = mb["gather_pos"][..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, idx)


def response_hidden_shared(base: Any, mb: dict[str, Any]) -> torch.Tensor:
    """[B, T, H] with one prompt forward per run: runs [(start, stop, prompt_ids [P])], resp_ids
    [B, T] right-padded, resp_len [B]. Positions past a response's length hold values that the
    valid mask drops."""
    t_resp = mb["resp_ids"].shape[1]
    out: list[torch.Tensor] = []
    for start, stop, prompt in mb["runs"]:
        g = stop - start
        first = base(input_ids=prompt[None], use_cache=True)
        h_last = first.last_hidden_state[:, -1:]  # [1, 1, H]: predicts response token 0
        pieces = [h_last.expand(g, 1, h_last.shape[-1])]
        lens = mb["resp_len"][start:stop]
        r = int(lens.max())
        if r > 1:
            cache = first.past_key_values
            cache.batch_repeat_interleave(g)  # a differentiable copy per completion
            r_in = mb["resp_ids"][start:stop, : r - 1]  # [G, R-1]: tokens 0..R-2 predict 1..R-1
            own = (torch.arange(r - 1, device=r_in.device)[None, :] < lens[:, None]).long()
            attn = torch.cat([torch.ones(g, prompt.numel(), dtype=torch.long, device=r_in.device), own], 1)
            pieces.append(base(input_ids=r_in, attention_mask=attn, past_key_values=cache, use_cache=True)[0])
        h = torch.cat(pieces, 1)  # [G, R, H]
        out.append(F.pad(h, (0, 0, 0, t_resp - h.shape[1])))
    return torch.cat(out, 0)
