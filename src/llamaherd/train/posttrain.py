"""One round of the Llama 3 post-training loop (paper §4.1): reward model -> rejection sampling ->
SFT -> DPO, with model averaging at each stage.

    from llamaherd.train.posttrain import run_round
    summary = run_round({"model": "smollm2:135m", "data": "examples/preference-demo/train.jsonl",
                         "out": "runs/round1", "runs": 2})

    herd train loop --config loop-smollm2 --out runs/round1

The stages, each in its own directory of OUT:

    reward/   `runs` reward models trained on the preference rows (`train_reward`), averaged into
              reward/model (a LlamaForSequenceClassification directory)
    samples.jsonl  `k` replies per prompt from the policy, scored by that reward model, the best
              (or top quartile) kept as SFT rows (`sample.rejection_sample`)
    sft/      `runs` fine-tunes of the policy on those rows, averaged into sft/model
    dpo/      `runs` DPO runs from sft/model on the preference pairs (best reply vs rejected),
              averaged into dpo/model: the round's policy

"Averaging" is the paper's: the runs of a stage differ (here by seed: data order, adapter
initialisation) and their weights are averaged element-wise; a LoRA run counts as its merged
weights (averaging A and B apart would not average the updates B·A). With `runs: 1` a stage's
model is its one run, merged (the reward model: reward/run0/model itself).

Every stage is an ordinary recipe call (`train_reward`, `rejection_sample`, `sft`, `dpo`) with the
same `method`, so each can be rerun alone with the matching `herd train` verb.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import HerdError

if TYPE_CHECKING:
    import torch

KEEP = ("best", "top_quartile")


@dataclass
class LoopConfig:
    model: str = ""  # the starting policy: a store name, a .gguf file, or a HF / Meta directory
    data: str = ""  # preference JSONL: prompt, chosen, rejected (optional edited)
    out: str = ""  # the round's directory
    prompts: str | None = None  # prompts to sample, JSONL {"messages": [...]} or {"prompt": "..."} (default: data's)
    val_data: str | None = None  # held-out preference rows: the reward model's pairwise accuracy
    reward_model: str | None = None  # use this reward model instead of training one
    method: str = "lora"  # full | lora, for every stage
    runs: int = 1  # runs per stage (seeds seed, seed+1, ...); their weights are averaged
    seed: int = 0
    batch_size: int = 4
    max_seq_len: int = 512
    reward_lr: float = 1e-4
    reward_steps: int | None = None  # optimizer steps of each stage (default: one epoch)
    k: int = 4  # samples per prompt
    temperature: float = 0.8
    top_p: float = 0.9
    system: str | None = None  # a system prompt for this round's samples
    keep: str = "best"  # best | top_quartile
    max_tokens: int = 256  # the longest sampled reply
    sft_lr: float = 2e-4
    sft_steps: int | None = None
    dpo_lr: float = 1e-5  # the paper's
    dpo_steps: int | None = None
    beta: float = 0.1  # the paper's
    nll_coef: float = 0.2  # the paper's
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise HerdError(f"the loop's method is full or lora, not {self.method!r}")
        if self.keep not in KEEP:
            raise HerdError(f"keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        for name in ("runs", "k", "batch_size", "max_seq_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("reward_steps", "sft_steps", "dpo_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise HerdError("temperature must be >= 0 and top_p in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Flags of `herd train loop`: (key, type, help).
LOOP_FLAGS = [
    ("model", str, "the starting policy (store name, .gguf, HF / Meta directory)"),
    ("data", str, "preference JSONL (prompt, chosen, rejected, optional edited)"),
    ("out", str, "the round's output directory"),
    ("prompts", str, "prompts to sample (default: the preference rows' prompts)"),
    ("val_data", str, "held-out preference JSONL for the reward model's accuracy"),
    ("reward_model", str, "use this reward model instead of training one"),
    ("method", str, "full | lora for every stage [lora]"),
    ("runs", int, "runs per stage, weights averaged [1]"),
    ("seed", int, "seed of the first run [0]"),
    ("batch_size", int, "sequences per micro-batch [4]"),
    ("max_seq_len", int, "tokens per sequence [512]"),
    ("reward_lr", float, "reward model learning rate [1e-4]"),
    ("reward_steps", int, "reward model steps per run (default: one epoch)"),
    ("k", int, "samples per prompt [4]"),
    ("temperature", float, "sampling temperature [0.8]"),
    ("top_p", float, "nucleus sampling [0.9]"),
    ("system", str, "a system prompt for this round's samples"),
    ("keep", str, "best | top_quartile [best]"),
    ("max_tokens", int, "the longest sampled reply, in tokens [256]"),
    ("sft_lr", float, "SFT learning rate [2e-4]"),
    ("sft_steps", int, "SFT steps per run (default: one epoch)"),
    ("dpo_lr", float, "DPO learning rate [1e-5, the paper's]"),
    ("dpo_steps", int, "DPO steps per run (default: one epoch)"),
    ("beta", float, "DPO beta [0.1]"),
    ("nll_coef", float, "DPO NLL coefficient [0.2]"),
    ("device", str, "cpu or cuda (default: cuda when available)"),
]


def make_loop_config(values: dict[str, Any]) -> LoopConfig:
    from .config import make_config

    return make_config(values, LoopConfig)


# -- model averaging ---------------------------------------------------------------------------

def average_state_dicts(load: Callable[[Any], dict[str, torch.Tensor]], sources: list) -> dict[str, torch.Tensor]:
    """The element-wise mean of the state dicts `load(s)` of `sources`, loaded one at a time.

    Raises:
        HerdError: the sources do not have the same tensors (names and shapes).
    """
    total: dict[str, torch.Tensor] = {}
    for i, source in enumerate(sources):
        sd = load(source)
        if i == 0:
            total = {k: v.detach().double().clone() for k, v in sd.items()}
            continue
        if set(sd) != set(total) or any(sd[k].shape != total[k].shape for k in sd):
            raise HerdError(f"cannot average {sources[0]} and {source}: their weights differ in names or shapes")
        for k, v in sd.items():
            total[k] += v.detach().double()
    if not total:
        raise HerdError("nothing to average")
    return {k: (v / len(sources)).float() for k, v in total.items()}


def average_models(sources: list[str | Path], out: str | Path) -> Path:
    """Average training outputs (SFT or DPO runs, LoRA merged) or model paths into one Hugging
    Face directory `out`; one source is just written merged."""
    from ..export import load_merged
    from ..export.hf import save_hf

    first = load_merged(sources[0])
    sd = average_state_dicts(lambda s: first.state_dict if s is sources[0] else load_merged(s).state_dict, sources)
    return save_hf(sd, first.args, first.tokenizer, out)


def average_reward_models(sources: list[str | Path], out: str | Path) -> Path:
    """Average reward models (`herd train reward` outputs or HF classification directories) into
    one `LlamaForSequenceClassification` directory `out`."""
    from .reward import load_reward_model, save_reward_model

    first = load_reward_model(sources[0])

    def state(source):
        rm = first if source is sources[0] else load_reward_model(source)
        return {k: v for k, v in rm.state_dict().items()}

    sd = average_state_dicts(state, sources)
    head = sd.pop("head.weight")
    backbone = {k.removeprefix("model."): v for k, v in sd.items()}
    return save_reward_model(backbone, head, first.model.args, first.tokenizer, out, first.pad_id)


# -- data for the stages -------------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Prompts to sample: JSONL lines {"messages": [...]} (no assistant reply needed) or {"prompt": "text"}."""
    from .data import field_messages

    path, prompts = Path(path), []
    if not path.is_file():
        raise HerdError(f"prompts file {path} does not exist")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or ("messages" not in record and "prompt" not in record):
                raise HerdError("expected a 'messages' list or a 'prompt'")
            prompt = field_messages(record.get("messages", record.get("prompt")), "messages", "user")
        except json.JSONDecodeError as e:
            raise HerdError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except HerdError as e:
            raise HerdError(f"{path}:{lineno}: {e}") from None
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]  # a whole conversation: sample its last reply anew
        prompts.append(prompt)
    if not prompts:
        raise HerdError(f"{path} holds no prompts")
    return prompts


