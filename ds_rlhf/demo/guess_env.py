"""An example environment for multi-turn RL: guess a secret number, told higher or lower.

    rollout: {environment: "ds_rlhf.demo.guess_env:GuessNumber", max_turns: 6}

The prompt data has a `secret` column next to the prompt (rows {"prompt": ..., "secret": 42});
an episode is: the prompt, the model's guess, "higher" / "lower", another guess, ... until
it guesses right (reward 1.0, the episode ends) or runs out of turns (rollout.max_turns).
Each step also costs 0.05, so fewer guesses score more. The run's reward sources (reward
functions, a reward model) may add to the environment's reward, by weight
(rollout.env_reward_weight); a run may also have no other reward at all, as here.

The interface (see ds_rlhf/episodes.py): a class, one instance per episode,
  reset(row) -> str | list[message]      the prompt; row = {"prompt": ..., **other columns}
  step(action_text) -> (observation, reward, done)
observation: a str (appended as is) or a list of messages (rendered with the chat
template, e.g. [{"role": "user", "content": "higher"}]). An exception in reset or step, or a
malformed answer, stops the run on every rank with an error naming the environment and row.
"""

from __future__ import annotations


class GuessNumber:
    def reset(self, row: dict) -> list[dict]:
        self.secret = int(row["secret"])
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, action_text: str) -> tuple[list[dict], float, bool]:
        words = action_text.split()
        guess = int(words[-1]) if words and words[-1].lstrip("-").isdigit() else None
        if guess == self.secret:
            return [], 1.0, True
        hint = "not a number" if guess is None else ("higher" if guess < self.secret
                                                      else "lower")
        return [{"role": "user", "content": hint}], -0.05, False
