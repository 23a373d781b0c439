"""`ds-rlhf generate`: answers from an exported model, to try it by hand.

    ds-rlhf generate --model runs/ppo/actor "What is 12 + 7?" "Name a prime."
    ds-rlhf generate --model runs/ppo/actor --greedy --max-new-tokens 64 "What is 12 + 7?"
    ds-rlhf generate --model runs/sft/model --chat          # a conversation; empty line ends it

Loads the export with plain AutoModelForCausalLM / AutoTokenizer (a GPU when there is one),
renders each prompt with the tokenizer's chat template when it has one (else the prompt as
it is) and samples with ds_rlhf.generation.generate, the sampler of the training rollouts:
the flags mean what the `generation` fields of the config mean, a response ends at the
tokenizer's EOS as in training, and an answer depends only on (seed, prompt, flags), so the
same command gives the same answers on any machine, up to float round-off.

`--chat` reads one user turn per line from stdin (a terminal or a pipe) until EOF, an empty
line or "exit", and answers each with the conversation so far; the oldest turns are dropped
when the conversation would not fit the model's positions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_rlhf.config import GenerationConfig, UserInputError

END_CHAT = ("", "exit")  # a user line that ends --chat


def load(model_dir: str):
    """(model in eval mode on the GPU when there is one, tokenizer) of an export folder."""
    import torch
    import transformers

    path = Path(model_dir)
    if not path.is_dir():
        raise UserInputError(f"--model: no folder {model_dir!r}; give the folder a run exported "
                             "(OUTPUT_DIR/actor of ppo, OUTPUT_DIR/model of sft or dpo)")
    if not (path / "config.json").is_file():
        raise UserInputError(f"--model: {model_dir!r} has no config.json, so it is not a model "
                             "folder; give the folder a run exported (OUTPUT_DIR/actor or "
                             "OUTPUT_DIR/model)")
    config = transformers.AutoConfig.from_pretrained(path)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise UserInputError(f"--model: {model_dir!r} is a reward model or critic (a sequence "
                             "classifier), which scores text but does not write it; give a "
                             "causal LM (OUTPUT_DIR/actor of ppo, OUTPUT_DIR/model of sft or dpo)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:  # missing weights or tokenizer files, unknown type...
        raise UserInputError(f"--model: cannot load {model_dir!r}: "
                             f"{' '.join(str(e).split())}") from None
    if tokenizer.eos_token_id is None:
        raise UserInputError(f"--model: the tokenizer of {model_dir!r} has no EOS token, so an "
                             "answer could never end")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the model answers: the conversation rendered with the chat template and
    the assistant's turn opened, or without one the turns' text, a line each."""
    if tokenizer.chat_template is None:
        return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has them


def answer(model, tokenizer, ids: list[int], args: argparse.Namespace, index: int,
           step: int) -> str:
    """One sampled (or greedy) answer to `ids`; `index` and `step` pick its random draws."""
    import torch

    from ds_rlhf.generation import generate

    with torch.no_grad():
        response, mask = generate(
            model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
            torch.tensor([index]), step=step, seed=args.seed,
            max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, greedy=args.greedy)
    tokens = response[0, : int(mask[0].sum())].tolist()
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _fits(model, ids: list[int], max_new_tokens: int) -> bool:
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit is None or len(ids) + max_new_tokens <= limit


def _too_long(model, ids: list[int], max_new_tokens: int, what: str) -> UserInputError:
    return UserInputError(
        f"{what} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
        f"model's {model.config.max_position_embeddings} positions: shorten it or lower "
        "--max-new-tokens")


def chat(model, tokenizer, args: argparse.Namespace, lines) -> None:
    """Answer each line of `lines` (user turns) with the conversation so far."""
    messages: list[dict[str, str]] = []
    interactive = lines.isatty()  # a terminal gets a "> " before each turn
    for turn, line in enumerate(_user_lines(lines, interactive)):
        messages.append({"role": "user", "content": line})
        ids = prompt_ids(tokenizer, messages)
        while not _fits(model, ids, args.max_new_tokens) and len(messages) > 1:
            messages = messages[2:]  # the oldest user turn and its answer
            ids = prompt_ids(tokenizer, messages)
        if not _fits(model, ids, args.max_new_tokens):
            raise _too_long(model, ids, args.max_new_tokens, "this turn")
        reply = answer(model, tokenizer, ids, args, index=0, step=turn)
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def _user_lines(lines, interactive: bool):
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = lines.readline()
        if not line or line.strip() in END_CHAT:  # EOF, an empty line or "exit"
            return
        yield line.strip()


def build_parser() -> argparse.ArgumentParser:
    defaults = GenerationConfig()  # the same defaults as a run's `generation` section
    parser = argparse.ArgumentParser(prog="ds-rlhf generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts to answer (a user turn each)")
    parser.add_argument("--model", required=True,
                        help="an exported model folder (OUTPUT_DIR/actor, OUTPUT_DIR/model)")
    parser.add_argument("--chat", action="store_true",
                        help="a conversation: one user turn per stdin line, until an empty "
                             "line, 'exit' or EOF")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="answer tokens at most")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="keep the k most likely tokens; 0 keeps all")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help="nucleus sampling mass; 1.0 keeps all")
    parser.add_argument("--greedy", action="store_true",
                        help="the most likely token each time (no sampling)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the draws: the same seed gives the same answers")
    return parser


def _check(args: argparse.Namespace) -> None:
    if not args.prompts and not args.chat:
        raise UserInputError("no prompt; give one or more prompts, or --chat")
    if args.chat and args.prompts:
        raise UserInputError("--chat reads its turns from stdin; give no prompts with it")
    checks = [(args.max_new_tokens >= 1, "--max-new-tokens: must be at least 1"),
              (args.temperature > 0, "--temperature: must be > 0 (it divides the logits)"),
              (args.top_k >= 0, "--top-k: must be >= 0 (0 keeps all tokens)"),
              (0 < args.top_p <= 1, f"--top-p: must be in (0, 1], got {args.top_p}")]
    for ok, message in checks:
        if not ok:
            raise UserInputError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        model, tokenizer = load(args.model)
        if args.chat:
            chat(model, tokenizer, args, sys.stdin)
            return 0
        for index, prompt in enumerate(args.prompts):
            ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
            if not _fits(model, ids, args.max_new_tokens):
                raise _too_long(model, ids, args.max_new_tokens, f"prompt {index + 1}")
            reply = answer(model, tokenizer, ids, args, index=index, step=0)
            # one prompt: the answer alone (for scripts); several: each under its prompt
            print(reply if len(args.prompts) == 1 else f"> {prompt}\n{reply}\n", flush=True)
    except UserInputError as e:
        print(f"ds-rlhf generate: error: {e}", file=sys.stderr)
        return 2
    return 0
