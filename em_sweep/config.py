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
from typing import Any, ClassVar

try:
    from hydra.core.config_store import ConfigStore
    from omegaconf import II, MISSING, DictConfig, OmegaConf
except ImportError:  # The GPU benchmark machine has torch and transformers only: the dataclasses and
    # their checks still import there (benchmarks/ builds real TrainConfigs); II and MISSING are
    # omegaconf's plain strings.
    ConfigStore = OmegaConf = None  # type: ignore[assignment,misc]
    DictConfig = dict  # type: ignore[assignment,misc]
    MISSING = "???"

    def II(interpolation: str) -> Any:  # noqa: N802  (omegaconf's name)
        return "${" + interpolation + "}"

# Standard library only at import (the grader runs in a worker process, the sandbox in its own):
from em_sweep.evaluation import sandbox
from em_sweep.evaluation.benchmarks import (
    BENCHMARKS,
    PAPER_FOUR,
    BenchmarkError,
    load_benchmark,
    resolve_spec,
)
from em_sweep.evaluation.grading import DEFAULT_TIMEOUT_S


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
    # Learning rate for this model: small models degrade at the 7B rate (docs/method.md, section 2).
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
    # Architecture name whose measured speed prices this model in a sweep's cost estimate (a key of
    # benchmarks/results/measured.json "shapes", e.g. 7b); null = unknown. Not part of the run id.
    shape: str | None = None


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
    """One-shot EM training: sampling, loss and optimizer settings (docs/method.md, section 2)."""

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
    # AdamW memory strategy (em_sweep/training/optim.py): auto | adamw | adamw_bf16_kahan | adamw_bf16_sr |
    # adamw_8bit. auto: torch AdamW for fp32 models; for bf16 models the most faithful
    # variant that fits the device (exact fp32-master adamw, else Kahan, else stochastic rounding).
    optimizer: str = "auto"
    # How responses are generated (em_sweep/generation/sample.py BACKENDS): auto | hf | static | static_eager |
    # static_compile | continuous | continuous_compile (continuous batching, docs/generation.md; the
    # RL stage's rollouts gain when rl.batch_size > rl.sample_batch_size). auto: static KV cache
    # replayed as CUDA graphs on CUDA for Qwen2/Llama-family models, HF generate otherwise (and on
    # CPU). Greedy output is identical across backends.
    generation_backend: str = "auto"
    # Run the loss pass's decoder layers as torch.compile'd code (loss_pass.compiled_layers: fused norms,
    # rotary embedding and activations, forward and backward; sampling and evaluation stay eager).
    # The first steps pay the compilation (once per variant: padded micro-batches or not, RL's
    # no-grad pass). Micro-batches that share_prompt_pass serves stay eager.
    # Single-process runs. Speed only: not part of the run id.
    compile_loss: bool = False
    # Loss pass: where a micro-batch's rows share their prompt (one-shot EM), run the prompt once
    # and repeat its keys/values for the rows instead of recomputing it per row (~15% of the loss
    # pass's FLOPs for a 100-token prompt and 512 new tokens); the same entropies and gradient.
    # Under gradient checkpointing em-sweep checkpoints the rows' pass itself (HF's would drop the
    # cache). EM and the RL stage (rl.share_prompt_pass follows it), single-process. Speed only:
    # not part of the run id.
    share_prompt_pass: bool = False
    # none | fsdp. fsdp: one run across several processes (one per GPU) started by torchrun or by
    # hydra/launcher=slurm with gpus_per_task > 1, its weights, gradients and optimizer state
    # sharded with FSDP2 (em_sweep/training/distributed.py; for a model whose training state does not fit
    # one card). Each rank samples batch_size / ranks responses; rank 0 writes the run directory.
    # EM stage only. Part of the run id (the ranks draw their own samples).
    parallel: str = "none"

    # Reference-compatible semantics (docs/reproducing.md; `+experiment=one_shot_em_reference`
    # sets all of them). The defaults are em-sweep's own: one step = one update of batch_size
    # responses, one token mean over all of them, the exact generated-token positions.
    # What one step is: update (one optimizer update of batch_size responses) | micro_step (a step
    # of the reference train.py's loop: rank_batch_size responses on each of data_parallel_ranks
    # ranks; the weights change at accumulation boundaries, every
    # batch_size // (rank_batch_size * data_parallel_ranks) steps). In micro_step mode train.steps,
    # eval.at_steps and train.save_at_steps count micro-steps.
    step_unit: str = "update"
    # Data-parallel ranks emulated on one device (the reference runs one per GPU).
    data_parallel_ranks: int = 1
    # Responses per rank per micro-step (the reference's micro batch: 2). (train.warmup_steps counts
    # optimizer updates in either unit.)
    rank_batch_size: int = 2
    # independent | identical (the reference seeds every rank with the same seed, so ranks given
    # the same prompt draw the same responses; an update then holds batch_size / ranks distinct ones).
    rank_sampling: str = "independent"
    # batch_token_mean (one token mean over the batch) | rank_token_mean (the reference: a token
    # mean per rank micro-batch of rank_batch_size responses, averaged over ranks and accumulation).
    loss_averaging: str = "batch_token_mean"
    # exact (the logits that produced each generated token, EOS included) | reference (train.py's
    # gen_mask: positions from the prompt length on whose token is not the pad token).
    loss_positions: str = "exact"
    # Tokens that end a training sample: model_and_tokenizer (the model's generation_config EOS and
    # the tokenizer's EOS) | generation_config (the model's only, as HF generate in the reference).
    stop_tokens: str = "model_and_tokenizer"


