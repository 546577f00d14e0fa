import sysconfig
import time
from pathlib import Path

import numpy as np

from hybridlm.data import TokenDataset, TrainLoader, ensure_embedded_dataset
from hybridlm.data.embedded import cache_root, embedded_pieces


def test_embedded_dataset_is_the_real_stdlib_and_cached(tmp_path):
    """Builds the real default corpus (all stdlib *.py, 8192-token BPE): ~20 s on 2 idle cores."""
    pieces = embedded_pieces()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    keys = {piece.key for piece in pieces}
    assert len(pieces) > 500 and {"os.py", "json/__init__.py"} <= keys
    assert not any("site-packages" in key for key in keys)

    path = ensure_embedded_dataset(tmp_path, progress=False)
    started = time.perf_counter()
    assert ensure_embedded_dataset(tmp_path, progress=False) == path
    assert time.perf_counter() - started < 5.0  # cached (a rebuild takes ~20 s of CPU on 2 cores)

    dataset = TokenDataset(path)
    assert path.name.startswith("embedded-py3.") and dataset.vocab_size == 8192
    assert dataset.meta["tokenizer"]["path"] == "tokenizer.json" and dataset.tokenizer_path.is_file()
    assert dataset.meta["sources"] == [str(stdlib.resolve())]
    tokenizer = dataset.tokenizer
    assert tokenizer.eos_token_id == dataset.eos_id == 0
    n_documents = 0
    for name in ("train", "val"):
        split = dataset.split(name)
        n_documents += split.n_documents
        tokens = split.read(0, split.n_tokens)
        assert np.count_nonzero(tokens == dataset.eos_id) == split.n_documents
        # Byte-level BPE: the exact UTF-8 size of the text is recoverable from the tokens (for bits per byte).
        assert int(tokenizer.token_byte_lengths[tokens].sum()) == split.n_bytes
    assert n_documents == len([piece for piece in pieces if piece.size > 0])
    assert dataset.split("val").n_documents >= 10 and dataset.split("val").num_instances(1024) >= 50
    batch = TrainLoader(dataset, seq_len=256, global_batch_size=4, seed=0).next_step()[0]
    assert batch.input_ids.shape == (4, 256) and int(batch.input_ids.max()) < 8192
    text = tokenizer.decode(dataset.split("train").read(0, 2000).tolist())
    assert "def " in text or "import " in text


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDLM_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("HYBRIDLM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "hybridlm"
