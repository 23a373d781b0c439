"""Rewards: combination by weight, reward functions (both forms, every error), a real reward
server on 127.0.0.1 (tokens, batches, retries, every bad answer), columns from a data file to
the rows they belong to, metrics. Ranks agreeing on a failure: tests/dist/test_rewards_run.py."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from ds_rlhf.cli import main as cli_main
from ds_rlhf.config import (
    ConfigError,
    DataConfig,
    DatasetSpec,
    PPORunConfig,
    RewardSpec,
    check_values,
    load_config,
    to_yaml,
)
from ds_rlhf.rewards import (
    RewardError,
    RewardRows,
    build_rewards,
    reward_metrics,
    reward_rows,
)
from ds_rlhf.rollout import Rollout
from tests.conftest import RewardServer

FUNCTIONS = '''
def exact(prompts, completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def length(prompts, completions, **kw):
    return [len(c) for c in completions]

def bad_count(prompts, completions, **kw):
    return [0.0] * (len(completions) - 1)

def not_number(prompts, completions, **kw):
    return [None if c == "b" else 1.0 for c in completions]

def nan(prompts, completions, **kw):
    return [float("nan") for c in completions]

def raises(prompts, completions, **kw):
    return [1.0 / (c != "b") for c in completions]  # ZeroDivisionError on completion "b"
'''


def _rollout(prompt_index: list[int]) -> Rollout:
    n = len(prompt_index)
    return Rollout(prompt_ids=torch.zeros(n, 2, dtype=torch.long),
                   prompt_mask=torch.ones(n, 2, dtype=torch.long),
                   response_ids=torch.zeros(n, 3, dtype=torch.long),
                   response_mask=torch.ones(n, 3, dtype=torch.long),
                   prompt_index=torch.tensor(prompt_index))


def _rows(completions: list[str], answers: list[str] | None = None) -> RewardRows:
    n = len(completions)
    return RewardRows(prompts=[f"q{i} =" for i in range(n)], completions=completions,
                      columns={"answer": answers or [""] * n}, rollout=_rollout(list(range(n))))


@pytest.fixture
def functions(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


def _cfg(*specs: RewardSpec) -> PPORunConfig:
    cfg = PPORunConfig(rewards=list(specs))
    cfg.reward.name, cfg.reward.weight = "rm", 0.25
    return cfg


def test_combination_by_weight_both_function_forms(functions, monkeypatch):
    monkeypatch.syspath_prepend(str(functions.parent))

    class LengthModel:  # the reward model's interface: scores(rollout) -> [N]
        def scores(self, rollout):
            return rollout.prompt_index.float() * 2  # 0, 2, 4

    cfg = _cfg(RewardSpec(function=f"{functions}:exact", weight=3.0),
               RewardSpec(function="my_rewards:length", weight=-0.5, name="len"))
    rewards = build_rewards(cfg, LengthModel())
    assert rewards.names == ["rm", "exact", "len"]
    rows = _rows(["7", " 12", "x"], answers=["7", "12", "9"])
    scores, per, failed = rewards.score(rows)
    assert failed == [None, None, None]
    # rm: 0, 2, 4; exact: 1, 1, 0; len: 1, 3, 1
    # 0.25 * rm + 3 * exact - 0.5 * len = [0 + 3 - 0.5, 0.5 + 3 - 1.5, 1 + 0 - 0.5]
    assert scores.tolist() == [2.5, 2.0, 0.5]
    assert per["exact"].tolist() == [1.0, 1.0, 0.0] and per["len"].tolist() == [1.0, 3.0, 1.0]
    assert scores.dtype == torch.float32 and per["rm"].dtype == torch.float32


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_xyz:exact", "cannot be imported: ModuleNotFoundError"),
    ("{dir}/missing.py:exact", "not found"),
    ("{file}:nope", "has no function 'nope'"),
])
def test_function_that_cannot_be_imported(functions, ref, message):
    ref = ref.format(dir=functions.parent, file=functions)
    with pytest.raises(RewardError) as e:
        build_rewards(_cfg(RewardSpec(function=ref)), None)
    assert ref in str(e.value) and "rewards[0]" in str(e.value) and message in str(e.value)


def test_broken_module_names_the_error(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_package_abc\n")
    with pytest.raises(RewardError, match="broken.py:f.*cannot be imported.*no_such_package_abc"):
        build_rewards(_cfg(RewardSpec(function=f"{tmp_path}/broken.py:f")), None)


@pytest.mark.parametrize("fn, message", [
    ("raises", r"raised ZeroDivisionError: .* on row 1 \(prompt index 1: 'q1 =' -> 'b'\)"),
    ("bad_count", "returned 2 values for 3 rows"),
    ("not_number", r"returned None \(NoneType\) for row 1 \(prompt index 1: 'q1 =' -> 'b'\)"),
    ("nan", r"returned nan \(float\) for row 0 .*expected a finite number"),
])
def test_function_errors_name_function_and_row(functions, fn, message):
    rewards = build_rewards(_cfg(RewardSpec(function=f"{functions}:{fn}")), None)
    with pytest.raises(RewardError, match=message) as e:
        rewards.score(_rows(["a", "b", "c"]))
    assert f"{functions}:{fn}" in str(e.value)


def test_reward_metrics_by_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    per = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]), "b": scores * 2}
    m = reward_metrics(per, scores, group_size=2, coord=None)
    # groups (1, 1) (0, 2) (3, 3): two of three all equal; a: 4 / 6; b: 20 / 6
    assert m == {"rewards/a/mean": 4 / 6, "rewards/b/mean": 20 / 6,
                 "rewards/all_equal_groups": 2 / 3}
    assert reward_metrics(per, scores, 1, None)["rewards/all_equal_groups"] == 0.0


# --------------------------------------------------------------------------------------------
# A real reward server on 127.0.0.1
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    s = RewardServer()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def fresh(server):
    server.mode, server.token, server.requests = "ok", None, []
    return server


def _server_spec(url: str, **kw) -> RewardSpec:
    return RewardSpec(url=url, **{"timeout": 0.2, "max_retries": 2, "backoff": 0.01, **kw})


def test_server_scores_in_batches_with_token_and_labels(fresh, monkeypatch):
    fresh.token = "s3cret"
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    spec = _server_spec(fresh.url, token_env="RM_TOKEN", batch_size=2, label_column="answer")
    scores, per, _ = build_rewards(_cfg(spec), None).score(_rows(["7", "12", "x"],
                                                                 ["7", "1", "2"]))
    # query = prompt + completion: "q0 =7", "q1 =12", "q2 =x" -> lengths 5, 6, 5
    assert per["server"].tolist() == [5.0, 6.0, 5.0] and scores.tolist() == [5.0, 6.0, 5.0]
    assert [body for _, body in fresh.requests] == [
        {"query": ["q0 =7", "q1 =12"], "prompts": ["q0 =", "q1 ="], "labels": ["7", "1"]},
        {"query": ["q2 =x"], "prompts": ["q2 ="], "labels": ["2"]}]
    assert fresh.requests[0][0]["Authorization"] == "Bearer s3cret"


def test_server_without_token_is_refused_once(fresh):
    fresh.token = "s3cret"
    with pytest.raises(RewardError) as e:
        build_rewards(_cfg(_server_spec(fresh.url)), None).score(_rows(["a"]))
    assert fresh.url in str(e.value) and "HTTP 401" in str(e.value)
    assert "set token_env" in str(e.value) and len(fresh.requests) == 1  # 4xx: no retry


def test_server_token_variable_must_be_set(fresh, monkeypatch):
    monkeypatch.delenv("RM_TOKEN_UNSET", raising=False)
    with pytest.raises(RewardError, match="'RM_TOKEN_UNSET'.*not set"):
        build_rewards(_cfg(_server_spec(fresh.url, token_env="RM_TOKEN_UNSET")), None)


SECRET = "9f8e7d6c"  # the part of a token that must never reach a message


@pytest.mark.parametrize("token", [
    f"sk-{SECRET}\r",  # a token file with Windows line endings, read by $(cat token.txt)
    f"sk-{SECRET}\n", f" sk-{SECRET}", f"sk-{SECRET} ", f"sk-{SECRET}\t{SECRET}",
    f"sk-{SECRET}\x1b", f"sk-{SECRET}\x7f", f"sk-{SECRET}\u00e9", f"sk-{SECRET}\u2028",
])
def test_token_that_is_not_a_header_value_is_refused_unprinted(fresh, monkeypatch, token):
    monkeypatch.setenv("RM_TOKEN", token)
    with pytest.raises(RewardError) as e:
        build_rewards(_cfg(_server_spec(fresh.url, token_env="RM_TOKEN")), None)
    told = "".join(traceback.format_exception(e.value))
    assert "$RM_TOKEN" in str(e.value) and "rewards[0].token_env" in str(e.value)
    assert SECRET not in told and "\n" not in str(e.value)
    assert fresh.requests == []


def test_errors_of_the_request_path_never_show_the_token(fresh, monkeypatch):
    token = f"sk-{SECRET}"
    fresh.token = token
    monkeypatch.setenv("RM_TOKEN", token)
    rewards = build_rewards(_cfg(_server_spec(fresh.url, token_env="RM_TOKEN",
                                              max_retries=0)), None)
    server = rewards.rewards[0].source
    # http.client refusing a header value: its text (ValueError: Invalid header value
    # b'Bearer sk-...\r') holds the token; the setup is wrong, so the run stops
    server.token = token + "\r"  # as if it had passed the start-up check
    with pytest.raises(RewardError) as e:
        rewards.score(_rows(["a"]))
    told = "".join(traceback.format_exception(e.value))
    assert SECRET not in told and "$RM_TOKEN" in str(e.value) and "ValueError" in str(e.value)
    # a connection error whose text holds the token (a proxy echoing the request): the row
    # fails and the text of its failure (printed, logged) names the variable instead
    server.token = token

    def leaky(self):
        raise ConnectionResetError(f"reset after 'Authorization: Bearer {token}'")

    monkeypatch.setattr(http.client.HTTPConnection, "getresponse", leaky)
    _, _, failed = rewards.score(_rows(["a"]))
    assert "ConnectionResetError" in failed[0].kind and "$RM_TOKEN" in failed[0].kind
    assert SECRET not in failed[0].kind


@pytest.mark.parametrize("url, problem", [
    ("http://:8000/score", "has no host"),
    ("http:///score", "has no host"),
    ("https://[::1/score", "Invalid IPv6 URL"),
    ("http://[zz]/score", "does not appear to be an IPv4 or IPv6 address"),
    ("http://rm:99999/score", "Port out of range"),
    ("http://rm:0/score", "port 0 is not in 1..65535"),
    ("http://rm:http/score", "Port could not be cast to integer"),
    ("http://rm/get reward", "printable ASCII"),
    ("http://rm/score\r", "printable ASCII"),
    ("http://rm/sc\u00f6re", "printable ASCII"),
    (f"https://user:{SECRET}@rm/score", "credentials"),
])
def test_reward_server_url_that_cannot_be_sent_to_is_a_config_error(url, problem):
    cfg = PPORunConfig(rewards=[RewardSpec(url=url)])
    cfg.actor.model.path = cfg.critic.model.path = "/models/x"
    cfg.data.datasets = [DatasetSpec(path="p.jsonl")]
    with pytest.raises(ConfigError) as e:
        check_values(cfg)
    message = str(e.value)
    assert message.startswith("rewards[0].url: ") and problem in message
    assert "\n" not in message and SECRET not in message


def test_reward_server_url_error_through_the_cli(tmp_path, capsys):
    """Even --print-config: one line, exit 2 (it was a raw ValueError traceback)."""
    path = tmp_path / "run.yaml"
    run = {"actor": {"model": {"path": "/m"}}, "critic": {"model": {"path": "/m"}},
           "data": {"datasets": [{"path": "p.jsonl"}]},
           "rewards": [{"url": "https://[::1/score"}]}
    path.write_text(yaml.safe_dump(run))
    assert cli_main(["ppo", "--config", str(path), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("ds-rlhf ppo: error: rewards[0].url: 'https://[::1/score'")
    assert cli_main(["ppo", "--config", str(path), "--print-config",
                     "--rewards", "[{url: 'https://[::1]/score'}]"]) == 0


def _failed_rows(spec: RewardSpec, completions: tuple[str, ...] = ("a",)) -> str:
    """Score `completions` with a server that fails on every one of them: the run goes on
    (no RewardError), each row is a reward failure naming its row, with a NaN score; returns
    the failures' kind (one for all: they were one request)."""
    rows = _rows(list(completions))
    scores, per, failed = build_rewards(_cfg(spec), None).score(rows)
    assert [f.source for f in failed] == ["reward"] * len(rows.prompts)
    assert [f.row for f in failed] == [rows.describe(i) for i in range(len(rows.prompts))]
    assert torch.isnan(scores).all() and torch.isnan(per["server"]).all()
    (kind,) = {f.kind for f in failed}
    assert spec.url in kind and len(kind) < 600
    return kind