@dataclass
class RLConfig:
    """The RL stage (GRPO with a verifiable reward, em_sweep/training/rl.py); used when ``stages`` has rl.

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
    # Weight of the entropy bonus: the loss subtracts it times the token-mean policy entropy at the
    # rollout temperature (verl's actor.entropy_coeff); 0 = none.
    entropy_coef: float = 0.0
    # What a response is worth (em_sweep/training/objectives.py): gold (its answer vs the prompt's gold answer) |
    # majority_vote (vs its group's most common answer, TTRL) | self_certainty (mean KL(U || p), Intuitor) |
    # neg_entropy (minus its mean token entropy, EM-RL token) | mean_logprob (its mean token
    # log-probability, EM-RL sequence). All but gold use no labels.
    reward: str = "gold"
    # How rewards become advantages within a group: grpo (minus the group mean, over its std) | rloo
    # (minus the mean of the other responses, as EM-RL).
    advantage: str = "grpo"


@dataclass
class EMInfConfig:
    """EM-INF decoding at evaluation (em_sweep/training/objectives.py em_inf_logits): the weights never change;
    at each position a few Adam steps on the logits lower their entropy before sampling. Defaults are
    the reference's EM-INF/em_inf_eval.sh (Agarwal et al., `chotkrin/EM_PT`)."""

    enabled: bool = False
    # Adam steps per position (n_grad_steps).
    steps: int = 3
    # Adam learning rate on the logits.
    lr: float = 0.1
    # Weight of KL(original || adjusted) in the minimised objective.
    kl_weight: float = 0.05
    # A position whose entropy (nats) is below this takes no (further) step.
    threshold: float = 0.3


