"""Export a training output: a merged model as GGUF (`gguf.py`) or a Hugging Face directory, and
LoRA adapters as a PEFT adapter directory (`hf.py`)."""
