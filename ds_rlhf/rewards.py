"""The run's rewards: a reward model, Python reward functions and reward servers, combined.

    rewards = build_rewards(cfg, reward_model, coord)       # before training; checks all
    scores, per_reward, failures = rewards.score(reward_rows(rollout, prompts, tokenizer))
    metrics.update(reward_metrics(per_reward, scores, group_size, coord, valid))

Every reward is a source with one small interface: `RewardRows` in, one float per row out.
The sequence score is sum_k weight_k * r_k over the configured rewards:

  reward model  `reward.model.path`: the frozen engine's score at the last token
                (`RewardModel.scores`), weight `reward.weight`, name `reward.name`.
  function      `rewards: [{function: "package.module:function" | "path/to/file.py:function"}]`
                with TRL's signature fn(prompts, completions, **columns) -> list[float]:
                `columns` are the prompt dataset's other columns (e.g. `answer`), one value
                per row. Each rank calls it on its own rows.
  server        `rewards: [{url: "http://host:5000/get_reward", token_env: RM_TOKEN}]`, the
                protocol of OpenRLHF's remote reward model (openrlhf.cli.serve_rm,
                remote_rm_utils.remote_rm_fn), so servers people run work unchanged:
                POST {"query": [prompt + completion], "prompts": [prompt],
                "labels": [label_column value or ""]} -> {"rewards": [float, ...]},
                `batch_size` rows per request, bearer token from $token_env, `timeout` a
                deadline for the whole request, answers of at most `max_response_bytes`,
                `max_retries` with exponential backoff. Redirects are refused, never
                followed (the token stays with `url`); a token over plain http:// to a host
                that is not loopback is a config error unless `allow_insecure: true`, and
                one that cannot be a header value (a trailing \r) is refused at the start.

Every answer is checked: one finite number per row. A function that cannot be imported,
raises, or returns a wrong count or a non-number (or one past float range, 10**400), and a
server whose request is wrong (a refused token, another 4xx, a redirect, a TLS certificate
error), give one `RewardError` naming the function or URL (and the row, where there is one):
the setup is wrong, the run stops. With a coordinator the ranks agree after scoring, so every
rank raises it together and none waits in a collective for a rank that has stopped (see
`Rewards.score`). A server request that still fails after its retries (a timeout, a
connection error, a 5xx, an answer that is not UTF-8, not JSON, too large or not one number
per row) fails its rows only: their score is NaN and `Rewards.score` returns a `RowFailure`
for each, which the trainer drops from the update (rollout.max_failed_fraction). No message
ever holds the token: it is replaced by the name of its variable, and errors of http.client
that may quote a header value are not shown.

No deepspeed or torch.distributed import here: the coordinator brings the collectives.
"""

from __future__ import annotations

import http.client
import importlib
import importlib.util
import json
import math
import numbers
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ds_rlhf.config import PPORunConfig, RewardSpec, UserInputError
from ds_rlhf.rollout import Rollout, RowFailure


class RewardError(UserInputError):
    """A reward function or server failed; names it, the problem and the row where known."""

    every_rank = False  # set when all ranks raise it together (Rewards.score with a coord)


