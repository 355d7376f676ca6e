"""What wave 2 needs from the LLM wrapper: trainable rows for new tokens, hidden states at positions."""

import pytest
import torch

from mmbridge.modeling import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor
from mmbridge.testing import build_tiny

VOKENS = [f"[IMG{i}]" for i in range(8)]


def test_added_tokens_train_alone_and_survive_save(tmp_path, images):
    model, processor = build_tiny(seed=3, init_std=0.5)
    embeddings_before = model.llm.model.get_input_embeddings().weight.detach().clone()
    ids = model.llm.add_special_tokens(VOKENS, processor.tokenizer, model.config)
    model.apply_trainable_policy()
    assert list(ids) == VOKENS and len(set(ids.values())) == 8
    assert processor.tokenizer.convert_tokens_to_ids("[IMG3]") == ids["[IMG3]"]

    llm_trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("trainable_tokens_delta" in n for n in llm_trainable)

    # New rows start at the mean embedding (MiniGPT-5) and old rows are untouched.
    embed = model.llm.model.get_input_embeddings()
    rows = embed(torch.tensor(list(ids.values())))
    assert torch.allclose(rows, embeddings_before.mean(0).expand_as(rows), atol=1e-6)

    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Draw it."}]},
            {"role": "assistant", "content": "Here " + "".join(VOKENS)}]
    batch = processor(conv, images=images[:1], return_labels=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()

    with torch.no_grad():
        old = torch.arange(embeddings_before.shape[0])
        assert torch.equal(embed(old), embeddings_before), "frozen rows must not move (not even by weight decay)"
        trained = embed(torch.tensor(list(ids.values())))
    assert not torch.allclose(trained, rows), "the new rows should have trained"

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    reloaded_processor = MMBridgeProcessor.from_pretrained(tmp_path)
    assert loaded.config.added_tokens == ids
    assert reloaded_processor.tokenizer.convert_tokens_to_ids(VOKENS) == list(ids.values())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_hidden_states_at_positions(images):
    model, processor = build_tiny(init_std=0.5)
    batch = processor([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a b c"}]}],
                       [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]],
                      images=images[:2])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    positions = torch.tensor([[0, 5], [3, 7]])
    picked = model.llm.hidden_states_at(hidden, positions)
    assert picked.shape == (2, 2, hidden.shape[-1])
    assert torch.equal(picked[1, 0], hidden[1, 3]) and torch.equal(picked[0, 1], hidden[0, 5])


def test_lm_head_gets_its_input_with_canonical_strides():
    """generate slices the last position (B, 1, K) out of the full sequence; with frozen bf16 weights
    PyTorch's CPU linear then copied the transposed head first (1.2 s instead of 18 ms at 1 B, batch 1)."""
    from mmbridge.modeling.llm import _canonical_strides
    from mmbridge.testing import build_tiny

    for batch in (1, 3):
        hidden = torch.randn(batch, 7, 16)[:, -1:, :]
        (fixed,) = _canonical_strides(None, (hidden,))
        assert fixed.stride() == (16, 16, 1) and torch.equal(fixed, hidden)
    model, processor = build_tiny(seed=0)
    inputs = processor([[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]], add_generation_prompt=True)
    seen = []
    model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                   do_sample=False)
    head = model.llm.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2,
                   do_sample=False)
    assert seen and all(stride[0] == stride[1] for stride in seen)  # the hook ran before ours


def test_lm_turn_weighs_every_answer_turn_alike(images):
    """`lm_turn`: cross-entropy averaged over each answer turn, then over turns — a one-word answer weighs what a
    sentence does (where `lm`, the per-token mean, is dominated by the sentence); only when asked for."""
    import torch.nn.functional as F

    from mmbridge.modeling.model import turn_mean_lm_loss

    model, processor = build_tiny(seed=0, init_std=0.5)
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
              {"role": "assistant", "content": "red"},
              {"role": "user", "content": "Describe it."},
              {"role": "assistant", "content": "A large red circle and a small blue square on a gray background."}],
             [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
              {"role": "assistant", "content": "2"}]]
    batch = processor(chats, images=images[:2], return_labels=True)
    with torch.no_grad():
        out = model(**batch, loss_names=["lm", "lm_turn", "lm_first"])
        assert not {"lm_turn", "lm_first"} & set(model(**batch).losses)  # opt-in: the default total is unchanged
        targets = batch["labels"][:, 1:]
        tokens = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100,
                                 reduction="none")
        turns, firsts = [], []  # by hand: runs of labelled positions, row by row
        for row in range(len(targets)):
            run = []
            for t in range(targets.shape[1]):
                if targets[row, t] != -100:
                    run.append(tokens[row, t])
                elif run:
                    turns.append(torch.stack(run).mean())
                    firsts.append(run[0])
                    run = []
            if run:
                turns.append(torch.stack(run).mean())
                firsts.append(run[0])
    assert len(turns) == 3
    assert torch.allclose(out.losses["lm_turn"], torch.stack(turns).mean(), atol=1e-5)
    # `lm_first`: each turn's first token alone (the one that decides a route or words), over turns
    assert torch.allclose(out.losses["lm_first"], torch.stack(firsts).mean(), atol=1e-5)
    assert torch.allclose(out.losses["lm"], tokens[targets != -100].mean(), atol=1e-5)
    assert not torch.allclose(out.losses["lm"], out.losses["lm_turn"], atol=1e-3)
    with pytest.raises(ValueError, match="no answer turn"):
        turn_mean_lm_loss(out.logits, torch.full_like(batch["labels"], -100))
