import json
import random

import numpy as np
import pytest
import torch

from hybridlm.data import (
    Batch,
    EvalLoader,
    TokenDataset,
    TrainLoader,
    cu_seqlens_from_document_ids,
    document_ids,
    prepare_dataset,
)

SEQ_LEN = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizer) -> TokenDataset:
    """~60 random documents in several shards; every training window is distinct, so a window names its instance."""
    root = tmp_path_factory.mktemp("loader")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    for i in range(60):
        text = " ".join(f"{rng.choice('abcdefgh')}{rng.randint(0, 99)}" for _ in range(rng.randint(2, 40)))
        (corpus / f"doc{i:02d}.txt").write_text(text)
    out = prepare_dataset([corpus], tiny_tokenizer, root / "ds", val_fraction=0.2, shard_bytes=500, progress=False)
    return TokenDataset(out)


def window_index(dataset: TokenDataset, split: str = "train") -> dict[bytes, int]:
    part = dataset.split(split)
    n = part.num_instances(SEQ_LEN)
    stream = part.read(0, part.n_tokens).astype(np.int64)
    index = {stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1].tobytes(): i for i in range(n)}
    assert len(index) == n, "test corpus must have distinct windows"
    return index


def instances_of(batches: list[Batch], index: dict[bytes, int]) -> list[int]:
    out = []
    for batch in batches:
        for inputs, labels in zip(batch.input_ids, batch.labels):
            assert torch.equal(inputs[1:], labels[:-1])
            window = torch.cat([inputs, labels[-1:]]).numpy()
            out.append(index[window.tobytes()])
    return out


def test_instances_are_windows_of_the_stream(dataset):
    part = dataset.split("train")
    stream = part.read(0, part.n_tokens)
    assert len(dataset.meta["splits"]["train"]["shards"]) > 2
    n = part.num_instances(SEQ_LEN)
    assert n == (part.n_tokens - 1) // SEQ_LEN
    for i in (0, 1, n // 2, n - 1):
        np.testing.assert_array_equal(part.instance(i, SEQ_LEN), stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])
    with pytest.raises(IndexError):
        part.instance(n, SEQ_LEN)
    for start in range(0, part.n_tokens - 50, 37):  # reads that cross shard boundaries
        np.testing.assert_array_equal(part.read(start, 50), stream[start : start + 50])


def test_epoch_order_is_a_seeded_permutation(dataset):
    index = window_index(dataset)
    n = len(index)
    loader = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=8, seed=7)
    assert loader.instances_per_epoch == n and loader.tokens_per_step == 8 * SEQ_LEN
    steps = -(-3 * n // 8)  # three epochs and a bit
    seen = [i for _ in range(steps) for i in instances_of(loader.next_step(), index)]
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))  # each instance exactly once
        assert seen[epoch * n : (epoch + 1) * n] == loader.permutation(epoch).tolist()
    assert seen[:n] != seen[n : 2 * n]  # a new order each epoch
    assert (loader.epoch, loader.position) == divmod(steps * 8, n)

    again = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=8, seed=7)
    assert [i for _ in range(steps) for i in instances_of(again.next_step(), index)] == seen
    other = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=8, seed=8)
    assert instances_of(other.next_step(), index) != seen[:8]


def test_resume_mid_epoch_and_across_epochs(dataset):
    index = window_index(dataset)
    n = len(index)
    reference = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, seed=1)
    uninterrupted = [instances_of(reference.next_step(), index) for _ in range(3 * n // 6)]
    for stop in (1, n // 6 - 1, n // 6 + 1, 2 * n // 6):
        loader = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, seed=1)
        for _ in range(stop):
            loader.next_step()
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint as plain data
        resumed = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, seed=1)
        resumed.load_state_dict(state)
        continued = [instances_of(resumed.next_step(), index) for _ in range(len(uninterrupted) - stop)]
        assert continued == uninterrupted[stop:]
        # Resuming on 3 ranks with micro-batches continues the same global order.
        shards = []
        for rank in range(3):
            ranked = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, micro_batch_size=1, rank=rank,
                                 world_size=3, seed=1)
            ranked.load_state_dict(state)
            shards.append(instances_of(ranked.next_step(), index))
        assert sum(shards, []) == uninterrupted[stop]

    with pytest.raises(ValueError, match="seed"):
        TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        reference.load_state_dict({**reference.state_dict(), "position": n})


@pytest.mark.parametrize("world_size, micro_batch_size", [(1, 3), (2, 2), (4, 1), (12, None)])
def test_rank_shards_reassemble_the_single_process_order(dataset, world_size, micro_batch_size):
    index = window_index(dataset)
    single = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=12, seed=4)
    ranks = [TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=12, micro_batch_size=micro_batch_size,
                         rank=r, world_size=world_size, seed=4) for r in range(world_size)]
    for _ in range(2 * len(index) // 12 + 1):
        expected = instances_of(single.next_step(), index)
        parts = []
        for loader in ranks:
            micro_batches = loader.next_step()
            rows = micro_batch_size or 12 // world_size
            assert len(micro_batches) == 12 // world_size // rows
            assert all(b.input_ids.shape == (rows, SEQ_LEN) and b.input_ids.dtype == torch.int64 for b in micro_batches)
            parts.append(instances_of(micro_batches, index))
        assert sum(parts, []) == expected
        assert len(set(map(tuple, parts))) == world_size or world_size == 1


def test_batch_config_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="multiple of world_size"):
        TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="must divide"):
        TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=6, rank=2, world_size=2)
    too_long = dataset.split("val").n_tokens
    for make in (lambda: TrainLoader(dataset, split="val", seq_len=too_long, global_batch_size=1),
                 lambda: EvalLoader(dataset, seq_len=too_long, batch_size=1)):
        with pytest.raises(ValueError, match=f"needs at least {too_long + 1} tokens.*hybridlm data prepare"):
            make()