@pytest.mark.parametrize("mode, problem", [
    ("count", "returned 2 values for 3 rows"),
    ("nan", r"returned nan \(float\) for row 2 of the request"),
    ("500", "HTTP 500"),
    ("slow", "no answer within timeout=0.2 s"),
])
def test_bad_server_answers_fail_their_rows_after_bounded_retries(fresh, mode, problem):
    fresh.mode = mode
    start = time.perf_counter()
    kind = _failed_rows(_server_spec(fresh.url, backoff=0.05), ("a", "b", "c"))
    seconds = time.perf_counter() - start
    assert re.search(problem, kind) and "after 3 attempt(s)" in kind
    assert len(fresh.requests) == 3  # 1 + max_retries, then it stops
    assert 0.05 + 0.1 <= seconds < 3  # exponential backoff between the attempts


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/get_reward"  # nobody listens here
    assert re.search(f"{url}.*Connection.*after 3 attempt", _failed_rows(_server_spec(url)))


def test_a_failing_request_fails_its_rows_only(raw_servers, functions):
    """Requests of 2, 2 and 1 rows to a server that always answers one reward: the first
    two are wrong answers (their rows fail; the second, after the first failed its retries,
    is tried once), the last is scored. The other rewards, the combination of the rows that
    did not fail and the metrics over them are untouched."""
    server = raw_servers(_http(b'{"rewards": [7.0]}'))
    cfg = _cfg(_server_spec(server.url, batch_size=2, weight=2.0),
               RewardSpec(function=f"{functions}:length"))
    rows = _rows(["a", "bb", "ccc", "dddd", "eeeee"])
    scores, per, failed = build_rewards(cfg, None).score(rows)
    assert len(server.requests) == 3 + 1 + 1
    assert [f is None for f in failed] == [False] * 4 + [True]
    assert "returned 1 values for 2 rows" in failed[0].kind and "after 3 attempt(s)" in \
        failed[0].kind and failed[0].kind == failed[1].kind
    assert "returned 1 values for 2 rows" in failed[2].kind and "tried once" in failed[2].kind
    assert failed[3].row == rows.describe(3)
    assert per["length"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.isnan(per["server"][:4]).all() and per["server"][4] == 7.0
    assert torch.isnan(scores[:4]).all() and scores[4] == 2.0 * 7.0 + 5.0
    valid = torch.tensor([f is None for f in failed])
    m = reward_metrics(per, torch.where(valid, scores, 0.0), 1, None, valid)
    assert m == {"rewards/length/mean": 5.0, "rewards/server/mean": 7.0,
                 "rewards/all_equal_groups": 0.0}


class RawServer:
    """A TCP server on 127.0.0.1 that answers every connection with the raw bytes `reply`
    (whatever was asked), or with `pieces` sent `gap` seconds apart (a trickle), then
    closes; `requests` holds what each connection sent (for a POST: head and body)."""

    def __init__(self, reply: bytes = b"", pieces: list[bytes] | None = None, gap: float = 0.0):
        self.pieces, self.gap, self.requests = pieces or [reply], gap, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/get_reward"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            data = conn.recv(1 << 16)
            if data.startswith((b"POST", b"GET")):  # else a TLS hello: answer it at once
                while b"\r\n\r\n" not in data:
                    data += conn.recv(1 << 16)
                head = data.partition(b"\r\n\r\n")[0].decode().lower()
                length = int(re.search(r"content-length: *(\d+)", head)[1]) \
                    if "content-length" in head else 0
                while len(data.partition(b"\r\n\r\n")[2]) < length:
                    data += conn.recv(1 << 16)
            self.requests.append(data)
            try:
                for piece in self.pieces:
                    conn.sendall(piece)
                    time.sleep(self.gap)
            except OSError:
                pass  # the client gave up

    def close(self):
        self.sock.close()


def _http(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.fixture
def raw_servers():
    servers = []

    def start(*args, **kw) -> RawServer:
        servers.append(RawServer(*args, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_refused_and_the_token_stays(raw_servers, monkeypatch, status):
    elsewhere = raw_servers(_http(b'{"rewards": [1.0]}'))  # would answer anything
    location = elsewhere.url.replace("/get_reward", "/steal")
    redirecting = raw_servers(_http(b"", f"{status} Moved", f"Location: {location}\r\n"))
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    spec = _server_spec(redirecting.url, token_env="RM_TOKEN")
    with pytest.raises(RewardError) as e:
        build_rewards(_cfg(spec), None).score(_rows(["a"]))
    assert f"HTTP {status}" in str(e.value) and location in str(e.value)
    assert "after 1 attempt(s)" in str(e.value)  # the answer would be the same again
    assert b"Bearer s3cret" in redirecting.requests[0]
    assert elsewhere.requests == []  # neither the token nor a GET ever went there


@pytest.mark.parametrize("where", ["head", "body"])
def test_timeout_is_a_deadline_for_the_whole_answer(raw_servers, where):
    answer = _http(b'{"rewards": [' + b" " * 40 + b"5.0]}")  # 118 bytes
    head, body = answer[:len(answer) - 45], answer[len(answer) - 45:]
    # 2 bytes every 50 ms (no single read waits anywhere near the 0.3 s timeout): the whole
    # answer would take ~3 s; or the head at once and the body as slowly (~1.2 s)
    trickle = answer if where == "head" else body
    pieces = [trickle[i:i + 2] for i in range(0, len(trickle), 2)]
    server = raw_servers(pieces=pieces if where == "head" else [head, *pieces], gap=0.05)
    start = time.perf_counter()
    kind = _failed_rows(_server_spec(server.url, timeout=0.3, max_retries=0))
    assert "no answer within timeout=0.3 s" in kind
    assert time.perf_counter() - start < 0.9  # held to the deadline (slack for a busy CPU)


def test_answer_size_is_capped(raw_servers):
    server = raw_servers(_http(b'{"rewards": [5.0], "pad": "' + b"x" * 5000 + b'"}'))
    spec = _server_spec(server.url, max_response_bytes=1000, max_retries=0)
    assert "more than max_response_bytes=1000 bytes" in _failed_rows(spec)
    spec.max_response_bytes = 6000  # the same answer fits
    assert build_rewards(_cfg(spec), None).score(_rows(["a"]))[0].tolist() == [5.0]


@pytest.mark.parametrize("body, problem", [
    # float() of a 400-digit integer raised OverflowError
    (b'{"rewards": [1' + b"0" * 400 + b"]}",
     r"returned 1000.*\.\.\. \(int\) for row 0 of the request"),
    # json.loads of an integer past 4300 digits raised ValueError
    (b'{"rewards": [1' + b"0" * 5000 + b"]}", r"invalid JSON \(ValueError: Exceeds the limit"),
    (b'{"rewards": [1.0], "note": "\xff"}', "not UTF-8"),  # UnicodeDecodeError
    (b"[" * 100_000 + b"]" * 100_000, r"invalid JSON \(RecursionError"),
])
def test_answers_that_escaped_the_error_path_are_reward_failures(raw_servers, body, problem):
    server = raw_servers(_http(body))
    assert re.search(problem, _failed_rows(_server_spec(server.url, max_retries=0)))


def test_function_returning_a_huge_integer_is_a_reward_error(tmp_path):
    path = tmp_path / "huge.py"
    path.write_text("def big(p, c, **kw): return [1.0, 10**400]\n"
                    "def bigger(p, c, **kw): return [10**5000, 1.0]\n")
    with pytest.raises(RewardError, match=r"big' \(rewards\[0\]\) returned 1000.*\.\.\. "
                       r"\(int\) for row 1 \(prompt index 1"):
        build_rewards(_cfg(RewardSpec(function=f"{path}:big")), None).score(_rows(["a", "b"]))
    with pytest.raises(RewardError, match=r"returned an integer of about 5000 digits \(int\) "
                       "for row 0"):
        build_rewards(_cfg(RewardSpec(function=f"{path}:bigger")), None).score(_rows(["a", "b"]))


def test_tls_errors_are_not_retried(raw_servers):
    server = raw_servers(_http(b'{"rewards": [1.0]}'))  # plain HTTP behind an https:// URL
    url = server.url.replace("http://", "https://")
    with pytest.raises(RewardError, match=r"TLS error: .*after 1 attempt\(s\)"):
        build_rewards(_cfg(_server_spec(url)), None).score(_rows(["a"]))
    assert len(server.requests) == 1


@pytest.mark.parametrize("status, attempts", [(403, 1), (404, 1), (408, 3), (429, 3)])
def test_4xx_are_retried_only_for_408_and_429(raw_servers, status, attempts):
    """A refused request stops the run (asking again gives the same answer: the setup is
    wrong); 408 and 429 are the server's trouble: retried, then the rows fail."""
    server = raw_servers(_http(b"{}", f"{status} Nope"))
    spec = _server_spec(server.url)
    if attempts == 1:
        with pytest.raises(RewardError, match=f"HTTP {status} .*after 1 attempt"):
            build_rewards(_cfg(spec), None).score(_rows(["a"]))
    else:
        assert re.search(f"HTTP {status} .*after {attempts} attempt", _failed_rows(spec))
    assert len(server.requests) == attempts


# --------------------------------------------------------------------------------------------
# Columns from the data file to the rows; config checks
# --------------------------------------------------------------------------------------------


def test_columns_reach_the_rows_they_belong_to(tmp_path, functions):
    from ds_rlhf.data import load_prompts
    from ds_rlhf.demo.task import build_tokenizer

    tokenizer = build_tokenizer()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"prompt": f"review of the {c} lamp :", "answer": c,
                                         "id": i}) + "\n"
                             for i, c in enumerate(["red", "blue", "green"])))
    second.write_text(json.dumps({"prompt": "review of the old chair :", "id": 9}) + "\n")
    data = DataConfig(datasets=[DatasetSpec(path=str(first), weight=3.0),
                                DatasetSpec(path=str(second))])  # mixed 3 : 1, as they are
    prompts = load_prompts(data, tokenizer)
    # a column missing from one dataset is None for its rows
    assert prompts.columns == {"answer": ["red", "blue", "green", None], "id": [0, 1, 2, 9]}
    order = [2, 3, 0]
    rollout = _rollout(order)
    eos = tokenizer.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ("green", "red", "blue")]
    rollout.response_ids = torch.tensor([[ids[0], eos, eos], [ids[1], ids[2], eos],
                                         [ids[2], eos, eos]])
    rollout.response_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    rows = reward_rows(rollout, prompts, tokenizer)
    assert rows.prompts == [prompts.texts[i] for i in order]
    assert rows.completions == ["green", "red blue", "blue"]  # no EOS
    assert rows.columns == {"answer": ["green", None, "red"], "id": [2, 9, 0]}
    exact = build_rewards(_cfg(RewardSpec(function=f"{functions}:exact")), None)
    assert exact.score(rows)[0].tolist() == [1.0, 0.0, 0.0]


