"""Numerics of the engines the loops build: bf16 reduces and accumulates gradients in fp32 where DeepSpeed 0.19
allows it, and the export takes the fp32 master weights (not the bf16 weights widened) under every ZeRO stage.
Real DeepSpeed engines in one subprocess (CPU, gloo, world size 1; no Ray): tests/master_weights_check.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

CASES = ["0:fp32", "1:fp32", "2:fp32", "3:fp32", "0:bf16", "1:bf16", "2:bf16", "3:bf16", "2:bf16:offload",
         "3:bf16:offload"]


@pytest.fixture(scope="module")
def engines() -> dict[str, dict]:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "master_weights_check.py"), *CASES], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {res["case"]: res for res in results}


@pytest.mark.parametrize("case", CASES)
def test_the_export_has_the_models_keys_in_fp32(engines, case):
    res = engines[case]
    assert res["same_keys"] and res["all_fp32"] and res["close_to_16bit"], res


@pytest.mark.parametrize("case", [c for c in CASES if "fp32" in c])
def test_fp32_training_exports_the_weights_themselves(engines, case):
    res = engines[case]
    assert res["max_vs_weights"] == 0.0 and res["max_vs_consolidated"] == 0.0, res


@pytest.mark.parametrize("case", [c for c in CASES if "bf16" in c])
def test_bf16_training_exports_the_fp32_master_weights(engines, case):
    res = engines[case]
    assert not res["bf16_representable"] and res["max_vs_weights"] > 0, res  # not the bf16 weights widened
    if not case.startswith("0:"):  # ZeRO checkpoints hold the fp32 masters: the same values, bit for bit
        assert res["max_vs_consolidated"] == 0.0, res


@pytest.mark.parametrize("case", [c for c in CASES if "bf16" in c])
def test_bf16_reduces_gradients_in_fp32_and_accumulates_them_in_fp32_under_zero(engines, case):
    res = engines[case]
    assert res["model_dtype"] == "bfloat16" and res["communication_data_type"] == "float32", res
    # DeepSpeed refuses fp32 accumulation of bf16 gradients without ZeRO.
    assert res["grad_accum_dtype"] == ("bfloat16" if case.startswith("0:") else "float32"), res
    if case == "1:bf16":
        assert res["optimizer"] == "BF16_Optimizer"  # DeepSpeed's route for ZeRO-1 with fp32 accumulation


@pytest.mark.parametrize("case", ["2:fp32", "3:fp32", "2:bf16", "3:bf16", "2:bf16:offload"])
def test_checkpoints_consolidate_as_deepspeeds_zero_to_fp32_does(engines, case):
    assert engines[case]["max_vs_zero_to_fp32"] == 0.0, engines[case]
