"""`herd export`: a training output (or any model) as GGUF, a Hugging Face directory or a PEFT adapter.

    herd export runs/mine --format gguf --quant q8_0 -o mine.gguf
    herd export runs/mine --format hf -o mine-hf
    herd export runs/mine --format peft -o mine-adapter
    herd export runs/mine --format gguf-lora -o mine-lora.gguf
"""

from __future__ import annotations


def register(sub, local) -> None:
    p = sub.add_parser("export", help="export a fine-tuned model (GGUF, Hugging Face, PEFT)",
                       description="Export a training output (herd train sft --out DIR) or any model herd loads.")
    p.add_argument("source", metavar="DIR", help="a training output directory, or a model path")
    p.add_argument("--format", required=True, choices=("gguf", "hf", "peft", "gguf-lora"),
                   help="gguf: one merged file; hf: config.json + model.safetensors + tokenizer; "
                        "peft: the LoRA adapter directory; gguf-lora: the LoRA adapter as llama.cpp's --lora file")
    p.add_argument("--quant", default=None,
                   help="GGUF weights: f32 | f16 | q8_0 | q4_0 [f16]; gguf-lora: f32 | f16 [f32]")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="the file (gguf) or directory to write")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export import export

    out = export(args.source, args.format, args.output, args.quant)
    print(f"wrote {out}")
    return 0
