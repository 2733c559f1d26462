import io
import threading

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gill.cli import app
from gill.errors import InputError
from gill.events import DiffusionPreview, Done, ImageRequest, ImageResult, TextDelta
from gill.images import png_bytes
from gill.options import GenerationOptions
from gill.tiny import shape_image

PROMPT = "Q: show me a red circle on a blue background\nA:"
IMAGE_TURN = GenerationOptions(max_new_tokens=12, gen_scale_factor=1e5, min_word_tokens=4,
                               num_inference_steps=4, seed=7, stop_at_newline=False, stop_at_eos=False)


def test_turn_streams_text_then_image_then_done(pipeline, decision_bias):
    decision_bias("gen")
    image = shape_image("green", "square", "white", 48)
    events = list(pipeline.stream([image, PROMPT], IMAGE_TURN))
    kinds = [type(e) for e in events]
    assert kinds[-1] is Done and kinds.count(Done) == 1
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 3, "text arrives as several deltas"
    request = next(e for e in events if isinstance(e, ImageRequest))
    assert request.hidden_states.shape == (8, pipeline.components.model.lm_width)
    assert kinds.index(ImageRequest) > kinds.index(TextDelta), "min_word_tokens words come first"
    result = next(e for e in events if isinstance(e, ImageResult))
    assert result.source == "generated" and result.decision == "gen"
    assert result.image.size == (32, 32)
    assert sum(result.probabilities) == pytest.approx(1.0)
    done = events[-1]
    assert done.text == "".join(d.text for d in deltas)
    assert done.generated_tokens == 12 and done.stop_reason == "length"
    model = pipeline.components.model
    assert done.prompt_tokens == model.args.n_visual_tokens + len(model.tokenize(PROMPT, True))
    assert {"prompt_s", "first_token_s", "decode_s", "total_s", "diffusion_s"} <= set(done.timings)


def test_generation_is_skipped_when_the_decision_is_retrieve(pipeline, decision_bias):
    decision_bias("ret")
    before = pipeline.components.generator.steps_run
    result = pipeline.run([PROMPT], IMAGE_TURN)
    assert pipeline.components.generator.steps_run == before, "Stable Diffusion must not run for a retrieval"
    [image] = result.images
    assert image.source == "retrieved" and image.decision == "ret"
    assert image.url.startswith("retrieval_images/") and image.caption.startswith("a ")
    assert image.probabilities[1] > 0.99
    assert "diffusion_s" not in result.done.timings


def test_generation_runs_when_the_decision_is_generate(pipeline, decision_bias):
    decision_bias("gen")
    before = pipeline.components.generator.steps_run
    result = pipeline.run([PROMPT], IMAGE_TURN)
    # PNDM (SD v1.5's scheduler) runs one extra warm-up step: count what the scheduler planned.
    planned = len(pipeline.components.generator.pipe.scheduler.timesteps)
    assert planned in (IMAGE_TURN.num_inference_steps, IMAGE_TURN.num_inference_steps + 1)
    assert pipeline.components.generator.steps_run - before == planned
    assert [i.source for i in result.images] == ["generated"]


def test_same_seed_same_turn(pipeline, decision_bias):
    decision_bias("gen")
    first = pipeline.run([PROMPT], IMAGE_TURN)
    second = pipeline.run([PROMPT], IMAGE_TURN)
    assert first.text == second.text
    assert png_bytes(first.images[0].image) == png_bytes(second.images[0].image)


def test_retrieval_never_shows_the_same_image_twice(pipeline, decision_bias):
    decision_bias("ret")
    options = GenerationOptions(max_new_tokens=12, ret_scale_factor=1e5, max_images=3,
                                stop_at_newline=False, stop_at_eos=False)
    result = pipeline.run([PROMPT], options)
    urls = [i.url for i in result.images]
    assert len(urls) == 3 and len(set(urls)) == 3


def test_disallowed_branch_falls_back_to_the_other(pipeline, decision_bias):
    decision_bias("ret")
    result = pipeline.run([PROMPT], GenerationOptions(**{**IMAGE_TURN.to_dict(), "allow_retrieval": False}))
    assert [i.source for i in result.images] == ["generated"]
    result = pipeline.run([PROMPT], GenerationOptions(**{**IMAGE_TURN.to_dict(), "allow_retrieval": False,
                                                         "allow_generation": False}))
    assert result.images == [] and result.done.stop_reason == "length"


def test_cancel_during_diffusion_stops_within_one_step(pipeline, decision_bias):
    decision_bias("gen")
    unet_calls = []
    handle = pipeline.components.generator.pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    cancelled = threading.Event()
    previews = []
    options = GenerationOptions(**{**IMAGE_TURN.to_dict(), "num_inference_steps": 40, "preview_every": 1})
    try:
        for event in pipeline.stream([PROMPT], options, cancel=cancelled.is_set):
            if isinstance(event, DiffusionPreview):
                previews.append(event)
                if len(previews) == 2:
                    cancelled.set()
                    calls_at_cancel = len(unet_calls)
            last = event
    finally:
        handle.remove()
    assert isinstance(last, Done) and last.stop_reason == "cancelled"
    assert not any(isinstance(e, ImageResult) for e in [last])
    # The worker may be one step ahead of the preview we read; nothing runs after the next check.
    assert len(unet_calls) - calls_at_cancel <= 1
    assert len(unet_calls) < 40


