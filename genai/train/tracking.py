"""Rank-0 TensorBoard logging into the run folder (uploaded when the run lives in object storage), and the
lines and progress the user sees on the driver's console."""

from __future__ import annotations

import time

from cluster.progress import progress_line
from cluster.storage import local_scratch, resolve
from genai.run import TENSORBOARD_DIR

_console = None  # the driver's ProgressChannel, when it shows this run's progress


def use_console(channel) -> None:
    """Send say() lines and progress to the driver's console through `channel` (None: print them only)."""
    global _console
    _console = channel


def say(text: str) -> None:
    """A line for the user (an evaluation, a checkpoint, a resume): into this worker's log and to the console."""
    print(text, flush=True)
    if _console is not None:
        _console.send("line", text)


def say_resumed(step: int, text: str) -> None:
    """say() for a resume from the checkpoint of `step`: the driver's console also tells what a restart lost."""
    print(text, flush=True)
    if _console is not None:
        _console.send("resumed", step, text)


class RunLogger:
    """TensorBoard scalars/text on rank 0 plus a readable progress line; a no-op on other ranks."""

    def __init__(self, run_uri: str, rank: int, start_step: int, max_steps: int):
        self.rank, self.max_steps = rank, max_steps
        self.writer = None
        self._t0, self._step0 = time.time(), start_step
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.remote = resolve(run_uri).join(TENSORBOARD_DIR)
        self.local_dir = self.remote.path if self.remote.local else local_scratch("genai-tb-")
        # purge_step hides events a crashed attempt logged after the checkpoint we resumed from (the
        # checkpoint's own step was logged before it was saved, so its events stay).
        self.writer = SummaryWriter(self.local_dir, purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer:
            # Markdown code block keeps line breaks and spacing of the sample.
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def image(self, step: int, tag: str, image_hwc) -> None:
        """An image (uint8 array, height x width x channels)."""
        if self.writer:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def progress(self, step: int, parts: dict[str, str]) -> None:
        if self.rank != 0:
            return
        done = step - self._step0
        eta = (time.time() - self._t0) / done * (self.max_steps - step) if done > 0 else None
        print(progress_line(step, self.max_steps, parts, eta), flush=True)
        if _console is not None:
            _console.send("progress", step, self.max_steps, parts)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()
            if not self.remote.local:
                self.remote.upload_from(self.local_dir)

    def close(self) -> None:
        if self.writer:
            self.flush()
            self.writer.close()


def write_hparams(uri: str, hparams: dict, metrics: dict) -> None:
    """One TensorBoard run at `uri` holding a trial's hyperparameters and final metrics (the HParams view)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    loc = resolve(uri)
    local = loc.path if loc.local else local_scratch("genai-hparams-")
    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    values = {f"hparams/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    with SummaryWriter(local) as writer:
        for summary in hparams_summary(clean, values):
            writer.file_writer.add_summary(summary)
        for tag, value in values.items():
            writer.add_scalar(tag, value)
    if not loc.local:
        loc.upload_from(local)
