"""`ds-rlhf generate` on an export: the answers of plain transformers' greedy decoding, a
conversation piped on stdin, and one clear line for a folder that holds no model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from ds_rlhf.cli import main as cli_main
from tests.conftest import REPO, cpu_env, tiny_init

pytestmark = pytest.mark.e2e

PROMPTS = ["review of the camera :", "review of the phone :"]


@pytest.fixture(scope="module")
def export(assets, tmp_path_factory):
    """A tiny random llama saved as an export is (save_pretrained + the demo tokenizer, which
    has a chat template and pad == EOS)."""
    path = tmp_path_factory.mktemp("export") / "actor"
    torch.manual_seed(3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["tokenizer"])
    config = transformers.AutoConfig.for_model(**tiny_init(assets["vocab_size"]))
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _generate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_rlhf", "generate", *args], cwd=REPO,
                          env=cpu_env(), input=stdin, capture_output=True, text=True,
                          timeout=120)


def _hf_greedy(path, messages: list[dict], max_new_tokens: int) -> str:
    """Plain transformers: the chat template, then greedy generate, as a user would."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_answers_are_those_of_plain_transformers(export):
    proc = _generate("--model", str(export), PROMPTS[0], "--greedy", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _hf_greedy(export, [{"role": "user", "content": PROMPTS[0]}], 5)
    assert expected  # five words of a random model: something to compare
    assert proc.stdout == expected + "\n"


def test_chat_answers_each_turn_with_the_conversation_so_far(export):
    proc = _generate("--model", str(export), "--chat", "--greedy", "--max-new-tokens", "4",
                     stdin=f"{PROMPTS[0]}\n{PROMPTS[1]}\n\nnever read\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _hf_greedy(export, [{"role": "user", "content": PROMPTS[0]}], 4)
    second = _hf_greedy(export, [{"role": "user", "content": PROMPTS[0]},
                                 {"role": "assistant", "content": first},
                                 {"role": "user", "content": PROMPTS[1]}], 4)
    # the empty line ends the conversation: two answers, no prompt marks (not a terminal)
    assert proc.stdout.splitlines() == [first, second]


@pytest.mark.parametrize("make", ["missing", "empty", "reward"])
def test_a_folder_without_a_causal_lm_is_one_line_and_exit_2(export, tmp_path, capsys, make):
    folder = tmp_path / "model"
    if make == "empty":
        folder.mkdir()
    if make == "reward":  # a reward model export scores text; it cannot write it
        config = transformers.AutoConfig.from_pretrained(export, num_labels=1)
        transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(
            folder)
    capsys.readouterr()  # what saving printed
    assert cli_main(["generate", "--model", str(folder), "hello"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ds-rlhf generate: error: --model:"), err
    assert str(folder) in err[0]
