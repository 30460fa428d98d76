"""File formats read without torch: the GGUF container (`gguf.GGUFFile`: header, metadata, tensor
table, memory-mapped data)."""
