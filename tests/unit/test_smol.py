"""SmolLM2-135M-Instruct, a real pretrained checkpoint, in every role (one process): loaded
from its GGUF (`model.gguf_file`) into a normal HF model, its chat template and default
system prompt in the prompts, pad == EOS (the reward read at the EOS), tied embeddings tied
under ZeRO-3, in the HybridEngine's copy and in the export."""

from __future__ import annotations

import json
import types

import pytest
import torch
import transformers
from safetensors import safe_open

from ds_rlhf import models
from ds_rlhf.cli import main as cli_main
from ds_rlhf.config import DataConfig, DatasetSpec, ModelConfig, TrainEngineConfig
from ds_rlhf.data import load_prompts, load_sft
from ds_rlhf.engines.export import classifier_tokenizer, export_hf
from ds_rlhf.engines.hybrid import HybridEngine
from ds_rlhf.engines.roles import RewardModel, init_engine
from ds_rlhf.rollout import Rollout
from tests.conftest import float32_tolerance, free_port, ppo_config, write_yaml
from tests.dist.ppo_checks import hybrid_copy

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(model, tokenizer, conv, n: int = 8) -> str:
    inputs = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_the_converted_copy_is_a_plain_checkpoint_that_answers(smol):
    """The fixture's copy (models.convert_gguf): no quantization mark, one stored copy of the
    tied embedding, loaded by plain transformers, and the weights know things."""
    config = json.loads(open(f"{smol['path']}/config.json").read())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    with safe_open(f"{smol['path']}/model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(smol["path"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol["path"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
    assert "Paris" in _greedy(model, tokenizer, QUESTION)


def test_gguf_file_gives_a_normal_scalar_model_and_the_tokenizer(smol, tmp_path):
    """A critic / reward role straight from the GGUF: the backbone's weights are the
    converted copy's, the head is new, and it saves as a plain checkpoint."""
    gguf = ModelConfig(path=smol["gguf_dir"], gguf_file=smol["gguf_file"])
    tokenizer = models.load_tokenizer(gguf, "critic")
    plain = transformers.AutoTokenizer.from_pretrained(smol["path"])
    assert tokenizer.get_vocab() == plain.get_vocab()
    assert tokenizer.chat_template == plain.chat_template
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == plain.eos_token_id
    critic = models.build_scalar_model(gguf, "critic", "fp32", seed=0,
                                       pad_token_id=tokenizer.pad_token_id).hf_model
    assert getattr(critic, "hf_quantizer", None) is None
    assert getattr(critic.config, "quantization_config", None) is None
    lm = transformers.AutoModelForCausalLM.from_pretrained(smol["path"])
    expected = {k: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    got = critic.state_dict()
    assert sorted(got) == sorted([*expected, "score.weight"])
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    critic.save_pretrained(tmp_path / "critic")  # refused for transformers' GGUF models
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic")
    assert torch.equal(loaded.score.weight, critic.score.weight)


def test_prompts_are_rendered_as_the_tokenizer_renders_them(smol, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol["path"])
    convs = [QUESTION, [{"role": "system", "content": "Be brief."}, *QUESTION,
                        {"role": "assistant", "content": "Paris."},
                        {"role": "user", "content": "And of Italy?"}]]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    data = DataConfig(datasets=[DatasetSpec(path=str(path), format="messages")])
    prompts = load_prompts(data, tokenizer)
    for conv in convs:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        k = prompts.texts.index(text)  # training order is mixed
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)
        assert prompts.input_ids[k] == ids
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    assert sum(t.startswith(default) for t in prompts.texts) == 1  # the row without its own
    # SFT on a conversation trains its answer and the <|im_end|> that ends it.
    sft_path = tmp_path / "sft.jsonl"
    sft_path.write_text(json.dumps({"messages": convs[1][:3]}) + "\n")
    sft = load_sft(DataConfig(datasets=[DatasetSpec(path=str(sft_path), format="messages")]),
                   tokenizer)
    targets = [t for t, m in zip(sft.input_ids[0], sft.loss_mask[0], strict=True) if m]
    assert tokenizer.decode(targets) == "Paris.<|im_end|>\n"


class _Module:
    """What RewardModel reads of an engine: a device, and a forward."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **inputs):
        return self.model(**inputs)


def test_the_reward_is_read_at_the_eos_not_at_a_pad(smol):
    """pad == EOS: scores come from lengths, at the EOS that ends a response; an exported
    reward model pads with another token, so HF's pooled forward scores the same EOS."""
    tokenizer = models.load_tokenizer(ModelConfig(path=smol["path"]), "reward")
    eos = tokenizer.eos_token_id
    reward = models.build_scalar_model(ModelConfig(path=smol["path"]), "reward", "fp32", 0,
                                       tokenizer.pad_token_id)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                           return_dict=False)
    answer = tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    long = tokenizer(" It is the capital.", add_special_tokens=False)["input_ids"]
    width = len(answer) + 1 + 3
    # Row 0: the answer, its EOS, then pads (== EOS). Row 1: no EOS, cut at the length limit.
    response = torch.tensor([answer + [eos] * 4, (answer + long)[:width]])
    mask = torch.tensor([[1] * (len(answer) + 1) + [0] * 3, [1] * width])
    prompt_ids = torch.tensor([prompt, prompt])
    rollout = Rollout(prompt_ids, torch.ones_like(prompt_ids), response, mask, torch.arange(2))
    with torch.no_grad():
        scores = RewardModel._score(_Module(reward), rollout)
        ids, attn, pos = models.sequence_inputs(prompt_ids, torch.ones_like(prompt_ids),
                                                response, mask)
        per_token = reward(ids, attn, pos)
    at_eos = len(prompt) + len(answer)
    tol = float32_tolerance(per_token)  # the scoring pass drops all-pad columns: other shapes
    assert ids[0, at_eos] == eos and abs(scores[0] - per_token[0, at_eos]) <= tol
    assert abs(scores[1] - per_token[1, -1]) <= tol
    # The classic bug, HF's pooled forward with pad == EOS: "the last token that is not pad"
    # is the one before the EOS, whose value differs.
    hf = reward.hf_model
    assert hf.config.pad_token_id == eos
    with torch.no_grad():
        pooled_at_pad = hf(input_ids=ids[:1], attention_mask=attn[:1]).logits[0, 0]
    assert abs(pooled_at_pad - per_token[0, at_eos - 1]) <= tol
    assert abs(scores[0] - per_token[0, at_eos - 1]) > 100 * tol
    # The export's tokenizer: pad is <|endoftext|>, so right-padding the standard way keeps
    # HF's "last token that is not pad" on the EOS.
    shipped = classifier_tokenizer(tokenizer, reward.config.vocab_size)
    assert shipped.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == eos
    hf.config.pad_token_id = shipped.pad_token_id
    row = ids[0, : at_eos + 1].tolist()
    padded = torch.tensor([row + [shipped.pad_token_id] * 3])
    attention = torch.tensor([[1] * len(row) + [0] * 3])
    with torch.no_grad():
        pooled = hf(input_ids=padded, attention_mask=attention).logits[0, 0]
    assert abs(pooled - scores[0]) <= tol


