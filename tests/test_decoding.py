import pytest
import torch

from gill.decoding import Decoder, ImageStates, TokenStep, generate_without_cache
from gill.errors import InputError
from gill.options import GenerationOptions


def _prompt(pipeline, text="Q: show me a red circle on a blue background\nA:"):
    prompt = pipeline.build_prompt([text], GenerationOptions())
    return pipeline.components.model.embed_prompt(prompt.ids, prompt.prefixes)


def _decode(pipeline, prompts, options, cancel=None):
    decoder = Decoder(pipeline.components.model.lm, pipeline.components.model.tokens)
    tokens = [[] for _ in prompts]
    images = [[] for _ in prompts]
    reasons = None
    for step in decoder.stream(prompts, options, cancel):
        if isinstance(step, TokenStep):
            for row, token in enumerate(step.tokens):
                if token is not None:
                    tokens[row].append(token)
            reasons = step.finished
        else:
            for row, states in step.states.items():
                images[row].append(states)
    return tokens, images, reasons


def _expand(tokens, img_ids):
    """The reference writes all 8 [IMG] ids after [IMG0]; the decoder reports only [IMG0]."""
    out = []
    for token in tokens:
        out.extend(img_ids if token == img_ids[0] else [token])
    return out


@pytest.mark.parametrize("options", [
    GenerationOptions(max_new_tokens=24, stop_at_newline=False, stop_at_eos=False, max_images=0),
    GenerationOptions(max_new_tokens=24, stop_at_newline=False, stop_at_eos=False, gen_scale_factor=3,
                      max_images=2, min_word_tokens=2),
    GenerationOptions(max_new_tokens=6, gen_scale_factor=1e5, max_images=1),
])
def test_kv_cache_equals_full_recompute_token_for_token(pipeline, options):
    prompt = _prompt(pipeline)
    img = list(pipeline.components.model.tokens.img)
    model = pipeline.components.model
    expected_tokens, expected_images = generate_without_cache(model.lm, model.tokens, prompt, options)
    tokens, images, _ = _decode(pipeline, [prompt], options)
    assert _expand(tokens[0], img) == expected_tokens
    assert len(images[0]) == len(expected_images)
    for got, expected in zip(images[0], expected_images, strict=False):
        assert got.shape == (8, pipeline.components.model.lm_width)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_image_tokens_are_forced_and_text_continues_after(pipeline):
    options = GenerationOptions(max_new_tokens=12, stop_at_newline=False, stop_at_eos=False,
                                ret_scale_factor=1e5, min_word_tokens=3, max_images=1)
    tokens, images, reasons = _decode(pipeline, [_prompt(pipeline)], options)
    img0 = pipeline.components.model.tokens.img[0]
    assert img0 not in tokens[0][:3], "min_word_tokens forbids [IMG0] at first"
    assert tokens[0][3] == img0, "a huge scale factor picks [IMG0] as soon as allowed"
    assert len(images[0]) == 1
    after = tokens[0][4:]
    assert len(after) == 8 and img0 not in after, "one image only, then text goes on"
    assert not set(after) & set(pipeline.components.model.tokens.img[1:]), "[IMG1..7] are never sampled"


def test_batch_equals_one_at_a_time(pipeline):
    options = GenerationOptions(max_new_tokens=10, stop_at_newline=False, stop_at_eos=False,
                                gen_scale_factor=2.5, max_images=1)
    prompts = [_prompt(pipeline, "Q: hi\nA:"), _prompt(pipeline), _prompt(pipeline, "A picture of")]
    batch_tokens, batch_images, _ = _decode(pipeline, prompts, options)
    for row, prompt in enumerate(prompts):
        tokens, images, _ = _decode(pipeline, [prompt], options)
        assert batch_tokens[row] == tokens[0]
        assert len(batch_images[row]) == len(images[0])
        for got, expected in zip(batch_images[row], images[0], strict=False):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_repeats_and_seeds_differ(pipeline):
    prompt = _prompt(pipeline)

    def sample(seed):
        options = GenerationOptions(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
                                    stop_at_newline=False, stop_at_eos=False)
        return _decode(pipeline, [prompt], options)[0][0]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize("options", [
    {"temperature": 1e-45},  # the smallest float32: scores / temperature overflow to +inf
    {"temperature": 1e-45, "top_p": 1e-45},
    {"temperature": 1.0, "ret_scale_factor": 3.4e38},  # the [IMG0] score overflows to +inf
], ids=["tiny-temperature", "tiny-temperature-and-top-p", "huge-scale-factor"])
def test_sampling_survives_scores_that_overflow(pipeline, options):
    """Found by tests/test_fuzz.py: these raised "probability tensor contains either inf, nan" (INTERNAL)."""
    prompt = _prompt(pipeline)
    greedy = GenerationOptions(max_new_tokens=8, stop_at_newline=False, stop_at_eos=False, max_images=0)
    sampled = GenerationOptions(**{**greedy.to_dict(), "max_images": 1, "seed": 0, **options})
    tokens, images, _ = _decode(pipeline, [prompt], sampled)
    if "ret_scale_factor" in options:
        assert len(images[0]) == 1  # an infinitely favoured image is shown
    else:  # a temperature tending to 0 tends to greedy decoding
        assert tokens == _decode(pipeline, [prompt], greedy)[0]