def test_missing_or_empty_dataset_errors(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="hybridlm data prepare"):
        TrainLoader(tmp_path / "nowhere", seq_len=SEQ_LEN, global_batch_size=1)
    (tmp_path / "no_meta").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json.*hybridlm data prepare"):
        TokenDataset(tmp_path / "no_meta")
    meta = json.loads((dataset.path / "meta.json").read_text())
    meta["splits"]["val"]["n_tokens"] = 0
    (tmp_path / "empty_val").mkdir()
    (tmp_path / "empty_val" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="split 'val' .* is empty"):
        EvalLoader(tmp_path / "empty_val", seq_len=SEQ_LEN, batch_size=1)
    (tmp_path / "old" ).mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="version 0, expected"):
        TokenDataset(tmp_path / "old")
    # A shard cut short after preparation is caught on open.
    shard = dataset.path / meta["splits"]["train"]["shards"][0]["tokens"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text(json.dumps(meta))
    (corrupt / "train").mkdir()
    (corrupt / "train" / shard.name).write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="incomplete"):
        TokenDataset(corrupt).split("train")


def reference_document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    out = torch.zeros_like(input_ids)
    for b in range(input_ids.shape[0]):
        current = 0
        for t in range(input_ids.shape[1]):
            out[b, t] = current
            if input_ids[b, t] == eos_id:
                current += 1
    return out


def reference_cu_seqlens(doc_ids: torch.Tensor) -> list[int]:
    batch, length = doc_ids.shape
    bounds = []
    for b in range(batch):
        for t in range(length):
            if t == 0 or doc_ids[b, t] != doc_ids[b, t - 1]:
                bounds.append(b * length + t)
    return bounds + [batch * length]


def test_document_ids_and_cu_seqlens():
    eos = 0
    input_ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9],
                              [0, 1, 2, 3, 4, 5, 6, 7],
                              [1, 2, 3, 4, 5, 6, 7, 0]])
    doc_ids = document_ids(input_ids, eos)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1], [0] * 8]
    assert cu_seqlens_from_document_ids(doc_ids).tolist() == [0, 3, 5, 6, 8, 9, 16, 24]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 4, (3, 11), generator=generator)
        doc_ids = document_ids(ids, eos)
        assert torch.equal(doc_ids, reference_document_ids(ids, eos))
        cu_seqlens = cu_seqlens_from_document_ids(doc_ids)
        assert cu_seqlens.dtype == torch.int64 and cu_seqlens.tolist() == reference_cu_seqlens(doc_ids)


def test_loader_document_masking(dataset):
    loader = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=8, document_masking=True)
    batch = loader.next_step()[0]
    assert batch.doc_ids.shape == batch.input_ids.shape and batch.doc_ids.dtype == torch.int64
    assert torch.equal(batch.doc_ids, reference_document_ids(batch.input_ids, dataset.eos_id))
    assert (batch.input_ids == dataset.eos_id).any(), "test batch should contain document boundaries"
    assert batch.cu_seqlens().tolist() == reference_cu_seqlens(batch.doc_ids)
    plain = TrainLoader(dataset, seq_len=SEQ_LEN, global_batch_size=8).next_step()[0]
    assert plain.doc_ids is None and torch.equal(plain.input_ids, batch.input_ids)
    moved = batch.to("meta")
    assert moved.input_ids.is_meta and moved.labels.is_meta and moved.doc_ids.is_meta
    assert plain.to("meta").doc_ids is None
    with pytest.raises(ValueError, match="document_masking=True"):
        plain.cu_seqlens()


def test_eval_loader_fixed_order(dataset):
    index = window_index(dataset, "val")
    n = len(index)
    everything = EvalLoader(dataset, seq_len=SEQ_LEN, batch_size=3)
    assert everything.num_instances == n and len(everything) == -(-n // 3)
    assert instances_of(list(everything), index) == list(range(n))
    assert instances_of(list(everything), index) == list(range(n))  # the same again
    subset = EvalLoader(dataset, seq_len=SEQ_LEN, batch_size=2, max_instances=4)
    picked = instances_of(list(subset), index)
    assert picked == [k * n // 4 for k in range(4)] and picked[-1] >= n // 2  # spread over the split
    ranks = [instances_of(list(EvalLoader(dataset, seq_len=SEQ_LEN, batch_size=2, rank=r, world_size=3)), index)
             for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(n))
    masked = next(iter(EvalLoader(dataset, seq_len=SEQ_LEN, batch_size=2, document_masking=True)))
    assert torch.equal(masked.doc_ids, reference_document_ids(masked.input_ids, dataset.eos_id))
