"""Chat concerns below the engine: prompt templates (`template`: the model's Jinja template, Llama 3's
format), tool definitions and tool calls (`tools`), and tokens -> text with stop strings held back
(`text`). They need a tokenizer, never the model or the engine."""
