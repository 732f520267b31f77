"""Training recipes: a YAML file validated by pydantic before anything heavy loads.

A bad key or value fails with a message naming the key (``loss.kind``) and the allowed values. Paths in
the file are relative to the recipe file, paths given as overrides to the working directory;
``pkg:default/...`` names a path inside the installed package's ``stillroom/data`` (the embedded default). ``key=value`` overrides use dotted keys and YAML values:
``train.max_steps=20``, ``teachers.0.path=/models/t``, ``fusion.method=avg_ce``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stillroom.errors import ConfigError
from stillroom.files import PACKAGE_DATA
from stillroom.teachers.config import ObjectiveConfig
from stillroom.tokenization.project import FALLBACKS

# report_to values transformers understands, and the module each needs (checked by ``train --check``)
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
             "comet_ml": ("comet_ml",), "trackio": ("trackio",), "swanlab": ("swanlab",), "none": ()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value, info: ValidationInfo):
        """YAML ``true`` is not a number: pydantic would read ``max_steps: true`` as 1."""
        ann = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(value, bool) and ann in (int, float, int | None, float | None):
            raise ValueError(f"got {value!r}; a number is required")
        return value


class TeacherSpec(_Strict):
    path: str = Field(description="Hugging Face model folder of the teacher (model + tokenizer), or a .gguf file; "
                      "with server: a folder or .gguf holding at least its tokenizer")
    cache: str | None = Field(None, description="offline cache folder (stillroom cache) instead of running it")
    server: str | None = Field(None, description="URL of an OpenAI-compatible completions server running this "
                               "teacher (llama.cpp, vLLM: http://HOST:PORT); scored there, not loaded here")
    server_model: str | None = Field(None, description="server only: the served model's name when it hosts several")
    server_concurrency: int = Field(4, ge=1, description="server only: requests in flight at once")
    name: str | None = Field(None, description="label in metrics and the model card (default: the folder name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype an online teacher loads and runs in; auto: bfloat16 where this machine runs it "
        "measurably faster (stillroom.models.precision), else float32")
    objective: Literal["kd", "alm", "uld", "xtoken", "hybrid"] = Field(
        "kd", description="kd: projected onto the student vocabulary and fused into the (1 − λ)·D target; alm: "
        "its own approximate-likelihood-matching term over aligned chunks; uld: its own universal logit "
        "distillation term; xtoken: its own KL in the teacher's vocabulary, the student's distribution moved there "
        "; hybrid: GOLD's hybrid ULD, exact-bytes twins id by id and the rest sorted "
        "(see stillroom.teachers.objectives, stillroom.teachers.xtoken)")
    weight: float | None = Field(None, ge=0.0, description="alm / uld / xtoken / hybrid only: w in λ·CE + Σ w·D (default 1 − λ)")
    alm_temperature: float = Field(ObjectiveConfig.alm_temperature, gt=0.0, description="alm only: binarisation temperature")
    alm_divergence: Literal["bce", "kl", "reverse_kl"] = Field(ObjectiveConfig.alm_divergence, description="alm only: binarised divergence")
    alm_chunks: Literal["exact", "all", "unbiased"] = Field(
        ObjectiveConfig.alm_chunks, description="alm only: chunks = exact alignment groups, every group, or unbiased chunks (exact "
        "groups merged up to boundaries whose tokenization bias is within alm_bias_threshold; stillroom.tokenization.unbiased)")
    alm_bias_threshold: float = Field(ObjectiveConfig.alm_bias_threshold, ge=0.0, description="alm_chunks: unbiased only: the largest unigram "
                                      "probability of crossing tokens one side has and the other lacks")

    @model_validator(mode="after")
    def _default_name(self) -> TeacherSpec:
        if self.name is None:
            self.name = Path(self.path).name
        wrong = sorted(k for k in self.model_fields_set if (k == "weight" and self.objective == "kd")
                       or (k.startswith("alm_") and self.objective != "alm"))
        if wrong:
            raise ValueError(f"{', '.join(wrong)} set but objective is {self.objective!r}: weight is for alm / uld / xtoken / hybrid "
                             f"teachers (kd teachers share the fused (1 − λ) term), alm_* for alm teachers; remove "
                             f"them or set objective")
        wrong = sorted(k for k in self.model_fields_set if k.startswith("server_") and self.server is None)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} set without server: they apply to a teacher behind a server; set "
                             "server: URL or remove them")
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server {self.server!r} is not an http(s) URL; give it as http://HOST:PORT")
        return self


class DataSpec(_Strict):
    train: str = Field(description="DATA: text file, folder of .txt, .jsonl with 'text', or datasets folder")
    eval: str | None = None
    format: Literal["text", "prompt_completion", "chat"] = Field(
        "text", description="'text': documents packed into blocks; 'prompt_completion' / 'chat': JSONL records "
        "trained on their completions only (stillroom.inputs.chat)")
    text_field: str = "text"
    documents: Literal["file", "paragraph", "line"] = Field(
        "file", description="what one document of a plain .txt is: the whole file, each blank-line-separated "
        "paragraph, or each line (train and eval data alike; see stillroom.inputs.text)")
    seq_len: int = Field(128, ge=4, le=65536)
    add_bos: bool = Field(True, description="put the separator token (BOS, else EOS) before every document")
    packing: bool = Field(True, description="fill every block with documents (the last block is padded); "
                          "false: every document starts a new block")
    isolate_documents: bool = Field(True, description="position ids restart at every document so attention "
                                    "does not cross documents in a packed block")
    max_blocks: int | None = Field(None, ge=1)
    streaming: bool = Field(False, description="read and pack data.train on the fly (stillroom.inputs.blocks."
                            "StreamingBlocks): memory stays flat whatever its size; needs train.max_steps")


class LossSpec(_Strict):
    kind: str = Field("forward_kl", description="a divergence of stillroom.losses (KINDS) or 'emo'")
    ce_weight: float = Field(0.9, ge=0.0, le=1.0, description="λ in λ·CE + (1−λ)·D")
    temperature: float = Field(1.0, gt=0.0)
    support_temperature: float = Field(1.0, gt=0.0, description="the kd target's spread within its top-k: "
                                       "p^(1/T) renormalised to the support's mass, the tail kept (>1 softer)")
    beta: float = Field(0.5, ge=0.0, le=1.0)
    alpha: float = Field(0.1, ge=0.0, le=1.0)
    chunk_size: int | None = Field(None, ge=1, description="rows per loss chunk (default: automatic)")
    emo_mode: Literal[1, 2] | None = Field(1, description="EMO only: 1 or 2 (EMO + MLE as in the paper), null = EMO alone")
    emo_cost: Literal["fixed", "adaptive"] = Field("fixed", description="EMO only: cost embedding")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from stillroom.losses.divergences import KINDS  # the divergences' one list (imports torch)

        if value not in (*KINDS, "emo"):
            raise ValueError(f"got {value!r}; use one of {', '.join(KINDS)} or emo")
        return value


class FusionSpec(_Strict):
    method: Literal["min_ce", "avg_ce", "mean"] = "min_ce"
    level: Literal["sequence", "token"] = "sequence"
    top_k: int | None = Field(10, ge=1, description="teacher top-k kept per position; null = the dense "
                              "distribution (one teacher sharing the student's tokenizer only)")
    fused_top_k: int | None = Field(None, ge=1, description="entries kept of the fused target per position; null "
                                    "= the union of the teachers' top-k")
    weight_temperature: float = Field(1.0, gt=0.0)
    include_student: bool = Field(False, description="FuseLLM: the student's own initial distribution (a frozen "
                                  "copy of its starting weights) is one more fusion candidate")
    projection: Literal[FALLBACKS] = Field(
        "onehot", description="how teacher mass reaches the student vocabulary: 'onehot' (FuseLLM), 'bytes', "
        "'prefix' (longest student token each teacher token starts with), 'next_bytes' (prefix, and inside a "
        "multi-token student group the teacher's next bytes given those already spelled), 'next_bytes_pruned' (the "
        "same, its tail counted only as far as it agrees with those bytes); 'none' = teachers share the student tokenizer")
    fill_uncovered: bool = Field(True, description="rows no kd teacher's target covers (inside a multi-token "
                                 "group, for onehot / bytes / prefix) get the one-hot gold next token as their target: "
                                 "extra cross-entropy, not teacher knowledge; false leaves them out of the (1 − λ)·D term")


class TrainSpec(_Strict):
    output_dir: str = "runs/train"
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = "adamw_torch"
    seed: int = 0
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps (default: at the end only)")
    eval_max_blocks: int | None = Field(None, ge=1, description="evaluate on the first N x seq_len tokens of data.eval "
                                        "(default: all)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (default: none)")
    save_total_limit: int | None = Field(2, ge=1)
    resume: bool | str = Field(False, description="true = latest checkpoint in output_dir, or a checkpoint path")
    overwrite: bool = Field(False, description="replace a non-empty output_dir (its checkpoints and metrics "
                            "are removed first); the CLI's --overwrite")
    report_to: list[str] = Field(default_factory=list, description="e.g. ['tensorboard'] or ['wandb']")

    @field_validator("report_to")
    @classmethod
    def _known_reporters(cls, value: list[str]) -> list[str]:
        for v in value:
            if v not in REPORTERS:
                raise ValueError(f"got {v!r}; use any of {', '.join(REPORTERS)}")
        return value
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="student compute: fp32, or bf16 / fp16 autocast over fp32 master weights; auto: bf16 "
        "where stillroom.models.precision measured it faster (GPU with bf16, or a CPU with native bf16), else fp32")
    gradient_checkpointing: bool = Field(False, description="recompute the student's layer activations in the "
                                         "backward pass: less memory, ~30% more compute")
    compile: bool = Field(False, description="torch.compile each decoder layer of the student (see "
                          "docs/training.md: on CPU it did not pay here)")
    progress: bool = True
    plot: bool = True


class OnPolicySpec(_Strict):
    """On-policy distillation (GKD, Agarwal et al. 2024): with probability λ an optimizer step's completions are
    the student's own samples for the batch's prompts, graded by the teachers (stillroom.training.onpolicy)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0, description="λ: the fraction of steps trained on "
                           "student samples (0 = the data's completions only, 1 = always sampled; prompt-only "
                           "data needs 1)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the student's completions")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass of the student's sampling (1 = all)")
    max_new_tokens: int = Field(64, ge=1, description="longest sampled completion, in student tokens (the prompt "
                                "keeps its last data.seq_len − max_new_tokens tokens)")
    seed: int | None = Field(None, description="seed of the λ coin and the samples (default: train.seed)")


