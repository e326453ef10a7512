"""Train a GAN (DCGAN, class-conditional, WGAN-GP) with Ray Train and two DeepSpeed engines.

Runs on an embedded local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).
Rerunning with the same --name (and storage) resumes from the run's latest checkpoint.

    python jobs/train_gan.py --recipe tiny-gan
    python jobs/train_gan.py --recipe dcgan-mnist --data ~/datasets/mnist --set train.classifier=~/digit-classifier
"""

from __future__ import annotations

import _cli
import train

if __name__ == "__main__":
    _cli.run_main(lambda: train.main(__doc__, "gan", "dcgan-mnist"))
