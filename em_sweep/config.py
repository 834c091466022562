"""Structured configs: the one source of truth for every default and its meaning.

Each group is a dataclass registered in Hydra's ConfigStore under the schema
root ``em_sweep_schema``; the YAML files in ``conf/`` only set values, so a
misspelt key or a wrong type fails at compose time naming the key.
Cross-field checks that types cannot express live in :func:`validate`, which
runs before anything is loaded or computed.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    """Which model to post-train and how to load it."""

    # Short name used in tables and presets.
    name: str = MISSING
    # HF hub id or local directory, passed to AutoModelForCausalLM.from_pretrained.
    # "pkg://<asset>" points into em_sweep/assets (the shipped default model).
    path: str = MISSING
    # Learning rate for this model: small models degrade at the 7B rate (MISSION.md s7).
    lr: float = 2e-5
    # float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 on CPU).
    dtype: str = "auto"
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # Passed to from_pretrained; e.g. "sdpa", "flash_attention_2"; null = transformers' choice.
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    # Gradient checkpointing for the loss pass (sampling always runs in eval mode with a KV cache).
    # Memory only (the same activations, recomputed): not part of the run id.
    gradient_checkpointing: bool = False


@dataclass
class PromptConfig:
    """The unlabeled prompt(s) EM trains on."""

    name: str = MISSING
    # JSONL pool (fields id, problem, answer): a shipped pool's name (pi1: always the shipped file),
    # or a path (with a `/`, or ending in .jsonl) relative to the working directory (prompts.resolve_pool_path).
    pool: str = MISSING
    # Ids from the pool; one id = one-shot EM, several = multi-shot (spread evenly over each batch;
    # more ids than train.batch_size: each step takes the next batch_size of them, cycling).
    ids: list[str] = field(default_factory=list)
    # Optional system message; null = the user turn only.
    system: str | None = None
    # Apply the tokenizer's chat template (else: plain text + newline).
    chat_template: bool = True
    # How the prompt was chosen; printed with the results so the story stays honest. Documentation:
    # not part of the run id (docs/run-identity.md).
    note: str = ""


@dataclass
class TrainConfig:
    """One-shot EM training: sampling, loss and optimizer settings (MISSION.md s1)."""

    # Number of optimizer updates (one step = one update, whatever the micro-batching).
    steps: int = 10
    # Sampled responses per optimizer step.
    batch_size: int = 64
    # Responses per forward/backward pass; batch_size must be a multiple of it. Memory only: the
    # accumulated gradient is the batch's up to rounding, so not part of the run id.
    micro_batch_size: int = 8
    lr: float = II("model.lr")
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # Sampling settings; the temperatures default to the top-level `temperature`.
    sample_temperature: float = II("temperature")
    top_p: float = 0.95
    # 0 = off.
    top_k: int = 0
    # 1.0 = off.
    repetition_penalty: float = 1.15
    max_new_tokens: int = 512
    # Responses sampled per generate call (memory knob; does not change the samples' distribution,
    # but does change which samples a seed draws, so it is part of the run id).
    sample_batch_size: int = 64
    # Temperature tau inside the entropy: p = softmax(logits / tau).
    loss_temperature: float = II("temperature")
    # Tokens per chunk in the entropy pass (bounds the fp32 softmax copy); 0 = all at once. Memory
    # only (the same entropies up to rounding): not part of the run id.
    loss_chunk_tokens: int = 4096
    # Save HF checkpoints at these steps (none by default).
    save_at_steps: list[int] = field(default_factory=list)
    # AdamW memory strategy (em_sweep/optim.py): auto | adamw | adamw_bf16_kahan | adamw_bf16_sr |
    # adamw_8bit. auto: torch AdamW for fp32 models (unchanged); for bf16 models the most faithful
    # variant that fits the device (exact fp32-master adamw, else Kahan, else stochastic rounding).
    optimizer: str = "auto"
    # How responses are generated (em_sweep/sample.py BACKENDS): auto | hf | static | static_eager |
    # static_compile. auto: static KV cache replayed as CUDA graphs on CUDA for Qwen2/Llama-family
    # models, HF generate otherwise (CPU unchanged). Greedy output is identical across backends.
    generation_backend: str = "auto"
    # Run the loss pass's decoder layers as torch.compile'd code (em.compiled_layers: fused norms,
    # rotary embedding and activations, forward and backward; sampling and evaluation stay eager).
    # The first steps pay the compilation (once per variant: padded micro-batches or not, RL's
    # no-grad pass; ~10 s each on CPU). Micro-batches that share_prompt_pass serves stay eager.
    # Single-process runs. Speed only: not part of the run id.
    compile_loss: bool = False
    # Loss pass: where a micro-batch's rows share their prompt (one-shot EM), run the prompt once
    # and repeat its keys/values for the rows instead of recomputing it per row (~15% of the loss
    # pass's FLOPs for a 100-token prompt and 512 new tokens); the same entropies and gradient.
    # Under gradient checkpointing em-sweep checkpoints the rows' pass itself (HF's would drop the
    # cache). EM and the RL stage (rl.share_prompt_pass follows it), single-process. Speed only:
    # not part of the run id.
    share_prompt_pass: bool = False


@dataclass
class RLConfig:
    """The RL stage (GRPO with a verifiable reward, em_sweep/rl.py); used when ``stages`` has rl.

    Its prompts are the run's ``prompt`` set (they need gold answers): one prompt = one-shot
    RLVR (pi_1), a pool = multi-prompt RL. Optimizer betas/eps/strategy and sampling backend
    follow train.*.
    """

    steps: int = 10
    # Samples per prompt (a GRPO group); rewards are normalised within each group.
    group_size: int = 8
    # Samples per step (batch_size / group_size prompts per step, cycling through the prompt set).
    batch_size: int = 64
    micro_batch_size: int = II("train.micro_batch_size")
    sample_batch_size: int = II("train.sample_batch_size")
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = II("train.adam_beta1")
    adam_beta2: float = II("train.adam_beta2")
    adam_eps: float = II("train.adam_eps")
    warmup_steps: int = 0
    grad_clip: float = 1.0
    optimizer: str = II("train.optimizer")
    # Optimizer updates per sampled batch (GRPO's mu): 1 = on-policy (the ratio is 1, the clip
    # inert); more reuse the batch, with the clip bounding each token's ratio to the sampling policy.
    updates_per_batch: int = 1
    # PPO-style ratio clip (epsilon).
    clip_ratio: float = 0.2
    # Weight of the k3 KL to a frozen copy of the model at the stage's start; 0 = none kept (a
    # copy costs the weights' memory again: 15 GB for a bf16 7B model).
    kl_coef: float = 0.0
    # Rollout sampling (temperature > 0: a group must be able to disagree).
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = II("train.max_new_tokens")
    loss_chunk_tokens: int = II("train.loss_chunk_tokens")
    compile_loss: bool = II("train.compile_loss")
    # Micro-batch rows of one prompt (a group) run it once in the loss pass (train.share_prompt_pass).
    share_prompt_pass: bool = II("train.share_prompt_pass")


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    # Each entry: a name from em_sweep.benchmarks.BENCHMARKS, or a user's own JSONL file as a mapping
    # {name, path, question_field, answer_field} plus optional id_field, answer_format, repeats
    # (em_sweep.benchmarks.resolve_spec). Default: the paper's four.
    benchmarks: list[Any] = field(default_factory=lambda: ["math500", "minerva_math", "olympiadbench", "amc23"])
    # Steps at which to evaluate; 0 = before training. The last step is always included.
    at_steps: list[int] = field(default_factory=lambda: [0])
    # 0.0 = greedy.
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    # Samples per problem when temperature > 0.
    n_samples: int = 1
    top_p: float = 1.0
    max_new_tokens: int = 3072
    batch_size: int = 64
    # Limit problems per benchmark (null = all); for smoke tests only.
    limit: int | None = None
    # qwen25-math-cot | plain | chat (the model's chat template, user turn only).
    template: str = "qwen25-math-cot"
    # Seconds before a single grading call is abandoned (counted as wrong, logged).
    grade_timeout_s: float = 5.0
    # Seed for sampled evaluation; the same at every step so steps are comparable.
    seed: int = 1234
    # How evaluation responses are generated: hf (in-process on the run's model, em_sweep/sample.py)
    # | vllm (em_sweep/vllm_backend.py; optional, CUDA only). vLLM loads the weights from
    # model.path, so it scores saved models only: train.steps=0 or `em-sweep eval`.
    backend: str = "hf"


@dataclass
class LoggerConfig:
    """Weights & Biases mirror of the local files (which stay the source of truth)."""

    # offline | online | disabled
    mode: str = "offline"
    project: str = "em-sweep"
    # W&B projects get slow past ~10k runs (MISSION.md s7): with N > 1, a run goes to project
    # `<project>-<k>`, k = its run id mod N (the same project again when the run resumes).
    project_shards: int = 1
    entity: str | None = None
    # Seconds allowed for wandb.init / finish before we carry on without W&B.
    init_timeout_s: float = 60.0


@dataclass
class PathsConfig:
    root: str = "outputs"
    runs_dir: str = "${paths.root}/runs"


@dataclass
class Config:
    """The root config of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Global seed: sampling, initialisation of anything random.
    seed: int = 15
    # Training temperature: default for both train.sample_temperature and train.loss_temperature.
    temperature: float = 0.5
    # Experiment / sweep name: the W&B group; not part of a run's identity.
    name: str = "default"
    # Pipeline stages, in order: em (train.*) and rl (rl.*), e.g. [em], [em, rl], [rl, em], [rl].
    # The model is evaluated before the first stage and after each; steps count on across stages.
    stages: list[str] = field(default_factory=lambda: ["em"])