class LoraSpec(_Strict):
    """LoRA adapters on the student (``stillroom.models.lora``): only they train; the saved student is merged."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0.0, description="scale α (the update is α / r · B A)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every linear "
        "layer but the head")


class StudentSpec(_Strict):
    """Where the student comes from — exactly one kind:

    - ``{path: DIR}`` (or just ``student: DIR``): a pretrained model, trained further (``reinit: true`` keeps its
      architecture and tokenizer but draws fresh weights);
    - ``{init_from: DIR_OR_GGUF, layers: [0, 6, ...]}``: cut from a (teacher) model, keeping those decoder layers;
    - ``{tokenizer: DIR, config: {model_type: gpt2, ...}}``: built from scratch with that tokenizer.
    """

    path: str | None = Field(None, description="pretrained student: a model folder or .gguf file")
    reinit: bool = Field(False, description="with path: re-initialise the weights from its config")
    init_from: str | None = Field(None, description="cut student: the model (folder or .gguf) to cut")
    layers: list[int] | None = Field(None, description="with init_from: decoder layers to keep, in order")
    tokenizer: str | None = Field(None, description="from-scratch student: folder holding its tokenizer")
    config: dict | None = Field(None, description="with tokenizer: the model config, e.g. {model_type: gpt2, "
                                "n_layer: 2, n_embd: 128, n_head: 4}; vocab and special ids come from the tokenizer")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters only, on any student kind: {r, alpha, "
                                  "dropout, target_modules}")

    @property
    def kind(self) -> str:
        """``pretrained``, ``reinit``, ``cut`` or ``scratch``."""
        if self.path is not None:
            return "reinit" if self.reinit else "pretrained"
        return "cut" if self.init_from is not None else "scratch"

    @property
    def source(self) -> str:
        """The folder (or .gguf file) the student's tokenizer comes from."""
        return self.path or self.init_from or self.tokenizer  # type: ignore[return-value]

    @model_validator(mode="after")
    def _one_kind(self) -> StudentSpec:
        kinds = [k for k, v in (("path", self.path), ("init_from", self.init_from), ("tokenizer", self.tokenizer))
                 if v is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of path (pretrained), init_from + layers (cut from a model) or "
                             f"tokenizer + config (from scratch); got {', '.join(kinds) or 'none'}")
        if (self.layers is not None) != (self.init_from is not None):
            raise ValueError("layers goes with init_from (and init_from needs layers, e.g. [0, 6, 12])")
        if (self.config is not None) != (self.tokenizer is not None):
            raise ValueError("config goes with tokenizer (a from-scratch student needs both)")
        if self.reinit and self.path is None:
            raise ValueError("reinit goes with path (re-initialise a pretrained student's weights)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config: needs model_type (e.g. gpt2, llama) and that model's config keys")
        if self.path is not None:
            _check_model_path(self.path, "student.path")
        if self.init_from is not None:
            _check_model_path(self.init_from, "student.init_from")
        if self.tokenizer is not None:
            p = Path(self.tokenizer)
            if not p.is_dir() or not ((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()):
                raise ValueError(f"tokenizer: {self.tokenizer} holds no tokenizer (tokenizer.json)")
        return self


class Recipe(_Strict):
    """A full training recipe. See recipes/*.yaml and docs/training.md."""

    name: str = "stillroom-train"
    student: StudentSpec = Field(description="the student: a model folder (pretrained), or {path: ...}, "
                                 "{init_from: ..., layers: [...]} or {tokenizer: ..., config: {...}}")
    teachers: list[TeacherSpec] = Field(default_factory=list)
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    onpolicy: OnPolicySpec | None = Field(None, description="on-policy distillation on the student's own samples "
                                          "(prompt/completion or chat data; see docs/training.md)")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for i, t in enumerate(self.teachers):
            if t.server is None:
                _check_model_path(t.path, f"teachers.{i}.path")
            elif not Path(os.path.expanduser(t.path)).exists():  # a served teacher: only its tokenizer is here
                raise ValueError(f"teachers.{i}.path: {t.path} does not exist; with server, point it at the "
                                 "teacher's tokenizer (a folder or its .gguf)")
            if t.cache is not None and not Path(t.cache).is_dir():
                raise ValueError(f"teachers.{i}.cache: {t.cache} is not a folder (build it with `stillroom cache`)")
            if t.objective != "kd" and t.weight is None and self.loss.ce_weight == 1.0:
                raise ValueError(f"teachers.{i}.weight: objective {t.objective!r} with loss.ce_weight=1.0 gives it the "
                                 f"default weight 1 − λ = 0; set teachers.{i}.weight (e.g. 0.5) or lower loss.ce_weight")
        alm = [(i, (t.weight, t.alm_temperature, t.alm_divergence, t.alm_chunks, t.alm_bias_threshold))
               for i, t in enumerate(self.teachers) if t.objective == "alm"]
        for i, opts in alm[1:]:  # several ALM teachers are fused into one term (stillroom.teachers.alm_fusion)
            if opts != alm[0][1]:
                raise ValueError(f"teachers.{i}: ALM teachers are fused into one term and share weight, alm_temperature, "
                                 f"alm_divergence, alm_chunks and alm_bias_threshold; teachers.{alm[0][0]} has {alm[0][1]}, this one "
                                 f"{opts}: set the same values")
        if self.loss.support_temperature != 1.0 and (self.fusion.top_k is None or
                                                     not any(t.objective == "kd" for t in self.teachers)):
            raise ValueError("loss.support_temperature: it reshapes a kd teacher's top-k target, and this recipe has "
                             "none (fusion.top_k null or no objective: kd teacher); set fusion.top_k (e.g. 10) or "
                             "leave loss.support_temperature at 1")
        if not Path(self.data.train).exists():
            raise ValueError(f"data.train: {self.data.train} does not exist")
        if self.data.eval is not None and not Path(self.data.eval).exists():
            raise ValueError(f"data.eval: {self.data.eval} does not exist")
        if self.data.streaming and "max_steps" not in self.train.model_fields_set:
            raise ValueError("data.streaming: the number of blocks is unknown until the data is read, so set "
                             "train.max_steps (e.g. train.max_steps=1000)")
        if self.loss.kind == "emo":
            if self.teachers:
                raise ValueError("loss.kind: 'emo' trains without teachers; remove `teachers` or pick a "
                                 "divergence (e.g. forward_kl)")
        elif not self.teachers and not self.fusion.include_student and self.loss.ce_weight != 1.0:
            raise ValueError("loss.ce_weight: with no teachers it must be 1.0 (plain CE); add teachers or set "
                             "loss.ce_weight=1.0")
        if self.onpolicy is not None:
            if self.data.format == "text":
                raise ValueError("onpolicy: the student completes prompts, so data.format must be prompt_completion "
                                 "or chat (JSONL records), not 'text'")
            if self.onpolicy.max_new_tokens >= self.data.seq_len:
                raise ValueError(f"onpolicy.max_new_tokens: got {self.onpolicy.max_new_tokens}, but a row is "
                                 f"data.seq_len={self.data.seq_len} tokens, prompt included; lower it or raise "
                                 "data.seq_len")
            if not self.teachers:
                raise ValueError("onpolicy: the student's samples need a teacher to grade them; add teachers")
        return self


def _check_model_path(path: str, key: str) -> None:
    from stillroom.models.loading import is_model_path

    if not Path(os.path.expanduser(path)).exists():
        raise ValueError(f"{key}: {path} does not exist; point it at a folder saved with save_pretrained "
                         "(or a .gguf file)")
    if not is_model_path(path):
        raise ValueError(f"{key}: {path} is not a Hugging Face model folder (no config.json) or .gguf file; "
                         "point it at a folder saved with save_pretrained")


def _normalise_student(raw: dict) -> dict:
    """``student: DIR`` means ``{path: DIR}``; the old ``student_config`` key is refused unless null."""
    if "student_config" in raw:
        cfg = raw.pop("student_config")
        if cfg is not None:
            raise RecipeError("student_config: the student's kind is now explicit; write student: {tokenizer: "
                              "DIR, config: {...}} to build it from scratch, or student: DIR for a pretrained one")
    if "from_scratch" in raw:
        if raw.pop("from_scratch"):
            raise RecipeError("from_scratch: write student: {path: DIR, reinit: true} to re-initialise a "
                              "pretrained student's weights")
    if isinstance(raw.get("student"), str):
        raw["student"] = {"path": raw["student"]}
    return raw


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    if value.startswith("pkg:"):
        return str(PACKAGE_DATA / value[4:])
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p))


