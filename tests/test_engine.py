"""stylize(): the optimisation loop, its options, progress and cancellation."""

import json
import math
import mmap
import os
import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_painting, make_photo

from stylekit import Cancelled, StylekitError, StyleOptions, StyleRequest, engine, lbfgs, stylize
from stylekit.engine import (
    HISTORY_SIZE,
    MIN_HISTORY,
    SHORT_RUN_STEPS,
    MemoryPlan,
    Runtime,
    _optimise,
    check_style_pass,
    history_size,
    pick_runtime,
    plan_memory,
    scale_phases,
    scale_sizes,
    stylize_batch,
)
from stylekit.errors import NotEnoughMemory
from stylekit.request import FLOAT32_MAX


@pytest.fixture
def run(weights_file):
    """Stylise the tiny photo with the tiny painting; options override small, fast defaults."""
    def go(progress=None, styles=None, init_image=None, content=None, **changes):
        # The CPU: these tests specify behaviour, not devices (a GPU throttles progress, say).
        options = StyleOptions(weights=str(weights_file), steps=4, targets="torch", device="cpu"
                               ).replace(**changes)
        request = StyleRequest(make_photo() if content is None else content, styles or [make_painting()],
                               options, init_image=init_image)
        return stylize(request, progress=progress)
    return go


def test_the_package_lists_its_lazily_imported_stylize_for_completion():
    import stylekit
    assert {"stylize", "stylize_batch", "StyleRequest", "Cancelled"} <= set(dir(stylekit))


def test_the_result_is_the_best_iterate_not_the_last(run):
    seen = []
    result = run(steps=12, progress=lambda p: seen.append(p.loss) if p.stage == "optimise" else None)
    assert result.total_loss <= min(seen) * (1 + 1e-5)


def test_optimiser_lowers_the_total_loss_substantially(run):
    before = run(steps=1)
    after = run(steps=30)
    assert after.total_loss < 0.5 * before.total_loss


def test_adam_also_lowers_the_loss(run):
    assert run(optimizer="adam", steps=20).total_loss < run(optimizer="adam", steps=1).total_loss


def test_same_seed_gives_the_same_pixels(run):
    assert np.array_equal(run(init="noise", seed=7).image, run(init="noise", seed=7).image)


def test_different_seed_gives_different_pixels_from_noise(run):
    assert not np.array_equal(run(init="noise", seed=7).image, run(init="noise", seed=8).image)


def test_output_keeps_the_content_size_by_default(run):
    result = run()
    assert result.image.shape == (40, 48, 3) and (result.width, result.height) == (48, 40)


def test_size_sets_the_long_side(run):
    assert run(size=32).image.shape == (27, 32, 3)


def test_result_reports_losses_iterations_and_memory(run):
    result = run(steps=3)
    assert result.iterations == 3 and result.device == "cpu" and result.peak_memory_bytes > 0
    assert result.total_loss == pytest.approx(
        result.content_loss + 1e6 * result.style_loss + 10 * result.tv_loss, rel=1e-4)


def test_weights_of_the_loss_are_applied_as_given(run):
    result = run(content_weight=2.0, style_weight=3.0, tv_weight=0.0, steps=2)
    assert result.total_loss == pytest.approx(2 * result.content_loss + 3 * result.style_loss, rel=1e-4)


def test_style_init_starts_from_the_style_image(run):
    assert not np.allclose(run(init="style", steps=1).image, run(init="content", steps=1).image)


def test_init_image_is_used_as_the_start(run):
    start = np.full((40, 48, 3), 0.5, dtype=np.float32)
    assert not np.allclose(run(init_image=start, steps=1).image, run(steps=1).image)


def test_a_style_blend_needs_one_weight_per_style_image(run):
    with pytest.raises(StylekitError, match=r"^style_blend has 2 weights for 1 style image "):
        run(style_blend=(0.5, 0.5))


@pytest.mark.parametrize("blend", [(0.0, 0.0), (1.0, -0.5)])
def test_a_style_blend_of_negative_or_only_zero_weights_is_refused(run, blend):
    with pytest.raises(StylekitError, match=r"^bad style_blend .*(not all 0|≥ 0)"):
        run(styles=[make_painting(), make_painting(seed=2)], style_blend=blend)


