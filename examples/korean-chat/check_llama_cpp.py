"""The exported Korean model in llama.cpp itself (through llama-cpp-python, where it is installed):
greedy replies of llama.cpp and of herd to the held-out questions, token by token.

    python examples/korean-chat/check_llama_cpp.py --herd runs/smollm2-korean-f16.gguf \\
        --llama-cpp runs/smollm2-korean-f16.gguf
    python examples/korean-chat/check_llama_cpp.py --herd runs/smollm2-korean-f16.gguf \\
        --llama-cpp smollm2:135m --lora runs/smollm2-korean-lora.gguf

Prints, per question, how many leading tokens the two replies share and whether they are identical.
llama.cpp multiplies 4/8-bit and f16 weights with activations rounded to 8 or 16 bits, herd in float32,
so where the model is unsure a shared prefix, not identity, is what to expect.
"""

import argparse
import json
from pathlib import Path

import llamaherd
from llamaherd.resolve import resolve_model

HERE = Path(__file__).resolve().parent


def questions() -> list[str]:
    rows = [json.loads(line) for line in (HERE / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["prompt"] if "prompt" in r else next(m["content"] for m in r["messages"] if m["role"] == "user")
            for r in rows]


def herd_reply(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for chunk in llm.stream(ids, llm.options(temperature=0, num_predict=n)):
        out += list(chunk.tokens or ())
    return out


def llama_cpp_reply(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    out: list[int] = []
    for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
        if token in stop or len(out) == n:
            break
        out.append(token)
    return out


def top1_agreement(ours, theirs) -> tuple[int, int]:
    """Teacher-forced: over every held-out conversation's tokens, how often the two argmaxes agree."""
    import numpy as np

    rows = [json.loads(line) for line in (HERE / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    agree = total = 0
    for r in rows:
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                         {"role": "assistant", "content": r["completion"]}]
        ids = ours.encode_chat(messages, add_generation_prompt=False)
        theirs.reset()
        theirs.eval(ids)
        b = np.asarray(theirs.scores[:len(ids)]).argmax(-1)
        a = ours.logits(ids).argmax(-1).numpy()
        agree, total = agree + int((a == b).sum()), total + len(ids)
    return agree, total


def shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--herd", required=True, help="the model herd runs (a .gguf or a directory)")
    parser.add_argument("--llama-cpp", required=True, help="the GGUF llama.cpp runs")
    parser.add_argument("--lora", help="a GGUF LoRA adapter llama.cpp applies over --llama-cpp")
    parser.add_argument("--quantized", action="store_true", help="herd keeps 4/8-bit blocks (else float32)")
    parser.add_argument("-n", type=int, default=48, help="tokens per reply at most [48]")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="also the top-1 agreement over every token of heldout.jsonl")
    parser.add_argument("--limit", type=int, help="ask only this many questions, evenly over the file")
    args = parser.parse_args()
    ours = llamaherd.load(resolve_model(args.herd).path, device="cpu", quantized=args.quantized)
    theirs = llama_cpp.Llama(str(resolve_model(args.llama_cpp).path), lora_path=args.lora, n_ctx=512, n_threads=2,
                             logits_all=args.teacher_forced, verbose=False)
    stop = set(ours.tokenizer.stop_ids)
    prefixes, same = [], 0
    asked = questions()
    if args.limit:
        asked = [asked[i * len(asked) // args.limit] for i in range(args.limit)]
    for q in asked:
        ids = ours.encode_chat([{"role": "user", "content": q}])
        a = [t for t in herd_reply(ours, ids, args.n) if t not in stop]
        b = llama_cpp_reply(theirs, ids, args.n, stop)
        prefixes.append(shared(a, b))
        same += a == b
        print(f"{prefixes[-1]:3d}/{max(len(a), len(b)):3d} {'=' if a == b else '~'}  {q}  |  "
              f"{ours.tokenizer.decode(a)!r}  |  {ours.tokenizer.decode(b)!r}")
    print(f"identical replies: {same}/{len(prefixes)}; mean shared prefix {sum(prefixes) / len(prefixes):.1f} "
          f"tokens; shortest {min(prefixes)}")
    if args.teacher_forced:
        agree, total = top1_agreement(ours, theirs)
        print(f"teacher-forced top-1 agreement: {agree}/{total} = {agree / total:.2%}")


if __name__ == "__main__":
    main()
