"""The driver's console (progress bar or plain lines) and the resource check made before a run starts."""

from __future__ import annotations

import io

import pytest

from cluster.launch import ResourceError, wait_for_resources, worker_slots
from cluster.progress import ProgressDisplay, progress_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    display = ProgressDisplay(out)
    display.show([("progress", 10, 100, {"loss": "2.5000", "tok/s": "1,000"}), ("line", "step 10: val loss 2.4")])
    display.show([("progress", 20, 100, {"loss": "2.1000", "tok/s": "1,000"})])
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "step  10/100 | loss 2.5000 | tok/s 1,000"  # no ETA before a second report
    assert lines[1] == "step 10: val loss 2.4"
    assert lines[2].startswith("step  20/100 | loss 2.1000 | tok/s 1,000 | eta ")
    assert progress_line(5, 5, {}, 3725) == "step 5/5 | eta 1h02m"


def test_a_live_bar_on_a_terminal_with_lines_above_it():
    out = Terminal()
    display = ProgressDisplay(out)
    display.show([("progress", 10, 40, {"loss": "2.5"})])
    display.show([("line", "checkpoint_00000010 saved (0.1s)"), ("progress", 40, 40, {"loss": "1.9"})])
    assert display.bar.n == 40
    display.close()
    text = out.getvalue()
    assert "\r" in text and "40/40" in text and "loss 1.9" in text  # redrawn in place
    assert "checkpoint_00000010 saved (0.1s)\n" in text


def test_a_restarted_run_starts_the_bar_again_from_its_checkpoint():
    display = ProgressDisplay(Terminal())
    display.show([("progress", 30, 40, {})])
    display.show([("progress", 20, 40, {})])  # the worker group restarted from the step-20 checkpoint
    assert display.bar.n == 20
    display.close()


def test_a_restart_says_which_steps_are_trained_again():
    out = io.StringIO()
    display = ProgressDisplay(out)
    display.show([("resumed", 0, "resumed from c0 at step 0")])  # a first resume: nothing was lost
    display.show([("progress", 30, 40, {}), ("progress", 35, 40, {})])
    display.show([("resumed", 20, "resumed from c20 at step 20")])
    lines = out.getvalue().splitlines()
    assert lines[0] == "resumed from c0 at step 0" and not any("trained again" in line for line in lines[:3])
    assert lines[-2] == "resumed from c20 at step 20"
    assert lines[-1].startswith("the workers restarted from the checkpoint of step 20: steps 21-35 ")


def test_worker_slots_count_what_one_node_can_hold():
    gpu_node = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}}
    cpu_node = {"Alive": True, "Resources": {"CPU": 4.0}}
    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    assert worker_slots([gpu_node, cpu_node, dead], 1, use_gpu=True) == 2
    assert worker_slots([gpu_node, cpu_node], 0.5, use_gpu=False) == 40
    assert worker_slots([cpu_node], 3, use_gpu=False) == 1  # workers do not straddle nodes


def test_a_cluster_that_cannot_hold_the_run_fails_after_saying_what_it_waits_for():
    cpu_only = lambda: [{"Alive": True, "NodeID": "a", "Resources": {"CPU": 2.0}}]  # noqa: E731 - ray.nodes()' shape
    said = []
    with pytest.raises(ResourceError, match=r"cannot hold 2 worker\(s\) of 1 CPU \+ 1 GPU: its nodes hold 0 "
                                            r"\(0 GPU\(s\) in all\) after waiting 0s"):
        wait_for_resources(2, 1, True, 0.3, log=lambda *a, **k: said.append(a[0]), nodes=cpu_only)
    assert len(said) == 1 and "cluster.resource_wait_s" in said[0]  # said once, not at every poll
    wait_for_resources(2, 1, False, 0, nodes=cpu_only)  # two CPU workers fit
