"""The generation copy and the HF export, on plain (non-ZeRO) models in one process: tied
weights stay tied, LoRA on GPT-2's Conv1D layers merges, and an exported reward model read
the standard HF way scores the EOS, as training does."""

from __future__ import annotations

import pytest
import torch
import transformers

from ds_rlhf.engines.export import classifier_tokenizer
from ds_rlhf.engines.hybrid import HybridEngine
from ds_rlhf.engines.roles import add_lora
from ds_rlhf.models import ScalarHeadModel, sequence_inputs


def _gpt2(vocab_size: int = 100, **extra) -> transformers.PretrainedConfig:
    return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=64, bos_token_id=0, eos_token_id=0, **extra)


class _Unpartitioned:
    """What the HybridEngine reads of a DeepSpeed engine, for a model without ZeRO-3 (then
    filling the copy runs no collective)."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def zero_optimization_stage(self) -> int:
        return 0


def _plain_copy(model):
    """The HybridEngine's generation copy of `model`: weights copied, LoRA merged."""
    return HybridEngine(_Unpartitioned(model), gather_weights=True, synced=None)._fill()


def test_generation_copy_keeps_tied_embeddings_tied():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_gpt2()).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    copy = _plain_copy(model)
    # One storage for both, so no extra vocab x hidden matrix: 100 x 32 = 3200 fewer numbers.
    assert copy.lm_head.weight.data_ptr() == copy.transformer.wte.weight.data_ptr()
    assert sum(p.numel() for p in copy.parameters()) == sum(p.numel() for p in
                                                             model.parameters())
    ids = torch.randint(0, 100, (2, 5))
    assert torch.equal(copy(ids).logits, model(ids).logits)


def test_lora_merge_on_conv1d_layers_matches_the_adapted_model():
    """GPT-2's Conv1D stores W as [in, out] (peft's fan_in_fan_out): B @ A is transposed."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_gpt2()).eval()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
    add_lora(model, rank=4, alpha=8.0)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(m.fan_in_fan_out for m in layers)  # c_attn, c_proj, c_fc
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (no change); make the adapters count
            torch.nn.init.normal_(p, std=0.5)
    copy = _plain_copy(model)
    assert not any(hasattr(m, "lora_A") for m in copy.modules())
    with torch.no_grad():
        adapted, merged = model(ids).logits, copy(ids).logits
    assert (adapted - base).abs().max() > 0.1  # the adapters change the model
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_classifier_tokenizer_pads_with_a_token_other_than_eos(assets):
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["tokenizer"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0  # the demo's: pad == EOS
    exported = classifier_tokenizer(tokenizer, vocab_size=len(tokenizer))
    assert exported.pad_token == "<unk>" and exported.pad_token_id == 1
    assert tokenizer.pad_token_id == 0  # the training tokenizer is left as it is
    # No special token to spare: a new one, if the embedding has a row for it.
    bare = transformers.AutoTokenizer.from_pretrained(assets["tokenizer"])
    bare.unk_token = bare.eos_token
    padded = classifier_tokenizer(bare, vocab_size=len(bare) + 8)
    assert padded.pad_token == "<pad>" and padded.pad_token_id == len(bare)
    assert classifier_tokenizer(bare, vocab_size=len(bare)).pad_token_id == bare.eos_token_id


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_standard_hf_forward_scores_the_eos_with_the_export_pad(assets, model_type):
    """EOS-terminated rows of different lengths, right-padded with the exported pad: HF's
    pooled logits equal the training read (ScalarHeadModel at the last real token)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["tokenizer"])
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    config = (_gpt2(vocab) if model_type == "gpt2" else transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    config.num_labels = 1
    config.pad_token_id = classifier_tokenizer(tokenizer, vocab).pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    rows = [[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, 14, eos]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [config.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        standard = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        # Training: prompt-free rows, scores at the last real token found from lengths.
        ids_t, mask_t, pos = sequence_inputs(ids[:, :0], mask[:, :0], ids, mask)
        per_token = ScalarHeadModel(model)(ids_t, mask_t, pos)
        training = per_token.gather(1, (mask.sum(1) - 1)[:, None]).squeeze(1)
        # With pad == EOS the same HF forward reads the token before the EOS instead.
        model.config.pad_token_id = eos
        eos_padded = torch.where(mask.bool(), ids, eos)
        old = model(input_ids=eos_padded, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(standard, training, atol=1e-5, rtol=1e-5)
    before_eos = per_token.gather(1, (mask.sum(1) - 2)[:, None]).squeeze(1)
    torch.testing.assert_close(old, before_eos, atol=1e-5, rtol=1e-5)
