"""The recipe schema and its loader.

`load_recipe(path, overrides)` returns a validated `Recipe` or raises `RecipeError`
listing *every* problem at once, each with its key path and YAML line. This module
imports nothing else from prefopt (and nothing heavy), so `prefopt plan` and the
CLI's error paths stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class PrefoptError(Exception):
    """A user error: printed as a clear message, exit code 2, no traceback."""


class DataError(PrefoptError):
    """A data file that cannot be used: names the file, the row and what is wrong.

    `key` is the stage's data key the problem belongs to (e.g. "eval_fraction"), when it is one key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class GateFailed(PrefoptError):
    """An evaluation gate failed: the run stops before the merge (exit code 3 from the CLI)."""

    exit_code = 3


class RecipeError(PrefoptError):
    """Every problem found in a recipe (or its data), one per line."""

    def __init__(self, problems: list[str], source: str | None = None, repaired: "Recipe | None" = None):
        self.problems = list(problems)
        self.source = source
        # the recipe with each bad value left out (its default used), when that validates: the later checks run
        # on it, so that one report lists every problem (prefopt.preflight.load_checked)
        self.repaired = repaired
        head = f"{source}: " if source else ""
        n = len(self.problems)
        super().__init__(
            f"{head}{n} problem{'s' if n != 1 else ''} in the recipe:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


SURFACE = {"cli": False}  # set by the command line: messages name its flags, else the API's keyword arguments


def option(name: str, arg: str | None = None) -> str:
    """How the user sets an option where they are: '--output-dir DIR' on the command line, 'output_dir=<dir>' in
    Python (prefopt.run, prefopt.merge)."""
    if SURFACE["cli"]:
        return f"--{name.replace('_', '-')}" + (f" {arg}" if arg else "")
    return f"{name}=" + (f"<{arg.lower()}>" if arg else "True")


def environment_error(e: OSError) -> PrefoptError | None:
    """A read-only folder, a full disk, permission denied, a path that is a file: a user error naming the path and
    what to do (None for an OSError that is not about the machine's file system)."""
    import errno

    out = option("output_dir", "DIR")
    why = {errno.EROFS: ("the file system is read-only", f"choose a folder on a writable disk ({out})"),
           errno.ENOSPC: ("the disk is full", f"free some space, or choose a folder on a larger disk ({out})"),
           errno.EDQUOT: ("the disk quota is exceeded", f"free some space, or choose another folder ({out})"),
           errno.EACCES: ("permission denied", f"choose a folder you can write ({out}), or fix its permissions"),
           errno.EPERM: ("operation not permitted", f"choose a folder you can write ({out})"),
           errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
           errno.EISDIR: ("it is a folder", "choose another path")}.get(e.errno)
    if why is None:
        return None
    path = f"{e.filename}: " if e.filename else ""
    return PrefoptError(f"{path}{why[0]}; {why[1]}")


PREFERENCE_TYPES = ("dpo", "orpo", "simpo")


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
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
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
    def _dora_semantics(self) -> "AdapterSection":
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
    def _one_amount(self) -> "SourceSection":
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
    min_tokens: int = Field(4, ge=0, description="Drop rows whose text (prompt + answer) is shorter than this many tokens.")
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


    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, v):
        import re as _re

        if v is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if isinstance(v, bool):
            raise ValueError("must be steps (an integer), a percentage such as '10%', minutes such as '30min', or 'off'")
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
    def _reference_score_fits_the_stage(self) -> "_StageBase":
        rf = self.data.quality.reference_filter
        pref = self.type in PREFERENCE_TYPES
        if rf is not None and rf.score == ("logprob" if pref else "margin"):
            # "@<sub.path>: " names the key below the stage (see _problems_from)
            raise ValueError(f"@data.quality.reference_filter.score: {rf.score} scores "
                             f"{'SFT' if pref else 'preference'} rows; a {self.type} stage uses "
                             f"{'margin' if pref else 'logprob'} (or auto)")
        return self


class SFTStage(_StageBase):
    type: Literal["sft"] = Field("sft", description="Stage type: sft | dpo | orpo | simpo.")


