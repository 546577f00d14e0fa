"""Data: tokenizers, preparation of token datasets on disk, and the training / evaluation loaders."""

from hybridlm.data.dataset import TokenDataset, TokenSplit
from hybridlm.data.embedded import ensure_embedded_dataset
from hybridlm.data.loader import Batch, EvalLoader, TrainLoader, cu_seqlens_from_document_ids, document_ids
from hybridlm.data.prepare import DEFAULT_VAL_FRACTION, prepare_dataset
from hybridlm.data.tokenizer import Tokenizer, train_bpe_tokenizer

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "Batch",
    "EvalLoader",
    "TokenDataset",
    "TokenSplit",
    "Tokenizer",
    "TrainLoader",
    "cu_seqlens_from_document_ids",
    "document_ids",
    "ensure_embedded_dataset",
    "prepare_dataset",
    "train_bpe_tokenizer",
]