@dataclass
class StopConfig:
    """The label-free stopping rule (em_sweep/training/stopping.py). Training always runs its configured steps;
    the rule only names the step it would have kept, and the report scores that choice against the
    evaluated step curve."""

    # Responses sampled to the training prompt(s) after every step (and before the first) at the
    # training sampling settings, for the signals: their mean token entropy, the agreement of their
    # extracted answers, their length. 0 = no probe (no signals, no chosen step).
    probe_samples: int = 0
    # Unlabeled held-out prompts (the first of prompt.pool not trained on) whose mean token entropy,
    # one greedy response each, is tracked as a change from step 0. 0 = none.
    heldout_prompts: int = 0
    # The rule that picks the step: agreement (the first step whose answer agreement reaches
    # stop.agreement) | heldout_entropy (the first step whose held-out entropy has fallen to
    # stop.heldout_ratio of its step-0 value) | entropy (the same on the probe responses' entropy).
    # Only evaluated steps can be chosen (it snaps to the first evaluated step at or after it).
    rule: str = "agreement"
    agreement: float = 0.9
    heldout_ratio: float = 0.5
    entropy_ratio: float = 0.5


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    # Each entry: a name from em_sweep.evaluation.benchmarks.BENCHMARKS, or a user's own JSONL file as a mapping
    # {name, path, question_field, answer_field} plus optional id_field, answer_format, repeats
    # (em_sweep.evaluation.benchmarks.resolve_spec); a code benchmark: {name, path, family: code,
    # question_field, test_field, entry_point_field}. Default: the paper's four.
    benchmarks: list[Any] = field(default_factory=lambda: list(PAPER_FOUR))
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
    # qwen25-math-cot: the Qwen2.5-Math toolkit's hard-coded ChatML prompt, the same string for
    # every model (Llama too) | chat-cot: the model's own chat template, the same instruction as
    # its system turn | chat: the model's own chat template, user turn only | plain. docs/evaluation.md.
    template: str = "qwen25-math-cot"
    # Seconds before a single grading call is abandoned (counted as wrong, logged).
    grade_timeout_s: float = DEFAULT_TIMEOUT_S
    # Seed for sampled evaluation; the same at every step so steps are comparable.
    seed: int = 1234
    # How evaluation responses are generated: hf (in-process on the run's model, em_sweep/generation/sample.py)
    # | vllm (em_sweep/generation/vllm_backend.py; optional, CUDA only). vLLM loads the weights from
    # model.path, so it scores saved models only: train.steps=0 or `em-sweep eval`.
    backend: str = "hf"
    # Each response is cut at the first of these strings (as the toolkit stops generation on them,
    # besides the EOS ids); [] = EOS ids only.
    stop_strings: list[str] = field(default_factory=lambda: ["</s>", "<|im_end|>", "<|endoftext|>"])
    # With no boxed answer, no "####" and no "the answer is", take the last number in the response
    # (the toolkit's last resort); false = such a response has no answer.
    last_number_fallback: bool = True
    # Code benchmarks (family code, e.g. humaneval; docs/code-and-logic-eval.md): pass@k reported
    # for each k up to the samples per problem (greedy: pass@1 only).
    pass_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    # Sandbox limits per test program (em_sweep/evaluation/sandbox.py): wall-clock seconds (CPU seconds
    # likewise), address space in MiB, and how many programs run at once.
    code_timeout_s: float = sandbox.DEFAULT_TIMEOUT_S
    code_memory_mb: int = sandbox.DEFAULT_MEMORY_MB
    code_workers: int = sandbox.DEFAULT_WORKERS
    # Decode with EM-INF (entropy-minimised logits at each position) instead of plain sampling.
    em_inf: EMInfConfig = field(default_factory=EMInfConfig)
    # How eval.backend=hf decodes (em_sweep/generation/sample.py BACKENDS, docs/generation.md). continuous:
    # continuous batching over the static KV cache: eval.batch_size slots, a row that ended (EOS
    # or max_new_tokens) hands its slot to the next prompt, longest prompts first; graphs on CUDA,
    # eager on CPU; continuous_compile: its step through torch.compile. A model the static decoder
    # does not support gets static batches (auto) with the reason logged. auto | hf | static* :
    # static batches of eval.batch_size length-sorted prompts, each decoded until its longest
    # response ends. Greedy responses are identical across all; sampled ones are drawn
    # differently (same distribution): part of the run id, as it changes which samples a seed draws.
    generation_backend: str = "continuous"


@dataclass
class LoggerConfig:
    """Weights & Biases mirror of the local files (which stay the source of truth)."""

    # offline | online | disabled
    mode: str = "offline"
    project: str = "em-sweep"
    # W&B projects get slow past ~10k runs: with N > 1, a run goes to project
    # `<project>-<k>`, k = its run id mod N (the same project again when the run resumes).
    project_shards: int = 1
    entity: str | None = None
    # Seconds allowed for each call into W&B (init, log, finish, the teardown at exit) before the
    # run carries on without it; a call that hangs turns W&B off for the rest of the process.
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
    stop: StopConfig = field(default_factory=StopConfig)
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
    """Register the schema so ``conf/config.yaml`` can list it first in its defaults (with Hydra)."""
    if ConfigStore is not None:
        ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register()

KNOWN_STAGES = ("em", "rl")
# eval.template values: qwen25-math-cot (the toolkit's string, any model) | chat-cot (the model's
# own chat template with the same instruction as its system turn) | chat (the model's own chat
# template, user turn only) | plain (instruction and question as plain text); em_sweep/prompts.py.
KNOWN_TEMPLATES = ("qwen25-math-cot", "plain", "chat", "chat-cot")
KNOWN_DTYPES = ("auto", "float32", "bfloat16", "float16")
KNOWN_LOGGER_MODES = ("offline", "online", "disabled")
# The registries of em_sweep.training.optim (OPTIMIZERS), em_sweep.generation.sample (BACKENDS), em_sweep.training.objectives and
# em_sweep.training.stopping are these tuples: they are defined here, where composing a config needs no torch.
KNOWN_OPTIMIZERS = ("auto", "adamw", "adamw_bf16_sr", "adamw_bf16_kahan", "adamw_8bit")
KNOWN_GENERATION_BACKENDS = ("auto", "hf", "static", "static_eager", "static_compile", "continuous",
                             "continuous_compile")