def test_style_blend_weights_change_the_result(run):
    styles = [make_painting(seed=1), make_photo(40, 40, seed=9)]
    first = run(styles=styles, style_blend=(1.0, 0.0))
    second = run(styles=styles, style_blend=(0.0, 1.0))
    assert not np.allclose(first.image, second.image)


@pytest.mark.parametrize("style", [make_painting(48, 48), make_painting(400, 12)], ids=["square", "panorama"])
def test_a_style_too_small_for_the_network_at_its_scale_is_taken_at_16_px(run, style):
    # at style_scale 0.05 the square style would be 2 px, the panorama's short side 1 px
    assert math.isfinite(run(styles=[style], style_scale=0.05, scales=1).total_loss)


@pytest.mark.parametrize(("content", "message"), [
    ((make_photo() * 255).astype(np.uint8), "float32 array"),
    (make_photo().astype(np.float64), "float32 array"),
    (make_photo()[..., 0], "H×W×3"),
    (make_photo() * 255, "outside \\[0, 1\\]"),
    (np.where(np.eye(40, 48, dtype=bool)[..., None], np.nan, make_photo()).astype(np.float32), "NaN"),
    (np.zeros((0, 0, 3), np.float32), "no pixels"),
], ids=["uint8", "float64", "grey 2-D", "0-255 floats", "NaN", "empty"])
def test_pixels_the_engine_cannot_take_are_refused_naming_the_image(weights_file, content, message):
    options = StyleOptions(weights=str(weights_file), steps=2, device="cpu", targets="torch")
    with pytest.raises(StylekitError, match=f"the content image .*{message}"):
        stylize(StyleRequest(content, [make_painting()], options))


@pytest.mark.parametrize(("changes", "message"), [
    ({"options": None}, "options must be a stylekit.StyleOptions, not NoneType"),
    ({"style_key": 3}, "style_key must be a string, not int"),
    ({"options": StyleOptions(style_blend=("a",))}, r"bad style_blend \('a',\) \(must be a list of"),
], ids=["options", "style_key", "blend of strings"])
def test_a_request_of_the_wrong_types_is_refused_by_name(changes, message):
    with pytest.raises(StylekitError, match=f"^{message}"):
        stylize(replace(StyleRequest(make_photo(), [make_painting()]), **changes))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: stylize(None), "a request must be a stylekit.StyleRequest, not NoneType"),
    (lambda: stylize(StyleRequest(make_photo(), (s for s in [make_painting()]))),
     "at least one style image is needed, in a list"),
    (lambda: stylize(StyleRequest(make_photo(), [make_painting()]), progress=5),
     "progress must be a function taking a stylekit.Progress, not int"),
    (lambda: stylize_batch([]), "stylize_batch needs a list of one or more requests"),
    (lambda: stylize_batch(StyleRequest(make_photo(), [make_painting()])),
     "stylize_batch needs a list of one or more requests"),
    (lambda: StyleOptions().replace(colour=1), "unknown option 'colour'"),
], ids=["not a request", "styles a generator", "progress not callable", "empty batch", "batch not a list",
        "unknown option"])
def test_library_calls_of_the_wrong_shape_get_a_stylekit_error_at_once(call, message):
    with pytest.raises(StylekitError, match=f"^{re.escape(message)}$"):
        call()


def test_a_batch_styles_requests_sharing_a_style_key_with_their_own_styles(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=2, optimizer="adam", targets="torch")
    alone = stylize(StyleRequest(make_photo(seed=2), [make_painting(seed=2)], options))
    _, second = stylize_batch([  # one key for two sets of style images, as after a preset was replaced
        StyleRequest(make_photo(seed=seed), [make_painting(seed=seed)], options, style_key="k")
        for seed in (1, 2)])
    np.testing.assert_allclose(second.image, alone.image, atol=1e-4)


def test_a_read_only_image_is_styled_without_a_warning(run):
    content = make_photo()
    content.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(steps=1, content=content)


def test_the_result_is_a_c_contiguous_array_as_loaded_images_are(run):
    assert run().image.flags.c_contiguous


def test_a_bare_style_array_instead_of_a_list_is_refused(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=2, device="cpu", targets="torch")
    with pytest.raises(StylekitError, match="in a list"):
        stylize(StyleRequest(make_photo(), make_painting(), options))