@dataclass
class RewardRows:
    """One rank's rows as every reward sees them (row i of each field belongs together)."""

    prompts: list[str]  # prompt text of each row
    completions: list[str]  # decoded response of each row (up to and without the EOS)
    columns: dict[str, list]  # the prompt dataset's other columns, one value per row
    rollout: Rollout  # the token view (the reward-model reward reads this)
    env_rewards: list[float] | None = None  # episodes: the environment's summed step rewards

    def describe(self, i: int) -> str:
        """How errors name row i: its prompt index, prompt and completion."""
        return (f"row {i} (prompt index {int(self.rollout.prompt_index[i])}: "
                f"{_short(self.prompts[i])} -> {_short(self.completions[i])})")

    def select(self, idx: Sequence[int]) -> RewardRows:
        """The rows `idx`, in that order."""
        return RewardRows([self.prompts[i] for i in idx], [self.completions[i] for i in idx],
                          {k: [v[i] for i in idx] for k, v in self.columns.items()},
                          self.rollout.select(list(idx)),
                          None if self.env_rewards is None else
                          [self.env_rewards[i] for i in idx])


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def reward_rows(rollout: Rollout, prompts, tokenizer, episodes=None) -> RewardRows:
    """The rows of `rollout` with their prompt texts, decoded completions and columns
    (`prompts` is the run's PromptSet; rollout.prompt_index indexes it). Multi-turn
    `episodes` (episodes.Episodes): the completion is the model's last turn (its answer),
    and the environment's rewards come along."""
    index = rollout.prompt_index.tolist()
    if episodes is not None:
        completions = episodes.final_texts(tokenizer)
    else:
        completions = []
        lengths = rollout.response_lengths.tolist()
        for row, n in zip(rollout.response_ids.tolist(), lengths, strict=True):
            ids = row[:n]
            if ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    return RewardRows(
        prompts=[prompts.texts[i] for i in index], completions=completions,
        columns={name: [values[i] for i in index] for name, values in prompts.columns.items()},
        rollout=rollout, env_rewards=None if episodes is None else episodes.env_rewards())


def _check_values(values: Any, rows: RewardRows, what: str,
                  describe: Callable[[int], str] | None = None, secret: str | None = None
                  ) -> list[float]:
    """One finite number per row, or a RewardError naming `what` and the row (`describe(i)`,
    default rows.describe), values shown without `secret` (see _show)."""
    if hasattr(values, "tolist"):  # a tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{what} returned {type(values).__name__}, not a list of "
                          f"{len(rows.prompts)} numbers (one per completion)")
    if len(values) != len(rows.prompts):
        raise RewardError(f"{what} returned {len(values)} values for {len(rows.prompts)} rows; "
                          "it must return one number per completion, in order")
    out = []
    for i, v in enumerate(values):
        try:  # float() of an int past 1.8e308 raises OverflowError
            number = float(v) if isinstance(v, numbers.Real) else math.nan
        except (OverflowError, ValueError):
            number = math.inf
        if not math.isfinite(number):
            raise RewardError(f"{what} returned {_show(v, secret=secret)} ({type(v).__name__})"
                              f" for {(describe or rows.describe)(i)}; expected a finite number")
        out.append(number)
    return out


def _show(value: Any, limit: int = 60, secret: str | None = None) -> str:
    """repr(value), cut to `limit` characters (an answer can be megabytes long); `secret` (a
    token: a server may echo the request) replaced first, so that no part of it is left."""
    try:
        text = _redact(repr(value), secret)
    except ValueError:  # an int past Python's 4300-digit limit for str()
        return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def _redact(text: str, secret: str | None, name: str = "the token") -> str:
    """`text` with `secret` replaced by `name`, as it is and as repr() or JSON escape it."""
    if secret:
        for form in {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}:
            text = text.replace(form, f"<{name}>")
    return text


def _token_problem(token: str) -> str | None:
    """Why `token` cannot go in `Authorization: Bearer <token>`, or None. http.client refuses
    a control character (in an error that quotes the header, token included) and a bearer
    token is printable ASCII (RFC 6750): so nothing else is sent."""
    if token != token.strip():
        return ("starts or ends with whitespace (a token file with Windows line endings read "
                "by $(cat token.txt) leaves a \\r at the end)")
    if not all("!" <= c <= "~" for c in token):
        return "holds a character that is not printable ASCII (a control character, a space)"
    return None


# --------------------------------------------------------------------------------------------
# The sources: rows in, one score per row out
# --------------------------------------------------------------------------------------------


class ModelReward:
    """The reward model engine (a collective: every rank calls it, see Rewards.score)."""

    def __init__(self, model):
        self.model = model  # engines.roles.RewardModel, or anything with .scores(rollout)

    def __call__(self, rows: RewardRows) -> Tensor:
        return self.model.scores(rows.rollout)


