"""Multi-turn episodes with a scripted "model" (fixed token sequences per turn): the loss mask,
token-in/token-out, hostile tools (their processes: test_tools.py) and environments (a failed
episode ends alone), zero gradient on observations. Runs
through real DeepSpeed engines: tests/dist/test_grpo_dist.py (agent runs)."""

from __future__ import annotations

import time

import pytest
import torch

from ds_rlhf import algo
from ds_rlhf.config import ConfigError, PPORunConfig, RolloutConfig, load_config
from ds_rlhf.demo import calculator
from ds_rlhf.episodes import EpisodeError, EpisodeRunner, ToolCall, Tools, hermes_parser
from ds_rlhf.generation import generate
from ds_rlhf.rollout import Rollout

TOK = calculator.build_tokenizer()
EOS = TOK.eos_token_id


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """A "model" that answers turn k of prompt p with script[p][k], recording what it saw."""

    def __init__(self, script: dict[int, list[list[int]]]):
        self.script = script
        self.turn = dict.fromkeys(script, 0)
        self.calls: list[tuple[list[list[int]], list[int], int]] = []

    def __call__(self, contexts, prompt_index, sample_index, offsets, max_new_tokens):
        self.calls.append(([list(c) for c in contexts], offsets.tolist(), max_new_tokens))
        out = []
        for p in prompt_index.tolist():
            out.append(self.script[p][self.turn[p]][:max_new_tokens])
            self.turn[p] += 1
        return out, None


def runner(tokenizer=TOK, **rollout) -> EpisodeRunner:
    cfg = RolloutConfig(**{"tools": ["ds_rlhf.demo.calculator:add"], **rollout})
    return EpisodeRunner(cfg, tokenizer, max_new_tokens=24, max_prompt_len=16)


PROMPTS = [ids("user : what is 1 + 2 ? assistant :"), ids("user : what is 5 + 0 ? assistant :")]
ROWS = [{"prompt": "q1", "answer": "3"}, {"prompt": "q2", "answer": "5"}]
CALL_1 = ids(calculator.tool_call(1, 2)) + [EOS]
CALL_2 = ids(calculator.tool_call(3, 4)) + [EOS]
ANSWER = ids("3") + [EOS]
OBS_1, OBS_2 = ids("tool : 3 assistant :"), ids("tool : 7 assistant :")


def run(r: EpisodeRunner, script, prompts=PROMPTS, rows=ROWS):
    model = Scripted(script)
    n = len(prompts)
    rollout, episodes = r.run(model, prompts, rows, torch.arange(n),
                              torch.zeros(n, dtype=torch.long))
    return model, rollout, episodes


def test_loss_mask_covers_exactly_the_models_tokens_over_three_turns():
    model, rollout, episodes = run(runner(max_turns=3),
                                   {0: [CALL_1, CALL_2, ANSWER], 1: [ids("5") + [EOS]]})
    expected = CALL_1 + OBS_1 + CALL_2 + OBS_2 + ANSWER
    n = len(expected)
    assert rollout.response_ids[0, :n].tolist() == expected
    assert rollout.response_mask[0].tolist() == [1] * n
    action = [1] * len(CALL_1) + [0] * len(OBS_1) + [1] * len(CALL_2) + [0] * len(OBS_2) + \
        [1] * len(ANSWER)
    assert rollout.action_mask[0, :n].tolist() == action
    assert rollout.loss_mask[0].tolist() == action
    # row 1 answered at once: one turn, all its tokens the model's, padding after
    assert rollout.loss_mask[1].tolist() == [1, 1] + [0] * (n - 2)
    assert rollout.response_ids[1, :2].tolist() == ids("5") + [EOS]
    # the model saw its own tokens as context, exactly, and drew from its response positions
    assert model.calls[1][0][0] == PROMPTS[0] + CALL_1 + OBS_1
    assert model.calls[1][1] == [len(CALL_1 + OBS_1)]
    assert model.calls[2][1] == [len(CALL_1 + OBS_1 + CALL_2 + OBS_2)]
    e = episodes.episodes
    assert (e[0].turns, e[0].tool_calls, e[0].tool_errors, e[0].truncated) == (3, 2, 0, False)
    assert (e[1].turns, e[1].tool_calls) == (1, 0)
    assert [p["role"] for p in episodes.parts(0, TOK)] == [
        "assistant", "tool", "assistant", "tool", "assistant"]
    assert episodes.parts(0, TOK)[1]["text"] == "tool : 3 assistant :"
    assert episodes.final_texts(TOK) == ["3", "5"]
    assert episodes.stats().tolist() == [2, 4, 2, 0, 0]