def test_reward_config_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "actor": {"model": {"path": "/m"}}, "critic": {"model": {"path": "/m"}},
        "data": {"datasets": [{"path": "p.jsonl"}]},
        "rewards": [{"function": "my.mod:fn", "weight": 2.0},
                    {"url": "https://rm/get_reward", "token_env": "T", "batch_size": 8}]}))
    cfg = load_config(path)
    assert cfg.rewards[1] == RewardSpec(url="https://rm/get_reward", token_env="T", batch_size=8)
    assert [r.display_name for r in cfg.rewards] == ["fn", "server"]
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("rewards, field", [
    ([], "reward.model / rewards"),  # no reward at all
    ([{"function": "m:f", "url": "http://x"}], "rewards[0]"),
    ([{"function": "m.f"}], "rewards[0].function"),
    ([{"function": "m:f", "timeout": 5}], "rewards[0].timeout"),  # server field on a function
    ([{"url": "localhost:5000"}], "rewards[0].url"),
    ([{"url": "http://x", "batch_size": 0}], "rewards[0].batch_size"),
    ([{"url": "http://x", "max_response_bytes": 0}], "rewards[0].max_response_bytes"),
    ([{"function": "m:f", "allow_insecure": True}], "rewards[0].allow_insecure"),
    ([{"function": "m:f"}, {"function": "n:f"}], "rewards[1].name"),  # both named "f"
])
def test_reward_config_errors_name_the_field(rewards, field):
    cfg = PPORunConfig(rewards=[RewardSpec(**r) for r in rewards])
    cfg.actor.model.path = cfg.critic.model.path = "/models/x"
    cfg.data.datasets = [DatasetSpec(path="p.jsonl")]
    with pytest.raises(ConfigError) as e:
        check_values(cfg)
    assert str(e.value).startswith(field)
    cfg.rewards = [RewardSpec(function="m:f"), RewardSpec(url="http://x", name="srv")]
    check_values(cfg)  # no reward model: the functions and servers are the reward