def test_a_one_pixel_content_enlarged_to_the_size_asked_for_is_styled(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=2, size=32, targets="torch", device="cpu")
    result = stylize(StyleRequest(np.full((1, 1, 3), 0.5, np.float32), [make_painting()], options))
    assert result.image.shape == (32, 32, 3) and result.iterations > 0


def test_loss_weights_that_overflow_the_loss_are_refused_not_returned_as_the_start(run):
    with pytest.raises(StylekitError, match=r"^the loss or its gradient is not a finite number at the start "
                                            r".*--style"):
        run(init="noise", content_weight=3e38, style_weight=3e38, tv_weight=3e38)


def _overflowing_run(run, progress=None):
    """Adam with a large learning rate and --tv-weight at float32's largest, from a grey content towards
    a checkerboard: its jumps make a pattern whose TV passes 1, so the weighted loss overflows after
    a few finite evaluations (and Adam's next steps are NaN)."""
    ys, xs = np.mgrid[0:40, 0:40]
    checkerboard = np.repeat(((xs + ys) % 2).astype(np.float32)[..., None], 3, axis=-1)
    return run(progress=progress, content=np.full((40, 48, 3), 0.5, np.float32), styles=[checkerboard],
               optimizer="adam", learning_rate=1.0, tv_weight=FLOAT32_MAX, steps=8, scales=1)


def test_a_run_whose_loss_overflows_part_way_returns_its_best_finite_image_and_says_so(run):
    seen = []
    result = _overflowing_run(run, lambda p: seen.append(p.loss) if p.stage == "optimise" else None)
    finite = [loss for loss in seen if loss is not None and math.isfinite(loss)]
    assert len(finite) < len(seen)  # it did overflow
    assert np.isfinite(result.image).all() and result.total_loss == pytest.approx(min(finite), rel=1e-5)
    said = [message for message in result.warnings if "overflowed" in message]
    assert said == [engine.overflow_warning(len(finite))]


def test_progress_reports_no_loss_rather_than_a_non_finite_one(run):
    seen = []
    _overflowing_run(run, lambda p: seen.append(p.loss) if p.stage == "optimise" else None)
    assert None in seen and all(loss is None or math.isfinite(loss) for loss in seen)


def test_a_run_leaves_the_callers_random_state_alone(run):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_layer_options_may_be_given_as_lists(run):
    assert StyleOptions(style_layers=["relu1_1", "relu2_1"]).style_layers == ("relu1_1", "relu2_1")
    assert math.isfinite(run(content_layers=["relu3_1"], style_layers=["relu1_1", "relu2_1"]).total_loss)


@pytest.mark.parametrize(("name", "value"), [("steps", 2.5), ("seed", 1.5), ("seed", None), ("scales", 1.0)])
def test_counts_must_be_whole_numbers(run, name, value):
    with pytest.raises(StylekitError, match=f"bad {name} .*whole number"):
        run(**{name: value})


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("style_weight", "1e6", "a number"), ("style_scale", None, "a number"), ("weights", None, "a string"),
    ("style_layers", "relu1_1", "a list of strings"),
    ("style_layer_weights", ("1",) * 5, "a list of numbers"),
])
def test_option_values_of_the_wrong_type_are_refused_with_their_name(run, name, value, kind):
    with pytest.raises(StylekitError, match=rf"^bad {name} .* \(must be {kind}\)$"):
        run(**{name: value})


def test_numpy_option_values_are_taken_as_plain_numbers_and_reported_as_json(run):
    result = run(steps=np.int64(2), style_weight=np.float32(1e5), style_layer_weights=np.ones(5))
    assert result.iterations == 2
    assert json.loads(json.dumps(result.report()))["options"]["style_layer_weights"] == [1.0] * 5


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux resets a process's peak")
def test_each_run_reports_its_own_peak_memory_not_the_processes(run):
    first = run(steps=1)
    with mmap.mmap(-1, 1 << 30) as ballast:  # a GiB, touched, then unmapped before the next run
        for offset in range(0, len(ballast), mmap.PAGESIZE):
            ballast[offset] = 1
    assert run(steps=1).peak_memory_bytes < first.peak_memory_bytes + (256 << 20)