class WithLogprobs(Scripted):
    """The scripted model, also giving a sampler logprob per token: -(its position in the turn
    + 1) / 10, so every token's value says where it came from."""

    def __call__(self, *args):
        out, _ = super().__call__(*args)
        return out, [[-(t + 1) / 10 for t in range(len(turn))] for turn in out]


def test_sampler_logprobs_follow_the_models_tokens_and_are_0_on_observations():
    model = WithLogprobs({0: [CALL_1, ANSWER], 1: [ids("5") + [EOS]]})
    rollout, _ = runner(max_turns=3).run(model, PROMPTS, ROWS, torch.arange(2),
                                         torch.zeros(2, dtype=torch.long))
    turn = lambda k: [-(t + 1) / 10 for t in range(k)]  # noqa: E731
    expected = turn(len(CALL_1)) + [0.0] * len(OBS_1) + turn(len(ANSWER))
    n = len(expected)
    assert rollout.sampler_logprobs[0, :n].tolist() == pytest.approx(expected)
    assert rollout.sampler_logprobs[1].tolist() == pytest.approx(turn(2) + [0.0] * (n - 2))
    # a backend without logprobs (the scripted one): the rollout has none
    _, plain, _ = run(runner(max_turns=3), {0: [CALL_1, ANSWER], 1: [ids("5") + [EOS]]})
    assert plain.sampler_logprobs is None