def test_ints_bools_tuples_and_tensors_are_numbers(tmp_path):
    path = tmp_path / "kinds.py"
    path.write_text("import torch\n"
                    "def ints(p, c, **kw): return [1, True]\n"
                    "def tensor(p, c, **kw): return torch.tensor([0.5, 2.0])\n")
    cfg = _cfg(RewardSpec(function=f"{path}:ints"), RewardSpec(function=f"{path}:tensor"))
    _, per, _ = build_rewards(cfg, None).score(_rows(["a", "b"]))
    assert per["ints"].tolist() == [1.0, 1.0] and per["tensor"].tolist() == [0.5, 2.0]


@pytest.mark.parametrize("url, allow_insecure, ok", [
    ("http://rm.example:5000/get_reward", False, False),  # the token in the clear
    ("http://10.0.0.7/get_reward", False, False),
    ("http://rm.example:5000/get_reward", True, True),  # the user says the network is private
    ("https://rm.example/get_reward", False, True),
    ("http://127.0.0.1:5000/get_reward", False, True),  # loopback never leaves the machine
    ("http://localhost:5000/get_reward", False, True),
    ("http://[::1]:5000/get_reward", False, True),
])
def test_token_over_plain_http_to_another_host_is_refused(url, allow_insecure, ok):
    cfg = PPORunConfig(rewards=[RewardSpec(url=url, token_env="RM_TOKEN",
                                           allow_insecure=allow_insecure)])
    cfg.actor.model.path = cfg.critic.model.path = "/models/x"
    cfg.data.datasets = [DatasetSpec(path="p.jsonl")]
    if ok:
        check_values(cfg)
        cfg.rewards[0].token_env = None  # no token: nothing to leak
        check_values(cfg)
        return
    with pytest.raises(ConfigError, match=r"^rewards\[0\].url: .*\$RM_TOKEN over plain http:// "
                       r".*allow_insecure: true"):
        check_values(cfg)
    cfg.rewards[0].token_env = None
    check_values(cfg)