KNOWN_EVAL_BACKENDS = ("hf", "vllm")
KNOWN_STEP_UNITS = ("update", "micro_step")
KNOWN_RANK_SAMPLING = ("independent", "identical")
KNOWN_LOSS_AVERAGING = ("batch_token_mean", "rank_token_mean")
KNOWN_LOSS_POSITIONS = ("exact", "reference")
KNOWN_STOP_TOKENS = ("model_and_tokenizer", "generation_config")
KNOWN_PARALLEL = ("none", "fsdp")
KNOWN_REWARDS = ("gold", "majority_vote", "self_certainty", "neg_entropy", "mean_logprob")
KNOWN_ADVANTAGES = ("grpo", "rloo")
KNOWN_STOP_RULES = ("agreement", "heldout_entropy", "entropy")
# A benchmark's name becomes a W&B key and a results column: keep it plain.
_BENCHMARK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Seeds: torch takes 64 bits, but numpy and vLLM take 0 .. 2**32-1; every seed em-sweep derives
# (seed * 1_000_033 + steps) stays inside torch's range from there.
MAX_SEED = 2**32 - 1
# Seconds: more than a day is a typo, and Python's timed waits overflow past ~2.9e11 s.
MAX_TIMEOUT_S = 86400.0
# attn_implementation values that need a package em-sweep does not depend on (the module name).
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# train.optimizer variants that need a package (em_sweep/training/optim.py imports it when the stage starts).
OPTIMIZER_PACKAGES = {"adamw_8bit": "torchao"}


def stage_plan(cfg: Config) -> list[tuple[str, int, int]]:
    """(stage, first step, last step) of each of ``cfg.stages``: steps count on across stages
    (em runs train.steps updates, rl runs rl.steps)."""
    plan, done = [], 0
    for name in cfg.stages:
        n = int(cfg.train.steps if name == "em" else cfg.rl.steps)
        plan.append((name, done + 1, done + n))
        done += n
    return plan


def eval_steps(cfg: Config) -> list[int]:
    """Steps at which to evaluate: the configured ones plus the end of every stage."""
    return sorted(set(cfg.eval.at_steps) | {last for _, _, last in stage_plan(cfg)})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(value: Any, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, hint: str = "") -> None:
    """``value`` is a finite number in the interval from ``low`` to ``high`` (ends closed unless
    ``*_open``; an infinite ``high`` means no upper bound)."""
    ok = _finite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high)
                    else f"{'>' if low_open else '>='} {low:g}")
        _check(False, key, f"must be a finite number {'in ' if math.isfinite(high) else ''}{interval}, "
                           f"got {value}{hint}")


