from .architecture import decoder_layers, keep_layers, non_embedding_parameters
from .loading import DEFAULT_TEACHER, load, load_tokenizer, resolve_source

__all__ = ["DEFAULT_TEACHER", "decoder_layers", "keep_layers", "load", "load_tokenizer", "non_embedding_parameters", "resolve_source"]
