"""The recipe schema: every field with its default and help text, the one place a default is written.

The CLI, the Python API, the plan and the docs read defaults from here. `Recipe` also knows where it came from (its
file, YAML lines, --set items): other modules ask it through `where()`, `resolve()` and `source`, never its private
fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .locate import fmt_path, resolve_path, where

PREFERENCE_TYPES = ("dpo", "orpo", "simpo")  # stages that train on pairs (prompt, chosen, rejected)
UNPAIRED_TYPES = ("kto",)  # stages that train on single answers labelled desirable or not (pairs are split)
REFERENCE_TYPES = ("dpo", "kto")  # stages with a reference model (previous_stage or base)
STAGE_TYPE_HELP = "Stage type: sft | dpo | kto | orpo | simpo."
REWRITING_INITS = ("pissa", "olora")  # adapter inits that move part of the base weights into the adapter

# Fields added after stage hashes were first recorded, with the value they had implicitly before: left out of a
# stage's or adapter's identity at that value, so a recipe that does not use them keeps its finished stages.
ADDED_DEFAULTS = {
    "adapter": {"init": "kaiming"},
    "dpo": {"loss_weights": None, "f_divergence_type": "reverse_kl", "ld_alpha": None, "use_weighting": False},
    "train": {"early_stopping": "auto"},  # what auto decides is part of the stage's inputs (steps/train.py)
    "merge": {"peft_forward": "auto"},
}


def identity(section: str, values: dict) -> dict:
    """`values` without the fields of ADDED_DEFAULTS[section] that hold their old implicit value."""
    added = ADDED_DEFAULTS.get(section, {})
    out = {k: v for k, v in values.items() if not (k in added and v == added[k])}
    if isinstance(out.get("train"), dict):  # a stage: its train section too
        out["train"] = identity("train", out["train"])
    return out


def defaults(section: type[BaseModel]) -> dict:
    """A section's field defaults, by name: code outside the schema reads its defaults from here."""
    return {k: f.default for k, f in section.model_fields.items()}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- model / adapter


class ModelSection(_Section):
    name_or_path: str = Field(description="Hugging Face hub id or local folder of the base model.")
    quantization: Literal["nf4", "int8", "none"] = Field(
        "nf4", description="Base weights: nf4 (4-bit NF4, double quant), int8, or none (full precision)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of unquantized weights and of 4-bit compute."
    )
    chat_template: str | None = Field(
        None,
        description="null keeps the tokenizer's own template (chatml if it has none); 'chatml' forces the built-in "
        "ChatML template; any other string is used as a Jinja template.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Container dtype of the packed NF4 weights: uint8, or the training dtype (bfloat16) for "
        "FSDP, which flattens every weight of a block into one float tensor. The numbers are the same.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless asked.")


class AdapterSection(_Section):
    """ONE adapter config, shared by every stage: the chain trains the same adapter throughout."""

    method: Literal["dora", "lora"] = Field("dora", description="dora (weight-decomposed LoRA) or plain lora.")
    r: int = Field(16, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with "
                         "rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    init: Literal["kaiming", "gaussian", "eva", "pissa", "olora"] = Field(
        "kaiming",
        description="How the adapter starts (PEFT's init_lora_weights). kaiming (PEFT's default, and prefopt's before "
        "this option: A Kaiming-uniform, B zero) and gaussian (A normal with std 1/r, B zero) start at the base "
        "exactly; eva too (B zero, A from an SVD of each layer's inputs on the first stage's training rows). pissa "
        "(the top-r singular directions of W) and olora (a QR of W) move part of W into the adapter and train the "
        "rest of the base frozen (W - s*B0*A0): the model starts at the base, but the adapter disabled is not the "
        "base, so they are refused with a stage whose reference is the base; they need a full-precision base "
        "(quantization: none). prefopt rebuilds that residual base at every load, and the merge folds it in.",
    )
    dora_impl: Literal["fast", "peft"] = Field(
        "fast",
        description="DoRA forward: fast (prefopt's exact low-rank weight norm, no full W + sBA and no second base "
        "matmul; same results and saved files as PEFT) or peft (PEFT's own DoRA layer).",
    )
    dora_dropout: Literal["lowrank", "full"] = Field(
        "lowrank",
        description="What adapter dropout drops in DoRA: lowrank (the low-rank branch only, as torchtune; no extra "
        "matmul) or full (the DoRA paper's and PEFT's semantics, which also run the base layer on the dropped-out "
        "input). With dora_impl: peft only full exists, and is the default.",
    )

    @model_validator(mode="after")
    def _dora_semantics(self) -> AdapterSection:
        if self.method == "dora" and self.dora_impl == "peft" and self.dora_dropout == "lowrank":
            if "dora_dropout" in self.model_fields_set and self.dropout > 0:
                raise ValueError(
                    "dora_dropout: lowrank needs dora_impl: fast (PEFT's DoRA layer only has the full semantics); "
                    "set dora_impl: fast, or dora_dropout: full"
                )
            self.__dict__["dora_dropout"] = "full"  # PEFT's semantics, recorded as such
        return self


