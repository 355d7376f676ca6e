import pytest
import torch

from mmbridge.generation import GenerationResult, StopStringFilter, TextPart


def ask(text, with_image=True):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Describe the image.",
             "Is there a red square?", "What shape is the blue object?"]


def test_batched_greedy_equals_per_sample_token_for_token(tiny_pipeline, images):
    # Different prompt lengths force left padding; every sample must decode exactly as alone.
    conversations = [ask(q) for q in QUESTIONS]
    batch_images = [images[i % 3] for i in range(len(QUESTIONS))]
    batched = tiny_pipeline.generate(conversations, images=batch_images, max_new_tokens=12)
    for conv, image, result in zip(conversations, batch_images, batched):
        alone = tiny_pipeline.generate(conv, images=[image], max_new_tokens=12)[0]
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text
    assert len({tuple(r.token_ids) for r in batched}) > 1, "answers should depend on the input"


def test_batched_samples_stop_on_their_own(tiny_pipeline, images):
    # Stop on a string one sample produces early: it stops, the others run on.
    conversations = [ask(q) for q in QUESTIONS[:3]]
    free = tiny_pipeline.generate(conversations, images=images, max_new_tokens=10)
    decode = tiny_pipeline.processor.tokenizer.decode
    # a clean ASCII token from the middle of sample 0's answer, not seen earlier in it
    k, stop = next((k, decode([t]).strip()) for k, t in enumerate(free[0].token_ids) if k > 0
                   and decode([t]).strip().isalpha() and decode([t]).strip().isascii()
                   and decode([t]).strip() not in decode(free[0].token_ids[:k]))
    stopped = tiny_pipeline.generate(conversations, images=images, max_new_tokens=10, stop=[stop])
    assert stopped[0].finish_reason == "stop"
    assert stop not in stopped[0].text
    assert len(stopped[0].token_ids) < len(free[0].token_ids)
    for before, after in zip(free[1:], stopped[1:]):
        if stop not in decode(before.token_ids):
            assert after.token_ids == before.token_ids