def test_luminance_mode_keeps_the_content_colours(run):
    plain, kept = run(steps=8), run(steps=8, preserve_color="luminance")
    content = make_photo()
    assert np.abs(kept.image - content).mean() < np.abs(plain.image - content).mean()


def test_luminance_mode_reports_the_losses_of_the_image_it_returns(run):
    kept = run(steps=8, preserve_color="luminance")
    # One evaluation at one scale, started from the returned pixels, scores exactly those pixels.
    rescored = run(steps=1, scales=1, init_image=kept.image)
    assert (kept.content_loss, kept.style_loss, kept.tv_loss, kept.total_loss) == pytest.approx(
        (rescored.content_loss, rescored.style_loss, rescored.tv_loss, rescored.total_loss), rel=1e-4)


def test_histogram_mode_changes_the_result(run):
    assert not np.allclose(run(preserve_color="histogram").image, run().image)


def test_coarse_to_fine_scales_double_up_to_the_size_from_min_scale():
    assert scale_sizes(400, 300, 512, None, 128, 300) == [(128, 96), (256, 192), (512, 384)]
    assert scale_sizes(48, 40, 48, None, 128, 300) == [(48, 40)]


def test_by_default_a_half_size_scale_comes_before_the_full_size():
    assert scale_sizes(400, 300, 512, None, None, 300) == [(256, 192), (512, 384)]
    assert scale_sizes(1000, 750, 1000, None, None, 300) == [(500, 375), (1000, 750)]
    assert scale_sizes(48, 40, 48, None, None, 300) == [(48, 40)]  # a 24 px scale teaches nothing


def test_a_short_run_starts_at_a_quarter_of_the_size():
    assert scale_sizes(400, 300, 512, None, None, SHORT_RUN_STEPS) == [(128, 96), (256, 192), (512, 384)]
    assert scale_sizes(400, 300, 512, None, None, SHORT_RUN_STEPS + 1) == [(256, 192), (512, 384)]
    assert scale_sizes(400, 300, 512, 1, None, 50) == [(512, 384)]  # asked for: as asked


def test_every_scale_is_optimised_coarse_ones_with_half_the_steps(run):
    result = run(size=80, scales=2, steps=4)
    assert result.iterations == 4 + 2


def test_a_short_run_without_scales_asked_for_is_optimised_over_three(run):
    assert run(size=160, steps=4).iterations == 4 + 2 + 2  # 40×33, 80×67, then 160×133


BF16_GRAD = Runtime(torch.device("cpu"), torch.float32, torch.bfloat16)


def test_with_bf16_gradients_a_coarse_scale_drafts_two_thirds_in_bf16_then_polishes():
    draft = Runtime(torch.device("cpu"), torch.bfloat16)
    assert scale_phases(150, False, BF16_GRAD) == [(draft, 100), (BF16_GRAD, 50)]


def test_the_finest_scale_and_fp32_runs_are_not_drafted():
    fp32 = Runtime(torch.device("cpu"), torch.float32)
    assert scale_phases(300, True, BF16_GRAD) == [(BF16_GRAD, 300)]
    assert scale_phases(150, False, fp32) == [(fp32, 150)]


def test_gpu_runs_are_not_drafted():
    gpu = Runtime(torch.device("cuda"), torch.float32, torch.bfloat16)
    assert scale_phases(150, False, gpu) == [(gpu, 150)]


def test_a_drafted_coarse_scale_reports_its_evaluations_as_one_scale(run):
    seen = []
    result = run(size=80, scales=2, steps=6, precision="bf16-grad", progress=seen.append)
    optimised = [(p.scale, p.iteration) for p in seen if p.stage == "optimise"]
    assert optimised == [(1, i) for i in range(1, 4)] + [(2, i) for i in range(4, 10)]
    assert result.iterations == 9 and result.precision == "bf16-grad"


def test_progress_reports_every_evaluation_in_order(run):
    seen = []
    run(progress=seen.append, steps=3)
    iterations = [p.iteration for p in seen if p.stage == "optimise"]
    assert iterations == [1, 2, 3] and seen[-1].stage == "done" and seen[-1].fraction == 1.0


