"""What is applied to the model from outside keeps its names and its numbers."""

import torch

from hybridlm.models import HybridLM, get_preset
from hybridlm.train.distributed import apply_activation_checkpointing


def test_activation_checkpointing_recomputes_and_keeps_gradients_and_names():
    torch.manual_seed(0)
    config = get_preset("hybrid-tiny", vocab_size=256, eos_token_id=0, pad_token_id=1)
    plain = HybridLM(config)
    checkpointed = HybridLM(config)
    checkpointed.load_state_dict(plain.state_dict())
    names = list(plain.state_dict())
    apply_activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == names

    calls = {"n": 0}
    mlp_forward = checkpointed.model.layers[0].mlp.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return mlp_forward(*args, **kwargs)

    checkpointed.model.layers[0].mlp.forward = counting
    ids = torch.randint(0, 256, (2, 24))
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 10:] = 1
    for model in (plain, checkpointed):
        logits = model(ids, doc_ids=doc_ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert calls["n"] == 2, "the block's forward runs again in the backward pass"
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
