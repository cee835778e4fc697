"""Text data: the shipped default corpus, user text files, tokenization and packing into fixed-length blocks."""

from .text import DEFAULT_CORPUS, load_documents, pack_blocks, sample_blocks, tokenize_documents

__all__ = ["DEFAULT_CORPUS", "load_documents", "pack_blocks", "sample_blocks", "tokenize_documents"]
