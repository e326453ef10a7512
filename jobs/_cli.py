"""Shared plumbing of the job scripts: import path, argument parsing, exit codes and error lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python jobs/x.py` and `ray job submit --working-dir .` both work
    sys.path.insert(0, str(ROOT))

from cluster.launch import ResourceError  # noqa: E402
from cluster.storage import StorageError  # noqa: E402
from genai.config import ConfigError  # noqa: E402
from genai.data.sources import SourceError  # noqa: E402
from genai.data.text_dataset import DatasetError  # noqa: E402
from genai.run import CheckpointError  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
BAD_INPUT = (ConfigError, DatasetError, SourceError, StorageError, CheckpointError, ResourceError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run_main(main) -> None:
    """Call main(); bad input becomes one stderr line and exit 2, Ctrl-C exit 130."""
    try:
        code = main()
    except BAD_INPUT as exc:
        code = fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        code = fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(code or EXIT_OK)