# ---------------------------------------------------------------------------------------------- stages


class SourceSection(_Section):
    """One source of a mixture: a file or hub dataset, and how much of it to take."""

    path: str = Field(description="Local JSONL/JSON/Parquet/CSV file, or a `datasets` hub id.")
    split: str = Field("train", description="Split to read when `path` is a hub id.")
    fraction: float | None = Field(None, gt=0, le=1, description="Take this fraction of the source's rows (seeded).")
    rows: int | None = Field(None, gt=0, description="Take this many of the source's rows (seeded); not with fraction.")
    sha256: str | None = Field(None, description="Expected content hash of `path` (as DataSection.sha256).")

    @model_validator(mode="after")
    def _one_amount(self) -> SourceSection:
        if self.fraction is not None and self.rows is not None:
            raise ValueError("give fraction or rows, not both")
        return self


class ReferenceFilterSection(_Section):
    """Score every training row with the stage's reference model and drop the lowest-scoring fraction."""

    score: Literal["auto", "margin", "logprob"] = Field(
        "auto",
        description="margin: length-normalised log-prob margin of chosen over rejected (preference stages); logprob: "
        "mean per-token log-prob of the answer under the base (SFT stages); auto picks by stage type.",
    )
    drop_fraction: float = Field(0.05, gt=0, lt=1, description="Drop this fraction of the training rows, lowest first.")
    batch_size: int = Field(8, gt=0, description="Rows scored per forward pass.")


class QualitySection(_Section):
    """The data step's filters, run before the split over training and held-out rows together."""

    dedup: Literal["none", "exact", "near"] = Field(
        "near", description="none | exact (normalised rows) | near (exact + MinHash LSH near-duplicates)."
    )
    near_threshold: float = Field(
        0.85, gt=0, le=1, description="Estimated Jaccard similarity of normalised word shingles at which two rows are "
        "near duplicates (the first is kept)."
    )
    decontaminate: list[str] = Field(
        default_factory=list,
        description="Evaluation sets (files, folders of CSV/JSONL files, or hub ids): a row sharing a 13-word n-gram "
        "with one of their items is dropped.",
    )
    min_tokens: int = Field(4, ge=0, description="Drop rows whose text (prompt + answer) is shorter than this many "
                            "tokens.")
    reference_filter: ReferenceFilterSection | None = Field(
        None, description="Opt-in: drop the rows the reference model rates lowest (loads the model).")
    review_fraction: float = Field(
        0.05, ge=0, le=1, description="Kept rows written to review_sample.jsonl/.md for a person to read (at least 20)."
    )


