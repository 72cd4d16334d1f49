"""The benchmark runner itself works (at a tiny size), so `make bench` cannot rot unnoticed."""

import pytest
import torch
from conftest import make_painting, make_photo

from bench.hotfolder import main as hotfolder_main
from bench.reference import run_reference, score
from bench.run import main, markdown, section_name, update_doc
from stylekit import StyleOptions, StyleRequest, stylize
from stylekit.engine import to_tensor

RANDOM = ["--weights", "random:0"]  # as "auto" offline, with no attempt to download


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    """One tiny run of `make bench`'s runner: 32 px, 5 reference evaluations."""
    output = tmp_path_factory.mktemp("bench")
    return main(["--sizes", "32", "--steps", "5", "--no-doc", "--output", str(output), *RANDOM]), output


def test_bench_compares_stylekit_with_the_reference_at_the_same_loss(bench_results):
    results, output = bench_results
    row = results["rows"][0]
    assert row["reference"]["iterations"] >= 5 and row["stylekit"]["iterations"] >= 5
    for side in ("reference", "stylekit"):
        assert row[side]["total_loss"] > 0 and row[side]["peak_memory_bytes"] > 0
    assert list(output.glob("cpu-*.json"))
    table = markdown(results)
    assert "| 32×" in table
    ours, theirs = row["stylekit"], row["reference"]
    assert (f"{ours['content_loss']:.3g} / {ours['style_loss']:.3g} "
            f"({theirs['content_loss']:.3g} / {theirs['style_loss']:.3g})") in table


def test_a_cpu_of_another_vendor_adds_its_section_and_keeps_the_last_machines(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr("bench.run.DOC", doc)
    update_doc("AMD's table\n", "cpu-amd")
    monkeypatch.setattr("bench.run._cpu_name", lambda: "Intel(R) Xeon(R) Processor @ 2.50GHz")
    assert section_name(torch.device("cpu")) == "cpu-intel"
    update_doc("Intel's table\n", section_name(torch.device("cpu")))
    update_doc("Intel's second table\n", "cpu-intel")
    text = doc.read_text()
    assert "AMD's table" in text and "Intel's second table" in text and "Intel's table\n" not in text


def test_bench_also_times_stylekit_to_the_lowest_loss_the_reference_passed(bench_results):
    results, _ = bench_results
    reference, ours = results["rows"][0]["reference"], results["rows"][0]["stylekit"]
    assert 0 < reference["seconds_to_best"] <= reference["seconds"]
    table = markdown(results)
    if ours["time_to_best"] is None:  # 5 evaluations: stylekit's coarse start may not get there
        assert f"{reference['best_loss']:.4g} ({reference['seconds_to_best']:.1f} s) → not reached" in table
    else:
        assert ours["speedup_to_best"] == pytest.approx(reference["seconds_to_best"] / ours["time_to_best"])
        assert (f"{reference['best_loss']:.4g} ({reference['seconds_to_best']:.1f} s) → "
                f"{ours['time_to_best']:.1f} s ({ours['speedup_to_best']:.2f}×)") in table


def test_hotfolder_bench_times_a_real_watcher_against_the_reference(tmp_path):
    results = hotfolder_main(["--count", "2", "--size", "32", "--steps", "3", "--stylekit-steps", "3",
                              "--no-doc", "--output", str(tmp_path), *RANDOM])
    row = results["row"]
    for side in ("hotfolder", "reference"):
        assert row[side]["images_per_minute"] > 0 and row[side]["mean_total_loss"] > 0
    assert list(tmp_path.glob("hotfolder-cpu-*.json"))


def _both_at_the_reference_settings(weights_file, steps):
    """stylekit with the reference's settings (one scale, same evaluations) and the reference itself."""
    state = torch.load(weights_file)
    photo, painting = make_photo(), make_painting(48, 48)
    content, style = to_tensor(photo, torch.device("cpu")), to_tensor(painting, torch.device("cpu"))
    reference = run_reference(content, style, state, steps=steps)
    options = StyleOptions(weights=str(weights_file), steps=steps, scales=1, targets="torch")
    ours = stylize(StyleRequest(photo, [painting], options))
    return (score(to_tensor(ours.image, content.device), content, style, state)["total_loss"],
            score(reference.image, content, style, state)["total_loss"])


@pytest.mark.parametrize("steps", [20, 150])
def test_at_the_reference_settings_the_loss_is_no_worse_than_the_reference(weights_file, steps):
    ours, reference = _both_at_the_reference_settings(weights_file, steps)
    assert ours <= reference * 1.001
