"""The shared-prompt forward gives the full forward's hidden states and gradients (a tiny random
Llama, fp32): groups of different prompt lengths, responses of different lengths incl. 1 token,
a group split across micro-batches."""

import pytest
import torch
import transformers

from actors.common.batch import TrainSequence, collate, prompt_runs
from actors.learner.forward import length_chunks, response_hidden_full, response_hidden_shared


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def _batch(seqs):
    """The learner's micro-batch for both paths from [(prompt, response)]."""
    batch = [TrainSequence(p, r, [0.0] * len(r), 0.0) for p, r in seqs]
    (mb,) = collate(batch, len(batch), "cpu")
    return mb


SEQS = [
    ([1, 2, 3, 4, 5], [7, 8, 9]),
    ([1, 2, 3, 4, 5], [7]),  # one token: only the prompt's last position
    ([1, 2, 3, 4, 5], [10, 11, 12, 13, 14]),
    ([6, 5, 4], [20, 21]),
    ([6, 5, 4], [22, 23, 24, 25]),
    ([9], [30, 31, 32]),  # a one-token prompt
]


def test_length_chunks_sort_longest_first_and_cut_below_the_keep_share():
    # default keep 0.85, sorted: 10 (row 1); 8 < 8.5 opens a chunk, 7 >= 6.8 joins it; 3 < 5.95 and 1 < 2.55 open
    got = length_chunks(torch.tensor([3, 10, 8, 1, 7]))
    assert [c.tolist() for c in got] == [[1], [2, 4], [0], [3]]
    assert [c.tolist() for c in length_chunks(torch.tensor([5, 5, 4]))] == [[0, 1], [2]]  # 4 < 4.25
    # keep 0.75: 8 >= 7.5 stays with 10; 7 < 7.5 opens a chunk, 3 < 5.25 and 1 < 2.25 too
    got = length_chunks(torch.tensor([3, 10, 8, 1, 7]), keep=0.75)
    assert [c.tolist() for c in got] == [[1, 2], [4], [0], [3]]
    assert [c.tolist() for c in length_chunks(torch.tensor([5, 5, 4]), keep=0.75)] == [[0, 1, 2]]  # 4 >= 3.75
    assert [c.tolist() for c in length_chunks(torch.tensor([6, 2]), keep=0.0)] == [[0, 1]]  # keep 0: one chunk


def test_the_shared_forward_runs_its_responses_in_several_length_chunks():
    mb = _batch(SEQS)
    assert len(length_chunks(mb.resp_len)) >= 3  # so the equality test below covers the chunked path


def test_prompt_runs():
    assert prompt_runs([[1], [1], [2], [1], [1], [1]]) == [(0, 2), (2, 3), (3, 6)]
    assert prompt_runs([]) == []


@pytest.mark.parametrize("split", [[range(0, 6)], [range(0, 2), range(2, 6)]])
def test_shared_prompt_forward_equals_full_forward(split):
    model = _model()
    base = model.model
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    grads = {}
    hiddens = {}
    for name, fn in (("full", response_hidden_full), ("shared", response_hidden_shared)):
        model.zero_grad()
        hs = []
        for rows in split:
            mb = _batch([SEQS[i] for i in rows])
            h = fn(base, mb)  # [B, T, H]
            assert h.shape == (len(rows), mb.resp_ids.shape[1], 32)
            h = h[mb.valid]  # valid positions only
            (h @ w.T).tanh().sum().backward()
            hs.append(h.detach())
        hiddens[name] = torch.cat(hs)
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(hiddens["shared"], hiddens["full"], atol=1e-5, rtol=1e-5)
    assert grads["shared"].keys() == grads["full"].keys() and len(grads["full"]) > 10
    for k in grads["full"]:
        torch.testing.assert_close(grads["shared"][k], grads["full"][k], atol=1e-5, rtol=1e-4, msg=k)