class NoRoundTrip:
    """The calculator tokenizer whose decode writes "+" as "plus", which encodes to <unk>:
    decode then encode does not give the model's tokens back."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def decode(self, token_ids, **kwargs):
        return self.tokenizer.decode(token_ids, **kwargs).replace("+", "plus")


def test_trained_ids_are_the_sampled_ids_with_a_tokenizer_that_does_not_round_trip():
    lossy = NoRoundTrip(TOK)
    turn = ids("+ 7 + { ?") + [EOS]  # no tool call: the answer, full of "+"
    assert lossy(lossy.decode(turn), add_special_tokens=False)["input_ids"] != turn
    call = ids(calculator.tool_call(1, 2) + " +") + [EOS]  # a call, then a stray "+"
    _, rollout, episodes = run(runner(lossy), {0: [call, turn], 1: [turn]})
    row0 = rollout.response_ids[0][rollout.action_mask[0].bool()].tolist()
    assert row0 == call + turn  # the model's tokens, exactly as sampled
    assert rollout.response_ids[1, :len(turn)].tolist() == turn
    assert episodes.episodes[0].tool_calls == 1 and episodes.episodes[0].tool_errors == 0


TOOLS_FILE = '''
import time

def boom(x: int) -> str:
    """Raises.

    Args:
        x: anything
    """
    raise RuntimeError("kaboom")

def slow(x: int) -> str:
    """Sleeps.

    Args:
        x: anything
    """
    time.sleep(5)
    return "late"

def number(x: int) -> str:
    """Returns an int.

    Args:
        x: anything
    """
    return 42

def huge(x: int) -> str:
    """Returns a long text.

    Args:
        x: anything
    """
    return "1 " * 1000

def parse(text):
    """One word per call: what -> boom, is -> slow, + -> number, ? -> huge, user -> an
    unknown tool, { -> a malformed call."""
    names = {"what": "boom", "is": "slow", "+": "number", "?": "huge", "user": "nope"}
    if "{" in text:
        raise ValueError("unbalanced braces")
    return [{"name": names[w], "arguments": {"x": 1}} for w in text.split() if w in names]
'''


@pytest.fixture
def hostile(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(TOOLS_FILE)
    return [f"{path}:{name}" for name in ("boom", "slow", "number", "huge")], f"{path}:parse"


def test_tool_failures_become_error_observations(hostile):
    tools, _ = hostile
    start = time.monotonic()
    results = Tools(tools, timeout=0.3).run(
        [ToolCall(n, {"x": 1}) for n in ("boom", "slow", "number", "huge", "nope")]
        + [ToolCall("boom", {"y": 1})])
    assert time.monotonic() - start < 2.0  # the slow call was abandoned at its timeout
    texts, oks = zip(*results, strict=True)
    assert oks == (False, False, False, True, False, False)
    assert texts[0] == "error: boom raised RuntimeError: kaboom"
    assert texts[1] == "error: slow did not answer within 0.3 s"
    assert texts[2] == "error: number returned int, not a string"
    assert texts[4].startswith("error: no tool named 'nope'")
    assert "TypeError" in texts[5]  # wrong argument name


def test_hostile_tools_and_malformed_calls_end_no_episode(hostile, monkeypatch):
    tools, parser = hostile
    r = runner(tools=tools, tool_parser=parser, tool_timeout=0.3, max_turns=3,
               max_total_tokens=60, max_observation_tokens=50)
    seen = []
    monkeypatch.setattr(r, "encode", lambda text: (seen.append(text), ids(text))[1])
    script = {0: [ids("what is + ?") + [EOS], ids("user {") + [EOS], ANSWER],
              1: [ids("{ {") + [EOS], ids("5") + [EOS]]}
    _, rollout, episodes = run(r, script)
    e = episodes.episodes
    assert (e[0].turns, e[0].tool_calls, e[0].tool_errors) == (3, 5, 5)  # 4 calls, then a
    assert (e[1].turns, e[1].tool_calls, e[1].tool_errors) == (2, 1, 1)  # malformed turn
    assert not any(x.truncated for x in e)
    observations = [s.lstrip() for s in seen if s.lstrip().startswith("tool")]
    assert "tool : error: boom raised RuntimeError: kaboom tool : error: slow did not " \
           "answer within 0.3 s tool : error: number returned int, not a string tool : " \
           "error: the result of huge has more than 50 tokens assistant : " in observations
    assert "tool : error: unbalanced braces assistant : " in observations
    assert rollout.action_mask.sum() == sum(len(t) for t in (*script[0], *script[1]))


def test_limits_cut_episodes_with_the_truncated_flag():
    # max_total_tokens: the second call's observation does not fit
    budget = len(CALL_1 + OBS_1 + CALL_2) + 2
    _, rollout, episodes = run(runner(max_turns=4, max_total_tokens=budget),
                               {0: [CALL_1, CALL_2, ANSWER], 1: [ids("5") + [EOS]]})
    e = episodes.episodes[0]
    assert e.truncated and e.turns == 2 and len(e.response) == budget
    assert rollout.response_mask[0].sum() == budget
    assert rollout.action_mask[0, -2:].tolist() == [0, 0]  # the cut observation
    # max_turns with a call pending; a turn without EOS (at max_new_tokens) is a turn
    _, _, episodes = run(runner(max_turns=1), {0: [CALL_1], 1: [ids("5 5")]})
    assert [x.truncated for x in episodes.episodes] == [True, False]
    assert episodes.stats().tolist() == [2, 2, 1, 0, 1]
    assert episodes.final_texts(TOK) == [calculator.tool_call(1, 2), "5 5"]


ENV_FILE = '''
class Countdown:
    """Three model turns; each gets reward 0.5 and the observation "what"."""

    def reset(self, row):
        self.left = 3
        if row["answer"] == "boom":
            raise KeyError("no such puzzle")
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, action):
        self.left -= 1
        if action == "?":
            return "bad"
        return "what", 0.5, self.left == 0
'''


@pytest.fixture
def env(tmp_path):
    path = tmp_path / "env.py"
    path.write_text(ENV_FILE)
    return f"{path}:Countdown"


def test_environment_episodes(env):
    r = runner(tools=[], environment=env, max_turns=5)
    rows = [{"prompt": "what is 1 + 2 ?", "answer": "3"}, {"prompt": "what is", "answer": "5"}]
    turn = ids("7") + [EOS]
    model, rollout, episodes = run(r, {0: [turn] * 3, 1: [turn] * 3}, rows=rows)
    assert model.calls[0][0][0] == ids("user : what is 1 + 2 ? assistant :")  # reset's prompt
    assert rollout.prompt_ids[0][rollout.prompt_mask[0].bool()].tolist() == model.calls[0][0][0]
    assert episodes.env_rewards() == [1.5, 1.5]
    assert [p["role"] for p in episodes.parts(0, TOK)] == [
        "assistant", "environment", "assistant", "environment", "assistant"]
    assert rollout.action_mask[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1]


def test_a_failed_episode_ends_alone_and_names_the_environment_and_row(env):
    """reset() raising (row 1) and step() answering wrongly (row 2, its second turn) fail
    those episodes only: row 0 plays to its end; the failed rows are still rollout rows."""
    r = runner(tools=[], environment=env, max_turns=5)
    rows = [{"prompt": "what is", "answer": "3"}, {"prompt": "what", "answer": "boom"},
            {"prompt": "what is", "answer": "3"}]
    prompts = [*PROMPTS, ids("user : what is 3 + 4 ? assistant :")]
    turn, what = ids("7") + [EOS], ids("what")
    _, rollout, episodes = run(r, {0: [turn] * 3, 2: [turn, ids("?") + [EOS]]},
                               prompts=prompts, rows=rows)
    assert episodes.failed.tolist() == [False, True, True]
    ok, reset, step = episodes.errors
    assert ok is None and reset.source == step.source == "episode"
    where = f"environment {env!r} (rollout.environment): "
    assert reset.kind == where + "reset() raised KeyError: 'no such puzzle'"
    assert reset.row == "the row of prompt index 1 ('what')"
    assert step.kind == where + "step() returned 'bad', not a tuple (observation, reward, done)"
    assert step.row == "the row of prompt index 2 ('what is')"
    assert episodes.episodes[1].error is reset
    e = episodes.episodes
    assert (e[0].turns, e[0].env_reward, e[0].done) == (3, 1.5, True)
    assert rollout.action_mask[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    # reset failed: the row's dataset prompt and one token, in no loss
    assert rollout.prompt_ids[1][rollout.prompt_mask[1].bool()].tolist() == prompts[1]
    assert rollout.response_lengths.tolist() == [8, 1, 5]
    assert rollout.loss_mask[1].sum() == 0 and e[1].turns == 0
    assert episodes.final_texts(TOK)[1] == ""
    # step failed on the second turn: what the episode had, in no loss either
    assert rollout.response_ids[2, :5].tolist() == turn + what + ids("?") + [EOS]
    assert rollout.loss_mask[2].sum() == 0 and e[2].turns == 2


def test_an_environment_that_cannot_be_built_stops_the_run(tmp_path):
    """The constructor is the setup, not one episode: EpisodeError, as every rank raises it
    together (rewards.raise_together)."""
    path = tmp_path / "env.py"
    path.write_text("class Needy:\n    def __init__(self, size):\n        pass\n")
    r = runner(tools=[], environment=f"{path}:Needy")
    with pytest.raises(EpisodeError, match=r"environment .*Needy.* \(rollout.environment\): "
                       r"__init__\(\) raised TypeError: .*size"):
        run(r, {0: [ANSWER], 1: [ANSWER]})


DONE_FILE = '''
import numpy
import torch

class Done:
    """Ends after one turn when row["done"] (a Python expression) says so."""

    def reset(self, row):
        self.done = eval(row["done"])
        return row["prompt"]

    def step(self, action):
        return "what", 0.5, self.done
'''


def test_done_must_be_a_bool(tmp_path):
    """done="False" ended every episode after one turn; a bool (numpy's, a torch scalar
    too) is an answer, anything else fails the episode naming the environment."""
    path = tmp_path / "env.py"
    path.write_text(DONE_FILE)
    r = runner(tools=[], environment=f"{path}:Done", max_turns=2)
    dones = ["'False'", "True", "numpy.bool_(True)", "torch.tensor(True)", "1", "None",
             "numpy.bool_(False)", "torch.tensor([True])"]
    rows = [{"prompt": "what is", "done": d} for d in dones]
    prompts = [ids("user : what is assistant :")] * len(rows)
    turn = ids("7") + [EOS]
    _, _, episodes = run(r, {i: [turn, turn] for i in range(len(rows))}, prompts=prompts,
                         rows=rows)
    assert episodes.failed.tolist() == [True, False, False, False, True, True, False, True]
    kinds = [f.kind for f in episodes.errors if f is not None]
    assert kinds[0] == (f"environment '{path}:Done' (rollout.environment): step() returned "
                        "done 'False' (str); return a bool")
    assert kinds[1:] == [kinds[0].replace("'False' (str)", x) for x in
                         ("1 (int)", "None (NoneType)", "tensor([True]) (Tensor)")]
    assert [e.turns for e in episodes.episodes] == [1, 1, 1, 1, 1, 1, 2, 1]


def test_an_environment_message_of_role_assistant_is_not_trained(tmp_path):
    """An observation is the environment's, whatever its messages' role: a scripted
    assistant turn (a forced prefix) is context, 0 in the action mask and the loss."""
    path = tmp_path / "env.py"
    path.write_text("class Prefix:\n"
                    "    def reset(self, row):\n"
                    "        return row['prompt']\n"
                    "    def step(self, action):\n"
                    "        return [{'role': 'assistant', 'content': '5'}], 0.0, action == '3'\n")
    r = runner(tools=[], environment=f"{path}:Prefix", max_turns=3)
    turn, answer = ids("7") + [EOS], ids("3") + [EOS]
    model, rollout, episodes = run(r, {0: [turn, answer], 1: [answer]})
    observation = ids(" assistant : 5") + [EOS] + ids("assistant :")
    assert model.calls[1][0][0] == model.calls[0][0][0] + turn + observation  # seen
    expected = [1] * len(turn) + [0] * len(observation) + [1] * len(answer)
    assert rollout.action_mask[0].tolist() == expected
    assert rollout.loss_mask[0].tolist() == expected
    assert rollout.action_mask[1].tolist() == [1, 1] + [0] * (len(expected) - 2)
    assert [p["role"] for p in episodes.parts(0, TOK)] == ["assistant"] * 3  # as displayed


def test_hermes_parser():
    assert hermes_parser("no call") == []
    assert hermes_parser('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                         '<tool_call>{"name": "g"}</tool_call>') == [
        ToolCall("f", {"x": 1}), ToolCall("g", {})]
    for bad in ("<tool_call>{oops}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                '<tool_call>{"name": "f"}'):
        with pytest.raises(ValueError):
            hermes_parser(bad)


def test_observation_tokens_get_zero_gradient():
    """Perturbing everything at observation positions (old logprobs, advantages, reference
    logprobs) changes neither the losses nor any gradient, and their gradient is 0."""
    torch.manual_seed(0)
    response_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    action_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    r = Rollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1),
                response_ids=torch.zeros(2, 7, dtype=torch.long), response_mask=response_mask,
                prompt_index=torch.arange(2), action_mask=action_mask)
    mask = r.loss_mask
    observation = (response_mask == 1) & (action_mask == 0)
    logits = torch.randn(2, 7, requires_grad=True)  # stands in for the model's logprobs
    old, adv, ref = torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 7)

    def losses(old, adv, ref):
        logits.grad = None
        logprobs = torch.nn.functional.logsigmoid(logits)
        loss = algo.policy_loss(logprobs, old, adv, mask, 0.2, num_tokens=mask.sum())[0] + \
            algo.kl_loss(logprobs, ref, mask, "k3", num_tokens=mask.sum())[0]
        loss.backward()
        return loss.detach(), logits.grad.clone()

    loss, grad = losses(old, adv, ref)
    noise = torch.where(observation, 100.0, 0.0)
    loss2, grad2 = losses(old + noise, adv - noise, ref + noise)
    assert loss2 == loss
    assert torch.equal(grad2, grad)
    assert grad[observation].abs().max() == 0
    assert grad[mask.bool()].abs().min() > 0


def test_position_offset_draws_later_positions_of_the_same_stream():
    """A later turn draws the uniforms of its response positions: offset 0 is the default,
    and a row's draws at offset k are the stream's draws from position k on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=32))
    model.eval()
    prompt, mask = torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)
    kw = dict(step=1, seed=7, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    base = generate(model, prompt, mask, torch.tensor([0]), **kw)[0]
    zero = generate(model, prompt, mask, torch.tensor([0]), position_offset=torch.tensor([0]),
                    **kw)[0]
    assert torch.equal(base, zero)
    # continuing from the first 2 tokens at offset 2 samples what the full call sampled
    cont = generate(model, torch.cat([prompt, base[:, :2]], 1), torch.ones(1, 4).long(),
                    torch.tensor([0]), position_offset=torch.tensor([2]),
                    **{**kw, "max_new_tokens": 4})[0]
    assert torch.equal(cont, base[:, 2:])


def test_rollout_config_is_checked_before_any_engine(tmp_path):
    base = {"actor": {"model": {"init": {"vocab_size": 8}}}, "data": {"datasets": [
        {"path": "x.jsonl"}]}, "rewards": [{"function": "m:f"}],
        "ppo": {"advantage_estimator": "rloo"}, "generation": {"n_samples_per_prompt": 2}}

    def check(**rollout):  # load_config runs check_values
        load_config(None, {**base, "rollout": rollout}, cls=PPORunConfig)

    check(tools=["m:f"], max_turns=3)
    for bad, match in [
        ({"tools": ["m:f"], "environment": "e.py:E"}, "rollout.tools: an episode has tools"),
        ({"tools": ["nope"]}, r"rollout.tools\[0\]: 'nope' is not"),
        ({"max_turns": 3}, "rollout.max_turns: is an episode setting"),
        ({"tools": ["m:f"], "max_turns": 0}, "rollout.max_turns: must be at least 1"),
        ({"tools": ["m:f"], "tool_timeout": 0}, "rollout.tool_timeout"),
        ({"tools": ["m:f"], "tool_workers": 0}, "rollout.tool_workers: must be at least 1"),
        ({"tool_workers": 2}, "rollout.tool_workers: is an episode setting"),
        ({"tools": ["m:f"], "tool_parser": "json"}, "rollout.tool_parser"),
        ({"tools": ["m:f"], "max_total_tokens": 64}, "generation.max_new_tokens: 128"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check(**bad)
    no_reward = {**base, "rewards": [], "rollout": {"environment": "e.py:E"}}
    load_config(None, no_reward, cls=PPORunConfig)  # the environment's reward suffices
    gather = {**base, "generation": {"gather_weights": False, "n_samples_per_prompt": 2},
              "rollout": {"tools": ["m:f"]}}
    load_config(None, {**gather, "actor": {**base["actor"], "zero_stage": 2}},
                cls=PPORunConfig)  # ZeRO-2 generates on the module itself, no collectives
    gather["actor"] = {**base["actor"], "zero_stage": 3}
    with pytest.raises(ConfigError, match="generation.gather_weights"):
        load_config(None, gather, cls=PPORunConfig)


def test_tools_without_schema_or_chat_template_fail_at_build(tmp_path):
    path = tmp_path / "t.py"
    path.write_text("def f(x):\n    return x\n")
    with pytest.raises(EpisodeError, match=r"tool .*t.py:f.* no JSON schema"):
        runner(tools=[f"{path}:f"])
    with pytest.raises(EpisodeError, match="not found"):
        runner(tools=[f"{tmp_path}/missing.py:f"])
    plain = calculator.build_tokenizer()
    plain.chat_template = None
    with pytest.raises(EpisodeError, match="no chat template"):
        runner(plain)


def test_example_environment_guess_number():
    """ds_rlhf/demo/guess_env.py, the documented example: hints until the right guess."""
    r = runner(tools=[], environment="ds_rlhf.demo.guess_env:GuessNumber", max_turns=6)
    rows = [{"prompt": "what is", "secret": 37}, {"prompt": "what is", "secret": 3}]
    script = {0: [ids(x) + [EOS] for x in ("50", "25", "37")],
              1: [ids(x) + [EOS] for x in ("what", "3")]}
    model, rollout, episodes = run(r, script, rows=rows)
    assert episodes.env_rewards() == pytest.approx([0.9, 0.95])
    assert [e.turns for e in episodes.episodes] == [3, 2]
    hint = ids("user : higher assistant :")  # "higher": <unk> in this vocabulary
    assert model.calls[1][0][0] == ids("user : what is assistant :") + script[0][0] + hint
    assert [p["role"] for p in episodes.parts(0, TOK)] == [
        "assistant", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("estimator", ["gae", "reinforce_pp"])
def test_returns_and_gae_run_over_the_models_tokens_only(estimator):
    """With observations between the model's turns, returns-to-go and GAE equal those of the
    model's tokens side by side (observations skipped, not a stop), and are 0 on them."""
    from types import SimpleNamespace

    from ds_rlhf.trainers.ppo import PPOTrainer

    torch.manual_seed(0)
    action = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0, 0, 0]])
    response = torch.tensor([[1] * 7 + [0], [1, 1, 1, 1, 0, 0, 0, 0]])

    def rollout(action, response, old, ref, values):
        return Rollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long),
                       prompt_mask=torch.ones(2, 1, dtype=torch.long),
                       response_ids=torch.zeros_like(response), response_mask=response,
                       prompt_index=torch.arange(2), action_mask=action,
                       old_logprobs=old, ref_logprobs=ref, values=values,
                       scores=torch.tensor([1.0, -2.0]))

    old, ref, values = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    cfg = load_config(None, {"actor": {"model": {"init": {}}}, "critic": {"model": {"init": {}}},
                             "data": {"datasets": [{"path": "x"}]},
                             "rewards": [{"function": "m:f"}],
                             "ppo": {"advantage_estimator": estimator, "kl_coef": 0.1,
                                     "whiten_advantages": False, "gamma": 0.9, "lam": 0.8}},
                      cls=PPORunConfig)
    trainer = SimpleNamespace(cfg=cfg, ref=object(), kl_ctl=SimpleNamespace(value=0.1))
    episode = rollout(action, response, old, ref, values)
    PPOTrainer.advantages(trainer, episode)
    # the same model tokens, side by side, no observations
    model = (action * response).bool()

    def side_by_side(t):  # row i's model tokens first, zeros after
        return torch.stack([torch.nn.functional.pad(t[i][model[i]], (0, 8 - int(model[i].sum())))
                            for i in range(2)])

    packed = [side_by_side(t) for t in (old, ref, values)]
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, :5], mask[1, :3] = 1, 1
    side = rollout(None, mask, *packed)
    PPOTrainer.advantages(trainer, side)
    torch.testing.assert_close(episode.advantages[model], side.advantages[mask.bool()])
    assert episode.advantages[~model].abs().max() == 0
    if estimator == "gae":
        torch.testing.assert_close(episode.returns[model], side.returns[mask.bool()])


