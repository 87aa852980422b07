"""`spectral-peft bench` on a tiny linear layer: what it measures, what it writes, and its bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from spectral_peft.tools import bench
from spectral_peft.tools.workloads import workload
from spectral_peft_cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_reports_every_method_against_the_base_step():
    work = workload("linear", "cpu", torch.float32, width=32, tokens=64)
    result = bench.measure(work, ["lora", "fastfourierft", "loca", "loca-locations"], n=50, rank=4, repeats=2,
                           warmup=1, device="cpu")
    methods = result["methods"]
    assert list(methods) == ["base", "lora", "fastfourierft", "loca", "loca-locations"]
    assert methods["base"]["trainable"] == 0
    assert methods["lora"]["trainable"] == 4 * (32 + 32)
    # coefficients; their float locations are counted apart (the one parameter count)
    assert methods["loca"]["trainable"] == 50 and methods["loca"]["location_params"] == 2 * 50
    for name, m in methods.items():
        assert 0 < m["step_s"]["min"] <= m["step_s"]["median"] <= m["step_s"]["max"]
        assert m["peak_memory_bytes"] >= 32 * 32 * 4  # at least the frozen weight
        assert "unmerged_inference_s" in m
        if name != "base":
            assert m["overhead_s"] == pytest.approx(m["step_s"]["median"] - methods["base"]["step_s"]["median"])
            assert m["merged_inference_s"]["median"] > 0
        assert m["step_paired_ratio"] > 0 and m["unmerged_inference_paired_ratio"] > 0
        assert m["page_faults_per_step"] is None or m["page_faults_per_step"] >= 0
    assert methods["lora"]["step_paired_ratio"] == methods["lora"]["unmerged_inference_paired_ratio"] == 1.0
    table = bench.table(result)
    assert table.count("\n") == 2 + len(methods) - 1
    assert "| LoRA (stock PEFT) |" in table and "| 1.00 / 1.00 |" in table


def test_peak_memory_measurement_keeps_the_profilers_native_log_off_stderr(capfd):
    capfd.readouterr()
    peak = bench._peak_step_growth_cpu(lambda: torch.ones(256, 256).sum())
    err = capfd.readouterr().err
    assert peak >= 256 * 256 * 4 and "profiler_st" not in err


@pytest.mark.skipif(bench.page_faults() is None, reason="this OS counts no page faults")
def test_page_faults_count_the_fresh_memory_a_call_touches():
    # 64 MiB is above the size glibc ever serves from its heap: every call maps fresh pages and touches them all
    # (at least 32 faults even where the kernel hands out 2 MiB pages)
    faults: dict = {}
    bench.interleaved({"fresh": lambda: torch.ones(16 * 2**20), "none": lambda: None}, repeats=3, warmup=1,
                      device="cpu", faults=faults)
    assert len(faults["fresh"]) == len(faults["none"]) == 3
    assert min(faults["fresh"]) >= 32 and min(faults["fresh"]) > max(faults["none"])


def test_paired_ratios_cancel_a_slow_spell_that_the_medians_do_not():
    # the third round ran three times slower for everyone; the reference also had a slow second round
    method, reference = [1.1, 1.1, 3.3], [1.0, 3.0, 3.0]
    assert statistics.median(method) / statistics.median(reference) == pytest.approx(1.1 / 3.0)
    assert bench.paired_ratio(method, reference) == pytest.approx(1.1)


def test_merged_timing_leaves_the_shared_weights_unchanged():
    torch.manual_seed(0)
    work = workload("linear", "cpu", torch.float32, width=16, tokens=8)
    before = work.model.proj.weight.detach().clone()
    bench.measure(work, ["loca"], n=20, rank=2, repeats=1, warmup=0, device="cpu")
    # the LoCA step trained its coefficients, so a merge left behind would have moved the weight
    torch.testing.assert_close(work.model.proj.weight.detach(), before, atol=1e-6, rtol=0)


def test_the_command_writes_json_markdown_and_the_sweep_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--shapes", "linear", "--methods", "lora", "fourierft", "fastfourierft", "loca",
                 "--sweep-widths", "16", "32", "--sweep-n", "10", "100", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    points = {(r["width"], r["n"], r["method"]) for r in report["sweep"]}
    # every method at every (width, n) point
    assert len(points) == 2 * 2 * 4
    assert report["machine"]["torch"] == torch.__version__
    assert (out / "sweep.png").stat().st_size > 1000
    assert "## linear sweep" in (out / "bench.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--shapes", "resnet"], "invalid choice: 'resnet'"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code = main(["bench", *argv])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("spectral-peft: error:") and message in err
