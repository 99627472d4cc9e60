"""The ``transformers.Trainer`` of a preference run: its loss, logs, checkpoints and batch order.

:class:`PreferenceTrainer` changes only how the loss is computed and logged (and how
checkpoints are written and resumed), so everything ``TrainingArguments`` offers works
unchanged. :class:`EpochLengthGroupedSampler` is its length-grouped order and
:class:`JsonlLogCallback` writes every log event to ``train_log.jsonl``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import Trainer, TrainerCallback

from mmsafe.errors import ModelError
from mmsafe.models.recipe import save_recipe
from mmsafe.train.config import TrainConfig
from mmsafe.train.data import PreferenceDataset
from mmsafe.train.forward import ResponseLogProbs, score_batch
from mmsafe.train.objectives import Objective
from mmsafe.train.resume import save_trainer_state
from mmsafe.train.scoring import padding_share

#: Batch keys that travel to the device uncast (see :meth:`PreferenceTrainer._prepare_inputs`).
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


class PreferenceTrainer(Trainer):
    """A Trainer whose loss is its objective's (SFT, DPO or BPO) over log-probs from :func:`score_batch`.

    ``objective`` (default: the one ``config.loss`` names) says whether reference
    log-probs are needed and computes the loss and its metrics. ``reference`` is called
    for batches that carry no precomputed reference log-probs. ``sources`` names the
    rejected sources, for the per-source logs.
    """

    def __init__(
        self,
        *args: Any,
        config: TrainConfig,
        sources: Sequence[str],
        reference: Any | None = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.preference_config = config
        self.objective: Objective = objective if objective is not None else config.objective()
        self.sources = list(sources)
        self.reference = reference
        # The loss is a mean over examples, not over tokens: let the Trainer divide it by
        # the accumulation steps itself (it would not, for a model whose forward takes **kwargs).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metric_names = ["batch/padding_share", *self.objective.metric_names(self.sources)]
        self._metric_sums = torch.zeros(len(self._metric_names), dtype=torch.float64)
        self._metric_counts = torch.zeros(len(self._metric_names), dtype=torch.float64)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, with ``trainer_state.json`` written atomically.

        That file is written last and marks the checkpoint complete: written in place, a full
        disk left it empty and every later resume failed on it.
        """
        state = self.state
        state.save_to_json = functools.partial(save_trainer_state, state)  # type: ignore[method-assign]  # an instance attribute, not a field: not saved
        try:
            super()._save_checkpoint(model, trial)
        finally:
            vars(state).pop("save_to_json", None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume full weights through ``from_pretrained``, which maps saved key names back.

        In transformers 5, ``save_pretrained`` writes some architectures (LLaVA among them)
        under their legacy key names, and the Trainer's own loader reads the file with
        ``load_state_dict(strict=False)``: every key was reported missing and a resumed run
        silently went on from the base weights. Adapters, FSDP and DeepSpeed keep the
        Trainer's own path.
        """
        from transformers import PreTrainedModel

        target = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
        if (
            not has_weights
            or not isinstance(target, PreTrainedModel)
            or hasattr(target, "peft_config")
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = type(target).from_pretrained(str(folder), dtype=next(target.parameters()).dtype, use_safetensors=True)
        try:
            target.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as error:
            raise ModelError(
                f"{folder}: the checkpoint's weights do not fit the model being trained ({str(error).splitlines()[0]})"
            ) from None
        finally:
            del saved

    #: The model's input recipe (:mod:`mmsafe.models.recipe`), written beside every save.
    input_recipe: Any = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does, then the input recipe beside the weights.

        Checkpoints are saved through here too (before ``trainer_state.json``, which marks
        a checkpoint complete), so every complete ``checkpoint-N`` holds the recipe.
        """
        super().save_model(output_dir, _internal_call)
        if self.input_recipe is not None and self.args.should_save:
            # TrainingArguments fills in output_dir when it is not given
            save_recipe(self.input_recipe, output_dir if output_dir is not None else cast(str, self.args.output_dir))

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Examples of similar length batched together (``group_by_length``), in an order fixed per epoch by the seed."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.preference_config.group_by_length or not isinstance(dataset, PreferenceDataset):
            return super()._get_train_sampler(train_dataset)
        lengths = [example_length(example) for example in dataset.examples]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        # Grouped by the global batch (every process, every accumulation step), so the order does
        # not depend on how a batch is split over processes: 2 processes x 1 = 1 process x 2.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthGroupedSampler(global_batch, lengths, seed)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Under DeepSpeed the Trainer casts every float input to the model's dtype; bf16
        # would round a reference log-prob of -250.1 to -250, so these travel uncast.
        exact = {key: inputs[key] for key in REFERENCE_KEYS if key in inputs}
        inputs = super()._prepare_inputs({key: value for key, value in inputs.items() if key not in exact})
        inputs.update({key: value.to(self.args.device) for key, value in exact.items()})
        return inputs

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        objective = self.objective
        policy = score_batch(model, inputs, average=objective.average_logprobs)
        if (
            model.training
        ):  # the positions the forwards ran where the path reports them (prompt-cache), else the layout's
            self.record_metrics({"batch/padding_share": policy.positions or padding_share(inputs)})
        reference = self.reference_logprobs(inputs) if objective.needs_reference else None
        output = objective.compute(policy, reference, inputs["rejected_source_ids"], self.sources)
        self.record_metrics(output.metrics)
        return (output.loss, output.outputs) if return_outputs else output.loss

    def reference_logprobs(self, inputs: dict[str, Any]) -> ResponseLogProbs:
        """The batch's precomputed reference log-probs, else the reference model's."""
        if "reference_chosen_logps" in inputs:
            return ResponseLogProbs(
                inputs["reference_chosen_logps"], inputs["reference_rejected_logps"], inputs["rejected_mask"]
            )
        if self.reference is None:
            raise RuntimeError("no reference log-probs: the batch has none and no reference model is set")
        with self.accelerator.autocast():  # the precision of the policy's own (prepared) forward
            return self.reference(inputs)

    def record_metrics(self, values: dict[str, tuple[float, float]]) -> None:
        """Add (sum, count) pairs to the running metrics, averaged at the next log."""
        for position, name in enumerate(self._metric_names):
            if name in values:
                total, count = values[name]
                self._metric_sums[position] += total
                self._metric_counts[position] += count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A step's log, or the end-of-training summary (which flushes the steps after the
        # last logging step); both come on every process, so the reduction below is matched.
        if "loss" in logs or "train_runtime" in logs:
            sums, counts = self._metric_sums, self._metric_counts
            if self.args.world_size > 1:
                stacked = self.accelerator.reduce(
                    torch.stack([sums, counts]).to(self.args.device), reduction="sum"
                ).cpu()
                sums, counts = stacked[0], stacked[1]
            for name, total, count in zip(self._metric_names, sums.tolist(), counts.tolist(), strict=True):
                if count > 0:
                    logs[name] = total / count
            self._metric_sums.zero_()
            self._metric_counts.zero_()
        super().log(logs, start_time)


def example_length(example: Any) -> int:
    """Tokens of an encoded example (prompt once, every response): what length grouping sorts by."""
    return len(example.prompt_ids) + sum(len(ids) for ids in example.responses)


class EpochLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length-grouped order (random groups of similar length, the longest batch first), seeded per epoch.

    The order of epoch ``e`` depends on ``seed`` and ``e`` only, so a resumed run (which
    skips the batches already seen) gets the same order as the run it continues.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, lengths, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class JsonlLogCallback(TrainerCallback):
    """Appends every log event, with its step, to ``output_dir/train_log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, state: Any, entry: dict[str, Any]) -> None:
        if state.is_world_process_zero:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({"step": state.global_step, **entry}) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state, {"event": "train_begin"})  # after a resume, step is the checkpoint's

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs:
            self._write(state, logs)