class DataSection(_Section):
    path: str | Annotated[list[SourceSection], Field(min_length=1)] = Field(
        description="Local JSONL/JSON/Parquet/CSV file, or a `datasets` hub id; or a list of sources (a mixture): "
        "[{path: ..., fraction: 0.3}, {path: ..., rows: 1000}]."
    )
    split: str = Field("train", description="Split to read when `path` is a hub id.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction held out for evaluation (seeded split).")
    eval_path: str | None = Field(None, description="A separate evaluation file; overrides eval_fraction.")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows (after the split).")
    sha256: str | None = Field(None, description="Expected content hash of `path` (first 16 hex digits of its sha256); "
                               "a run folder's recipe.yaml records it, and a changed file is refused.")
    eval_sha256: str | None = Field(None, description="Expected content hash of `eval_path`, as `sha256`.")
    quality: QualitySection = Field(default_factory=QualitySection, description="Filters, report and review sample.")

    def sources(self) -> list[SourceSection]:
        """The training sources: `path` as a one-source mixture, or the mixture as given."""
        if isinstance(self.path, str):
            return [SourceSection(path=self.path, split=self.split, sha256=self.sha256)]
        return list(self.path)


class EarlyStoppingSection(_Section):
    """Stop a stage when its held-out metric stops improving, and keep the best checkpoint's adapter."""

    metric: str = Field("eval_loss", description="The held-out metric watched (eval_loss; a preference stage's "
                        "eval_rewards/accuracies, eval_rewards/margins, ...; the eval_ prefix may be left out).")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (a loss); max: higher is better.")
    patience: int = Field(2, gt=0, description="Stop after this many evaluations without an improvement.")
    min_delta: float = Field(0.0, ge=0, description="An improvement must beat the best by more than this.")


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    batch_size: int = Field(2, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(8, gt=0, description="Gradient accumulation steps.")
    max_length: int = Field(2048, gt=0, description="Truncate sequences (prompt + completion) to this many tokens.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch_fused", description="transformers optimizer name (adamw_torch_fused, adamw_torch, "
                       "paged_adamw_8bit, ...); the default, transformers' own, updates every tensor in one kernel.")
    gradient_checkpointing: bool = Field(True, description="Trade compute for activation memory.")
    logging_steps: int = Field(10, gt=0, description="Log every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (null: once, at the end).")
    checkpoint_every: int | str = Field(
        "10%", description="Checkpoint inside the stage (adapter, optimizer, scheduler, RNG, trainer state) every N "
        "optimizer steps, every 'P%' of the stage's steps, or every 'Mmin' of wall time; 'off' for none. A rerun after "
        "an interruption resumes from the last one.",
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="SFT: train on the assistant turns only (every other token masked), or on all tokens.")
    early_stopping: EarlyStoppingSection | Literal["auto"] | None = Field(
        "auto", description="Evaluate on the held-out rows each epoch (or every eval_steps), stop when the metric has "
        "not improved for `patience` evaluations, and hand the next stage the best checkpoint's adapter. auto: on "
        "(eval_loss, patience 2) for an SFT stage with held-out rows and under 1,000 training rows -- where the "
        "guidance is to watch the held-out loss after the first epoch -- and said at start-up; off otherwise. null: "
        "off. Takes over checkpoint_every: a checkpoint at every evaluation.")

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping(cls, v):
        return {} if v is True else None if v is False else v  # `early_stopping: true`: the defaults

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, v):
        import re as _re

        if v is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if isinstance(v, bool):
            raise ValueError("must be steps (an integer), a percentage such as '10%', minutes such as '30min', "
                             "or 'off'")
        if isinstance(v, int):
            if v <= 0:
                raise ValueError("must be > 0 steps (or 'off')")
            return v
        v = v.strip()
        m = _re.fullmatch(r"(\d+(?:\.\d+)?)(%|min)", v)
        if v == "off" or (m and float(m.group(1)) > 0 and (m.group(2) == "min" or float(m.group(1)) < 100)):
            return v
        raise ValueError(f"'{v}' is not steps (an integer), a percentage such as '10%', minutes such as '30min', "
                         "or 'off'")