def preference_prompts(rows) -> list[list[dict[str, str]]]:
    """The distinct prompts of preference rows, in order."""
    seen, prompts = set(), []
    for row in rows:
        key = json.dumps(row.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(row.prompt)
    return prompts


def write_dpo_pairs(rows, path: Path) -> Path:
    """DPO rows (prompt, chosen, rejected) from ranked rows: the best reply (the edit when there is
    one) against the rejected one."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row.prompt, "chosen": row.replies[0], "rejected": row.replies[-1]},
                               ensure_ascii=False) + "\n")
    return path


def write_jsonl(rows: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# -- the round ------------------------------------------------------------------------------------

def run_round(config: LoopConfig | dict, on_stage: Callable[[str, dict], None] | None = None) -> dict:
    """Reward -> rejection sampling -> SFT -> DPO, once (see the module doc).

    Args:
        config: a `LoopConfig`, or a dict of its keys.
        on_stage: called with (stage name, its summary) as each stage ends.
    Returns:
        {"stages": {"reward", "sample", "sft", "dpo": {"model", "runs", ...}}, "policy": the final
        policy directory}; also written to OUT/round.json.
    Raises:
        HerdError: a bad setting or file, or a reward model whose tokenizer is not the policy's.
    """
    from .finetune import sft
    from .reward import load_reward_model, read_preferences, train_reward

    cfg = config if isinstance(config, LoopConfig) else make_loop_config(dict(config))
    for key in ("model", "data", "out"):
        if not getattr(cfg, key):
            raise HerdError(f"{key} is required")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_preferences(cfg.data)  # fail on bad data before any training
    prompts = read_prompts(cfg.prompts) if cfg.prompts else preference_prompts(rows)
    seeds = [cfg.seed + i for i in range(cfg.runs)]
    common = {"method": cfg.method, "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
              "progress": cfg.progress, "device": cfg.device}
    stages: dict[str, dict] = {}

    def done(name, info):
        stages[name] = info
        (out / "round.json").write_text(json.dumps({"config": cfg.to_dict(), "stages": stages}, indent=2))
        if on_stage is not None:
            on_stage(name, info)

    # 1. The reward model.
    if cfg.reward_model:
        reward_path = Path(cfg.reward_model)
        done("reward", {"model": str(reward_path), "runs": 0, "note": "given"})
    else:
        summaries = [train_reward(model=cfg.model, data=cfg.data, val_data=cfg.val_data,
                                  val_split=0.0 if cfg.val_data else 0.1, out=str(out / "reward" / f"run{s}"),
                                  lr=cfg.reward_lr, max_steps=cfg.reward_steps, seed=s, **common)
                     for s in seeds]
        runs = [out / "reward" / f"run{s}" for s in seeds]
        reward_path = average_reward_models(runs, out / "reward" / "model") if cfg.runs > 1 else runs[0] / "model"
        done("reward", {"model": str(reward_path), "runs": len(runs),
                        "val_accuracy": [s.get("val_accuracy") for s in summaries]})
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = load_reward_model(reward_path, device)

    # 2. Rejection sampling: K replies per prompt from the policy, the reward model keeps the best.
    from ..llm import Llama
    from .finetune import resolve_model_path
    from .sample import rejection_sample

    policy = Llama.load(resolve_model_path(cfg.model))
    reward.check_tokenizer(policy.tokenizer, f"the policy {cfg.model}")
    samples = rejection_sample(policy, prompts, reward.score, cfg.k, cfg.temperature, cfg.top_p,
                               system=cfg.system, keep=cfg.keep, max_tokens=cfg.max_tokens, seed=cfg.seed,
                               progress=cfg.progress)
    del reward, policy
    if not samples:
        raise HerdError("rejection sampling kept no sample to fine-tune on")
    samples_file = write_jsonl(samples, out / "samples.jsonl")
    done("sample", {"model": str(samples_file), "prompts": len(prompts), "k": cfg.k, "kept": len(samples),
                    "mean_score": sum(r["score"] for r in samples) / len(samples)})

    # 3. SFT of the policy on the kept samples.
    runs = [out / "sft" / f"run{s}" for s in seeds]
    for s, run in zip(seeds, runs):
        sft(model=cfg.model, data=str(samples_file), out=str(run), lr=cfg.sft_lr, max_steps=cfg.sft_steps,
            seed=s, **common)
    sft_model = average_models(runs, out / "sft" / "model")
    done("sft", {"model": str(sft_model), "runs": len(runs)})

    # 4. DPO from the SFT model on the preference pairs.
    from .dpo import dpo

    pairs = write_dpo_pairs(rows, out / "dpo-pairs.jsonl")
    runs = [out / "dpo" / f"run{s}" for s in seeds]
    for s, run in zip(seeds, runs):
        dpo(model=str(sft_model), data=str(pairs), out=str(run), lr=cfg.dpo_lr, max_steps=cfg.dpo_steps,
            seed=s, beta=cfg.beta, nll_coef=cfg.nll_coef, **common)
    policy = average_models(runs, out / "dpo" / "model")
    done("dpo", {"model": str(policy), "runs": len(runs)})
    summary = {"stages": stages, "policy": str(policy)}
    (out / "round.json").write_text(json.dumps({"config": cfg.to_dict(), **summary}, indent=2))
    return summary
