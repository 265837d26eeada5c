"""Per-group token stores for data mixing: format, reader, builders and the default corpus.

See ``store`` for the on-disk format and ``TokenWindows`` for how examples and global sample ids are defined.
"""
from .builders import build_from_folders, chunk_text, split_of, write_token_store
from .default_corpus import DEFAULT_GROUPS, SYNTHETIC_GROUPS, build_default_corpus
from .store import (CorruptStoreError, TokenStore, TokenWindows, atomic_directory, import_token_files,
                    read_megatron_index)
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype

__all__ = ["SYNTHETIC_GROUPS", "ByteTokenizer", "CorruptStoreError", "DEFAULT_GROUPS", "HFTokenizer", "TokenStore",
           "TokenWindows", "atomic_directory", "build_default_corpus", "build_from_folders", "chunk_text",
           "import_token_files", "load_tokenizer", "read_megatron_index", "split_of", "token_dtype",
           "write_token_store"]