def load_function(ref: str, where: str, what: str | None = None,
                  error: type[UserInputError] | None = None) -> Callable:
    """The callable named by "package.module:function" or "path/to/file.py:function";
    failures raise `error` (default RewardError) naming `what` (default: this reward
    function, at config field `where`.function)."""
    module_name, _, fn_name = ref.rpartition(":")
    what = what or f"reward function {ref!r} ({where}.function)"
    error = error or RewardError
    try:
        return _load(module_name, fn_name, what)
    except RewardError as e:
        raise error(str(e)) from e.__cause__


def _load(module_name: str, fn_name: str, what: str) -> Callable:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise RewardError(f"{what}: file {str(path)!r} not found")
            key = f"ds_rlhf_reward_{abs(hash(str(path)))}"  # load a file once per process
            module = sys.modules.get(key)
            if module is None:
                spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[key] = module
        else:
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as e:  # ImportError, SyntaxError, or whatever the module raises
        raise RewardError(f"{what} cannot be imported: {type(e).__name__}: {e}; check the "
                          "module path (PYTHONPATH) or the file path") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"{what}: module {module_name!r} has no function {fn_name!r}")
    return fn


class FunctionReward:
    """A Python reward function, TRL's signature: fn(prompts, completions, **columns)."""

    def __init__(self, ref: str, where: str):
        self.fn = load_function(ref, where)
        self.what = f"reward function {ref!r} ({where})"

    def _call(self, rows: RewardRows) -> Any:
        columns = {k: v for k, v in rows.columns.items() if k not in ("prompts", "completions")}
        return self.fn(rows.prompts, rows.completions, **columns)

    def __call__(self, rows: RewardRows) -> list[float]:
        try:
            values = self._call(rows)
        except Exception as e:
            raise RewardError(f"{self.what} raised {type(e).__name__}: {e}{self._culprit(rows)}"
                              ) from e
        return _check_values(values, rows, self.what)

    def _culprit(self, rows: RewardRows) -> str:
        """Which row makes the function raise: it is called on each row alone (only after a
        failure, so the cost is paid when the run stops anyway)."""
        for i in range(len(rows.prompts)):
            try:
                self._call(rows.select([i]))
            except Exception:
                return f" on {rows.describe(i)}"
        return f" on a batch of {len(rows.prompts)} rows (no single row raises alone)"


