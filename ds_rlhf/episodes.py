"""Multi-turn episodes: the model acts, a tool or an environment answers, for several turns.

    runner = build_episodes(cfg.rollout, tokenizer, cfg.generation.max_new_tokens)  # checks
    rollout, episodes = runner.run(actor_backend(actor, step), prompt_ids, rows,
                                   prompt_index, sample_index, coord)

Two ways to define an episode (rollout.tools or rollout.environment, see config.py):

  tools        plain Python functions with type hints and a docstring, returning str. Their
               JSON schemas (transformers' get_json_schema) go to the chat template
               (`tools=`, where the prompts are rendered). After each model turn the tool
               calls are parsed from its text (rollout.tool_parser; "hermes" reads
               <tool_call>{"name": ..., "arguments": {...}}</tool_call>), run, and their
               results appended as `tool` messages. The episode ends at a turn without a
               tool call, or at rollout.max_turns.
  environment  a class; one instance per episode. `reset(row) -> str | list[message]` gives
               the prompt (row: the dataset row, {"prompt": text, **other columns}, the
               columns reward functions see); `step(action_text) -> (observation, reward,
               done)` answers each model turn. The rewards of all steps add up to the
               episode's environment reward (rewards/environment/mean).

A model turn ends at the tokenizer's EOS or after generation.max_new_tokens tokens. An
episode is cut (episode/truncated) when it reaches rollout.max_total_tokens response tokens
(model turns and observations), or rollout.max_turns with a tool call or observation pending.

Token in, token out: the model's tokens are appended exactly as sampled, never decoded and
re-encoded (decoding is only for parsing); observations (tool results, environment text)
are encoded once and appended. `Rollout.action_mask` is 1 on the model's tokens, 0 on
observations: only the model's tokens enter the losses, KL terms and token counts. Who
produced a token decides (Episode.act / Episode.observe), never a message's role: an
environment's "assistant" message (a scripted turn) is an observation like any other.

Generation is behind one interface (`TurnBackend`): prompt token ids and per-row seeds in,
response token ids out. Token t of a turn draws the uniform of its position in the episode's
response (generation.generate's position_offset), so sampling stays a function of (seed,
prompt, sample, step, position): 1 rank equals 2 ranks, and a resumed run repeats.

Hostile tools: a tool that raises, runs past rollout.tool_timeout (calls run in worker
processes, ds_rlhf/tool_worker.py; one past its time is killed with its process and the
worker replaced), ends its process, returns a non-string or a result over
rollout.max_observation_tokens, an unknown tool and a malformed call all become an error
observation the model sees (episode/tool_errors). An environment that raises or answers
wrongly in reset() or step() fails that episode only: it ends there, Episode.error names the
environment, the method and the row, and the trainer drops the row (Episodes.failed,
rollout.max_failed_fraction). A setup error (the environment class cannot be built, the
tool workers cannot import the tools) stops every rank with `EpisodeError` (exit 2) after
all episodes of the step have ended; no collective runs inside an episode.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe
from multiprocessing.connection import wait as connection_wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ds_rlhf.config import RolloutConfig, UserInputError
from ds_rlhf.rewards import load_function, raise_together
from ds_rlhf.rollout import Rollout, RowFailure

# (context ids per row, prompt_index [b], sample_index [b], position_offset [b],
#  max_new_tokens) -> (the new tokens of each row, up to and including its EOS; the sampler's
#  log-probability of each of them, or None when the backend has none).
TurnOutput = tuple[list[list[int]], list[list[float]] | None]
TurnBackend = Callable[[list[list[int]], Tensor, Tensor, Tensor, int], TurnOutput]


class EpisodeError(UserInputError):
    """A tool set, parser or environment that cannot run; names it (and the row)."""

    every_rank = False  # set when all ranks raise it together (rewards.raise_together)


@dataclass
class ToolCall:
    name: str
    arguments: dict


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def hermes_parser(text: str) -> list[ToolCall]:
    """Tool calls in Hermes / Qwen form: <tool_call>{"name": ..., "arguments": {...}}
    </tool_call>, any number of them. Raises ValueError on a malformed call (bad JSON, no
    name, arguments not an object, an unclosed tag)."""
    calls = []
    for body in _HERMES.findall(text):
        try:
            call = json.loads(body.strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call is not valid JSON ({e}): {body.strip()[:200]!r}") \
                from e
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"tool call has no \"name\" string: {body.strip()[:200]!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ValueError(f"tool call arguments are not valid JSON ({e})") from e
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call arguments must be an object, got {arguments!r}")
        calls.append(ToolCall(call["name"], arguments))
    if not calls and "<tool_call>" in text:
        raise ValueError("<tool_call> without a closing </tool_call>")
    return calls


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(eq=False)
class _Worker:
    """A tool worker process (ds_rlhf/tool_worker.py) and its socket."""

    proc: subprocess.Popen
    conn: Connection
    ready: bool = False  # it said ("ready",): its tools are imported
    call: int = -1  # the call it runs (index into Tools.run's calls)
    deadline: float = 0.0  # when that call (or, not ready, its start) has run too long


_WORKER = str(Path(__file__).with_name("tool_worker.py"))
_START_SECONDS = 120.0  # a worker that has not imported the tools by then: a setup error


class Tools:
    """The run's tool functions by name, their schemas, and calls under a timeout.

    Calls run in worker processes (ds_rlhf/tool_worker.py, at most `workers`, started at
    first use and kept): a call past its `timeout` is killed with its process (a thread
    cannot be: a tool stuck in C, holding the GIL, held the whole rank) and the worker
    replaced at once, so no abandoned work keeps running. A pool rather than one process
    per call: a process starts once, not at every call, and `workers` bounds what a turn of
    many rows puts on a node's CPUs. Workers are plain subprocesses of `python -I`, not
    multiprocessing's: spawn and forkserver re-import the rank's __main__ in the child (a
    training script without a main guard would start training again), fork copies a rank
    with CUDA and DeepSpeed threads. They die with the rank (PR_SET_PDEATHSIG; the rank's
    thread that first ran tools must stay alive, as the main thread does) and at close()."""

    def __init__(self, refs: Sequence[str], timeout: float, workers: int = 8):
        from transformers.utils import get_json_schema

        self.timeout = timeout
        self.max_workers = workers
        self.refs: dict[str, str] = {}  # tool name -> import ref, for the workers
        self.schemas: list[dict] = []
        for i, ref in enumerate(refs):
            what = f"tool {ref!r} (rollout.tools[{i}])"
            fn = load_function(ref, f"rollout.tools[{i}]", what, EpisodeError)
            try:
                schema = get_json_schema(fn)
            except Exception as e:  # no docstring, an argument without a type or description
                raise EpisodeError(f"{what}: no JSON schema ({e}); give it type hints and a "
                                   "Google-style docstring with an Args: section") from e
            name = schema["function"]["name"]
            if name in self.refs:
                raise EpisodeError(f"{what}: a second tool named {name!r}; rename one")
            module, _, fn_name = ref.rpartition(":")
            if module.endswith(".py"):  # the same file whatever the worker's folder
                ref = f"{Path(module).resolve()}:{fn_name}"
            self.refs[name] = ref
            self.schemas.append(schema)
        self.workers: list[_Worker] = []  # alive: idle ones are in self.idle too
        self.idle: list[_Worker] = []
        self._close = weakref.finalize(self, _end_all, self.workers, os.getpid())

    def close(self) -> None:
        """Ends the worker processes (also at exit, or when this object is collected)."""
        self._close()

    def run(self, calls: Sequence[ToolCall]) -> list[tuple[str, bool]]:
        """(result text, ok) of each call, all calls in parallel (up to `workers`), each
        with `timeout` seconds; a failure becomes an error text, never an exception (only
        workers that cannot start at all raise EpisodeError: the setup is wrong)."""
        results: list[tuple[str, bool] | None] = [None] * len(calls)
        queue = deque()
        for k, call in enumerate(calls):
            if call.name in self.refs:
                queue.append(k)
            else:
                results[k] = (f"error: no tool named {call.name!r}; the tools are "
                              f"{', '.join(sorted(self.refs))}", False)
        running: dict[Connection, _Worker] = {}
        try:
            while queue or running:
                while queue and (self.idle or len(self.workers) < self.max_workers):
                    worker = self._worker()
                    worker.call = k = queue.popleft()
                    worker.deadline = time.monotonic() + (
                        self.timeout if worker.ready else _START_SECONDS)
                    running[worker.conn] = worker
                    try:
                        worker.conn.send((calls[k].name, calls[k].arguments))
                    except OSError:  # it died since: its recv below says so
                        pass
                wait = min(w.deadline for w in running.values()) - time.monotonic()
                for conn in connection_wait(list(running), max(wait, 0.0)):
                    worker = running[conn]
                    name = calls[worker.call].name
                    try:
                        answer = conn.recv()
                    except (EOFError, OSError):  # the tool ended its process
                        del running[conn]
                        results[worker.call] = (f"error: {name} ended its process (exit "
                                                f"code {self._end(worker, wait=True)})", False)
                        continue
                    if not worker.ready:  # its start, not yet the call's answer
                        if answer[0] != "ready":
                            raise EpisodeError(f"rollout.tools: a tool worker process cannot "
                                               f"import {answer[1]}")
                        worker.ready = True
                        worker.deadline = time.monotonic() + self.timeout
                        continue
                    del running[conn]
                    results[worker.call] = answer
                    self.idle.append(worker)
                now = time.monotonic()
                for conn, worker in list(running.items()):
                    if worker.deadline <= now:
                        if not worker.ready:
                            raise EpisodeError(f"a tool worker process did not import the "
                                               f"tools within {_START_SECONDS:g} s")
                        del running[conn]
                        self._end(worker)
                        results[worker.call] = (f"error: {calls[worker.call].name} did not "
                                                f"answer within {self.timeout:g} s", False)
                        self.idle.append(self._start())  # starts while the model generates
        finally:  # an exception (or ^C) leaves no call running to answer a later run
            for worker in running.values():
                self._end(worker)
        return [r for r in results]  # type: ignore[misc]

    def _worker(self) -> _Worker:
        """An idle worker (possibly still starting), or a new one."""
        while self.idle:
            worker = self.idle.pop()
            if worker.proc.poll() is None:
                return worker
            self._end(worker)  # killed from outside while idle
        return self._start()

    def _start(self) -> _Worker:
        ours, theirs = Pipe()
        proc = subprocess.Popen([sys.executable, "-I", _WORKER, str(theirs.fileno()),
                                 str(os.getpid())], pass_fds=[theirs.fileno()],
                                stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        ours.send((sys.path, self.refs))
        worker = _Worker(proc, ours)
        self.workers.append(worker)
        return worker

    def _end(self, worker: _Worker, wait: bool = False) -> int | None:
        """Kill a worker and what it started (its process group); its exit code. `wait`:
        it is ending on its own, give it a moment to say with which code."""
        if wait:
            try:
                worker.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        _kill(worker)
        self.workers.remove(worker)
        return worker.proc.returncode


def _kill(worker: _Worker) -> None:
    """SIGKILL to its process group: the worker and what its tool started."""
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)  # its group id, held while one lives
    except ProcessLookupError:  # ended, and nothing of its group is left
        pass
    worker.proc.wait()
    worker.conn.close()


def _end_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child, whose copies these are not
        for worker in workers:
            _kill(worker)
        workers.clear()


_STAND_IN = "ds_rlhf_stand_in_turn"


def render_delta(tokenizer, messages: list[dict], after_eos: bool = True) -> str:
    """The text the chat template adds for `messages` after an assistant turn, up to the next
    generation prompt: how tool results and message observations are appended. Rendered
    after a fixed stand-in conversation, so it depends on `messages` alone. `after_eos`: the
    model's turn ended with the EOS token, so what the template writes after an assistant's
    EOS (Qwen's newline after <|im_end|>) comes first, as in the SFT data's rendering."""
    if tokenizer.chat_template is None:
        raise EpisodeError(f"tokenizer {tokenizer.name_or_path!r} has no chat template, "
                           "which tool results and message observations are rendered with")
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _STAND_IN}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + list(messages), tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise EpisodeError("the chat template renders a conversation differently once "
                           f"{messages[0]['role']!r} messages follow, so they cannot be "
                           "appended to an episode; use string observations")
    tail = before[before.rfind(_STAND_IN) + len(_STAND_IN):]  # after an assistant's text
    eos = tokenizer.eos_token or ""
    suffix = tail[tail.index(eos) + len(eos):] if after_eos and eos and eos in tail else ""
    return suffix + after[len(before):]


@dataclass
class Episode:
    """One row's episode: the prompt, then every token after it, whose they are."""

    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)  # model turns and observations
    action: list[int] = field(default_factory=list)  # 1: the model's token, 0: observation
    sampler_logprobs: list[float] = field(default_factory=list)  # 0.0 on observations
    parts: list[tuple[str, int]] = field(default_factory=list)  # (role, tokens) in order,
    # the role for display (samples.jsonl): an observation's first message's
    last_turn: list[int] = field(default_factory=list)  # the model's last turn
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    env_reward: float = 0.0
    truncated: bool = False  # cut by max_total_tokens, or max_turns with a call pending
    done: bool = False
    error: RowFailure | None = None  # the environment failed in this episode: it ended

    def act(self, ids: list[int], logprobs: list[float] | None) -> None:
        """The model's turn: its tokens are the trained ones (action 1)."""
        self.last_turn, self.turns = ids, self.turns + 1
        self._append("assistant", ids, 1, logprobs)

    def observe(self, role: str, ids: list[int]) -> None:
        """What a tool or the environment answered: context, never trained (action 0),
        whatever the role of its messages (an environment may script an assistant turn)."""
        self._append(role, ids, 0, None)

    def _append(self, role: str, ids: list[int], action: int,
                logprobs: list[float] | None) -> None:
        self.response += ids
        self.sampler_logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.action += [action] * len(ids)
        self.parts.append((role, len(ids)))

    def fail(self, failure: RowFailure, eos: int) -> None:
        """End the episode as failed. Its row stays a valid rollout row (the trainer drops
        it): the response it has, or one token if none, and nothing of it in any loss."""
        self.error, self.done = failure, True
        if not self.response:
            self._append("environment", [eos], 0, None)
        self.action = [0] * len(self.response)


