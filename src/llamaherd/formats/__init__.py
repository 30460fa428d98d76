"""File formats read without torch: the GGUF container (`gguf.GGUFFile`: header, metadata, tensor
table, memory-mapped data)."""

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