def test_a_run_that_converges_early_still_ends_its_progress_at_all_of_it(run):
    seen = []
    result = run(progress=seen.append, steps=20, scales=1, content_weight=0, style_weight=0, tv_weight=0)
    assert result.iterations < 20  # nothing to lower: L-BFGS stops at once
    assert seen[-1].stage == "done" and seen[-1].fraction == 1.0 and seen[-1].iteration == result.iterations


def test_the_done_progress_carries_the_loss_of_the_image_returned(run):
    seen = []
    result = run(progress=seen.append, steps=3, preserve_color="luminance")  # not the last one evaluated
    assert seen[-1].stage == "done" and seen[-1].loss == pytest.approx(result.total_loss, rel=1e-6)


def test_cancelling_from_the_callback_stops_the_run(run):
    def cancel_at_two(progress):
        if progress.iteration >= 2:
            raise Cancelled
    with pytest.raises(Cancelled):
        run(progress=cancel_at_two, steps=50)


def test_bf16_precision_runs_on_cpu(run):
    result = run(precision="bf16", steps=2)
    assert result.precision == "bf16" and np.isfinite(result.total_loss)


def test_bf16_grad_lowers_the_loss_as_far_as_fp32(weights_file):
    # Trajectories that differ only in rounding end up to 10% apart after 100 evaluations (either
    # way), so the two precisions are compared over three starts: the photo, and it with 1e-4 noise.
    photo = make_photo()
    starts = [photo] + [np.clip(photo + 1e-4 * np.random.default_rng(seed).standard_normal(photo.shape),
                                0, 1).astype(np.float32) for seed in (1, 2)]

    def total(precision: str) -> float:
        options = StyleOptions(weights=str(weights_file), steps=100, targets="torch", device="cpu",
                               precision=precision)
        results = [stylize(StyleRequest(start, [make_painting()], options)) for start in starts]
        assert all(result.precision == precision for result in results)
        return sum(result.total_loss for result in results)
    assert total("bf16-grad") <= 1.05 * total("fp32")


def test_auto_precision_on_a_cpu_with_native_bf16_keeps_fp32_losses_and_bf16_gradients(monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    runtime = pick_runtime("cpu", "auto")
    assert (runtime.dtype, runtime.gradient_dtype) == (torch.float32, torch.bfloat16)


def test_auto_precision_on_other_cpus_is_plain_fp32(monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    runtime = pick_runtime("cpu", "auto")
    assert (runtime.dtype, runtime.gradient_dtype, runtime.precision) == (torch.float32, None, "fp32")


def test_missing_gpu_is_a_clear_error(run):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(StylekitError, match="no CUDA GPU"):
        run(device="cuda")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("steps", 0, "steps"), ("style_weight", -1.0, "style_weight"), ("optimizer", "sgd", "optimizer"),
    ("content_layers", ("relu9_1",), "relu9_1"), ("style_layer_weights", (1.0,), "style layer weights"),
    ("learning_rate", 0.0, "learning_rate"), ("learning_rate", 4e37, "learning_rate"),
    ("learning_rate", math.nan, "learning_rate"), ("style_scale", 0.01, "style_scale"),
    ("style_scale", 1e3, r"style_scale 1000.0 \(must be from 0.05 to 8\)"),
    ("style_layers", (), r"^bad style_layers: none given \(e.g. relu1_1, "),
    ("content_layers", (), r"^bad content_layers: none given \(e.g. relu4_2\)"),
])
def test_bad_options_are_refused_with_their_name(run, option, value, message):
    with pytest.raises(StylekitError, match=message):
        run(**{option: value})


def test_a_batch_with_adam_gives_each_image_its_own_result(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=3, targets="torch", optimizer="adam")
    photos = [make_photo(seed=0), make_photo(seed=4)]
    batch = stylize_batch([StyleRequest(p, [make_painting()], options) for p in photos])
    alone = [stylize(StyleRequest(p, [make_painting()], options)) for p in photos]
    for together, single in zip(batch, alone, strict=True):  # equal up to float rounding
        assert np.abs(together.image - single.image).mean() < 1e-3
        assert together.total_loss == pytest.approx(single.total_loss, rel=1e-3)