class ServerReward:
    """A reward server speaking OpenRLHF's remote reward model protocol (module doc)."""

    def __init__(self, spec: RewardSpec, where: str):
        self.spec = spec
        self.what = f"reward server {spec.url} ({where})"
        self.token = None
        if spec.token_env is not None:
            self.token = os.environ.get(spec.token_env)
            if not self.token:
                raise RewardError(f"{self.what}: environment variable {spec.token_env!r} "
                                  f"({where}.token_env) is not set or empty; export the token")
            problem = _token_problem(self.token)
            if problem is not None:  # the value is never shown: it is a secret
                raise RewardError(
                    f"{self.what}: the token in ${spec.token_env} ({where}.token_env) {problem}"
                    f"; export it without, e.g. {spec.token_env}=\"$(tr -d '\\r\\n' < "
                    "token.txt)\"")

    def __call__(self, rows: RewardRows) -> PartialScores:
        """Requests of `batch_size` rows; a request that fails after its retries fails its
        rows (NaN, the error). Once one has, the later requests of this call are tried once,
        not retried: a failing server costs a step one round of retries, not one per
        request."""
        s = self.spec
        if s.label_column is not None and s.label_column not in rows.columns:
            raise RewardError(f"{self.what}: label_column {s.label_column!r} is not a column "
                              f"of the prompt data; its columns are {sorted(rows.columns)}")
        out, n, retries = PartialScores([], []), len(rows.prompts), s.max_retries
        for start in range(0, n, s.batch_size):
            batch = rows.select(range(start, min(start + s.batch_size, n)))
            try:
                scores, error = self._request(batch, retries), None
            except _RequestFailed as e:
                scores, error, retries = [math.nan] * len(batch.prompts), str(e), 0
            out.scores.extend(scores)
            out.errors.extend([error] * len(batch.prompts))
        return out

    def _request(self, batch: RewardRows, max_retries: int) -> list[float]:
        """One POST of `batch`, retried `max_retries` times with exponential backoff; the
        answer checked. After the retries a RewardError when asking again would not help
        (the setup is wrong), else _RequestFailed (the rows fail)."""
        s = self.spec
        labels = batch.columns[s.label_column] if s.label_column else [""] * len(batch.prompts)
        body = json.dumps({
            "query": [p + c for p, c in zip(batch.prompts, batch.completions, strict=True)],
            "prompts": batch.prompts, "labels": labels}).encode()
        attempts = 0
        while True:
            attempts += 1
            fatal = False
            try:
                answer = _parse_json(self._post(body))
                if not isinstance(answer, dict) or "rewards" not in answer:
                    raise RewardError(f"answered {_show(answer, 200, self.token)}, no 'rewards' "
                                      "list")
                return _check_values(answer["rewards"], batch, "it",
                                     lambda i: f"row {i} of the request", self.token)
            except _Refused as e:  # asking again gives the same answer
                problem, fatal = str(e), True
            except RewardError as e:  # a timeout, a 5xx, 408, 429 or an invalid answer
                problem = str(e)
            except ssl.SSLError as e:
                problem = f"TLS error: {e}"
                # a certificate or protocol mismatch does not heal by waiting
                fatal = not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
            except (OSError, http.client.HTTPException) as e:  # refused, reset, DNS
                problem = f"{type(e).__name__}: {e}"
            except ValueError as e:  # http.client refuses the request: its text may quote
                # the header (ValueError: Invalid header value b'Bearer sk-...'), not shown
                token = f", the token in ${s.token_env}" if s.token_env else ""
                problem, fatal = (f"http.client refused to send the request ({type(e).__name__}"
                                  f"; its text is not shown: it may quote a header{token})"), True
            if fatal or attempts > max_retries:
                break
            time.sleep(s.backoff * 2 ** (attempts - 1))
        tried = (f"after {attempts} attempt(s), max_retries={s.max_retries}"
                 if fatal or max_retries == s.max_retries else
                 "tried once: an earlier request of this step failed after its retries")
        message = _redact(f"{self.what}: {problem} ({tried})", self.token,
                          f"the token in ${s.token_env}")
        raise RewardError(message) if fatal else _RequestFailed(message)

    def _post(self, body: bytes) -> bytes:
        """POST `body` to the URL; the answer's body, read whole within `timeout` seconds (a
        deadline for the connection, the request and the answer together: a server that
        trickles bytes cannot hold the rank) and at most `max_response_bytes` long.

        http.client, not urllib: no redirect is ever followed (urllib would send the bearer
        token to wherever a 3xx points, and turn the POST into a GET), and no proxy from the
        environment is used. At the deadline a timer shuts the socket down, which ends any
        blocked read at once."""
        s, url = self.spec, urllib.parse.urlsplit(self.spec.url)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        # the port always given: http.client would read "::1" (from [::1]) as host ":" port 1
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=s.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=s.timeout)
        expired, sockets = threading.Event(), []

        def expire() -> None:
            expired.set()
            for sock in sockets:  # the plain socket under TLS too: its reads end at once
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed

        timer = threading.Timer(s.timeout, expire)
        timer.start()
        try:
            conn.connect()  # bounded by the socket timeout; the timer covers what follows
            sockets.append(conn.sock)  # kept: http.client drops conn.sock on Connection: close
            if expired.is_set():
                raise TimeoutError
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            conn.request("POST", target, body, headers)
            response = conn.getresponse()
            if 300 <= response.status < 400:
                raise _Refused(f"answered HTTP {response.status} {response.reason} redirecting "
                               f"to {response.getheader('Location')!r}; redirects are not "
                               "followed (the token must not go to another address): set url "
                               "to the address that answers")
            if not 200 <= response.status < 300:
                problem = f"HTTP {response.status} {response.reason}"
                if response.status == 401:
                    problem += (" (unauthorized: set token_env to the environment variable "
                                "holding the token)" if s.token_env is None else
                                f" (the token in ${s.token_env} was refused)")
                if 400 <= response.status < 500 and response.status not in (408, 429):
                    raise _Refused(problem)  # the request itself is wrong
                raise RewardError(problem)
            data = bytearray()
            while chunk := response.read(min(1 << 16, s.max_response_bytes + 1 - len(data))):
                data += chunk
                if len(data) > s.max_response_bytes:
                    raise RewardError(f"answered more than max_response_bytes="
                                      f"{s.max_response_bytes} bytes")
            if expired.is_set():  # the shutdown may look like a short but complete answer
                raise TimeoutError
            return bytes(data)
        except RewardError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if expired.is_set() or isinstance(e, TimeoutError):
                raise RewardError(f"no answer within timeout={s.timeout} s (a deadline for "
                                  "the whole request)") from e
            raise
        finally:
            timer.cancel()
            conn.close()