@dataclass
class Episodes:
    """A step's finished episodes on this rank (row i of the rollout is episodes[i])."""

    episodes: list[Episode]
    env_seconds: float  # time in tools and environment calls

    def final_texts(self, tokenizer) -> list[str]:
        """The model's last turn of each episode, decoded without its EOS: the completion
        reward functions see."""
        out = []
        for e in self.episodes:
            ids = e.last_turn[:-1] if e.last_turn[-1:] == [tokenizer.eos_token_id] \
                else e.last_turn
            out.append(tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def env_rewards(self) -> list[float]:
        return [e.env_reward for e in self.episodes]

    @property
    def failed(self) -> Tensor:
        """[B] bool: the rows whose episode failed (the environment raised or answered
        wrongly); the trainer leaves them out of the update (rollout.max_failed_fraction)."""
        return torch.tensor([e.error is not None for e in self.episodes], dtype=torch.bool)

    @property
    def errors(self) -> list[RowFailure | None]:
        """Why each row's episode failed, None where it did not."""
        return [e.error for e in self.episodes]

    def parts(self, i: int, tokenizer) -> list[dict]:
        """Episode i as [{"role", "text"}] in order: samples.jsonl."""
        e, start, out = self.episodes[i], 0, []
        for role, n in e.parts:
            out.append({"role": role, "text": tokenizer.decode(e.response[start:start + n])})
            start += n
        return out

    def stats(self) -> Tensor:
        """Sums over this rank: [episodes, turns, tool calls, tool errors, truncated]."""
        es = self.episodes
        return torch.tensor([len(es), sum(e.turns for e in es), sum(e.tool_calls for e in es),
                             sum(e.tool_errors for e in es), sum(e.truncated for e in es)],
                            dtype=torch.float64)


def episode_metrics(totals: Sequence[float]) -> dict[str, float]:
    """The metrics of Episodes.stats summed over ranks."""
    n, turns, calls, errors, truncated = totals
    n = n or float("nan")
    return {"episode/turns_mean": turns / n, "episode/tool_calls_mean": calls / n,
            "episode/tool_errors": errors, "episode/truncated": truncated / n}


def _check_step(answer: Any, what: str) -> tuple[Any, float, bool]:
    if not (isinstance(answer, tuple) and len(answer) == 3):
        raise EpisodeError(f"{what} returned {_short(str(answer))}, not a tuple (observation, "
                           "reward, done)")
    observation, reward, done = answer
    if not isinstance(observation, (str, list)):
        raise EpisodeError(f"{what} returned an observation of type "
                           f"{type(observation).__name__}; return a str or a list of messages")
    if not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise EpisodeError(f"{what} returned reward {reward!r}; expected a finite number")
    if isinstance(done, Tensor) and done.dtype == torch.bool and done.dim() == 0:
        done = bool(done)  # a torch scalar: fine, as numpy's bool is
    if not isinstance(done, (bool, np.bool_)):  # bool("False") is True: no guessing
        raise EpisodeError(f"{what} returned done {repr(done)[:60]} "
                           f"({type(done).__name__}); return a bool")
    return observation, float(reward), bool(done)


class EpisodeRunner:
    """Runs a step's episodes on one rank (module doc)."""

    def __init__(self, cfg: RolloutConfig, tokenizer, max_new_tokens: int,
                 max_prompt_len: int):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens  # per model turn (generation.max_new_tokens)
        self.max_prompt_len = max_prompt_len
        self.eos = tokenizer.eos_token_id
        self.tools = Tools(cfg.tools, cfg.tool_timeout, cfg.tool_workers) \
            if cfg.tools else None
        self.env_cls = None
        if cfg.environment is not None:
            self.env_cls = load_function(cfg.environment, "rollout.environment",
                                         f"environment {cfg.environment!r}", EpisodeError)
            if not inspect.isclass(self.env_cls):
                raise EpisodeError(f"environment {cfg.environment!r} is not a class; give a "
                                   "class with reset(row) and step(action_text)")
        if cfg.tool_parser == "hermes":
            self.parser: Callable[[str], list] = hermes_parser
        else:
            self.parser = load_function(cfg.tool_parser, "rollout.tool_parser",
                                        f"tool parser {cfg.tool_parser!r}", EpisodeError)
        if self.tools is not None:  # fail now, not in the first step
            render_delta(tokenizer, [{"role": "tool", "name": "t", "content": "0"}])

    def close(self) -> None:
        """Ends the tool worker processes (at the end of a run; at exit anyway)."""
        if self.tools is not None:
            self.tools.close()

    @property
    def schemas(self) -> list[dict] | None:
        """The tools' JSON schemas for the chat template, or None."""
        return None if self.tools is None else self.tools.schemas

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------------------------------

    def run(self, backend: TurnBackend, prompt_ids: list[list[int]], rows: list[dict],
            prompt_index: Tensor, sample_index: Tensor, coord=None,
            pad_token_id: int = 0) -> tuple[Rollout, Episodes]:
        """Every row's episode to its end, then one Rollout (with action_mask). `rows[i]`:
        the dataset row of row i ({"prompt": text, **columns}). An environment that raises
        or answers wrongly in reset() or step() ends that episode only, failed (Episode.
        error, Episodes.failed). A setup error (the environment class cannot be built, the
        tool workers cannot start) raises EpisodeError on every rank (with `coord`) once all
        rows ended."""
        env_seconds, error = 0.0, None
        envs: list[Any] = [None] * len(prompt_ids)
        episodes = [Episode(list(p)) for p in prompt_ids]
        if self.env_cls is not None:
            start = time.perf_counter()
            for i, e in enumerate(episodes):
                try:
                    envs[i] = self.env_cls()
                except Exception as err:
                    error = self._env_error(err, "__init__", rows[i], int(prompt_index[i]))
                    break
                try:
                    e.prompt_ids = self._env_prompt(envs[i].reset(dict(rows[i])))
                except Exception as err:  # the row keeps its dataset prompt
                    self._fail(e, err, "reset", rows[i], int(prompt_index[i]))
            env_seconds += time.perf_counter() - start
        has_logprobs = True  # every turn's backend call gave the sampler's logprobs
        for turn in range(self.cfg.max_turns):
            if error is not None:
                break
            live = [i for i, e in enumerate(episodes) if not e.done]
            if not live:
                break
            budgets = [self.cfg.max_total_tokens - len(episodes[i].response) for i in live]
            outs, logprobs = backend([episodes[i].prompt_ids + episodes[i].response for i in live],
                           prompt_index[live], sample_index[live],
                           torch.tensor([len(episodes[i].response) for i in live]),
                           min(self.max_new_tokens, max(budgets)))
            last_turn = turn == self.cfg.max_turns - 1
            has_logprobs = has_logprobs and logprobs is not None
            for k, (i, out, budget) in enumerate(zip(live, outs, budgets, strict=True)):
                e = episodes[i]
                out = list(out)[:budget]  # a turn ends at EOS or max_new_tokens
                e.act(out, None if logprobs is None else logprobs[k][:len(out)])
            start = time.perf_counter()
            if self.tools is not None:
                try:
                    self._tool_turn(episodes, live, last_turn)
                except EpisodeError as err:  # the tool workers cannot start
                    error = err
            else:
                for i in live:
                    try:
                        self._env_turn(episodes[i], envs[i], last_turn)
                    except Exception as err:
                        self._fail(episodes[i], err, "step", rows[i], int(prompt_index[i]))
            env_seconds += time.perf_counter() - start
        raise_together(coord, error)
        for e in episodes:  # max_turns reached with a call or observation pending: cut
            if not e.done:
                e.done = e.truncated = True
        return self._rollout(episodes, prompt_index, sample_index, pad_token_id,
                             has_logprobs), \
            Episodes(episodes, env_seconds)

    def _tool_turn(self, episodes: list[Episode], rows: list[int], last_turn: bool) -> None:
        """Parse each row's turn; run all calls of all rows together; append the results."""
        batch: list[tuple[int, list[ToolCall]]] = []
        for i in rows:
            e = episodes[i]
            text = self.tokenizer.decode(self._without_eos(e.last_turn))
            try:
                calls = [c if isinstance(c, ToolCall) else ToolCall(c["name"], c["arguments"])
                         for c in self.parser(text)]
            except Exception as err:  # a malformed call (a parser raises ValueError)
                e.tool_calls, e.tool_errors = e.tool_calls + 1, e.tool_errors + 1
                if not last_turn:
                    self._observe(e, [{"role": "tool", "name": "error",
                                       "content": f"error: {err}"}])
                else:
                    e.done = e.truncated = True
                continue
            if not calls:
                e.done = True  # the answer: a turn without a tool call
            elif last_turn:
                e.tool_calls += len(calls)
                e.done = e.truncated = True
            else:
                batch.append((i, calls))
        flat = [c for _, calls in batch for c in calls]
        results = iter(self.tools.run(flat) if flat else [])
        for i, calls in batch:
            e, messages = episodes[i], []
            for call in calls:
                text, ok = next(results)
                if ok and len(self.encode(text)) > self.cfg.max_observation_tokens:
                    text, ok = (f"error: the result of {call.name} has more than "
                                f"{self.cfg.max_observation_tokens} tokens", False)
                e.tool_calls += 1
                e.tool_errors += not ok
                messages.append({"role": "tool", "name": call.name, "content": text})
            self._observe(e, messages)

    def _without_eos(self, turn: list[int]) -> list[int]:
        return turn[:-1] if turn[-1:] == [self.eos] else turn

    def _env_turn(self, e: Episode, env: Any, last_turn: bool) -> None:
        text = self.tokenizer.decode(self._without_eos(e.last_turn), skip_special_tokens=True)
        observation, reward, done = _check_step(env.step(text), "step()")
        e.env_reward += reward
        if done:
            e.done = True
        elif last_turn:
            e.done = e.truncated = True
        else:
            self._observe(e, observation)

    def _observe(self, e: Episode, observation: str | list[dict]) -> None:
        """Append an observation (text as is, messages through the chat template), cut to
        the episode's budget (then the episode ends, truncated)."""
        text = observation if isinstance(observation, str) else \
            render_delta(self.tokenizer, observation, e.last_turn[-1:] == [self.eos])
        role = "environment" if isinstance(observation, str) else observation[0]["role"]
        ids = self.encode(text)
        budget = self.cfg.max_total_tokens - len(e.response)
        if len(ids) >= budget:  # no room for the model's next turn
            ids, e.done, e.truncated = ids[:budget], True, True
        e.observe(role, ids)

    def _env_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, list):
            ids = self.encode(self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True))
        else:
            raise EpisodeError(f"reset() returned {type(prompt).__name__}; return the prompt "
                               "as a str or a list of messages")
        if not ids or len(ids) > self.max_prompt_len:
            raise EpisodeError(f"reset() gave a prompt of {len(ids)} tokens; it must have 1 "
                               f"to data.max_prompt_len={self.max_prompt_len}")
        return ids

    def _failure(self, e: Exception, method: str, row: dict, index: int) -> RowFailure:
        """What failed (the environment, its method, the exception) and on which row."""
        detail = str(e) if isinstance(e, EpisodeError) else \
            f"{method}() raised {type(e).__name__}: {e}"
        return RowFailure("episode", f"environment {self.cfg.environment!r} "
                          f"(rollout.environment): {detail}", f"the row of prompt index "
                          f"{index} ({_short(str(row.get('prompt', '')))})")

    def _env_error(self, e: Exception, method: str, row: dict, index: int) -> EpisodeError:
        failure = self._failure(e, method, row, index)
        return EpisodeError(f"{failure.kind} on {failure.row}")

    def _fail(self, episode: Episode, e: Exception, method: str, row: dict,
              index: int) -> None:
        episode.fail(self._failure(e, method, row, index),
                     self.eos if self.eos is not None else 0)

    @staticmethod
    def _rollout(episodes: list[Episode], prompt_index: Tensor, sample_index: Tensor,
                 pad: int, has_logprobs: bool) -> Rollout:
        from ds_rlhf.data import collate_left

        prompt_ids, prompt_mask = collate_left([e.prompt_ids for e in episodes], pad)
        width = max(max(len(e.response) for e in episodes), 1)
        ids = torch.full((len(episodes), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        action = torch.zeros_like(ids)
        sampler_logprobs = torch.zeros(ids.shape, dtype=torch.float32)
        for i, e in enumerate(episodes):
            n = len(e.response)
            ids[i, :n] = torch.tensor(e.response, dtype=torch.long)
            mask[i, :n] = 1
            action[i, :n] = torch.tensor(e.action, dtype=torch.long)
            sampler_logprobs[i, :n] = torch.tensor(e.sampler_logprobs, dtype=torch.float32)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=ids,
                       response_mask=mask, prompt_index=prompt_index.cpu(),
                       sample_index=sample_index.cpu(), action_mask=action,
                       sampler_logprobs=sampler_logprobs if has_logprobs else None)


def actor_backend(actor, step: int, pad_token_id: int) -> TurnBackend:
    """The hf backend: the actor in generation mode (engines.roles.Actor.generate)."""
    from ds_rlhf.data import collate_left

    def generate(contexts, prompt_index, sample_index, offsets, max_new_tokens):
        ids, mask = collate_left(contexts, pad_token_id)
        r = actor.generate(ids, mask, prompt_index, step, sample_index=sample_index,
                           position_offset=offsets, max_new_tokens=max_new_tokens)
        lengths = r.response_lengths.tolist()
        return ([row[:n] for row, n in zip(r.response_ids.tolist(), lengths, strict=True)],
                [row[:n] for row, n in zip(r.sampler_logprobs.tolist(), lengths, strict=True)])
    return generate


def build_episodes(cfg: RolloutConfig, tokenizer, max_new_tokens: int,
                   max_prompt_len: int) -> EpisodeRunner | None:
    """The run's episode runner (imports tools, parser and environment: call it before any
    engine is built), or None for single-turn runs."""
    if not cfg.multi_turn:
        return None
    return EpisodeRunner(cfg, tokenizer, max_new_tokens, max_prompt_len)