class RecipeError(ConfigError):
    """A recipe that does not validate; the message names every bad key."""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (YAML-parsed values; list items by index) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value (e.g. train.max_steps=20)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit():
                    raise RecipeError(f"override {item!r}: {'.'.join(parts[:j])} is a list; use an index")
                while len(node) <= int(part):
                    node.append({})
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:j])} is not a mapping")
            if part not in node or node[part] is None:
                node[part] = [] if parts[j + 1].isdigit() else {}
            node = node[part]
        last = parts[-1]
        if len(parts) == 3 and parts[0] == "teachers" and last == "path" and \
                not any(o.split("=", 1)[0].strip() == f"teachers.{parts[1]}.name" for o in overrides):
            node.pop("name", None)  # another teacher: the recipe's label no longer names it (default: folder)
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: the value is not valid YAML; quote it") from None
        if isinstance(node, list):
            idx = int(last)
            while len(node) <= idx:
                node.append({})
            node[idx] = parsed
        else:
            node[last] = parsed
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    """One line: ``recipe R: key: got VALUE; what is allowed; next key: ...``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it (docs/training.md lists the keys)"
        elif e["type"] == "missing":
            msg = "required key is missing; add it"
        elif e["type"] == "value_error":  # our own validators: the message already names the key and value
            msg = msg.removeprefix("Value error, ")
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"got {e['input']!r}; {msg[:1].lower()}{msg[1:]}"
        parts.append(f"{key}: {msg}" if key else msg)
    return f"recipe {source}: " + "; ".join(parts)


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make the recipe's model, cache and data paths absolute (``base`` for relative ones; ``pkg:`` paths)."""
    if isinstance(raw.get("student"), str):
        raw["student"] = _resolve(raw["student"], base)
    elif isinstance(raw.get("student"), dict):
        for k in ("path", "init_from", "tokenizer"):
            if isinstance(raw["student"].get(k), str):
                raw["student"][k] = _resolve(raw["student"][k], base)
    for t in raw.get("teachers") or []:
        if isinstance(t, dict):
            for k in ("path", "cache"):
                if isinstance(t.get(k), str):
                    t[k] = _resolve(t[k], base)
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("train", "eval"):
            if isinstance(data.get(k), str):
                data[k] = _resolve(data[k], base)
    return raw


def load_recipe(source: str | os.PathLike | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, resolve paths and validate a recipe (YAML path, dict, or a loaded :class:`Recipe` to
    override: only the keys it was given are carried, so derived defaults are derived again). Loads no model."""
    if isinstance(source, Recipe):
        source = source.model_dump(exclude_unset=True)
    if isinstance(source, dict):
        raw, base, name = dict(source), Path.cwd(), "<dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist; pass a recipe YAML file (see recipes/)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path} is not UTF-8 text; pass a YAML recipe (see recipes/)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise RecipeError(f"recipe {path} is not valid YAML ({where}{getattr(e, 'problem', None) or e}); "
                              "fix it (see recipes/ for examples)") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {path}: the top level must be a mapping of keys (see recipes/)")
        base, name = path.resolve().parent, str(path)
    import copy

    # Paths in the file are relative to the file; paths given as overrides to where the command runs.
    raw = _resolve_paths(copy.deepcopy(raw), base)
    raw = _normalise_student(_resolve_paths(apply_overrides(raw, list(overrides)), Path.cwd()))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_error(e, name)) from None
