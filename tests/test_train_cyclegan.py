"""CycleGAN end to end on real Ray and DeepSpeed: four engines (two generators, two discriminators) under ZeRO-2
on two workers, the builtin pair of digit domains, checkpoint, resume bit-exact (engines, RNG and the history
pools), cycle L1 and label preservation, TensorBoard grids, export, translating an image both ways."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exported_weights, run_job

SLOW = pytest.mark.slow
TWO = ("cluster.num_workers=2", "train.checkpoint_interval=10")


def train(storage, name: str, *sets: str, expect: int = 0):
    args = ["--recipe", "tiny-translate", "--storage", str(storage), "--name", name]
    for s in sets:
        args += ["--set", s]
    r = run_job("train.py", *args)
    assert r.returncode == expect, r.stdout[-4000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(classifier, tmp_path_factory):
    """An uninterrupted run with the label metrics, and one stopped at step 10 and resumed."""
    storage = tmp_path_factory.mktemp("cyclegan-runs")
    evaluated = (f"train.classifier={classifier}",)
    straight = train(storage, "straight", *TWO, *evaluated)
    first = train(storage, "resumed", *TWO, *evaluated, "train.max_steps=10")
    second = train(storage, "resumed", *TWO, *evaluated)
    return storage, straight, first, second


@SLOW
def test_four_engines_on_two_workers_resume_matches_uninterrupted_run(runs):
    storage, straight, first, second = runs
    for name in ("g_ab", "g_ba", "d_a", "d_b"):
        assert f"{name} weights identical on all 2 rank(s)" in straight.stdout
    assert "4 engines" in straight.stdout and "step 10/10" in first.stdout
    assert re.search(r"resumed from \S+ at step 10", second.stdout), second.stdout[-3000:]
    a, b = (exported_weights(storage / name, "cyclegan", 20) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"ab", "ba"}
    assert all(torch.equal(a[k], b[k]) for k in a)


@SLOW
def test_cycle_and_label_metrics_and_grids_are_logged(runs):
    storage, straight, _, _ = runs
    assert re.search(r"step 20: cycle L1 A [0-9.]+, B [0-9.]+; label preservation a2b [0-9.]+%, b2a [0-9.]+%",
                     straight.stdout), straight.stdout[-3000:]
    assert re.search(r"^done: run straight at step 20, label_preservation_ab [0-9.]+, label_preservation_ba",
                     straight.stdout, re.M)
    assert re.search(r"step 20/20 \| g_loss [0-9.]+ \| cycle [0-9.]+ \| d_loss [0-9.]+", straight.stdout)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(storage / "straight" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/cycle_a", "train/identity_b", "train/d_a", "eval/cycle_l1_a",
            "eval/label_preservation_ab"} <= set(tags["scalars"])
    assert {"samples/a2b", "samples/b2a"} <= set(tags["images"])


@SLOW
def test_generate_translates_an_image_both_ways(runs, tmp_path):
    from PIL import Image

    from genai.data.digit_domains import builtin_digit_domains

    run = runs[0] / "straight"
    digit = tmp_path / "digit.png"
    Image.fromarray(builtin_digit_domains("val").a_images[0, 0]).save(digit)
    outputs = {}
    for direction in ("a2b", "b2a"):
        out = tmp_path / f"{direction}.png"
        r = run_job("generate.py", "--checkpoint", str(run), "--input", str(digit), "--direction", direction,
                    "--out", str(out))
        assert r.returncode == 0 and f"wrote the {direction} translation (28x28)" in r.stdout, r.stdout + r.stderr
        with Image.open(out) as img:
            assert img.size == (28, 28) and img.mode == "L"
        outputs[direction] = out.read_bytes()
    assert outputs["a2b"] != outputs["b2a"]
    Image.new("L", (30, 30)).save(tmp_path / "odd.png")
    bad = run_job("generate.py", "--checkpoint", str(run), "--input", str(tmp_path / "odd.png"),
                  "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "multiples of 4" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