def test_a_batch_can_mix_styles(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=2, targets="torch")
    requests = [StyleRequest(make_photo(), [make_painting(seed=s)], options) for s in (1, 2)]
    first, second = stylize_batch(requests)
    assert not np.allclose(first.image, second.image)


def test_a_batch_refuses_different_sizes(weights_file):
    options = StyleOptions(weights=str(weights_file), steps=1, targets="torch")
    with pytest.raises(StylekitError, match="same size"):
        stylize_batch([StyleRequest(make_photo(48, 40), [make_painting()], options),
                       StyleRequest(make_photo(40, 40), [make_painting()], options)])


def test_coarse_scales_too_small_to_help_are_dropped():
    assert scale_sizes(1000, 60, 1000, 3, 128, 300) == [(1000, 60)]
    assert scale_sizes(1000, 100, 1000, 3, 128, 300) == [(500, 50), (1000, 100)]


def test_scales_past_a_pixel_cost_nothing():
    assert scale_sizes(400, 300, 512, 10**12, None, 300) == scale_sizes(400, 300, 512, 20, None, 300)


def test_an_output_under_sixteen_pixels_is_refused(run):
    with pytest.raises(StylekitError, match=r"^bad size 12 \(the output's long side in pixels: at least "
                                            r"16\)$"):
        run(size=12)


def test_large_images_are_checkpointed_without_changing_the_result(run, monkeypatch):
    from stylekit import engine
    plain = run(steps=6)
    monkeypatch.setattr(engine, "CHECKPOINT_PIXELS", 0)  # treat the tiny image as a huge one
    checkpointed = run(steps=6)
    np.testing.assert_allclose(checkpointed.image, plain.image, atol=1e-4)


def test_lbfgs_history_shrinks_for_huge_images_only():
    assert history_size(1024 * 1024) == HISTORY_SIZE
    assert MIN_HISTORY <= history_size(4096 * 4096) < HISTORY_SIZE


def test_lbfgs_history_shrinks_to_what_free_memory_holds():
    assert history_size(256 * 256, fit=12) == 12
    assert history_size(256 * 256, fit=10 * HISTORY_SIZE) == HISTORY_SIZE
    assert history_size(256 * 256, fit=1) == MIN_HISTORY


def test_a_run_too_large_for_free_memory_is_refused_before_it_starts(run):
    stages = []
    with pytest.raises(NotEnoughMemory, match=r"^not enough memory for a \d+×\d+ image on the (CPU|GPU)"):
        run(size=10**6, progress=lambda p: stages.append(p.stage))  # no machine holds 10⁶ × 8·10⁵ px
    assert "optimise" not in stages


