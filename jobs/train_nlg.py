"""Train a GPT-style language model with Ray Train + DeepSpeed.

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.

    python jobs/train_nlg.py --recipe tiny
    python jobs/train_nlg.py --recipe shakespeare-char --name demo --set cluster.num_workers=2
    python jobs/train_nlg.py --recipe finetune --init-from ./my-hf-model --data ~/datasets/corpus-ft --name ft
"""

from __future__ import annotations

import _cli
import train

if __name__ == "__main__":
    _cli.run_main(lambda: train.main(__doc__, "gpt", "shakespeare-char"))
