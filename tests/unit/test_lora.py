"""LoRA's pure parts: the config's bounds and errors, vLLM's slot rank, and the learner's export
formats checked against PEFT itself on a small random Llama built here (no Ray, no DeepSpeed)."""

import json

import pytest
import torch

from actors.common.config_load import ConfigError, load_config
from actors.common.model_config import vllm_max_lora_rank


def test_lora_is_off_by_default_and_its_errors_name_field_value_and_accepted():
    assert load_config(None, []).model.lora is None
    cfg = load_config(None, ["model.lora={rank: 4}"])
    assert cfg.model.lora is not None and cfg.model.lora.alpha == 32
    assert cfg.model.lora.sync == "merged"  # auto, with CPU engines: vLLM's CPU LoRA kernels are slow
    gpu = load_config(None, ["model.lora={rank: 4}", "rollout.num_gpus_per_engine=1"])
    assert gpu.model.lora is not None and gpu.model.lora.sync == "adapter"
    assert "down_proj" in cfg.model.lora.target_modules and cfg.model.lora.dropout == 0.0
    for override, needle in [
        ("model.lora={rank: 0}", "model.lora.rank = 0: Input should be greater than or equal to 1"),
        ("model.lora={rank: 600}", "model.lora.rank = 600: Input should be less than or equal to 512"),
        ("model.lora={sync: full}", "model.lora.sync = 'full': Input should be 'auto', 'adapter' or 'merged'"),
        ("model.lora={target_modules: ['a.b']}", "model.lora.target_modules.0 = 'a.b': String should match"),
        ("model.lora={target_modules: []}", "model.lora.target_modules = [...]: List should have at least 1 item"),
        ("model.lora={dropout: 1}", "model.lora.dropout = 1: Input should be less than 1"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert needle in str(e.value), (override, str(e.value))


def test_vllm_slot_rank_is_the_smallest_that_holds_the_adapter():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]


def _model(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.common.model_config import LoraConfig
    from actors.learner.lora import apply_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)  # fmt: skip
    model = apply_lora(LlamaForCausalLM(cfg), LoraConfig(rank=4, alpha=12))
    with torch.no_grad():  # B starts at zero; a trained adapter has both
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_merged_state_is_pefts_merge_without_touching_the_model(tie):
    from actors.learner.lora import merged_state

    model = _model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = dict(merged_state(model))
    for k, v in model.state_dict().items():  # computed aside: nothing merged and unmerged in place
        assert torch.equal(v, before[k]), k
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        want = model.merge_and_unload().state_dict()  # PEFT's own merge (changes the model: last)
    assert ours.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(ours[k], want[k], atol=1e-6, rtol=0, msg=k)
    if tie:  # the tied head is the embedding's own tensor: the weight file stores it once
        assert ours["lm_head.weight"].data_ptr() == ours["model.embed_tokens.weight"].data_ptr()
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)


def test_the_adapter_file_is_a_peft_adapter(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from actors.common.weight_sync import ADAPTER_FILE, file_header, write_weights
    from actors.learner.lora import adapter_config_json, adapter_state

    model = _model(tie=True)
    state = adapter_state(model)
    peft_own = get_peft_model_state_dict(model)
    assert state.keys() == peft_own.keys() and all(torch.equal(state[k], peft_own[k]) for k in state)
    assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in state), sorted(state)[:3]
    assert len(state) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    out = write_weights(state.items(), "float32", str(tmp_path), 5, name=ADAPTER_FILE,
                        adapter_config=adapter_config_json(model))  # fmt: skip
    assert file_header(out.path) == (28, 5) and json.loads(out.adapter_config)["lora_alpha"] == 12
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = LlamaForCausalLM(model.config)
        base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()
                              if "lora_" not in k})  # fmt: skip
        loaded = PeftModel.from_pretrained(base, tmp_path)  # reads adapter_config.json + adapter_model.safetensors
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-6, rtol=0)