def test_a_setup_failure_on_one_rank_stops_every_rank():
    """rewards.raise_together, as a rank without an error sees it: the other rank's
    EpisodeError (its environment could not be built), its type and message (naming that
    rank), raised here too."""
    from ds_rlhf.rewards import raise_together

    class OtherRankFailed:  # rank 0's view of a 2-rank run whose rank 1 failed
        rank = 0

        def any(self, flag):
            return True

        def gather_objects(self, items):
            assert items == []
            return [(EpisodeError, "environment 'e.py:E' (rollout.environment): __init__() "
                     "raised KeyError (on rank 1)")]

    with pytest.raises(EpisodeError, match=r"__init__\(\) raised KeyError \(on rank 1\)") \
            as info:
        raise_together(OtherRankFailed(), None)
    assert info.value.every_rank
    raise_together(None, None)  # one process, no error: nothing


def test_observations_follow_the_chat_template_after_the_models_eos():
    """A Qwen-like template writes a newline after each <|im_end|> (here <eos>): an
    observation after the model's EOS starts with it, as the SFT rendering has it."""
    qwen = calculator.build_tokenizer()
    qwen.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                          "{{ m['content'] }}<eos>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tool = [{"role": "tool", "content": "82"}]
    from ds_rlhf.episodes import render_delta

    assert render_delta(qwen, tool) == "\n<|im_start|>tool\n82<eos>\n<|im_start|>assistant\n"
    assert render_delta(qwen, tool, after_eos=False) == \
        "<|im_start|>tool\n82<eos>\n<|im_start|>assistant\n"
    assert render_delta(TOK, tool) == " tool : 82 assistant : "  # the demo's: a space