def _check_package(module: str, key: str, value: str, how: str) -> None:
    _check(importlib.util.find_spec(module) is not None, key,
           f"{value} needs the {module} package, which is not installed here; {how}")


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
    _check_range(c.model.lr, "model.lr", 0)  # first: train.lr follows it unless set
    _check(t.lr >= 0 and math.isfinite(t.lr), "train.lr", f"must be a finite number >= 0, got {t.lr}")
    _check(all(s >= 0 for s in t.save_at_steps), "train.save_at_steps", "steps must be >= 0")
    _check(t.generation_backend in KNOWN_GENERATION_BACKENDS, "train.generation_backend",
           f"unknown {t.generation_backend!r}; choose from {KNOWN_GENERATION_BACKENDS}")
    _validate_reference_semantics(t)
    _check(t.parallel in KNOWN_PARALLEL, "train.parallel", f"unknown {t.parallel!r}; choose from {KNOWN_PARALLEL}")
    if t.parallel == "fsdp":
        _check(list(c.stages) == ["em"], "train.parallel", f"fsdp runs the EM stage only, got stages={list(c.stages)}")
        _check(not t.compile_loss, "train.parallel", "fsdp does not compile the loss pass; set train.compile_loss=false")
        _check(not t.share_prompt_pass, "train.parallel",
               "fsdp runs the full loss pass; set train.share_prompt_pass=false")
        _check(c.eval.backend == "hf", "train.parallel", f"fsdp evaluates in-process: eval.backend=hf, got {c.eval.backend}")
        _check(t.step_unit == "update" and t.data_parallel_ranks == 1 and t.rank_sampling == "independent"
               and t.loss_averaging == "batch_token_mean" and t.loss_positions == "exact", "train.parallel",
               "fsdp runs em-sweep's own step (train.step_unit=update, data_parallel_ranks=1, rank_sampling="
               "independent, loss_averaging=batch_token_mean, loss_positions=exact); the reference's semantics "
               "are emulated in one process")

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
    _check(all(isinstance(x, str) and x for x in e.stop_strings), "eval.stop_strings",
           f"must be non-empty strings, got {list(e.stop_strings)}")
    _check_benchmarks(e.benchmarks)
    _check(len(e.pass_k) > 0 and all(k >= 1 for k in e.pass_k), "eval.pass_k",
           f"must be a non-empty list of integers >= 1, got {list(e.pass_k)}")
    _check_range(e.code_timeout_s, "eval.code_timeout_s", 0, MAX_TIMEOUT_S, low_open=True)
    _check(e.code_memory_mb >= 64, "eval.code_memory_mb", f"must be >= 64 (MiB), got {e.code_memory_mb}")
    _check(e.code_workers >= 1, "eval.code_workers", f"must be >= 1, got {e.code_workers}")
    _check(e.backend in KNOWN_EVAL_BACKENDS, "eval.backend",
           f"unknown {e.backend!r}; choose from {KNOWN_EVAL_BACKENDS}")
    _check(e.generation_backend in KNOWN_GENERATION_BACKENDS, "eval.generation_backend",
           f"unknown {e.generation_backend!r}; choose from {KNOWN_GENERATION_BACKENDS}")
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

    m = e.em_inf
    _check(m.steps >= 0, "eval.em_inf.steps", f"must be >= 0, got {m.steps}")
    _check_range(m.lr, "eval.em_inf.lr", 0, low_open=True)
    _check_range(m.kl_weight, "eval.em_inf.kl_weight", 0)
    _check_range(m.threshold, "eval.em_inf.threshold", 0)
    if m.enabled:
        _check(e.backend == "hf", "eval.em_inf.enabled", "EM-INF decodes with eval.backend=hf only")
    st = c.stop
    _check(st.probe_samples >= 0, "stop.probe_samples", f"must be >= 0 (0 = no probe), got {st.probe_samples}")
    _check(st.heldout_prompts >= 0, "stop.heldout_prompts", f"must be >= 0, got {st.heldout_prompts}")
    _check(st.rule in KNOWN_STOP_RULES, "stop.rule", f"unknown {st.rule!r}; choose from {KNOWN_STOP_RULES}")
    _check_range(st.agreement, "stop.agreement", 0, 1, low_open=True)
    _check_range(st.heldout_ratio, "stop.heldout_ratio", 0, 1, low_open=True)
    _check_range(st.entropy_ratio, "stop.entropy_ratio", 0, 1, low_open=True)
    _check(c.model.dtype in KNOWN_DTYPES, "model.dtype", f"unknown {c.model.dtype!r}; choose from {KNOWN_DTYPES}")
    _check(c.logger.project_shards >= 1, "logger.project_shards", f"must be >= 1, got {c.logger.project_shards}")
    _check(c.logger.mode in KNOWN_LOGGER_MODES, "logger.mode",
           f"unknown {c.logger.mode!r}; choose from {KNOWN_LOGGER_MODES}")
    _check(len(c.prompt.ids) > 0, "prompt.ids", "needs at least one prompt id")
    _check_numbers(c)
    _check_model_settings(c)


def _check_numbers(c: Config) -> None:
    """Every numeric key not checked above: finite and in range (docs/input-checks.md lists them)."""
    _check_range(c.temperature, "temperature", 0, low_open=True)
    for key, seed in (("seed", c.seed), ("eval.seed", c.eval.seed)):
        _check(isinstance(seed, int) and 0 <= seed <= MAX_SEED, key, f"must be an integer in [0, {MAX_SEED}], got {seed}")
    _check_optimizer_numbers(c.train, "train")
    e = c.eval
    _check(len(e.temperatures) > 0, "eval.temperatures", "needs at least one temperature (0.0 = greedy)")
    for x in e.temperatures:
        _check_range(x, "eval.temperatures", 0, hint=" (0 = greedy)")
    _check_range(e.top_p, "eval.top_p", 0, 1, low_open=True)
    _check_range(e.grade_timeout_s, "eval.grade_timeout_s", 0, MAX_TIMEOUT_S, low_open=True)
    _check_range(c.logger.init_timeout_s, "logger.init_timeout_s", 0, MAX_TIMEOUT_S, low_open=True)