def test_previews_stream_during_generation(pipeline, decision_bias):
    decision_bias("gen")
    options = GenerationOptions(**{**IMAGE_TURN.to_dict(), "num_inference_steps": 6, "preview_every": 2})
    previews = [e for e in pipeline.stream([PROMPT], options) if isinstance(e, DiffusionPreview)]
    total = len(pipeline.components.generator.pipe.scheduler.timesteps)
    assert [p.step for p in previews] == list(range(2, total + 1, 2))
    assert all(p.total_steps == total and p.image.mode == "RGB" for p in previews)


def _truncated_png():
    data = png_bytes(shape_image("red", "circle", "blue", 32))
    return data[: len(data) // 2]


@pytest.mark.parametrize("parts, message", [
    ([], "empty prompt"),
    ([""], "empty prompt"),
    ("just a string", "list"),
    ([b"not an image at all", "hi"], "not a recognised image"),
    ([b"", "hi"], "empty"),
    ([_truncated_png(), "hi"], "truncated or corrupt"),
    ([42, "hi"], "part 0"),
])
def test_bad_input_is_a_clear_error(pipeline, parts, message):
    with pytest.raises(InputError, match=message):
        list(pipeline.stream(parts, GenerationOptions()))


def test_over_long_prompt_is_a_clear_error(pipeline):
    with pytest.raises(InputError, match="context too long"):
        list(pipeline.stream(["word " * 400], GenerationOptions()))


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "I;16"])
def test_image_modes_simply_work(pipeline, mode):
    image = shape_image("red", "circle", "blue", 32)
    if mode == "I;16":
        converted = Image.new("I;16", (32, 32))
    else:
        converted = image.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    result = pipeline.run([buffer.getvalue(), "A picture of"], GenerationOptions(max_new_tokens=2, max_images=0))
    assert result.done.generated_tokens >= 1


def test_decompression_bomb_is_refused(pipeline):
    huge = Image.new("1", (20000, 20000))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    with pytest.raises(InputError, match="limit|too large"):
        list(pipeline.stream([buffer.getvalue(), "hi"], GenerationOptions()))


def test_gill_run_streams_and_saves_the_image(tiny_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["run", "show me a red circle", "--checkpoint", str(tiny_dir), "--out", str(tmp_path),
                                 "--gen-scale-factor", "100000", "--steps", "3", "--seed", "1", "--device", "cpu",
                                 "--image", str(tiny_dir / "retrieval_images" / "00000.png")])
    assert result.exit_code == 0, result.output
    saved = list(tmp_path.glob("turn1-image0-*.png"))
    assert len(saved) == 1
    assert ("retrieved" in saved[0].name) == ("from retrieval_images/" in result.output)
    assert "stop:" in result.output or "tokens" in result.output


def test_gill_run_holds_a_conversation(tiny_dir, tmp_path):
    """Several messages: one turn each, the transcript printed, each turn's image saved under its turn number."""
    result = CliRunner().invoke(app, ["run", "show me a red circle", "now a blue one", "--checkpoint", str(tiny_dir),
                                      "--out", str(tmp_path), "--gen-scale-factor", "100000", "--steps", "2",
                                      "--max-new-tokens", "4", "--seed", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Q: show me a red circle\nA:" in result.output and "Q: now a blue one\nA:" in result.output
    assert len(list(tmp_path.glob("turn1-image0-*.png"))) == 1 and len(list(tmp_path.glob("turn2-image0-*.png"))) == 1
    assert result.output.count("stop:") == 2


def test_gill_run_bad_option_is_a_readable_error(tiny_dir):
    result = CliRunner().invoke(app, ["run", "hi", "--checkpoint", str(tiny_dir), "--temperature", "-1"])
    assert result.exit_code == 2
    assert "temperature" in result.output and "Traceback" not in result.output


def test_pipeline_keeps_serving_after_an_error(pipeline):
    with pytest.raises(InputError):
        list(pipeline.stream([b"garbage"], GenerationOptions()))
    assert pipeline.run(["A picture of"], GenerationOptions(max_new_tokens=3, max_images=0)).done.generated_tokens


def test_model_weights_stay_on_the_requested_device_and_dtype(pipeline):
    assert pipeline.components.model.device.type == "cpu" and pipeline.components.model.dtype == torch.float32


def test_leaving_the_loop_mid_diffusion_stops_denoising(pipeline, decision_bias):
    decision_bias("gen")
    unet_calls = []
    handle = pipeline.components.generator.pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    options = GenerationOptions(**{**IMAGE_TURN.to_dict(), "num_inference_steps": 60, "preview_every": 1})
    try:
        stream = pipeline.stream([PROMPT], options)
        for event in stream:
            if isinstance(event, DiffusionPreview):
                break
        stream.close()  # what a server does when its client goes away
        workers = [t for t in threading.enumerate() if t.name.startswith("gill-diffusion")]
        for worker in workers:
            worker.join(timeout=30)
        assert not any(worker.is_alive() for worker in workers)
    finally:
        handle.remove()
    assert len(unet_calls) <= 3, "denoising stopped within a step of the client leaving"
