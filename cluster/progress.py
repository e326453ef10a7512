"""What the user sees of a training run: rank 0 sends progress and notable lines to the driver through a small
Ray queue, and the driver shows them as one live progress bar (tqdm) with the lines above it.

Workers always print the same lines into their own log (Ray's session logs). Without a channel (a Tune
trial, or `--verbose`, where Ray's worker output reaches the console) the progress lines are printed there.
"""

from __future__ import annotations

import shutil
import sys
import time


def progress_line(step: int, total: int, parts: dict[str, str], eta_s: float | None) -> str:
    """`step  120/2000 | loss 2.3101 | tok/s 13,021 | eta 2m31s`: the plain form of the progress bar."""
    fields = "".join(f" | {k} {v}" for k, v in parts.items())
    eta = f" | eta {duration(eta_s)}" if eta_s is not None else ""
    return f"step {step:>{len(str(total))}}/{total}{fields}{eta}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressChannel:
    """A queue from the workers to the driver. Made on the driver; a picklable handle goes into the loop config."""

    def __init__(self):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a queue on a worker node would go with that node, and the console with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def send(self, *message) -> None:
        """("progress", step, total, parts) or ("line", text). Never blocks training for long, never raises."""
        try:
            self._queue.put_nowait(message)
        except Exception:  # noqa: BLE001 - the console is not worth a failed run (driver gone, queue full)
            pass

    def receive(self, timeout: float) -> list[tuple]:
        """What arrived, waiting up to `timeout` seconds for the first message."""
        try:
            first = self._queue.get(timeout=timeout)
            return [first] + self._queue.get_nowait_batch(self._queue.qsize())
        except Exception:  # noqa: BLE001 - Empty, or Ray going down with a failed run: its error is what counts
            return []

    def shutdown(self) -> None:
        try:
            self._queue.shutdown()
        except Exception:  # noqa: BLE001 - as above
            pass


class ProgressDisplay:
    """The driver's console: a live tqdm bar on a terminal, plain lines otherwise (`ray job submit`, logs)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.bar = None
        self._t0 = self._step0 = None
        self._last = None  # the last step reported

    def show(self, messages: list[tuple]) -> None:
        """("progress", step, total, parts), ("line", text) or ("resumed", step, text)."""
        for message in messages:
            if message[0] == "progress":
                self._progress(*message[1:])
            elif message[0] == "resumed":
                self._resumed(*message[1:])
            else:
                self.line(message[1])

    def _resumed(self, step: int, text: str) -> None:
        self.line(text)
        if self._last is not None and self._last > step:  # a restart (a lost worker or node) of this run
            self.line(f"the workers restarted from the checkpoint of step {step}: steps {step + 1}-{self._last} "
                      "(at least; the last reported) are trained again")

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _progress(self, step: int, total: int, parts: dict[str, str]) -> None:
        self._last = step
        if self._t0 is None or step < self._step0:  # first report, or a restart from an earlier checkpoint
            self._t0, self._step0 = time.monotonic(), step
            if self.bar is not None:
                self.bar.reset(total)
                self.bar.n = step
        if not self.live:
            done, elapsed = step - self._step0, time.monotonic() - self._t0
            print(progress_line(step, total, parts, elapsed / done * (total - step) if done else None),
                  file=self.stream, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            # A terminal that reports no size (0x0, e.g. some ptys) would hide the bar: assume 100x24.
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self.bar = tqdm(total=total, initial=step, unit="step", file=self.stream, dynamic_ncols=sized,
                            ncols=None if sized else 100, nrows=None if sized else 24,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in parts.items()), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
