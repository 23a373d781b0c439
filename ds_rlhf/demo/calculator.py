"""The tool-use demo task: add two numbers with a calculator tool.

    python -m ds_rlhf.demo.calculator OUTDIR [--seed 0]      # writes the data and tokenizer

A prompt asks "what is 37 + 45 ?" for numbers 0-99. The tiny model cannot add numbers from
its weights (the held-out pairs appear in no training file, and a 2-layer model learns no
addition table from a few thousand rows), but it can call the tool `add` and copy the
result. An episode (launch/demo.sh tools, rollout.tools: [ds_rlhf.demo.calculator:add]):

    user : what is 37 + 45 ? assistant :                                        prompt
    <tool_call> { "name" : "add" , "arguments" : { "a" : 37 , "b" : 45 } } </tool_call> <eos>
    tool : 82 assistant :                                                     the tool's answer
    82 <eos>                                                                  the answer

The SFT demonstrations are imperfect on purpose (SFT_RULES): 40% use the tool, 60% answer
at once with the first number (a wrong habit, and one single answer, so it is the SFT
policy's greedy choice). Sampling tries the tool often enough for GRPO, rewarded by
`reward` (1.0 for the right sum), to make it the greedy behaviour.

The tokenizer is word-level and splits on whitespace only, so each JSON piece of the tool
call is one word and decoding (words joined by spaces) gives back parseable JSON for the
run's `hermes` tool parser. Everything is local and deterministic.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ds_rlhf.demo.make_data import write_files
from ds_rlhf.demo.task import EOS, SPECIAL_TOKENS, UNK

MAX_NUMBER = 99  # operands 0..99, sums 0..198
NUMBERS = [str(i) for i in range(2 * MAX_NUMBER + 1)]
WORDS = ["user", "assistant", "tool", "system", ":", "what", "is", "+", "?", "<tool_call>",
         "</tool_call>", "{", "}", ",", '"name"', '"add"', '"arguments"', '"a"', '"b"']
VOCAB: dict[str, int] = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS, *NUMBERS])}
# "role : content" turns, as the sentiment demo's; an assistant turn ends with <eos>. The
# tool schemas (tools=) are not rendered: the tiny model learns the one tool from SFT.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}" + EOS + " {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
SFT_RULES = {"tool": 0.4, "first": 0.6}  # how demonstrations answer
NUM_SFT = 4000
NUM_PROMPTS = 2000
NUM_EVAL = 200


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(int(a) + int(b))


def tool_call(a: int, b: int) -> str:
    """The model's tool call text for add(a, b), in the hermes format."""
    return (f'<tool_call> {{ "name" : "add" , "arguments" : {{ "a" : {a} , "b" : {b} }} }} '
            "</tool_call>")


def question(a: int, b: int) -> str:
    return f"what is {a} + {b} ?"


def reward(prompts: list[str], completions: list[str], answer: list[str],
           **columns) -> list[float]:
    """1.0 when the final answer (the model's last turn) is the sum, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def build_tokenizer():
    """Word-level over VOCAB, split on whitespace only; eos == pad == <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                 unk_token=UNK, model_max_length=64)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_rows(seed: int) -> dict[str, list[dict]]:
    """The rows of each file, keyed by file name; a pure function of the seed."""
    pairs = [(a, b) for a in range(MAX_NUMBER + 1) for b in range(MAX_NUMBER + 1)]
    random.Random(f"{seed}:split").shuffle(pairs)
    eval_pool, train_pool = pairs[:NUM_EVAL], pairs[NUM_EVAL:]
    rng = random.Random(f"{seed}:sft")
    rules, weights = list(SFT_RULES), list(SFT_RULES.values())
    sft = []
    for a, b in rng.sample(train_pool, NUM_SFT):
        user = {"role": "user", "content": question(a, b)}
        if rng.choices(rules, weights)[0] == "tool":
            turns = [{"role": "assistant", "content": tool_call(a, b)},
                     {"role": "tool", "content": add(a, b)},
                     {"role": "assistant", "content": add(a, b)}]
        else:
            turns = [{"role": "assistant", "content": str(a)}]
        sft.append({"messages": [user, *turns]})

    def prompt_rows(chosen):
        return [{"messages": [{"role": "user", "content": question(a, b)}],
                 "answer": add(a, b)} for a, b in chosen]

    rng = random.Random(f"{seed}:prompts")
    return {"sft.jsonl": sft, "prompts.jsonl": prompt_rows(rng.sample(train_pool, NUM_PROMPTS)),
            "eval_prompts.jsonl": prompt_rows(eval_pool)}


def write(outdir: str | Path, seed: int = 0) -> dict[str, list[dict]]:
    files = make_rows(seed)
    write_files(outdir, files, build_tokenizer())
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the calculator tool demo data set.")
    parser.add_argument("outdir", help="directory to write the .jsonl files and tokenizer/ to")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random draws")
    args = parser.parse_args(argv)
    files = write(args.outdir, args.seed)
    print(f"wrote {', '.join(f'{n} ({len(r)} rows)' for n, r in files.items())} and tokenizer/ "
          f"to {args.outdir}")


if __name__ == "__main__":
    main()
