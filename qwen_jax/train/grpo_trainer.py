"""`qwen-jax train --method grpo`: GRPO with rollouts on the engine, as a `loop.Trainer`.

Data (`data/prompts.py`): records `{"prompt": text or chat messages, ...}` from any source `--data`
takes, tokenized once into the token cache with their other columns, which are passed to the
reward functions by name (`rewards.py`). `--batch-size` prompts per step, each rolled out
`--num-generations` times; prompts are shuffled per epoch with the run's seed.

One step: roll the batch's prompts out on the engine with the current parameters
(`rollout.Rollouts`, no weight copy), score the completions with the reward functions, turn the
rewards into group advantages, then `--num-iterations` optimizer updates of the GRPO loss
(`grpo.GRPOLoss`) on those rollouts. With `--beta` > 0 the reference log-probabilities come from
the base model: with LoRA the adapters set to zero (no second copy of the model), with full
fine-tuning a copy of the initial weights.

Checkpoints, exact resume (rollout seeds derive from the run's seed, the step and the row),
signals, TensorBoard and the final model work as for SFT (`loop.Trainer`); the final outputs add
`reward_curve.png`. `--eval-data` prompts are rolled out greedily every `--eval-every` steps and at
the end; each reward function's mean is logged as `eval_rewards/<name>`.

Across processes (`--coordinator ...`, as SFT) the train state is sharded over the global mesh and
every process rolls out its own contiguous share of the step's prompts (a prompt's generations stay
together) on an engine over its own devices (`multihost.ProcessLocalView`: the parameters as seen on
those devices, without a copy when they are replicated across processes, else gathered once per
step). Rollouts and rewards are then gathered, so every process holds the whole step's batch and
computes the advantages and metrics a single process would; each completion's seed comes from its
row in the global batch, so a seeded run samples the same tokens whatever the process count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.lora import LoRAParam
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data.prompts import PromptRecord, open_prompts
from qwen_jax.train.grpo import GRPOBatch, GRPOLoss, build_batch, group_advantages, scored_logps
from qwen_jax.train.loop import Trainer
from qwen_jax.train.rewards import check_columns, load_rewards, nan_mean, score, weighted_sum
from qwen_jax.train.rollout import Rollout, Rollouts, is_conversational
from qwen_jax.train.step import TrainSteps, make_optimizer, make_schedule


def _drop_nan(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its NaN values (a reward that was None everywhere has no mean)."""
    return {k: v for k, v in record.items() if not (isinstance(v, float) and np.isnan(v))}