def test_a_refusal_names_a_size_that_fits():
    cpu, free = torch.device("cpu"), 8 << 30
    with pytest.raises(NotEnoughMemory) as refused:
        plan_memory((4000, 3000), 1, cpu, free)
    longest = int(re.search(r"a long side of (\d+) px or less fits", str(refused.value))[1])
    assert 1000 < longest < 4000 and refused.value.long_side == longest
    plan_memory((longest, longest * 3 // 4), 1, cpu, free)
    with pytest.raises(NotEnoughMemory):
        plan_memory((longest + 100, (longest + 100) * 3 // 4), 1, cpu, free)


def test_a_style_pass_too_large_for_memory_is_refused_before_the_run_starts(run):
    stages = []
    with pytest.raises(NotEnoughMemory, match=r"^not enough memory for the style image at \d+×\d+ \(the "
                                              r"output's size × --style-scale 8\) on the CPU"):
        run(size=700, style_scale=8, max_memory=4, progress=lambda p: stages.append(p.stage))
    assert "optimise" not in stages  # a 5600 px style pass fits no 4 GiB, though the 700 px run does


def test_a_style_pass_refusal_names_a_style_scale_and_a_size_that_fit():
    cpu, plan = torch.device("cpu"), MemoryPlan(4 << 30, "cpu")
    with pytest.raises(NotEnoughMemory) as refused:
        check_style_pass([(300, 400)], 8.0, (700, 525), cpu, plan, None)
    found = re.search(r"a --style-scale of ([\d.]+) or less, or a long side of (\d+) px or less fits",
                      str(refused.value))
    scale, longest = float(found[1]), int(found[2])
    assert 1 < scale < 8 and refused.value.long_side == longest < 700
    check_style_pass([(300, 400)], scale, (700, 525), cpu, plan, None)
    check_style_pass([(300, 400)], 8.0, (longest, longest * 3 // 4), cpu, plan, None)


def test_a_batch_is_refused_by_its_whole_size():
    cpu, free = torch.device("cpu"), 6 << 30
    plan_memory((1024, 768), 1, cpu, free)
    with pytest.raises(NotEnoughMemory, match="4 images of 1024×768"):
        plan_memory((1024, 768), 4, cpu, free)


def test_a_cpu_run_that_fits_only_without_kept_freed_blocks_runs_lean():
    cpu = torch.device("cpu")
    assert plan_memory((1024, 768), 1, cpu, 8 << 30).footprint == "cpu"
    assert plan_memory((1024, 768), 1, cpu, 4 << 30).footprint == "cpu-lean"


def test_a_gpu_run_is_planned_with_the_gpu_figures():
    assert plan_memory((1024, 768), 1, torch.device("cuda"), 4 << 30).footprint == "cuda"


def test_an_apple_gpu_with_max_memory_is_planned_as_a_gpu():
    with pytest.raises(NotEnoughMemory, match="on the GPU: "):
        plan_memory((4096, 4096), 1, torch.device("mps"), None, limit=1 << 30)


def test_a_lean_run_says_it_is_slower(run):
    result = run(size=256, steps=2, scales=1, max_memory=0.78)  # 256×213 fits only lean in 0.78 GiB
    assert engine.LEAN_WARNING in result.warnings
    assert engine.LEAN_WARNING not in run(size=256, steps=2, scales=1).warnings


def test_the_plan_is_the_smaller_of_free_memory_and_max_memory():
    cpu = torch.device("cpu")
    assert plan_memory((64, 48), 1, cpu, 8 << 30, limit=2 << 30).budget == 2 << 30
    assert plan_memory((64, 48), 1, cpu, 1 << 30, limit=2 << 30).budget == 1 << 30
    assert plan_memory((64, 48), 1, cpu, None, limit=2 << 30).budget == 2 << 30


def test_max_memory_refuses_what_free_memory_would_hold():
    with pytest.raises(NotEnoughMemory, match=r"max_memory allows 1 GiB \(a long side of \d+ px"):
        plan_memory((1024, 768), 1, torch.device("cpu"), 8 << 30, limit=1 << 30)


def test_a_max_memory_too_small_for_any_image_asks_to_raise_it():
    with pytest.raises(NotEnoughMemory, match=r"\(raise max_memory\)$") as refused:
        plan_memory((64, 48), 1, torch.device("cpu"), 8 << 30, limit=100 << 20)
    assert refused.value.long_side is None


def test_stylize_plans_within_the_max_memory_option(run):
    with pytest.raises(NotEnoughMemory, match=r"max_memory allows 0\.5 GiB"):
        run(size=4096, max_memory=0.5)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan])
def test_a_max_memory_that_is_not_a_positive_number_is_refused(run, value):
    with pytest.raises(StylekitError, match=f"bad max_memory {value}"):
        run(max_memory=value)


def test_unknown_free_memory_refuses_nothing():
    assert plan_memory((10**6, 10**6), 1, torch.device("cpu"), None).budget is None  # not refused


def test_long_runs_stop_exactly_at_the_evaluation_budget(run):
    seen = []
    result = run(steps=120, scales=1,
                 progress=lambda p: seen.append(p.iteration) if p.stage == "optimise" else None)
    assert result.iterations == 120 and seen[-1] == 120
    assert result.total_loss < run(steps=1, scales=1).total_loss


def _gram_to_five(x):
    """A bounded Gram-matching toy problem on which torch's L-BFGS line search fails early."""
    flat = x.flatten(2)
    return SimpleNamespace(total=(flat @ flat.transpose(1, 2) - 5 * torch.eye(3)).pow(2).sum((1, 2)))


def _torch_lbfgs_called_again(steps):
    """What a plain loop gets: the same torch L-BFGS stepped until the budget is spent."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 4, 4, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], max_iter=steps, max_eval=steps + 1, tolerance_grad=0.0,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")
    count = 0

    def closure():
        nonlocal count
        with torch.no_grad():
            x.clamp_(0, 1)
        optimizer.zero_grad()
        loss = _gram_to_five(x).total.sum()
        loss.backward()
        count += 1
        return loss

    while count < steps:
        optimizer.step(closure)
    return float(_gram_to_five(x.detach().clamp(0, 1)).total)


def test_lbfgs_restarts_after_its_line_search_fails_instead_of_stalling(monkeypatch):
    rounds = []
    minimise = lbfgs.minimise
    monkeypatch.setattr(lbfgs, "minimise", lambda *a, **k: rounds.append(1) or minimise(*a, **k))
    torch.manual_seed(0)
    image = torch.rand(1, 3, 4, 4)
    spent, _ = _optimise(image, _gram_to_five, 200, StyleOptions(), lambda count, loss: None,
                         HISTORY_SIZE)
    stalled = _torch_lbfgs_called_again(200)
    assert len(rounds) > 1 and spent <= 200  # restarted, and stopped once a round gained nothing
    assert float(_gram_to_five(image).total) < 0.01 < 1.1 < stalled


def _walled(x):
    """Pixels pulled towards 0.9, but no finite loss once one of an image's passes 0.7 (N values)."""
    flat = x.flatten(1)
    return SimpleNamespace(total=torch.where(flat.max(1).values > 0.7, math.inf, (flat - 0.9).pow(2).sum(1)))


def _walled_run(steps):
    """One L-BFGS scale of `_walled` from dark pixels: (the image, _optimise's answer, every loss seen)."""
    seen = []

    def evaluate(x):
        losses = _walled(x)
        seen.append(float(losses.total.detach()))
        return losses
    torch.manual_seed(0)
    image = 0.5 * torch.rand(1, 3, 4, 4)
    answer = _optimise(image, evaluate, steps, StyleOptions(), lambda count, loss: None, HISTORY_SIZE)
    return image, answer, seen


@pytest.mark.parametrize("steps", [40, 200], ids=["backtracking", "strong-wolfe"])
def test_an_lbfgs_scale_whose_loss_overflows_part_way_ends_at_its_best_finite_image(steps):
    image, _, seen = _walled_run(steps)
    assert not all(map(math.isfinite, seen))
    assert float(_walled(image).total) == min(seen) and float(image.max()) <= 0.7


def test_a_scale_whose_loss_overflows_part_way_says_after_how_many_evaluations():
    _, (spent, finite), seen = _walled_run(40)
    assert finite == next(index for index, loss in enumerate(seen) if not math.isfinite(loss))
    assert finite < spent == len(seen)


def test_a_gradient_that_overflows_at_the_start_is_refused_like_a_loss():
    def evaluate(x):  # a finite loss whose gradient passes float16 scaled by 1e5, as in an fp16 backward
        return SimpleNamespace(total=1e5 * (1e-6 * x).half().float().flatten(1).sum(1))
    with pytest.raises(StylekitError, match=r"^the loss or its gradient is not a finite number at the start"):
        _optimise(torch.rand(1, 3, 4, 4), evaluate, 10, StyleOptions(), lambda count, loss: None,
                  HISTORY_SIZE)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_auto_precision_on_cuda_is_fp32_for_the_references_quality():
    runtime = pick_runtime("cuda", "auto")
    assert (runtime.dtype, runtime.gradient_dtype) == (torch.float32, None)


@needs_cuda
@pytest.mark.parametrize("mode", ["none", "luminance", "histogram"])
def test_every_colour_mode_runs_on_a_gpu(run, mode):
    assert run(device="cuda", preserve_color=mode).device == "cuda"


@needs_cuda
def test_a_gpu_run_at_the_size_a_refusal_names_stays_within_max_memory(run):
    limit = 2.0  # GiB: a ~830 px image (the plan's 1.5 KB per pixel plus L-BFGS's pairs)
    with pytest.raises(NotEnoughMemory) as refused:
        run(device="cuda", size=8192, steps=2, max_memory=limit)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    run(device="cuda", size=refused.value.long_side, steps=2, max_memory=limit)
    assert torch.cuda.max_memory_reserved() - before <= limit * (1 << 30)