class _Refused(RewardError):
    """A server answer that asking again would not change (a redirect, most 4xx)."""


class _RequestFailed(Exception):
    """A request that still failed after its retries: its rows fail, the run goes on."""


@dataclass
class PartialScores:
    """A source's scores where some rows may fail (a reward server): NaN there, with
    `errors[i]` saying why (None for a row that was scored)."""

    scores: list[float]
    errors: list[str | None]


def _parse_json(data: bytes) -> Any:
    """The JSON document in a server's answer, or a RewardError saying why not."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RewardError(f"answered a body that is not UTF-8 ({e})") from e
    # ValueError: invalid JSON, or an integer past Python's 4300-digit limit;
    # RecursionError: arrays nested thousands deep
    except (ValueError, RecursionError) as e:
        raise RewardError(f"answered invalid JSON ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e


# --------------------------------------------------------------------------------------------
# Combination and metrics
# --------------------------------------------------------------------------------------------


@dataclass
class Reward:
    """One reward of the run."""

    name: str  # metric name: rewards/<name>/mean
    weight: float  # weight in the sequence score
    source: Callable[[RewardRows], Any]  # rows in, one score per row out


class Rewards:
    """The run's rewards, each with a name and a weight; score = sum_k weight_k * r_k."""

    def __init__(self, rewards: list[Reward], coord=None):
        self.rewards = rewards
        self.names = [r.name for r in rewards]
        self.coord = coord  # when set, ranks agree on failures (see score)

    def score(self, rows: RewardRows
              ) -> tuple[Tensor, dict[str, Tensor], list[RowFailure | None]]:
        """([N] float32 combined score, {name: [N] float32 raw score of that reward},
        [N] failures: None for a scored row, a RowFailure("reward", kind, row) for a row
        whose reward server request failed after its retries; that reward's raw score and
        the combined score of such a row are NaN, its other rewards are scored as usual).

        Every source runs on every rank even after one failed: the reward model is a
        collective (ZeRO-3 gathers weights), so a rank that skipped it would hang the
        others. Then the ranks agree: if any raised a RewardError (the setup is wrong), all
        raise the first failing rank's error (with a coord; without one, this process
        raises its own). Failed rows raise nothing: the trainer counts them across ranks.
        """
        n = len(rows.prompts)
        per_reward, error, failures = {}, None, [None] * n
        for r in self.rewards:
            try:
                values = r.source(rows)
            except RewardError as e:
                error = error or e
                values = torch.zeros(n)
            if isinstance(values, PartialScores):
                for i, kind in enumerate(values.errors):
                    if kind is not None and failures[i] is None:
                        failures[i] = RowFailure("reward", kind, rows.describe(i))
                values = values.scores
            per_reward[r.name] = torch.as_tensor(values, dtype=torch.float32).cpu()
        raise_together(self.coord, error)
        scores = torch.zeros(n)
        for r in self.rewards:
            scores += r.weight * per_reward[r.name]
        return scores, per_reward, failures