def test_sampling_is_reproducible_with_a_seed(tiny_pipeline, images):
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    a = tiny_pipeline.generate(ask("Hi"), images=images[:1], **kwargs)[0]
    b = tiny_pipeline.generate(ask("Hi"), images=images[:1], **kwargs)[0]
    c = tiny_pipeline.generate(ask("Hi"), images=images[:1], **{**kwargs, "seed": 8})[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_beam_search_runs_and_scores_at_least_greedy(tiny_pipeline, images, monkeypatch):
    model, processor = tiny_pipeline.model, tiny_pipeline.processor
    monkeypatch.setattr(processor, "stop_strings", [])  # compare full-length sequences
    greedy = tiny_pipeline.generate(ask("Hi"), images=images[:1], max_new_tokens=6)[0]
    beam = tiny_pipeline.generate(ask("Hi"), images=images[:1], max_new_tokens=6, num_beams=4)[0]

    def logprob(tokens):
        inputs = processor(ask("Hi"), images=images[:1], add_generation_prompt=True)
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
        n = inputs["input_ids"].shape[1]
        logp = logits[n - 1:-1].log_softmax(-1)
        return float(logp.gather(1, torch.tensor(tokens)[:, None]).sum())

    assert len(beam.token_ids) == len(greedy.token_ids) == 6
    assert logprob(beam.token_ids) >= logprob(greedy.token_ids) - 1e-4


def test_streaming_yields_exactly_the_non_streaming_text(tiny_pipeline, images):
    counts = []
    for question in QUESTIONS:
        expected = tiny_pipeline.generate(ask(question), images=images[:1], max_new_tokens=16)[0]
        stream = tiny_pipeline.stream(ask(question), images=images[:1], max_new_tokens=16)
        pieces = []
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as done:
                final = done.value
                break
        assert "".join(pieces) == expected.text
        assert final.token_ids == expected.token_ids
        counts.append(len(pieces))
    assert max(counts) > 1, "text should arrive in several pieces"  # the streamer emits at word boundaries


def test_stop_string_filter_never_shows_a_stop_string():
    pieces = ["  The", " answer", " is #", "#", "# and more"]
    assert "".join(StopStringFilter(["###"]).filter(pieces)) == "The answer is"
    assert "".join(StopStringFilter(["###"]).filter(["a #", "b "])) == "a #b"


def test_streaming_survives_a_decoder_that_rejoins_words_and_punctuation():
    """Bug: the shapes tokenizer decodes "4 " and then "4###" (its decoder drops the space it inserted before
    punctuation); transformers' delta streamer then sent "##" and `mmbridge chat` printed "4 ##" where
    `generate` answered "4". The snapshot streamer sends whole texts and the filter never shows a stop string."""
    assert "".join(StopStringFilter(["###"]).filter_snapshots(["4 ", "4###", "4###right "])) == "4"
    assert "".join(StopStringFilter(["###"]).filter_snapshots(["A red circle ", "A red circle,", "A red circle, a"])) \
        == "A red circle, a"


@pytest.mark.parametrize("turns", [3])
def test_chat_kv_reuse_equals_full_reencoding(tiny_pipeline, images, turns):
    reuse = tiny_pipeline.chat(max_new_tokens=8)
    scratch = tiny_pipeline.chat(max_new_tokens=8, reuse_cache=False)
    prompts = [("What is this?", [images[0]]), ("And the colors?", []), ("Compare it with this one.", [images[1]])]
    for text, imgs in prompts[:turns]:
        a, b = reuse.ask(text, images=imgs), scratch.ask(text, images=imgs)
        assert a.token_ids == b.token_ids
    # The session's conversation, answered statelessly, gives the same last answer too.
    history = reuse.messages[:-1]
    stateless = tiny_pipeline.generate(history, images=[images[0], images[1]], max_new_tokens=8)[0]
    assert stateless.token_ids == a.token_ids


def test_a_chat_turn_prints_no_transformers_warning(tiny_pipeline, images, caplog):
    """Bug: every `mmbridge chat` answer printed transformers' warning about generate() arguments passed next to
    a generation_config (the session passed `cache_implementation=None` that way)."""
    session = tiny_pipeline.chat(max_new_tokens=4)
    with caplog.at_level("WARNING"):
        session.ask("What is this?", images=[images[0]])
        session.ask("And the colors?")
    assert not [r for r in caplog.records if "generation_config" in r.getMessage()]


def test_a_chat_session_keeps_its_own_cache_under_static_decoding(tiny_model_dir, tiny_pipeline, images):
    """With a static KV cache configured for batched decoding, a chat session still decodes on its own
    (reused) cache — transformers refuses a cache_implementation next to a given cache — and answers as the
    dynamic one does."""
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.generation.decode_options import apply_decode_options

    static = MMBridgePipeline.from_pretrained(tiny_model_dir)
    apply_decode_options(static.model, kv_cache="static")
    a, b = static.chat(max_new_tokens=4), tiny_pipeline.chat(max_new_tokens=4)
    for text, imgs in [("What is this?", [images[0]]), ("And the colors?", [])]:
        assert a.ask(text, images=imgs).token_ids == b.ask(text, images=imgs).token_ids


def test_chat_turn_only_runs_new_tokens(tiny_pipeline, images):
    session = tiny_pipeline.chat(max_new_tokens=5)
    first = session.ask("What is this?", images=[images[0]])
    cached_ids = list(session._cached_ids)
    cached = session._cache.get_seq_length()  # the last generated token has no KV yet
    seen = []
    handle = tiny_pipeline.model.llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None
                                                  else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    try:
        session.ask("And now?")
    finally:
        handle.remove()
    target = tiny_pipeline.processor.encode(session.messages[:-1], True).input_ids
    common = next(i for i, (a, b) in enumerate(zip(cached_ids + [None], target)) if a != b)
    reused = min(common, cached)
    # Everything up to the end of turn 1's prompt (image included) comes from the cache; only the
    # tail — at most the re-tokenised answer plus the new turn — runs through the LLM.
    assert reused >= first.prompt_tokens
    assert seen[0] + seen[1] == len(target) - reused
    assert all(n == 1 for n in seen[2:])


def test_chat_streaming_and_beam_in_session(tiny_pipeline, images):
    session = tiny_pipeline.chat(max_new_tokens=6)
    pieces = list(session.ask_stream("What is this?", images=[images[0]]))
    reference = tiny_pipeline.chat(max_new_tokens=6).ask("What is this?", images=[images[0]])
    assert "".join(pieces) == reference.text
    beam = session.ask("Again?", num_beams=3)
    assert isinstance(beam, GenerationResult) and beam.completion_tokens > 0
    assert session.ask("Once more?").completion_tokens > 0


def test_chat_rejects_image_count_mismatch(tiny_pipeline, images):
    session = tiny_pipeline.chat()
    with pytest.raises(ValueError, match="more images"):
        session.ask([{"type": "text", "text": "no image part"}], images=[images[0]])


def test_output_is_typed_parts(tiny_pipeline, images):
    result = tiny_pipeline.generate(ask("Hi"), images=images[:1], max_new_tokens=4)[0]
    assert all(isinstance(p, TextPart) and p.type == "text" for p in result.parts)
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 0 and result.completion_tokens == len(result.token_ids)


def test_the_image_placeholder_is_never_generated(tiny_pipeline, images, monkeypatch):
    """Regression: a random model emitted <ImageHere>; fed back, it asked for a soft prompt that does not exist."""
    processor = tiny_pipeline.processor
    monkeypatch.setattr(processor, "stop_strings", [])
    for question in QUESTIONS:
        result = tiny_pipeline.generate(ask(question), images=images[:1], max_new_tokens=24)[0]
        assert processor.image_token_id not in result.token_ids


@pytest.mark.parametrize("mid_answer", [True, False])
def test_routes_that_open_answers_are_not_generated_mid_answer(mid_answer):
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.generation.pipeline import RoutesOpenAnswers
    from mmbridge.heads_config import ActConfig
    from mmbridge.testing import build_tiny

    model, processor = build_tiny(seed=0)
    config = ActConfig(tasks=["det"], decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, num_object_queries=4,
                       mask_size=8, visual_prompts=False, route_mid_answer=mid_answer)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    pipe = MMBridgePipeline(model, processor)
    added = model.config.added_tokens
    trigger, first_slot = added["[DET]"], added["[DET_Q0]"]
    processors = pipe._logits_processors(prompt_length=3)
    assert any(isinstance(p, RoutesOpenAnswers) for p in processors) is not mid_answer
    vocab = model.config.text_config.vocab_size
    opening = processors(torch.tensor([[5, 6, 7]]), torch.zeros(1, vocab))  # the answer's first token
    assert opening[0, trigger] == 0
    later = processors(torch.tensor([[5, 6, 7, 8]]), torch.zeros(1, vocab))  # after a word of text
    assert bool(later[0, trigger] == 0) is mid_answer
    forced = processors(torch.tensor([[5, 6, 7, trigger]]), torch.zeros(1, vocab))  # a route's slots stay forced
    assert forced[0, first_slot] == 0 and forced[0].isinf().sum() == vocab - 1