def test_cancellation_stops_within_one_step(pipeline):
    calls = []
    handle = pipeline.components.model.lm.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    seen = []
    forwards_when_cancelled = []

    def cancel():
        if len(seen) >= 3:
            forwards_when_cancelled.append(len(calls))
            return True
        return False

    decoder = Decoder(pipeline.components.model.lm, pipeline.components.model.tokens)
    options = GenerationOptions(max_new_tokens=50, stop_at_newline=False, stop_at_eos=False)
    try:
        for step in decoder.stream([_prompt(pipeline)], options, cancel):
            seen.append(step)
    finally:
        handle.remove()
    assert seen[-1].finished == ["cancelled"]
    assert len(seen) == 4, "three steps, then the step that saw the cancel"
    assert len(calls) == forwards_when_cancelled[0], "no forward pass after the cancel was seen"
    assert len(calls) == 4, "prefill + one forward per token before the cancel"


def test_stops_at_newline_and_eos(pipeline):
    tokens = pipeline.components.model.tokens
    lm_head = pipeline.components.model.lm.get_output_embeddings()
    saved = lm_head.weight.detach().clone()
    try:
        with torch.no_grad():  # make the newline row win every step
            lm_head.weight[tokens.newline] = 0
            bias = torch.zeros(lm_head.weight.shape[0])
            bias[tokens.newline] = 1e4
            lm_head.bias = torch.nn.Parameter(bias)
        result, _, reasons = _decode(pipeline, [_prompt(pipeline)], GenerationOptions(max_new_tokens=10))
        assert result[0] == [tokens.newline] and reasons == ["newline"]
        result, _, reasons = _decode(pipeline, [_prompt(pipeline)],
                                     GenerationOptions(max_new_tokens=3, stop_at_newline=False))
        assert len(result[0]) == 3 and reasons == ["length"]
    finally:
        lm_head.bias = None
        with torch.no_grad():
            lm_head.weight.copy_(saved)


def test_over_long_context_is_a_clear_error(pipeline):
    window = pipeline.components.model.lm.config.max_position_embeddings
    prompt = torch.zeros(window - 10, pipeline.components.model.lm_width)
    with pytest.raises(InputError, match="context too long"):
        _decode(pipeline, [prompt], GenerationOptions(max_new_tokens=32))


@pytest.mark.parametrize("values, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"top_p": 0.9}, "greedy"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),  # budgets (10**9 tokens) are a server limit: test_limits.py
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"ret_scale_factor": float("inf")}, "ret_scale_factor"),
    ({"max_images": -1}, "max_images"),
    ({"seed": -5}, "seed"),
    ({"max_new_tokens": True}, "max_new_tokens"),
])
def test_bad_sampling_values_are_refused(values, field):
    with pytest.raises(InputError, match=field):
        GenerationOptions(**values)


def test_unknown_option_is_refused():
    with pytest.raises(InputError, match="unknown options"):
        GenerationOptions.from_dict({"temprature": 1.0})


def test_decoder_emits_image_states_once_per_image(pipeline):
    options = GenerationOptions(max_new_tokens=1, gen_scale_factor=1e5)
    decoder = Decoder(pipeline.components.model.lm, pipeline.components.model.tokens)
    steps = list(decoder.stream([_prompt(pipeline)], options))
    assert [type(s) for s in steps] == [TokenStep, ImageStates]
    assert steps[0].finished == ["length"]