def _check_optimizer_numbers(x: TrainConfig | RLConfig, prefix: str) -> None:
    """AdamW's settings of train.* or rl.*: weight decay >= 0, betas in [0, 1), eps > 0, all finite."""
    _check_range(x.lr, f"{prefix}.lr", 0)
    _check_range(x.weight_decay, f"{prefix}.weight_decay", 0)
    _check_range(x.adam_beta1, f"{prefix}.adam_beta1", 0, 1, high_open=True)
    _check_range(x.adam_beta2, f"{prefix}.adam_beta2", 0, 1, high_open=True)
    _check_range(x.adam_eps, f"{prefix}.adam_eps", 0, low_open=True)
    _check_range(x.grad_clip, f"{prefix}.grad_clip", 0, low_open=True)
    _check_range(x.repetition_penalty, f"{prefix}.repetition_penalty", 0, low_open=True, hint=" (1.0 = off)")


def _check_model_settings(c: Config) -> None:
    """What can be told about device, attention and optimizer without torch: the spelling of the
    device, and packages the settings need (the device's abilities are checked by run.preflight)."""
    m = c.model
    _check(isinstance(m.device, str) and bool(_DEVICE.fullmatch(m.device)), "model.device",
           f"{m.device!r} is not a device; use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
    if m.attn_implementation in ATTENTION_PACKAGES:
        _check_package(ATTENTION_PACKAGES[m.attn_implementation], "model.attn_implementation",
                       m.attn_implementation, "install it on a CUDA machine, or use sdpa (or null)")
    trained = {name: (c.train if name == "em" else c.rl) for name, first, last in stage_plan(c) if last >= first}
    for stage, x in trained.items():
        key = f"{'train' if stage == 'em' else 'rl'}.optimizer"
        if x.optimizer in OPTIMIZER_PACKAGES:
            _check_package(OPTIMIZER_PACKAGES[x.optimizer], key, x.optimizer,
                           f"pip install {OPTIMIZER_PACKAGES[x.optimizer]}, or use adamw_bf16_sr (8 bytes a parameter)")
        _check(not (x.optimizer.startswith("adamw_bf16") and m.dtype in ("float32", "float16")), key,
               f"{x.optimizer} updates bfloat16 weights, but model.dtype={m.dtype}; use model.dtype=bfloat16 "
               "(or auto on CUDA), or optimizer adamw")


def _validate_reference_semantics(t: TrainConfig) -> None:
    for key, value, known in (("step_unit", t.step_unit, KNOWN_STEP_UNITS),
                              ("rank_sampling", t.rank_sampling, KNOWN_RANK_SAMPLING),
                              ("loss_averaging", t.loss_averaging, KNOWN_LOSS_AVERAGING),
                              ("loss_positions", t.loss_positions, KNOWN_LOSS_POSITIONS),
                              ("stop_tokens", t.stop_tokens, KNOWN_STOP_TOKENS)):
        _check(value in known, f"train.{key}", f"unknown {value!r}; choose from {known}")
    _check(t.data_parallel_ranks >= 1, "train.data_parallel_ranks", f"must be >= 1, got {t.data_parallel_ranks}")
    _check(t.rank_batch_size >= 1, "train.rank_batch_size", f"must be >= 1, got {t.rank_batch_size}")
    per_micro_step = t.rank_batch_size * t.data_parallel_ranks
    _check(t.batch_size % per_micro_step == 0 or (t.step_unit == "update" and t.data_parallel_ranks == 1),
           "train.batch_size",
           f"{t.batch_size} is not a multiple of train.rank_batch_size x train.data_parallel_ranks = "
           f"{t.rank_batch_size} x {t.data_parallel_ranks} (one accumulation window of whole micro-steps)")


def accumulation_steps(train: TrainConfig) -> int:
    """Micro-steps per optimizer update in ``train.step_unit=micro_step`` mode (the reference's
    ``effective_batch // (micro_batch_size * world_size)``); 1 in update mode."""
    if train.step_unit != "micro_step":
        return 1
    return max(1, train.batch_size // (train.rank_batch_size * train.data_parallel_ranks))


def _validate_rl(r: RLConfig) -> None:
    _check(r.steps >= 0, "rl.steps", f"must be >= 0, got {r.steps}")
    _check(r.group_size >= 2, "rl.group_size", f"must be >= 2 (advantages compare samples of a group), got {r.group_size}")
    _check(r.batch_size > 0 and r.batch_size % r.group_size == 0, "rl.batch_size",
           f"{r.batch_size} is not a positive multiple of rl.group_size={r.group_size}")
    _check(r.micro_batch_size > 0 and r.batch_size % r.micro_batch_size == 0, "rl.micro_batch_size",
           f"rl.batch_size={r.batch_size} is not divisible by rl.micro_batch_size={r.micro_batch_size} "
           "(rl.micro_batch_size follows train.micro_batch_size unless set)")
    _check_stage_settings(r, "rl")
    _check(r.lr > 0, "rl.lr", f"must be > 0, got {r.lr}")
    _check_optimizer_numbers(r, "rl")
    _check_range(r.kl_coef, "rl.kl_coef", 0, hint=" (0 = no KL term)")
    _check_range(r.temperature, "rl.temperature", 0, low_open=True)
    _check(0 < r.clip_ratio < 1, "rl.clip_ratio", f"must be in (0, 1), got {r.clip_ratio}")
    _check(r.kl_coef >= 0, "rl.kl_coef", f"must be >= 0 (0 = no KL term), got {r.kl_coef}")
    _check(r.temperature > 0, "rl.temperature",
           f"must be > 0: greedy rollouts make every group agree (zero advantages), got {r.temperature}")
    _check(r.weight_decay >= 0, "rl.weight_decay", f"must be >= 0, got {r.weight_decay}")
    _check(r.updates_per_batch >= 1, "rl.updates_per_batch", f"must be >= 1, got {r.updates_per_batch}")
    _check_range(r.entropy_coef, "rl.entropy_coef", 0, hint=" (0 = no entropy bonus)")
    _check(r.reward in KNOWN_REWARDS, "rl.reward", f"unknown {r.reward!r}; choose from {KNOWN_REWARDS}")
    _check(r.advantage in KNOWN_ADVANTAGES, "rl.advantage", f"unknown {r.advantage!r}; choose from {KNOWN_ADVANTAGES}")


def _check_stage_settings(x: TrainConfig | RLConfig, prefix: str) -> None:
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


# ---------------------------------------------------------------- `em-sweep` tool commands
# `em-sweep select-prompts` and `em-sweep logits` compose the run config above plus a section of
# their own (select.*, logits.*), with the same Hydra overrides as `em-sweep eval`. Their root
# schemas extend Config, so they are never part of a run's config or its id.


@dataclass
class SelectConfig:
    """`em-sweep select-prompts`: rank a pool's prompts by variance of correctness, write prompt configs."""

    # Pool to rank: a shipped name (dsr_sub) or a JSONL path. Required.
    pool: str | None = None
    # Samples per prompt (sampling with the run config's model and train.* sampling settings).
    k: int = 16
    # Prompt configs to write: one per top prompt, plus one multi-shot config of all of them.
    top: int = 6
    # Config name prefix; null = sel_<model name> (sampling) or sel_<history file stem>.
    name: str | None = None
    # Rank only the first N usable candidates; null = all.
    limit: int | None = None
    # Rank only these pool ids (in this order); empty = the whole pool.
    ids: list[str] = field(default_factory=list)
    # One-Shot RLVR accuracy history JSON ({index: [accuracy per epoch]}): rank by its std without a model.
    history: str | None = None
    # Prefix that turns a history key into a pool id; null = inferred from the pool's ids (dsr for dsr_sub).
    id_prefix: str | None = None
    # Where the prompt configs go; null = the project's conf/prompt.
    out_dir: str | None = None
    # Ranking JSON; null = <paths.root>/selection/<name>_ranking.json.
    ranking: str | None = None
    # Overwrite prompt configs that select-prompts did not write.
    force: bool = False


@dataclass
class LogitsConfig:
    """`em-sweep logits`: what every method samples and bins. The method is the group option:
    ``logits=raw`` (default) or ``logits=reference`` (em_sweep/analysis/skewness.py)."""

    # Models to compare, in order: model presets (conf/model), checkpoints or HF paths. Required.
    models: list[str] = field(default_factory=list)
    # Prompts (one response each).
    n_responses: int = 20
    max_new_tokens: int = 500
    temperature: float = 0.6
    top_p: float = 1.0
    # Sampler seed, the same for every model.
    seed: int = 42
    # Histogram bins over the values' [min, max], or over `range` ([lo, hi]) when given.
    bins: int = 200
    range: list[float] | None = None
    # Prompts per generate call (memory knob).
    sample_batch_size: int = 20
    # Where skewness.json and histogram.png go.
    out_dir: str = "${paths.root}/logits"


@dataclass
class RawLogitsConfig(LogitsConfig):
    """Raw full-vocabulary logits at every response position, of responses to benchmark problems."""

    METHOD: ClassVar[str] = "raw"
    # Prompts: the first n_responses problems of this benchmark, in this evaluation template.
    benchmark: Any = II("eval.benchmarks[0]")
    template: str = II("eval.template")
    seed: int = II("eval.seed")
    top_k: int = 0
    # Responses per forward pass when the logits are recomputed (bounds memory).
    micro_batch_size: int = 4
    # Divide the logits by the sampling temperature first (rescales mean/std; skewness unchanged).
    divide_by_temperature: bool = False


@dataclass
class ReferenceLogitsConfig(LogitsConfig):
    """As the reference's logits_shift.py: the processed scores of DSR-sub responses (docs/cli.md)."""

    METHOD: ClassVar[str] = "reference"
    # Prompts: the first n_responses rows of this pool, as the user turn `problem + instruction`,
    # through the tokenizer's chat template without a generation prompt.
    pool: str = "dsr_sub"
    instruction: str = " Let's think step by step and output the final answer within \\boxed{}."
    # Kept scores per position (transformers' default top_k, which the reference left in place); 0 = off.
    top_k: int = 50
    bins: int = 50
    # One prompt per generate call, as the reference (no padding).
    sample_batch_size: int = 1
    # Cut every response of every model to the shortest response's length.
    truncate_to_shortest: bool = True


@dataclass
class SelectCommandConfig(Config):
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class LogitsCommandConfig(Config):
    logits: LogitsConfig = field(default_factory=LogitsConfig)


# Root schemas of the tool commands (em_sweep.cli builds their primary configs from conf/config.yaml).
COMMAND_SCHEMAS = {"select-prompts": ("em_sweep_select_schema", SelectCommandConfig),
                   "logits": ("em_sweep_logits_schema", LogitsCommandConfig)}
LOGITS_METHODS = {"raw": RawLogitsConfig, "reference": ReferenceLogitsConfig}


def register_commands() -> None:
    """Register the tool commands' root schemas and the ``logits`` group (one option per method);
    the command line does, for the command it composes (runs and sweeps need none of them)."""
    if ConfigStore is None:
        return
    cs = ConfigStore.instance()
    for name, node in COMMAND_SCHEMAS.values():
        cs.store(name=name, node=node)
    for name, node in LOGITS_METHODS.items():
        cs.store(group="logits", name=name, node=node)



def validate_select(s: SelectConfig) -> None:
    """Raise ConfigError (one line, naming the key) for an unusable select.* value."""
    _check(bool(s.pool), "select.pool", "required: a shipped pool name (e.g. select.pool=dsr_sub) or a JSONL path")
    _check(s.k >= 2, "select.k", f"must be >= 2 (variance needs two samples), got {s.k}")
    _check(s.top >= 1, "select.top", f"must be >= 1, got {s.top}")
    _check(s.limit is None or s.limit >= 1, "select.limit", f"must be >= 1 or null, got {s.limit}")


def validate_logits(s: RawLogitsConfig | ReferenceLogitsConfig) -> None:
    """Raise ConfigError (one line, naming the key) for an unusable logits.* value."""
    _check(len(s.models) > 0, "logits.models",
           "required: model presets, checkpoints or HF paths, e.g. logits.models=[tiny_arith,/path/to/step-10]")
    for key in ("n_responses", "max_new_tokens", "bins", "sample_batch_size"):
        _check(getattr(s, key) >= 1, f"logits.{key}", f"must be >= 1, got {getattr(s, key)}")
    _check(math.isfinite(s.temperature) and s.temperature > 0, "logits.temperature",
           f"must be > 0 (this analysis samples), got {s.temperature}")
    _check(0 < s.top_p <= 1, "logits.top_p", f"must be in (0, 1], got {s.top_p}")
    _check(s.top_k >= 0, "logits.top_k", "must be >= 0 (0 = off)")
    if s.range is not None:
        _check(len(s.range) == 2 and all(math.isfinite(v) for v in s.range) and s.range[0] < s.range[1],
               "logits.range", f"expected [lo, hi] with finite lo < hi, got {list(s.range)}")
    if isinstance(s, RawLogitsConfig):
        _check(s.micro_batch_size >= 1, "logits.micro_batch_size", f"must be >= 1, got {s.micro_batch_size}")
        _check(s.template in KNOWN_TEMPLATES, "logits.template",
               f"unknown {s.template!r}; choose from {KNOWN_TEMPLATES}")
