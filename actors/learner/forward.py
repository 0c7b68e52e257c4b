"""Hidden states at the positions that predict each response token, for one micro-batch.

Two ways to the same numbers (up to float rounding), chosen by `learner.share_prompt`:
- full: every sequence runs whole (prompt + response, right-padded to the micro-batch's width).
- shared: the completions of one prompt share a single forward of that prompt. Its keys and values
  are repeated once per completion and the responses run on top of them; gradients flow back
  through the copy into the one prompt forward, so the update equals the full path's. With 8
  completions of a 50-token prompt and 32-token responses a group costs 50 + 8 x 31 = 298 token
  positions instead of 8 x 82 = 656.
Response token j of a sequence with prompt length P is predicted by the hidden state at position
P - 1 + j: the prompt's last position for j = 0, the response's position j - 1 after that.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from actors.common.batch import MicroBatch

__all__ = ["length_chunks", "response_hidden_full", "response_hidden_shared"]


def response_hidden_full(base: Any, mb: MicroBatch) -> torch.Tensor:
    """[B, T, H] from whole sequences: input_ids / attention_mask [B, L], gather_pos [B, T]."""
    hidden = base(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)[0]  # [B, L, H]
    idx = mb.gather_pos[..., None].expand(-1, -1, hidden.shape[-1])
    out: torch.Tensor = hidden.gather(1, idx)
    return out


def response_hidden_shared(base: Any, mb: MicroBatch) -> torch.Tensor:
    """[B, T, H] with each prompt run once: runs [(start, stop, prompt_ids [P])], resp_ids [B, T]
    right-padded, resp_len [B]. Two forward calls per micro-batch: the distinct prompts, left-padded
    to one width, then every response on top of its prompt's keys/values (gathered per sequence, a
    differentiable copy). Positions past a response's length hold values that the valid mask drops."""
    resp_ids, resp_len = mb.resp_ids, mb.resp_len
    dev = resp_ids.device
    b, t_resp = resp_ids.shape
    runs = mb.runs
    p_len = torch.tensor([p.numel() for _, _, p in runs], device=dev)  # [n]
    width = int(p_len.max())
    prompt_ids = torch.zeros(len(runs), width, dtype=torch.long, device=dev)
    p_mask = torch.zeros(len(runs), width, dtype=torch.long, device=dev)
    for i, (_, _, p) in enumerate(runs):  # left padding: every prompt ends in the last column
        prompt_ids[i, width - p.numel() :] = p
        p_mask[i, width - p.numel() :] = 1
    p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)  # real positions 0..P-1 after the padding
    # one embedding lookup for the prompts and every response: each lookup's backward fills and adds a
    # dense vocab x hidden gradient (113 MB for SmolLM2), once per forward call if each embedded its own
    emb = base.get_input_embeddings()(torch.cat([prompt_ids.flatten(), resp_ids.flatten()]))
    p_emb = emb[: prompt_ids.numel()].view(*prompt_ids.shape, -1)
    r_emb = emb[prompt_ids.numel() :].view(b, t_resp, -1)
    first = base(inputs_embeds=p_emb, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
    owner = torch.repeat_interleave(
        torch.arange(len(runs), device=dev), torch.tensor([z - a for a, z, _ in runs], device=dev)
    )  # [B]: the run of each sequence
    pieces = [first.last_hidden_state[owner, -1:]]  # [B, 1, H]: predicts response token 0
    r = int(resp_len.max())
    if r > 1:
        outs, rows = [], []
        # the responses run in chunks of similar length (longest first), each on top of its own copy of
        # its prompts' keys/values: padding every response to the longest of the micro-batch cost up to
        # ~1.7x the positions with 8..64-token completions
        for chunk in length_chunks(resp_len):
            sel = owner[chunk]
            r_c = int(resp_len[chunk].max())
            if r_c < 2:  # one-token responses: the prompt's last position predicted all there is
                outs.append(first.last_hidden_state.new_zeros(len(chunk), r - 1, first.last_hidden_state.shape[-1]))
                rows.append(chunk)
                continue
            cache = _select_cache(first.past_key_values, sel)
            steps = torch.arange(r_c - 1, device=dev)
            own = (steps[None, :] < resp_len[chunk][:, None]).long()
            attn = torch.cat([p_mask[sel], own], 1)  # [b, width + r_c - 1]
            pos = p_len[sel][:, None] + steps[None, :]
            r_in = r_emb[chunk, : r_c - 1]  # tokens 0..r_c-2 predict 1..r_c-1
            h_c = base(
                inputs_embeds=r_in, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
            )[0]
            outs.append(F.pad(h_c, (0, 0, 0, r - r_c)))  # [b, R - 1, H]
            rows.append(chunk)
        order = torch.cat(rows)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=dev)
        pieces.append(torch.cat(outs)[inverse])  # back in the micro-batch's order
    h = torch.cat(pieces, 1)  # [B, R, H]
    return F.pad(h, (0, 0, 0, t_resp - h.shape[1]))


def _select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of a prompt cache holding the given batch rows (each layer keeps its own kind, e.g. a
    sliding window); the original stays whole for the next chunk."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[rows], layer.values[rows]
        out.layers.append(part)
    return out


def length_chunks(lengths: torch.Tensor, keep: float = 0.85) -> list[torch.Tensor]:
    """Row indices sorted by length, longest first, cut where a length falls below `keep` x its
    chunk's longest: padding within a chunk stays under 1 - keep, and similar lengths make few chunks."""
    order = torch.argsort(lengths, descending=True, stable=True)
    chunks: list[list[int]] = []
    top = 0
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        if not chunks or n < keep * top:
            chunks.append([])
            top = n
        chunks[-1].append(i)
    return [torch.tensor(c, dtype=torch.long, device=lengths.device) for c in chunks]