class GRPOTrainer(Trainer):
    """GRPO fine-tuning (full or LoRA/QLoRA) with engine rollouts; see the module docstring."""

    methods = ("grpo",)
    resume_keys = (
        *Trainer.resume_keys,
        "num_generations",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "num_iterations",
    )

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Qwen2ForCausalLM | None = None,
        devices: list[jax.Device] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.updates_per_step = config.num_iterations
        self.rollouts: Rollouts | None = None
        super().__init__(config, model=model, devices=devices, log=log)

    # ---------------------------------------------------------------- setup
    def _load_data(self) -> None:
        config = self.config
        tokenizer_dir = config.tokenizer or config.model
        with multihost.all_or_none("loading the tokenizer and the reward functions"):
            self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
            self.rewards = load_rewards(config.reward, config.reward_weights or None)
        self.loader, stats = open_prompts(
            config.data, config, self.tokenizer, tokenizer_dir, batch_size=config.batch_size, shuffle=True, log=self.log
        )
        self.columns = self.loader.columns
        self.data_stats = stats
        self.log(f"data: {stats.examples} prompts from {config.data} ({stats.skipped_lines} bad records skipped)")
        self.eval_records = None
        if config.eval_data:
            eval_loader, _ = open_prompts(
                config.eval_data, config, self.tokenizer, tokenizer_dir, batch_size=1, shuffle=False, log=self.log
            )
            self.eval_records = eval_loader.records()  # rolled out whole at every evaluation
        with multihost.all_or_none("checking the reward functions' columns"):
            check_columns(self.rewards, self.columns)
            if config.eval_data:
                check_columns(self.rewards, eval_loader.columns)

    def _build_steps(self) -> None:
        config = self.config
        rows = config.batch_size * config.num_generations
        self.schedule = make_schedule(config, self.total_steps * config.num_iterations)
        self.optimizer = make_optimizer(config, self.schedule)
        self.loss = GRPOLoss(
            loss_type=config.setting("loss_type"),
            epsilon=config.epsilon,
            epsilon_high=config.epsilon if config.epsilon_high is None else config.epsilon_high,
            beta=config.setting("beta"),
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            num_iterations=config.num_iterations,
        )
        self.steps = TrainSteps(
            self.model,
            loss=self.loss,
            optimizer=self.optimizer,
            schedule=self.schedule,
            trainable=LoRAParam if self.lora else nnx.Param,
            mesh=self.mesh,
            batch_size=rows,
            grad_accum=config.grad_accum,
            seq_len=config.seq_len,
            dropout=self.lora and config.lora_dropout > 0,
        )
        self.state, self.frozen = self.steps.init(self.model, config.seed)
        self.num_trainable = self.steps.num_trainable
        self.reference = None  # the steps take no reference model: its log-probabilities come in the batch
        # The reference policy: the base model (adapters at zero add nothing), or the initial weights.
        self.ref_params = None
        if self.loss.beta != 0.0:
            copy = jnp.zeros_like if self.lora else jnp.copy
            self.ref_params = jax.tree.map(copy, self.state["params"])
        eval_graphdef, temperature, max_new_tokens = self.steps.eval_graphdef, config.temperature, config.max_new_tokens

        def logps(params, frozen, batch):
            model = nnx.merge(eval_graphdef, params, frozen, copy=True)
            return scored_logps(model, batch, temperature, max_new_tokens)

        self._logps = jax.jit(
            logps,
            in_shardings=(
                self.steps.state_sharding["params"],
                self.steps.frozen_sharding,
                self.steps.eval_batch_sharding,
            ),
            out_shardings=NamedSharding(self.mesh, PartitionSpec()),  # every process reads them whole
        )
        # Across processes each process rolls out its share of the prompts on its own devices.
        self.local_view = multihost.ProcessLocalView(self.mesh) if jax.process_count() > 1 else None
        if self.local_view is not None:
            self.local_frozen = self.local_view.local(self.frozen)  # never updated: seen once
            trees = {"frozen": self.frozen, "trained": self.state["params"]}
            copies = [name for name, tree in trees.items() if self.local_view.needs_copy(tree)]
            self.log(
                f"rollouts: each process on its {self.local_view.mesh.size} devices (mesh "
                f"{dict(self.local_view.mesh.shape)}); parameters "
                + (f"gathered across processes ({' and '.join(copies)})" if copies else "seen without a copy")
            )
        slots = -(-config.batch_size // jax.process_count()) * config.num_generations
        self.rollouts = Rollouts(self.rollout_model(), self.tokenizer, slots=slots, max_len=config.seq_len)

    def rollout_model(self) -> Qwen2ForCausalLM:
        """The policy with the current parameters, on the devices this process rolls out on (all of
        the mesh alone; across processes its own, `multihost.ProcessLocalView`). Call on every process
        together: across processes it may gather parameters."""
        if self.local_view is None:
            return self.current_model()
        model = self.steps.model(self.local_view.local(self.state["params"]), self.local_frozen)
        model.mesh = self.local_view.mesh
        return model

    # ---------------------------------------------------------------- one step
    def _scored_logps(self, params: nnx.State, batch: GRPOBatch) -> np.ndarray:
        arrays = self.steps.device_batch(batch.select, accumulate=False)
        return np.asarray(jax.device_get(self._logps(params, self.frozen, arrays)))

    def _rollout_and_score(
        self, records: list[PromptRecord], *, num_generations: int, temperature: float, seeds: list[int] | int
    ) -> tuple[Rollout, np.ndarray]:
        """Completions of `records` with the current parameters and their rewards `[completions, functions]`.

        Across processes each rolls out and scores its contiguous share of `records` (seeds: those of
        its rows); every process returns the whole, in the order of `records`."""
        model = self.rollout_model()
        bounds = np.linspace(0, len(records), jax.process_count() + 1).astype(int)  # contiguous, near-equal shares
        first, end = int(bounds[jax.process_index()]), int(bounds[jax.process_index() + 1])
        rows = slice(first * num_generations, end * num_generations)
        with multihost.all_or_none("rolling out and scoring the prompts"):
            local = self._rollout_share(
                model,
                records[first:end],
                num_generations=num_generations,
                temperature=temperature,
                seeds=seeds if isinstance(seeds, int) else seeds[rows],
            )
        pieces = multihost.gather_objects(local)
        if len(pieces) == 1:
            return pieces[0]
        rollouts = [rollout for rollout, _ in pieces]
        merged = Rollout(
            **{
                name: [row for rollout in rollouts for row in getattr(rollout, name)]
                for name in ("prompt_ids", "completion_ids", "logprobs", "texts")
            },
            truncated=np.concatenate([rollout.truncated for rollout in rollouts]),
            seconds=max(rollout.seconds for rollout in rollouts),  # the processes roll out at the same time
        )
        return merged, np.concatenate([per_function for _, per_function in pieces])

    def _rollout_share(
        self,
        model: Qwen2ForCausalLM,
        records: list[PromptRecord],
        *,
        num_generations: int,
        temperature: float,
        seeds: list[int] | int,
    ) -> tuple[Rollout, np.ndarray]:
        """Completions of `records` (this process's share) with `model` and their rewards."""
        config = self.config
        if not records:  # more processes than prompts (a small eval set)
            empty = Rollout([], [], [], [], np.zeros(0, bool), 0.0)
            return empty, np.zeros((0, len(self.rewards)), np.float32)
        rollout = self.rollouts.sample(
            model,
            [r.prompt_ids for r in records],
            num_generations=num_generations,
            max_new_tokens=config.max_new_tokens,
            temperature=temperature,
            top_p=config.top_p if temperature else 1.0,
            top_k=config.top_k if temperature else 0,
            seed=seeds,
        )
        prompts = [r.prompt for r in records for _ in range(num_generations)]
        completions = [
            [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
            for prompt, text in zip(prompts, rollout.texts)
        ]
        columns = {
            name: [r.columns.get(name) for r in records for _ in range(num_generations)] for name in self.columns
        }
        per_function = score(self.rewards, prompts, completions, columns, rollout.completion_ids, config.max_new_tokens)
        return rollout, per_function

    def run_step(self) -> tuple[dict[str, Any], dict[str, str]]:
        config = self.config
        step = self.completed_steps()
        epoch, index = self.loader.advance()
        records = self.loader.batch(epoch, index)
        generations = config.num_generations
        rows = len(records) * generations
        seeds = [int(s) for s in np.random.SeedSequence([config.seed, step]).generate_state(rows) % (2**31)]
        start = time.perf_counter()
        rollout, per_function = self._rollout_and_score(
            records, num_generations=generations, temperature=config.temperature, seeds=seeds
        )
        weights = [r.weight for r in self.rewards]
        total = weighted_sum(per_function, weights)
        advantages, zero_std = group_advantages(total, generations, config.scale_rewards)
        loss_mask = ~rollout.truncated if config.mask_truncated_completions else None
        batch = build_batch(
            rollout.prompt_ids,
            rollout.completion_ids,
            rollout.logprobs,
            advantages,
            config.seq_len,
            config.max_new_tokens,
            loss_mask,
        )
        if self.ref_params is not None:
            batch = batch.replace(ref_logps=self._scored_logps(self.ref_params, batch))
        if config.num_iterations > 1:  # the rollout's policy, before the first update
            batch = batch.replace(old_logps=self._scored_logps(self.state["params"], batch))
        rollout_seconds = time.perf_counter() - start
        updates = []
        for _ in range(config.num_iterations):
            updates.append(self.train_step(batch.select))
        update_seconds = time.perf_counter() - start - rollout_seconds
        lengths = np.array([len(ids) for ids in rollout.completion_ids])
        metrics = {name: float(np.mean([u[name] for u in updates])) for name in updates[0]}
        metrics["logprob_diff"] = updates[0]["logprob_diff"]  # at the rollout's parameters
        metrics["lr"] = updates[-1]["lr"]
        record = {
            **metrics,
            "reward": nan_mean(total),
            "reward_std": float(_nanstd(total)),
            **{f"rewards/{r.name}/mean": nan_mean(per_function[:, i]) for i, r in enumerate(self.rewards)},
            **{f"rewards/{r.name}/std": float(_nanstd(per_function[:, i])) for i, r in enumerate(self.rewards)},
            "frac_reward_zero_std": float(np.mean(zero_std)),
            "completion_length": float(lengths.mean()),
            "completion_length/max": int(lengths.max()),
            "completion_length/truncated_fraction": float(rollout.truncated.mean()),
            "tokens": rollout.generated_tokens,
            "rollout_seconds": rollout_seconds,
            "update_seconds": update_seconds,
            "step_time": rollout_seconds + update_seconds,
            "rollout_tokens_per_s": rollout.generated_tokens / max(rollout.seconds, 1e-9),
            "epoch": self.loader.epoch,
        }
        return _drop_nan(record), {"reward": f"{record['reward']:.3f}", "loss": f"{metrics['loss']:.4f}"}

    def eval_metrics(self) -> dict[str, Any]:
        """Greedy rollouts of the eval prompts: `eval_reward` and `eval_rewards/<name>` (means)."""
        if not self.eval_records:
            return {}
        rollout, per_function = self._rollout_and_score(self.eval_records, num_generations=1, temperature=0.0, seeds=0)
        total = weighted_sum(per_function, [r.weight for r in self.rewards])
        record = {
            "eval_reward": nan_mean(total),
            **{f"eval_rewards/{r.name}": nan_mean(per_function[:, i]) for i, r in enumerate(self.rewards)},
            "eval_completion_length": float(np.mean([len(ids) for ids in rollout.completion_ids])),
        }
        return _drop_nan(record)

    def evaluate(self) -> float | None:
        """The mean total reward of greedy rollouts of the eval prompts (None without eval data)."""
        return self.eval_metrics().get("eval_reward")

    def run(self, on_step_end: Callable[[Trainer, int], None] | None = None) -> int:
        try:
            return super().run(on_step_end)
        finally:
            self.rollouts.close()


def _nanstd(values: np.ndarray) -> float:
    valid = values[~np.isnan(values)]
    return float(np.std(valid, ddof=1)) if valid.size > 1 else float("nan")