class DPOStage(_StageBase):
    type: Literal["dpo"] = Field("dpo", description="Stage type: sft | dpo | orpo | simpo.")
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference.")
    loss_type: str = Field("sigmoid", description="Any DPOTrainer loss_type (sigmoid, ipo, hinge, ...).")
    reference: Literal["previous_stage", "base"] = Field(
        "previous_stage",
        description="previous_stage: a frozen copy of the adapter as the stage begins (the SFT model); "
        "base: the base model with the adapter disabled.",
    )
    precompute_ref_log_probs: bool = Field(
        True, description="Compute the reference's log-probs once, before training (read from prefopt's cache when "
        "nothing they depend on changed), instead of a reference forward every step of every epoch.")


class ORPOStage(_StageBase):
    type: Literal["orpo"] = Field("orpo", description="Stage type: sft | dpo | orpo | simpo.")
    beta: float = Field(0.1, gt=0, description="ORPO's lambda: weight of the odds-ratio term.")


class SimPOStage(_StageBase):
    type: Literal["simpo"] = Field("simpo", description="Stage type: sft | dpo | orpo | simpo.")
    beta: float = Field(2.0, gt=0, description="SimPO reward scale.")
    gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (TRL's simpo_gamma).")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of the NLL term (0 is pure SimPO).")


STAGE_TYPES: dict[str, type[_StageBase]] = {"sft": SFTStage, "dpo": DPOStage, "orpo": ORPOStage, "simpo": SimPOStage}

Stage = Annotated[Union[SFTStage, DPOStage, ORPOStage, SimPOStage], Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------- tracking / merge


class WandbSection(_Section):
    project: str = Field("prefopt", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="online needs `wandb login`; offline writes runs you can `wandb sync` later."
    )
    tags: list[str] = Field(default_factory=list, description="Tags added to every stage's run.")


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


# ---------------------------------------------------------------------------------------------- evaluation


class MMLUSection(_Section):
    """MMLU through lm-evaluation-harness, base and tuned on the same items in the same process."""

    path: str = Field("cais/mmlu", description="Hub dataset id (cais/mmlu), or a local folder in the original Hendrycks "
                      "layout: dev/<subject>_dev.csv and test/<subject>_test.csv, no header (question, A, B, C, D, "
                      "answer letter). A local folder works offline.")
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
                                         "tuned-over-base win rate - 0.5; SFT: exact match tuned - base) is below this.")


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
    def _mmlu_gate_needs_mmlu(self) -> "EvalSection":
        if self.mmlu is None and self.gates.max_mmlu_drop is not None:
            raise ValueError("gates.max_mmlu_drop is set but mmlu is null (nothing to measure the drop on); set "
                             "mmlu, or gates.max_mmlu_drop: null")
        return self


# ---------------------------------------------------------------------------------------------- the recipe


class Recipe(_Section):
    name: str = Field(description="Recipe name; the run folder is runs/<name>/ unless --output-dir says otherwise.")
    seed: int = Field(42, description="Seed for data splits, adapter init and training.")
    model: ModelSection = Field(description="The base model and how it is loaded.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="The ONE adapter config every stage shares.")
    stages: list[Stage] = Field(min_length=1, description="Stages, run in order, sharing one adapter.")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Experiment tracking.")
    merge: MergeSection | None = Field(None, description="Merge the final adapter after the last stage (off if absent).")
    cache_dir: str | None = Field(
        None, description="Shared cache of finished stages and reference log-probs, reused across run folders: "
        "null is $PREFOPT_CACHE_DIR or ~/.cache/prefopt; 'off' turns sharing off.")

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false
    eval: EvalSection | None = Field(None, description="Evaluate before the merge: held-out metrics, MMLU delta, "
                                     "completions, eval log, gates (off if absent; the shipped recipes have one).")

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
    def _unique_stage_names(self) -> "Recipe":
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: '{st.name}' is already used by stages[{seen[st.name]}]; names must be unique")
            seen[st.name] = i
        return self

    def model_path(self) -> str:
        """A local model folder (relative to the cwd, else the recipe's folder), or the hub id as given."""
        local = resolve_path(self.model.name_or_path, self._base_dir)
        return str(local) if local is not None else self.model.name_or_path

    def locate(self, *path) -> str:
        """A key path as the user wrote it, with the YAML line of the key (or of its nearest written parent), or the
        --set that gave it."""
        return f"{_fmt_path(tuple(path))}{_where(tuple(path), self._lines, self._source, self._overrides)}"

    def stage_dirname(self, index: int) -> str:
        return f"{index:02d}-{self.stages[index].name}"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading


def _line_map(text: str) -> dict[tuple, int]:
    """Map key paths (tuples of str keys and int indexes) to 1-based YAML lines."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def _where(loc: tuple, lines: dict, source: str | None, overrides: dict | None = None) -> str:
    """' (recipe.yaml line 14)' for a key, its nearest written parent's line, or ' (from --set k=v)'."""
    for cut in range(len(loc), 0, -1):
        if (overrides or {}).get(tuple(loc[:cut])):
            return f" (from --set {overrides[tuple(loc[:cut])]})"
    line = None
    for cut in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:cut]))
        if line:
            break
    return f" ({source} line {line})" if source and line else (f" (line {line})" if line else "")