class _StageBase(_Section):
    name: str = Field(description="Stage name; unique in the recipe; names the stage folder.")
    data: DataSection = Field(description="Where the stage's rows come from and how they are split.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings of this stage.")
    trainer_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra fields of the TRL config, checked against its fields."
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v) or v.startswith("."):
            raise ValueError("must be letters, digits, '-', '_' or '.' (it names the stage folder)")
        return v

    @model_validator(mode="after")
    def _reference_score_fits_the_stage(self) -> _StageBase:
        rf = self.data.quality.reference_filter
        pref = self.type in PREFERENCE_TYPES
        if rf is not None and self.type in UNPAIRED_TYPES:
            raise ValueError(f"@data.quality.reference_filter: not for a {self.type} stage: its rows are single "
                             "answers, some undesirable on purpose, so a low reference score marks no bad row; remove "
                             "it (the other filters apply)")
        if rf is not None and rf.score == ("logprob" if pref else "margin"):
            # "@<sub.path>: " names the key below the stage (see _problems_from)
            raise ValueError(f"@data.quality.reference_filter.score: {rf.score} scores "
                             f"{'SFT' if pref else 'preference'} rows; a {self.type} stage uses "
                             f"{'margin' if pref else 'logprob'} (or auto)")
        return self

    def effective_max_length(self) -> int | None:
        """The length the stage's trainer cuts sequences to: trainer_kwargs.max_length (last wins) over
        train.max_length. The one place this is worked out: the data step, the stage's TRL config and the memory
        plan read it here."""
        n = self.trainer_kwargs.get("max_length", self.train.max_length)
        return n if isinstance(n, int) or n is None else self.train.max_length  # a wrong type: preflight reports it


class SFTStage(_StageBase):
    type: Literal["sft"] = Field("sft", description=STAGE_TYPE_HELP)


_REFERENCE_HELP = ("previous_stage: a frozen copy of the adapter as the stage begins (the SFT model); base: the base "
                   "model with the adapter disabled.")
_PRECOMPUTE_HELP = ("Compute the reference's log-probs once, before training (read from prefopt's cache when nothing "
                    "they depend on changed), instead of a reference forward every step of every epoch.")


