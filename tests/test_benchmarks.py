"""The benchmark scripts keep working (tiny sizes; their figures come from real runs, see benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

# The GPU machine has torch and DeepSpeed but neither Ray nor pyarrow: importing them must fail the check.
NO_RAY = ("import runpy, sys; sys.modules.update(ray=None, pyarrow=None); "
          "sys.argv = ['gpu_check.py', '--smoke']; runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')")


def test_gpu_check_runs_the_training_steps_without_ray_or_pyarrow(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_RAY], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    gpt, gan = result["gpt2_small"], result["dcgan"]
    variants = gpt["variants"]
    # On CPU the variants whose knobs act there (compile: tests/test_speed_knobs.py) run, and train.
    assert set(variants) == {"baseline", "act-ckpt", "chunked-loss", "chunked-loss+mb64"}
    for name, row in variants.items():
        assert "error" not in row and "skipped" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and row["loss_last"] < row["loss_first"], name  # the steps really train
        assert row["profile"]["share"] and row["mfu_measured_peak"] > 0, name
        assert name == "baseline" or row["loss_check"]["ok"], (name, row["loss_check"])
    assert variants["act-ckpt"]["loss_check"]["rel_diff"] == 0  # it changes no arithmetic
    assert gpt["best"] in variants and gan["images_per_s"] > 0
    assert "| GPT-2 small variant" in r.stdout and "| DCGAN" in r.stdout and "torch.profiler" in r.stdout
    assert (tmp_path / "gpu_check.md").read_text().startswith("gpu_check on cpu")
    assert "Self CPU" in (tmp_path / "gpu_check_profile.txt").read_text()


def test_gpu_check_refuses_an_unknown_variant_before_any_work():
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--variants", "baseline,turbo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown variant(s) turbo" in r.stderr


def test_every_benchmark_script_imports_and_documents_itself():
    import pytest

    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))  # _: helpers
    assert {"bench_nlg.py", "bench_gan.py", "bench_streaming.py", "bench_tune.py", "bench_system.py"} <= set(scripts)
    for script in scripts:
        r = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            pytest.fail(f"{script} --help: {r.stderr[-2000:]}")
        assert "usage:" in r.stdout, script