def _fmt_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def _model_at(loc: tuple, raw: Any) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (used to suggest key names)."""
    model: Any = Recipe
    node = raw
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if model == "stages":
                t = node.get("type") if isinstance(node, dict) else None
                model = STAGE_TYPES.get(t, _StageBase)
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        node = node.get(part) if isinstance(node, dict) else None
        if field is None:
            return None
        if part == "stages" and model is Recipe:
            model = "stages"
            continue
        ann = field.annotation
        # `eval: EvalSection | None` suggests EvalSection's keys too
        ann = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        model = ann
    return model if isinstance(model, type) else None


def _clean_loc(loc: tuple) -> tuple:
    # Discriminated unions insert the tag ('dpo') into the location; drop it.
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in STAGE_TYPES and i > 0 and isinstance(loc[i - 1], int):
            continue
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):  # a union member ('str', 'list[...]')
            continue
        out.append(part)
    return tuple(out)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_errors(errors: list[dict]) -> list[dict]:
    """One error per key where a union (data.path: a string or a list of sources) reports each member's: the
    deepest wins; members that all fail at the key itself become one 'must be ...' error."""
    by_loc: dict[tuple, list[dict]] = {}
    for e in errors:
        by_loc.setdefault(_clean_loc(tuple(e["loc"])), []).append(e)
    out = []
    for loc, errs in by_loc.items():
        member = [e for e in errs if any(isinstance(p, str) and (p in _UNION_TAGS or "[" in p) for p in e["loc"])]
        if not member:
            out += errs
            continue
        deeper = any(o[: len(loc)] == loc and len(o) > len(loc) for o in by_loc)
        if deeper:
            continue
        if len(member) > 1 and loc[-1:] == ("path",):
            out.append({**member[0], "type": "union_path",
                        "msg": "must be a file path or hub id, or a list of sources ([{path: ..., fraction: 0.3}])"})
        else:
            out += errs
    return out


def _problems_from(err: ValidationError, raw: dict, lines: dict, source: str | None, overrides: dict | None = None,
                   locs: list | None = None) -> list[str]:
    """Each validation error as '<key path>: <what> (<file> line N)'; `locs` collects the key paths."""
    problems = []
    for e in _union_errors(err.errors()):
        loc = _clean_loc(tuple(e["loc"]))
        typ = e["type"]
        msg = e["msg"]
        if typ == "extra_forbidden":
            owner = _model_at(loc[:-1], raw)
            choices = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            msg = "unknown key" + (f"; did you mean {close[0]}?" if close else "") + (
                f" (known keys: {', '.join(choices)})" if choices and not close else ""
            )
        elif typ == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            close = difflib.get_close_matches(str(tag), list(STAGE_TYPES), n=1)
            loc = loc + ("type",)
            msg = f"unknown stage type '{tag}'" + (f"; did you mean {close[0]}?" if close else "") + (
                f" (one of {', '.join(STAGE_TYPES)})"
            )
        elif typ == "union_tag_not_found":
            loc = loc + ("type",)
            msg = f"missing; every stage needs a type ({', '.join(STAGE_TYPES)})"
        elif typ == "missing":
            msg = "missing; this key is required"
        elif typ == "literal_error":
            import re as _re

            choices = _re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(str(e.get("input")), choices, n=1)
            msg = f"{msg}, got {e.get('input')!r}" + (f"; did you mean {close[0]}?" if close else "")
        elif typ == "value_error":
            msg = msg.removeprefix("Value error, ")
            if msg.startswith("@"):  # a model-level check naming the key below its model
                sub, _, msg = msg[1:].partition(": ")
                loc = loc + tuple(int(p) if p.isdigit() else p for p in sub.split("."))
            if msg.startswith("stages["):  # a model-level check that names its own path
                path, _, rest = msg.partition(": ")
                idx = int(path.split("[")[1].split("]")[0])
                problems.append(f"{path}: {rest}{_where(('stages', idx, 'name'), lines, source, overrides)}")
                if locs is not None:
                    locs.append(())  # not one key's value: nothing to leave out
                continue
        else:
            got = e.get("input")
            if not isinstance(got, (dict, list)):
                msg = f"{msg}, got {got!r}"
        if locs is not None:
            locs.append(loc)
        problems.append(f"{_fmt_path(loc)}: {msg}{_where(loc, lines, source, overrides)}")
    return problems


def _repaired(raw: dict, locs: list[tuple]) -> "Recipe | None":
    """The recipe with every bad key left out (so its default applies), if that validates; None otherwise (a
    required key was bad, or a check spans several keys)."""
    import copy

    if not locs or any(not loc for loc in locs):
        return None
    fixed = copy.deepcopy(raw)
    for loc in locs:
        node = fixed
        for part in loc[:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                node = None
                break
        if isinstance(node, dict) and loc[-1] in node:
            del node[loc[-1]]
        elif node is not None:
            return None
    try:
        return Recipe.model_validate(fixed)
    except ValidationError:
        return None


def _parse_override(item: str) -> tuple[list, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError([f"--set {item!r}: expected KEY=VALUE, e.g. stages.1.beta=0.2"])
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise RecipeError([f"--set {key}: the value is not valid YAML ({problem}); quote it, e.g. "
                           f"--set '{key}=\"...\"'"]) from None


def _list_item(node: list, part, key: str, upto: tuple) -> tuple[int | None, str | None]:
    """A list item by index, or (a stage) by its name: (index, None) or (None, the problem)."""
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if isinstance(part, int) and part < len(node):
        return part, None
    if not isinstance(part, int) and part in names:
        return names.index(part), None
    named = [str(n) for n in names if n is not None]
    how = (f"name one of {', '.join(named)}, or give an index 0-{len(node) - 1}" if named and len(named) == len(node)
           else f"give an index 0-{len(node) - 1}" if node else "the list is empty")
    close = difflib.get_close_matches(str(part), named, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return None, f"--set {key}: '{_fmt_path(upto)}' has no item {part!r}; {hint}{how}"


def apply_overrides(raw: dict, overrides: dict | list | None, given: dict | None = None,
                    problems: list | None = None) -> dict:
    """Apply {"stages.1.beta": 0.2} or ["stages.dpo.beta=0.2"] to the raw recipe dict. A stage is named by its
    index or its name. `given` collects, per key path (indexes resolved), the --set item that set it. Overrides
    that name no key raise RecipeError, or are added to `problems` when a list is given (the rest still apply)."""
    collect = problems
    if not overrides:
        return raw
    if isinstance(overrides, (list, tuple)):
        items = [(*_parse_override(o), o) for o in overrides]
    else:
        items = [([int(p) if p.isdigit() else p for p in str(k).split(".")], v, f"{k}={v}") for k, v in overrides.items()]
    problems = []
    for path, value, text in items:
        key = ".".join(map(str, path))
        node, resolved = raw, []
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                idx, problem = _list_item(node, part, key, tuple(resolved))
                if problem:
                    problems.append(problem)
                    node = None
                    break
                resolved.append(idx)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                resolved.append(part)
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"--set {key}: '{_fmt_path(tuple(resolved))}' is not a section")
                node = None
                break
        if node is not None and given is not None:
            given[tuple(resolved)] = text
    if collect is not None:
        collect += problems
    elif problems:
        raise RecipeError(problems)
    return raw


def check_paths(recipe: Recipe, base_dir: Path, lines: dict | None = None, source: str | None = None,
                overrides: dict | None = None) -> list[str]:
    """Local data files that do not exist. Paths are resolved against the recipe's folder, then the cwd."""
    problems = []
    for i, st in enumerate(recipe.stages):
        where_of = [(("path",) if isinstance(st.data.path, str) else ("path", j, "path"), src.path)
                    for j, src in enumerate(st.data.sources())]
        where_of.append((("eval_path",), st.data.eval_path))
        where_of += [(("quality", "decontaminate", j), p) for j, p in enumerate(st.data.quality.decontaminate)]
        for key, p in where_of:
            if p is None or not looks_local(p):
                continue
            if resolve_path(p, base_dir) is None:
                where = _where(("stages", i, "data", *key), lines or {}, source, overrides)
                problems.append(
                    f"{_fmt_path(('stages', i, 'data', *key))}: file not found: {p}{where}; give a path relative to "
                    "the recipe or the current folder, or a datasets hub id"
                )
    return problems


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_local(p: str) -> bool:
    """A data path is local if it has a data-file suffix or exists; otherwise it is a hub id."""
    return p.endswith(DATA_SUFFIXES) or p.startswith((".", "/", "~")) or Path(p).exists()


