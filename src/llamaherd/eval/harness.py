"""The `herd` model backend for lm-evaluation-harness: lm-eval's tasks on llamaherd's engine,
in process (no server, no Hugging Face download).

    herd-lm-eval --model herd --model_args model=smollm2:135m,quantized=False --tasks arc_easy

`herd-lm-eval` is lm-eval's own command line with this backend registered first: lm-eval 0.4.13
(the newest release) resolves `--model` against its built-in table only, so the plain
`lm_eval --model herd` does not find it. The package also declares the backend under
the `lm_eval.models` entry-point group, for lm-eval versions that load installed plugins
(EleutherAI/lm-evaluation-harness#4013), and `import llamaherd.eval.harness` registers it for
use from Python (`lm_eval.simple_evaluate(model="herd", ...)`).

Tokens follow lm-eval's `hf` backend with the model's own tokenizer: BOS is added when the
model's tokenizer adds it (HF's `add_special_tokens` default), the context/continuation split
and left truncation are lm-eval's (`TemplateLM._encode_pair`), and the scores come from
`llamaherd.eval.scoring.loglikelihoods`, as `herd eval` computes them.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


def _bool(value: Any) -> bool | None:
    """A model_args value ("True", "false", "1", None) as a bool."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("herd")
class HerdLM(TemplateLM):
    """lm-eval model backend over a `llamaherd.llm.Llama`.

    Args (lm-eval's --model_args):
        model: a store name (e.g. smollm2:135m), a .gguf file or a checkpoint directory; or
            `llm`: an already loaded `Llama` (from Python).
        quantized: keep GGUF weights 4/8-bit (the fast path; default on CPU) or not (the float
            reference path).
        batch_tokens: padded tokens per forward pass.
        max_length: the longest sequence scored at once (default the model's context length).
        add_bos_token: force BOS on (True) or off (False); default the tokenizer's own rule.
    """

    def __init__(self, model: str | None = None, llm: Any = None, quantized: Any = None,
                 batch_tokens: int | str = 4096, max_length: int | str | None = None,
                 add_bos_token: Any = None, batch_size: Any = None, device: str | None = None, **kwargs):
        super().__init__()
        if llm is None:
            if not model:
                raise ValueError("the herd backend needs model=NAME (a store name, .gguf file or directory)")
            from .runner import _load

            llm = _load(model, _bool(quantized))
        from .scoring import check_scorer

        check_scorer(llm, f"model '{model}'")
        self.llm = llm
        self.tok = llm.tokenizer
        self.batch_tokens = int(batch_tokens)
        self._max_length = int(max_length) if max_length else llm.args.max_seq_len
        self.add_bos_token = _bool(add_bos_token)
        self.backend = "causal"

    # -- tokens -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        from .scoring import prefix_token

        return prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"herd-{getattr(self.llm, 'path', 'model')}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        bos = add_special_tokens
        if bos is None:
            bos = self.tok.add_bos if self.add_bos_token is None else self.add_bos_token
        ids = self.tok.encode(string, bos=bool(bos))
        if bos and len(ids) > 1 and ids[1] == self.tok.bos_id and ids[0] == self.tok.bos_id:
            ids = ids[1:]  # the string already started with BOS text (lm-eval's has_bos_prefix)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.decode(self.llm.encode_chat(chat_history, add_generation_prompt=add_generation_prompt))

    # -- requests -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from .scoring import loglikelihoods

        bar = tqdm(total=len(requests), desc="herd loglikelihood", disable=disable_tqdm)
        try:
            results = loglikelihoods(self.llm, [(ctx, cont) for _, ctx, cont in requests], max_len=self.max_length,
                                     batch_tokens=self.batch_tokens, progress=bar.update)
        finally:
            bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="herd rolling", disable=disable_tqdm):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..generate import SamplingOptions

        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="herd generate", disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", None) is not False else 0.0
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            num_ctx = min(self.max_length, -(-(len(ids) + max_gen) // 1024) * 1024)  # few KV-cache sizes
            opts = SamplingOptions.from_dict({"temperature": temperature, "top_k": 0, "top_p": 1.0,
                                              "repeat_penalty": 1.0, "seed": 1234, "num_predict": max_gen,
                                              "stop": until, "num_ctx": num_ctx})
            text = "".join(c.text for c in self.llm.stream(ids, opts) if not c.done)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """`herd-lm-eval`: lm-eval's command line with `--model herd`, and every other backend that an
    installed package declares under the `lm_eval.models` entry-point group (lm-eval 0.4.13, the
    newest release, loads no such plugins itself)."""
    from importlib.metadata import entry_points

    import lm_eval.models  # noqa: F401  (lm-eval's own table first)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import model_registry

    for ep in entry_points(group="lm_eval.models"):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep.value)  # loaded when asked for
    cli_evaluate()