@pytest.fixture(scope="module")
def world():
    """A one-process world set up as a run sets it up (DeepSpeed's groups included)."""
    from ds_rlhf.coordinator import start_distributed, stop_distributed

    with pytest.MonkeyPatch.context() as mp:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            mp.setenv(key, value)
        coord = start_distributed(5.0)
        yield coord
        stop_distributed()


def test_tied_embeddings_stay_tied_under_zero3_in_the_copy_and_the_export(smol, world,
                                                                          tmp_path):
    cfg = TrainEngineConfig(model=ModelConfig(path=smol["path"]), zero_stage=3, lr=1e-5,
                            micro_batch_size=1)
    tokenizer = models.load_tokenizer(cfg.model, "actor")
    engine = init_engine(models.build_causal_lm(cfg.model, "actor", "fp32", 0), cfg, 1, 1)
    module = engine.module
    assert module.lm_head.weight is module.model.embed_tokens.weight
    ids = torch.tensor([tokenizer.apply_chat_template(QUESTION, return_dict=False)])
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()
    assert module.lm_head.weight is module.model.embed_tokens.weight  # one updated tensor
    # The HybridEngine's generation copy: the gathered training weights, one storage for the
    # embedding and the LM head, nothing held after generation.
    trainer = types.SimpleNamespace(coord=world, actor=types.SimpleNamespace(
        engine=engine, hybrid=HybridEngine(engine, gather_weights=True, synced=None)))
    assert hybrid_copy(trainer) == {"equal": True, "tied": True, "gathered": True,
                                    "numel_after": 0}
    export_hf(engine, module, tokenizer, tmp_path / "actor", is_main=True)
    with safe_open(str(tmp_path / "actor" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # stored once
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "actor")
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        trained = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.items())


def test_gguf_mistakes_are_one_line_before_any_engine(assets, smol, tmp_path, capsys,
                                                      monkeypatch):
    def fails(model: dict, *needles: str) -> None:
        cfg = ppo_config(assets, tmp_path / "out", actor={"model": model})
        capsys.readouterr()
        assert cli_main(["ppo", "--config", str(write_yaml(cfg, tmp_path / "c.yaml"))]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        for needle in needles:
            assert needle in err, err
        assert not (tmp_path / "out").exists()

    name = smol["gguf_file"]
    fails({"gguf_file": name, "init": {"model_type": "llama"}}, "actor.model.gguf_file",
          "set actor.model.path too")
    fails({"path": smol["gguf_dir"], "gguf_file": "SmolLM2.gguf"}, "no file 'SmolLM2.gguf'",
          f"its .gguf files: ['{name}']")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gguf" else find_spec(n, *a))
    fails({"path": smol["gguf_dir"], "gguf_file": name}, "needs the gguf package",
          'pip install -e ".[smol]"')