def resolve_path(p: str, base_dir: Path | None) -> Path | None:
    cand = Path(p).expanduser()
    for c in ([cand] if cand.is_absolute() else [Path.cwd() / cand] + ([base_dir / cand] if base_dir else [])):
        if c.exists():
            return c.resolve()
    return None


def validate_recipe(raw: Any, *, source: str | None = None, text: str | None = None, base_dir: Path | None = None,
                    overrides: dict | None = None) -> Recipe:
    """A validated Recipe, or RecipeError with every problem of the schema and the data paths (and the recipe with
    the bad values left out, for the checks that come after)."""
    lines = _line_map(text) if text else {}
    overrides = overrides or {}
    if not isinstance(raw, dict):
        raise RecipeError(["the recipe must be a YAML mapping (name:, model:, stages:, ...)"], source)

    def placed(recipe: Recipe) -> Recipe:
        recipe._base_dir = base_dir or Path.cwd()
        recipe._lines = lines
        recipe._source = source
        recipe._overrides = overrides
        return recipe

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        locs: list = []
        problems = _problems_from(err, raw, lines, source, overrides, locs)
        repaired = _repaired(raw, locs)
        if repaired is not None:
            placed(repaired)
            problems += check_paths(repaired, base_dir or Path.cwd(), lines, source, overrides)
        raise RecipeError(problems, source, repaired) from None
    placed(recipe)
    problems = check_paths(recipe, base_dir or Path.cwd(), lines, source, overrides)
    if problems:
        raise RecipeError(problems, source, recipe)
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is recorded (PyYAML keeps the last
    value silently). Same constructors, same types: only the duplicate check is added."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, first line, second line), 1-based

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((key, seen[key], line))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str):
    loader = _RecipeLoader(text)
    try:
        raw = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        by_line = {}
        for p, line in _line_map(text).items():
            by_line.setdefault(line, []).append(p)
        problems = []
        for key, first, second in loader.duplicates:
            path = next((p for p in by_line.get(second, []) if p and p[-1] == key), (key,))
            problems.append(f"{_fmt_path(path)}: duplicate key (lines {first} and {second}); YAML would silently keep "
                            "the last value: keep one")
        raise RecipeError(problems, source)
    return raw


def load_recipe(path: str | Path, overrides: dict | list | None = None) -> Recipe:
    """Load and validate a recipe file; raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"],
                          str(path)) from None
    try:
        raw = _load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    given: dict = {}
    bad_overrides: list = []
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, given, bad_overrides)
    if not bad_overrides:
        return validate_recipe(raw, source=str(path), text=text, base_dir=path.resolve().parent, overrides=given)
    try:  # the recipe's own problems too, in the same report
        recipe = validate_recipe(raw, source=str(path), text=text, base_dir=path.resolve().parent, overrides=given)
    except RecipeError as e:
        raise RecipeError(bad_overrides + e.problems, str(path), e.repaired) from None
    raise RecipeError(bad_overrides, str(path), recipe)


def recipe_from_dict(raw: dict, overrides: dict | list | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe built in code (a dict); same checks as load_recipe."""
    import copy

    given: dict = {}
    return validate_recipe(apply_overrides(copy.deepcopy(raw), overrides, given), base_dir=base_dir, overrides=given)