class DPOStage(_StageBase):
    type: Literal["dpo"] = Field("dpo", description=STAGE_TYPE_HELP)
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference.")
    loss_type: str | Annotated[list[str], Field(min_length=1)] = Field(
        "sigmoid", description="A DPOTrainer loss (sigmoid, ipo, hinge, bco_pair, sft, ...), or a list of them "
        "combined with loss_weights: [sigmoid, sft] is RPO (an SFT term on the chosen answers), [sigmoid, bco_pair, "
        "sft] with loss_weights [0.8, 0.2, 1.0] is MPO. Each part is logged as loss/<name>.")
    loss_weights: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] | None = Field(
        None, description="One weight per loss in loss_type (null: 1.0 each).")
    f_divergence_type: str = Field(
        "reverse_kl", description="The divergence from the reference (f-DPO): reverse_kl (standard DPO), forward_kl, "
        "js_divergence or alpha_divergence; other than reverse_kl only with the losses built on the reward "
        "difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).")
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO: weight of the answer tokens past the shorter answer's length (1.0: "
        "standard DPO, 0.0: they are masked); counters DPO's drift towards longer answers. null: off.")
    use_weighting: bool = Field(
        False, description="WPO: weight each pair by the policy's length-normalised probability of both answers "
        "(not with aot / aot_unpaired).")
    reference: Literal["previous_stage", "base"] = Field("previous_stage", description=_REFERENCE_HELP)
    precompute_ref_log_probs: bool = Field(True, description=_PRECOMPUTE_HELP)

    def losses(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    # (loss names, their number against loss_weights and repeats are checked by prefopt.stages.dpo.check, with
    # the other stage problems, so a recipe's every problem is listed at once)


class KTOStage(_StageBase):
    type: Literal["kto"] = Field("kto", description=STAGE_TYPE_HELP)
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (the KTO paper's loss, with its batch KL estimate) or apo_zero_unpaired (APO-zero: "
        "raise desirable answers, lower undesirable ones, no KL term).")
    desirable_weight: float | None = Field(
        None, gt=0, description="Weight of the desirable rows' loss. null (both weights null): balanced from the "
        "training rows' label counts -- the minority label's weight raised so weight x rows is equal, inside TRL's "
        "recommended range (KTO paper eq. 8), and said at start-up.")
    undesirable_weight: float | None = Field(
        None, gt=0, description="Weight of the undesirable rows' loss (null: see desirable_weight).")
    reference: Literal["previous_stage", "base"] = Field("previous_stage", description=_REFERENCE_HELP)
    precompute_ref_log_probs: bool = Field(True, description=_PRECOMPUTE_HELP)


class ORPOStage(_StageBase):
    type: Literal["orpo"] = Field("orpo", description=STAGE_TYPE_HELP)
    beta: float = Field(0.1, gt=0, description="ORPO's lambda: weight of the odds-ratio term.")


class SimPOStage(_StageBase):
    type: Literal["simpo"] = Field("simpo", description=STAGE_TYPE_HELP)
    beta: float = Field(2.0, gt=0, description="SimPO reward scale.")
    gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (TRL's simpo_gamma).")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of the NLL term (0 is pure SimPO).")


STAGE_TYPES: dict[str, type[_StageBase]] = {"sft": SFTStage, "dpo": DPOStage, "kto": KTOStage, "orpo": ORPOStage,
                                            "simpo": SimPOStage}

Stage = Annotated[SFTStage | DPOStage | KTOStage | ORPOStage | SimPOStage, Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------- tracking / merge


class WandbSection(_Section):
    project: str = Field("prefopt", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="online needs `wandb login`; offline writes runs you can `wandb sync` later."
    )
    tags: list[str] = Field(default_factory=list, description="Tags added to every stage's run.")
    group: str | None = Field(None, description="W&B group of the run's stages, evaluation and merge (null: "
                              "<name>-<run id>, one group per run folder; `prefopt sweep` sets one per sweep).")


class TrackingSection(_Section):
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases: one run per stage.")


class MergeSection(_Section):
    """Fold the final adapter into the base after the last stage, then verify it (runs/<name>/merged/)."""

    base: Literal["auto", "dequantized", "original"] = Field(
        "auto",
        description="dequantized: the same NF4/int8 round trip the training saw (default after a quantized "
        "base); original: the unquantized weights (default after an unquantized base).",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of the merged weights.")
    verify: bool = Field(True, description="Compare merged and adapter models' logits on probe prompts.")
    max_rel_logit_diff: float = Field(0.05, gt=0, description="Fail if max |Δlogit| / max |logit| exceeds this.")
    mean_kl: float = Field(1e-4, gt=0, description="Fail if the mean per-token KL(adapter || merged) exceeds this.")
    min_top1_agreement: float = Field(0.9, ge=0, le=1, description="Fail if top-1 tokens agree less often.")
    peft_forward: Literal["auto"] | bool = Field(
        "auto",
        description="Also run PEFT's DoRA forward in the verification and report it beside (not judged). auto: on "
        "for a base under 1 GiB; above, it costs a full-size pass per layer (PEFT materializes W + s B A).",
    )


# ---------------------------------------------------------------------------------------------- evaluation


class MMLUSection(_Section):
    """MMLU through lm-evaluation-harness, base and tuned on the same items in the same process."""

    path: str = Field("cais/mmlu", description="Hub dataset id (cais/mmlu), or a local folder in the original "
                      "Hendrycks layout: dev/<subject>_dev.csv and test/<subject>_test.csv, no header (question, A, B, "
                      "C, D, answer letter). A local folder works offline.")
    num_fewshot: int = Field(5, ge=0, description="Few-shot examples per question, taken from the dev split.")
    limit: int | None = Field(None, gt=0, description="At most this many test questions per subject (null: all).")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size (log-likelihood requests per forward).")


class CompletionsSection(_Section):
    """The same prompts through base and tuned, greedy, side by side, for a person to read."""

    n: int = Field(25, ge=0, description="How many prompts (the method asks for 20-30 read by a person).")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion, in tokens (greedy decoding).")
    prompts: str | None = Field(None, description="A .jsonl/.txt file of prompts (one per line: a string, or an object "
                                "with `prompt` or `messages`); null: the last stage's held-out prompts.")


class GatesSection(_Section):
    """Thresholds the tuned model must meet before it is merged; null turns a gate off."""

    max_mmlu_drop: float | None = Field(2.0, description="Fail if MMLU falls by more than this many points "
                                        "against the base (base - tuned > max_mmlu_drop).")
    min_reward_accuracy: float | None = Field(None, ge=0, le=1, description="Fail if the last preference stage's "
                                              "held-out reward accuracy is below this.")
    min_reward_margin: float | None = Field(None, description="Fail if the last preference stage's held-out mean "
                                            "reward margin (chosen - rejected reward) is below this: a model that "
                                            "did not move has accuracy by luck but a margin near 0.")
    min_task_delta: float | None = Field(None, description="Fail if the held-out task metric (preference stages: "
                                         "tuned-over-base win rate - 0.5; SFT: exact match tuned - base) is below "
                                         "this.")


class EvalSection(_Section):
    """Measure the result before it is merged: held-out metrics, MMLU delta, completions, an eval log, gates."""

    after: Literal["last", "every_stage"] = Field("last", description="last: evaluate the final adapter after the last "
                                                  "stage, before the merge; every_stage: every stage's adapter too.")
    mmlu: MMLUSection | None = Field(default_factory=MMLUSection, description="MMLU through lm-evaluation-harness "
                                     "(null skips it).")
    completions: CompletionsSection = Field(default_factory=CompletionsSection,
                                            description="Completions side by side (n: 0 skips them).")
    gates: GatesSection = Field(default_factory=GatesSection, description="Gates checked before the merge.")
    seed: int | None = Field(None, description="Seed for generation and lm-eval (null: the recipe's seed).")

    @model_validator(mode="after")
    def _mmlu_gate_needs_mmlu(self) -> EvalSection:
        if self.mmlu is None and self.gates.max_mmlu_drop is not None:
            raise ValueError("gates.max_mmlu_drop is set but mmlu is null (nothing to measure the drop on); set "
                             "mmlu, or gates.max_mmlu_drop: null")
        return self


# ---------------------------------------------------------------------------------------------- sweep


SWEEP_MAX_POINTS = 64  # a grid larger than this is refused unless max_points says more


class SweepSection(_Section):
    """`prefopt sweep RECIPE`: the values to try, every combination a point with its own run folder
    (runs/<name>-sweep/<point>/); `prefopt run` runs the recipe as written and leaves this section alone."""

    grid: dict[str, list[Any]] = Field(
        description="Recipe key -> values to try, as `--set` names keys (a stage by index or name), e.g. "
        "{stages.dpo.beta: [0.05, 0.1, 0.3], adapter.r: [8, 16]}: the cartesian product, in this order.")
    select: str | None = Field(
        None, description="The metric that marks the best point: <metric> (the last stage that logs it, e.g. "
        "eval/rewards/accuracies), <stage>/<metric> (dpo/eval/loss, sft/train/loss), mmlu_delta or train_time_s; "
        "':min' or ':max' after it (default: min for a loss or a time, max otherwise). null: eval/loss of the last "
        "stage, min.")
    max_points: int = Field(SWEEP_MAX_POINTS, gt=0, description="Refuse a grid of more points than this (a typo "
                            "in a grid can multiply the work; raise it on purpose).")


# ---------------------------------------------------------------------------------------------- the recipe


class Recipe(_Section):
    name: str = Field(description="Recipe name; the run folder is runs/<name>/ unless --output-dir says otherwise.")
    seed: int = Field(42, description="Seed for data splits, adapter init and training.")
    model: ModelSection = Field(description="The base model and how it is loaded.")
    adapter: AdapterSection = Field(default_factory=AdapterSection,
                                    description="The ONE adapter config every stage shares.")
    stages: list[Stage] = Field(min_length=1, description="Stages, run in order, sharing one adapter.")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Experiment tracking.")
    merge: MergeSection | None = Field(None, description="Merge the final adapter after the last stage (off if "
                                       "absent).")
    cache_dir: str | None = Field(
        None, description="Shared cache of finished stages and reference log-probs, reused across run folders: "
        "null is $PREFOPT_CACHE_DIR or ~/.cache/prefopt; 'off' turns sharing off.")

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false
    eval: EvalSection | None = Field(None, description="Evaluate before the merge: held-out metrics, MMLU delta, "
                                     "completions, eval log, gates (off if absent; the shipped recipes have one).")
    sweep: SweepSection | None = Field(None, description="What `prefopt sweep` tries (see its section); `prefopt "
                                       "run` ignores it.")

    # Where the recipe came from: relative data paths resolve against its folder; errors cite its lines.
    _base_dir: Path | None = PrivateAttr(None)
    _lines: dict = PrivateAttr(default_factory=dict)
    _source: str | None = PrivateAttr(None)
    _overrides: dict = PrivateAttr(default_factory=dict)  # key path -> the --set item that gave its value

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return _StageBase._name_is_a_folder_name(v)

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: '{st.name}' is already used by stages[{seen[st.name]}]; names "
                                 "must be unique")
            seen[st.name] = i
        return self

    @model_validator(mode="after")
    def _init_fits_the_chain(self) -> Recipe:
        init = self.adapter.init
        if init not in REWRITING_INITS:
            return self
        for i, st in enumerate(self.stages):
            if st.type in REFERENCE_TYPES and st.reference == "base":
                raise ValueError(f"@adapter.init: {init} rewrites the base weights (W becomes W - s*B0*A0), so the "
                                 f"adapter disabled is no longer the base, and stages[{i}] ({st.name}, {st.type}) has "
                                 "reference: base; use reference: previous_stage, or another init (kaiming, "
                                 "gaussian, eva)")
        if self.model.quantization != "none":
            raise ValueError(f"@adapter.init: {init} needs the base's full-precision weights "
                             + ("(PEFT refuses it on a quantized base: "
                                "'Please initialize PiSSA under float32, float16, or bfloat16')" if init == "pissa"
                                else "(prefopt rebuilds the rewritten base at every load, exactly only in full "
                                "precision)")
                             + f", and model.quantization is {self.model.quantization}; set model.quantization: "
                             "none, or another init (kaiming, gaussian, eva)")
        return self

    @property
    def source(self) -> str | None:
        """The recipe file it was loaded from (None for a recipe built in Python)."""
        return self._source

    @property
    def base_dir(self) -> Path | None:
        """The folder relative paths resolve against (after the current folder): the recipe file's folder."""
        return self._base_dir

    def resolve(self, path: str | None) -> Path | None:
        """A local file or folder the recipe names, resolved (the current folder first, then the recipe's); None if
        it does not exist (a hub id, or a missing file)."""
        return resolve_path(path, self._base_dir) if path is not None else None

    def line_of(self, *path, exact: bool = False) -> str:
        """' (recipe.yaml line 14)' for a key path, its nearest written parent's line, or ' (from --set k=v)';
        exact: the key's own line in the recipe file, or ''."""
        if exact:
            line = self._lines.get(tuple(path))
            return f" ({self._source} line {line})" if self._source and line else ""
        return where(tuple(path), self._lines, self._source, self._overrides)

    def with_origin_of(self, other: Recipe) -> Recipe:
        """This recipe, remembering where `other` came from (its file, lines and --set items)."""
        self._base_dir, self._lines, self._source, self._overrides = (other._base_dir, other._lines, other._source,
                                                                      other._overrides)
        return self

    def model_path(self) -> str:
        """A local model folder (relative to the cwd, else the recipe's folder), or the hub id as given."""
        local = resolve_path(self.model.name_or_path, self._base_dir)
        return str(local) if local is not None else self.model.name_or_path

    def locate(self, *path) -> str:
        """A key path as the user wrote it, with the YAML line of the key (or of its nearest written parent), or the
        --set that gave it."""
        return f"{fmt_path(tuple(path))}{self.line_of(*path)}"

    def stage_dirname(self, index: int) -> str:
        return f"{index:02d}-{self.stages[index].name}"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


