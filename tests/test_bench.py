"""The benchmark runner itself works (at a tiny size), so `make bench` cannot rot unnoticed."""

from bench.run import main, markdown


def test_bench_compares_stylekit_with_the_reference_at_the_same_loss(tmp_path):
    results = main(["--sizes", "32", "--steps", "5", "--no-doc", "--output", str(tmp_path)])
    row = results["rows"][0]
    assert row["reference"]["iterations"] >= 5 and row["stylekit"]["iterations"] >= 5
    for side in ("reference", "stylekit"):
        assert row[side]["total_loss"] > 0 and row[side]["peak_memory_bytes"] > 0
    assert list(tmp_path.glob("cpu-*.json"))
    assert "| 32×" in markdown(results)


def test_hotfolder_bench_times_a_real_watcher_against_the_reference(tmp_path):
    from bench.hotfolder import main as hotfolder_main
    results = hotfolder_main(["--count", "2", "--size", "32", "--steps", "3", "--stylekit-steps", "3",
                              "--no-doc", "--output", str(tmp_path)])
    row = results["row"]
    for side in ("hotfolder", "reference"):
        assert row[side]["images_per_minute"] > 0 and row[side]["mean_total_loss"] > 0
    assert list(tmp_path.glob("hotfolder-cpu-*.json"))