SCHEMA_NAME = "em_sweep_schema"


def register() -> None:
    """Register the schema so ``conf/config.yaml`` can list it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register()

KNOWN_STAGES = ("em", "rl")
KNOWN_TEMPLATES = ("qwen25-math-cot", "plain", "chat")
KNOWN_DTYPES = ("auto", "float32", "bfloat16", "float16")
KNOWN_LOGGER_MODES = ("offline", "online", "disabled")
# Kept in step with em_sweep.optim.OPTIMIZERS and em_sweep.sample.BACKENDS (tests/test_optim.py
# checks); spelt out here so composing a config does not import torch.
KNOWN_OPTIMIZERS = ("auto", "adamw", "adamw_bf16_sr", "adamw_bf16_kahan", "adamw_8bit")
KNOWN_GENERATION_BACKENDS = ("auto", "hf", "static", "static_eager", "static_compile")
KNOWN_EVAL_BACKENDS = ("hf", "vllm")
# A benchmark's name becomes a W&B key and a results column: keep it plain.
_BENCHMARK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def stage_plan(cfg: Any) -> list[tuple[str, int, int]]:
    """(stage, first step, last step) of each of ``cfg.stages``: steps count on across stages
    (em runs train.steps updates, rl runs rl.steps)."""
    plan, done = [], 0
    for name in cfg.stages:
        n = int(cfg.train.steps if name == "em" else cfg.rl.steps)
        plan.append((name, done + 1, done + n))
        done += n
    return plan


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: DictConfig | Config) -> None:
    """Raise ConfigError (one line, naming the key) for any value the types cannot rule out."""
    c: Any = cfg
    t = c.train
    _check(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    _check(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _check(
        t.batch_size % t.micro_batch_size == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}",
    )
    for key, value in (("train.sample_temperature", t.sample_temperature),
                       ("train.loss_temperature", t.loss_temperature)):
        _check(math.isfinite(value) and value > 0, key,
               f"must be > 0, got {value} (for greedy evaluation use eval.temperatures=[0.0])")
    _check_stage_settings(t, "train")
    _check(t.lr >= 0 and math.isfinite(t.lr), "train.lr", f"must be a finite number >= 0, got {t.lr}")
    _check(all(s >= 0 for s in t.save_at_steps), "train.save_at_steps", "steps must be >= 0")
    _check(t.generation_backend in KNOWN_GENERATION_BACKENDS, "train.generation_backend",
           f"unknown {t.generation_backend!r}; choose from {KNOWN_GENERATION_BACKENDS}")

    # Steps count on across stages (em: train.steps, rl: rl.steps), so step limits are the total.
    unknown = [s for s in c.stages if s not in KNOWN_STAGES]
    _check(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {KNOWN_STAGES}")
    _check(len(c.stages) > 0, "stages", "needs at least one stage, e.g. [em]")
    if "rl" in c.stages:
        _validate_rl(c.rl)
    total = stage_plan(c)[-1][2]
    what = f"train.steps={t.steps}" if list(c.stages) == ["em"] else f"the stages' {total} steps ({list(c.stages)})"
    late = [s for s in t.save_at_steps if s > total]
    _check(not late, "train.save_at_steps", f"{late} are past {what}")

    e = c.eval
    too_late = [s for s in e.at_steps if s > total]
    _check(not too_late, "eval.at_steps", f"{too_late} are past {what}")
    _check(all(s >= 0 for s in e.at_steps), "eval.at_steps", f"steps must be >= 0, got {list(e.at_steps)}")
    _check(all(x >= 0 for x in e.temperatures), "eval.temperatures", "must be >= 0 (0 = greedy)")
    _check(e.n_samples >= 1, "eval.n_samples", "must be >= 1")
    _check(e.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
    _check(e.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(e.limit is None or e.limit > 0, "eval.limit", "must be > 0 or null")
    _check(e.template in KNOWN_TEMPLATES, "eval.template", f"unknown {e.template!r}; choose from {KNOWN_TEMPLATES}")
    _check(e.grade_timeout_s > 0, "eval.grade_timeout_s", "must be > 0")
    _check_benchmarks(e.benchmarks)
    _check(e.backend in KNOWN_EVAL_BACKENDS, "eval.backend",
           f"unknown {e.backend!r}; choose from {KNOWN_EVAL_BACKENDS}")
    if e.backend == "vllm":
        # vLLM loads weights from model.path; EM changes them in memory, so only steps=0 is honest.
        _check(total == 0, "eval.backend",
               f"vllm scores the saved model.path only, but the stages {list(c.stages)} train it in memory "
               f"(train.steps={t.steps}, rl.steps={c.rl.steps}); use no training steps (or `em-sweep eval`) "
               "on a saved checkpoint (train.save_at_steps), or eval.backend=hf")
        _check(not t.save_at_steps, "train.save_at_steps",
               f"{list(t.save_at_steps)}: with eval.backend=vllm nothing trains, model.path is the saved model")
        _check(importlib.util.find_spec("vllm") is not None, "eval.backend",
               "vllm is not installed; `pip install vllm` on a CUDA machine (it is not an em-sweep "
               "dependency), or use eval.backend=hf")

    _check(c.model.dtype in KNOWN_DTYPES, "model.dtype", f"unknown {c.model.dtype!r}; choose from {KNOWN_DTYPES}")
    _check(c.logger.project_shards >= 1, "logger.project_shards", f"must be >= 1, got {c.logger.project_shards}")
    _check(c.logger.mode in KNOWN_LOGGER_MODES, "logger.mode",
           f"unknown {c.logger.mode!r}; choose from {KNOWN_LOGGER_MODES}")
    _check(len(c.prompt.ids) > 0, "prompt.ids", "needs at least one prompt id")


def _validate_rl(r: Any) -> None:
    _check(r.steps >= 0, "rl.steps", f"must be >= 0, got {r.steps}")
    _check(r.group_size >= 2, "rl.group_size", f"must be >= 2 (advantages compare samples of a group), got {r.group_size}")
    _check(r.batch_size > 0 and r.batch_size % r.group_size == 0, "rl.batch_size",
           f"{r.batch_size} is not a positive multiple of rl.group_size={r.group_size}")
    _check(r.micro_batch_size > 0 and r.batch_size % r.micro_batch_size == 0, "rl.micro_batch_size",
           f"rl.batch_size={r.batch_size} is not divisible by rl.micro_batch_size={r.micro_batch_size} "
           "(rl.micro_batch_size follows train.micro_batch_size unless set)")
    _check_stage_settings(r, "rl")
    _check(r.lr > 0, "rl.lr", f"must be > 0, got {r.lr}")
    _check(0 < r.clip_ratio < 1, "rl.clip_ratio", f"must be in (0, 1), got {r.clip_ratio}")
    _check(r.kl_coef >= 0, "rl.kl_coef", f"must be >= 0 (0 = no KL term), got {r.kl_coef}")
    _check(r.temperature > 0, "rl.temperature",
           f"must be > 0: greedy rollouts make every group agree (zero advantages), got {r.temperature}")
    _check(r.weight_decay >= 0, "rl.weight_decay", f"must be >= 0, got {r.weight_decay}")
    _check(r.updates_per_batch >= 1, "rl.updates_per_batch", f"must be >= 1, got {r.updates_per_batch}")


def _check_stage_settings(x: Any, prefix: str) -> None:
    """The sampling, update and memory settings train.* and rl.* share, checked alike."""
    _check(x.sample_batch_size > 0, f"{prefix}.sample_batch_size", f"must be > 0, got {x.sample_batch_size}")
    _check(0 < x.top_p <= 1, f"{prefix}.top_p", f"must be in (0, 1], got {x.top_p}")
    _check(x.top_k >= 0, f"{prefix}.top_k", f"must be >= 0 (0 = off), got {x.top_k}")
    _check(x.repetition_penalty > 0, f"{prefix}.repetition_penalty",
           f"must be > 0 (1.0 = off), got {x.repetition_penalty}")
    _check(x.max_new_tokens > 0, f"{prefix}.max_new_tokens", f"must be > 0, got {x.max_new_tokens}")
    _check(x.grad_clip > 0, f"{prefix}.grad_clip", f"must be > 0, got {x.grad_clip}")
    _check(x.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {x.warmup_steps}")
    _check(x.loss_chunk_tokens >= 0, f"{prefix}.loss_chunk_tokens", "must be >= 0 (0 = no chunking)")
    _check(x.optimizer in KNOWN_OPTIMIZERS, f"{prefix}.optimizer",
           f"unknown {x.optimizer!r}; choose from {KNOWN_OPTIMIZERS}")


def _check_benchmarks(entries: Any) -> None:
    """Every eval.benchmarks entry resolves, has a unique plain name, and (custom ones) a readable file."""
    # Lazy: the loader table pulls in the grader module; plain config composition need not.
    from em_sweep.benchmarks import BENCHMARKS, BenchmarkError, load_benchmark, resolve_spec

    key = "eval.benchmarks"
    _check(len(entries) > 0, key, "needs at least one benchmark")
    seen: set[str] = set()
    for entry in entries:
        custom = isinstance(entry, Mapping)
        try:
            spec = resolve_spec(entry)
            if custom:
                load_benchmark(spec)  # missing file, bad JSON, missing field: named with file and line
        except BenchmarkError as err:
            raise ConfigError(f"{key}: {err}") from None
        if custom:
            _check(isinstance(spec.name, str) and bool(_BENCHMARK_NAME.fullmatch(spec.name)), key,
                   f"custom benchmark name {spec.name!r} must be letters, digits, '_', '.' or '-'")
            _check(spec.name not in BENCHMARKS and spec.name != "avg4", key,
                   f"custom benchmark name {spec.name!r} is taken by a shipped benchmark or score; choose another")
        _check(spec.name not in seen, key, f"benchmark {spec.name!r} is listed twice")
        seen.add(spec.name)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (what is written to config.yaml and W&B)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]