def raise_together(coord, error: UserInputError | None) -> None:
    """Ranks agree on a failure: if any rank has an `error`, every rank raises the first
    failing rank's (its type and message, naming that rank), so none waits in a collective
    for a rank that stopped. Without a coord (one process), `error` is raised as is."""
    if coord is not None and coord.any(error is not None):
        messages = coord.gather_objects(
            [] if error is None else [(type(error), f"{error} (on rank {coord.rank})")])
        kind, message = messages[0]
        shared = kind(message)
        shared.every_rank = True
        raise shared from error
    if error is not None:
        raise error


def build_rewards(cfg: PPORunConfig, reward_model, coord=None) -> Rewards:
    """The rewards of `cfg`: the reward model (when `reward_model` is given) first, then the
    `rewards` entries in order. Imports every function and reads every server token, so a
    call with reward_model=None before any engine is built checks them all cheaply.
    `coord` (a Coordinator) makes failures end the run on every rank together."""
    rewards = []
    if reward_model is not None:
        rewards.append(Reward(cfg.reward.name, cfg.reward.weight, ModelReward(reward_model)))
    for i, spec in enumerate(cfg.rewards):
        where = f"rewards[{i}]"
        source = (FunctionReward(spec.function, where) if spec.function is not None
                  else ServerReward(spec, where))
        rewards.append(Reward(spec.display_name, spec.weight, source))
    if cfg.rollout.environment is not None:  # the episodes' summed step rewards
        rewards.append(Reward("environment", cfg.rollout.env_reward_weight,
                              lambda rows: rows.env_rewards))
    return Rewards(rewards, coord)


def reward_metrics(per_reward: dict[str, Tensor], scores: Tensor, group_size: int,
                   coord, valid: Tensor | None = None) -> dict[str, float]:
    """Over all ranks (coord.sum; coord=None: this process only) and the rows in the update
    (`valid`, [N] bool; None: all; rows dropped for a NaN/inf score are not): "rewards/<name>/
    mean" of each raw reward, and "rewards/all_equal_groups", the share of groups (rows
    g*n .. g*n+n-1, n = group_size) whose valid rows' combined scores are all equal (or that
    have fewer than 2 valid rows): under a group baseline such a group has zero advantage and
    teaches nothing (0.0 when group_size == 1)."""
    names = sorted(per_reward)
    if valid is None:
        valid = torch.ones(len(scores), dtype=torch.bool)
    num_groups = len(scores) // group_size if group_size > 1 else 0
    size = num_groups * group_size
    groups = scores[:size].reshape(num_groups, group_size)
    in_group = valid[:size].reshape(num_groups, group_size)
    all_equal = (torch.where(in_group, groups, -torch.inf).amax(1)
                 <= torch.where(in_group, groups, torch.inf).amin(1))
    # a raw reward of a dropped row may be the NaN that dropped it: selected out
    sums = [torch.where(valid, per_reward[k].double(), 0.0).sum() for k in names]
    local = torch.stack([valid.double().sum(), torch.tensor(float(num_groups)),
                         all_equal.double().sum(), *sums])
    total = coord.sum(local) if coord is not None else local.double()
    rows, groups_total, equal = total[:3].tolist()
    metrics = {f"rewards/{k}/mean": float(v) / max(rows, 1.0)
               for k, v in zip(names, total[3:].tolist(), strict=True)}
    metrics["rewards/all_equal_groups"] = equal / groups_total if groups_total else 0.0
    return metrics
