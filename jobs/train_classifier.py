"""Train the digit classifier behind the GAN quality metrics (feature-space Frechet distance, label agreement).

Trains on a prepared image dataset's train split, reports accuracy on its val split, and writes
classifier.pt + classifier.json to --out (a local folder or URI). Once per project; a few minutes on CPU.

    python jobs/train_classifier.py --data ~/datasets/mnist --out ~/digit-classifier
    python jobs/train_classifier.py --data s3://bucket/datasets/mnist --out s3://bucket/digit-classifier
"""

from __future__ import annotations

import os
import time

import _cli

from cluster.storage import check_access


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared image dataset folder or URI (labelled digits)")
    p.add_argument("--out", required=True, help="output folder or URI for classifier.pt / classifier.json")
    p.add_argument("--epochs", type=int, default=2, help="passes over the train split")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--limit", type=int, help="use at most N images of each split (quick runs)")
    args = p.parse_args()
    if args.epochs < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--epochs, --batch-size and --limit must be positive")
    out = check_access(args.out, expect="folder")
    if out.local and not os.path.isdir(os.path.dirname(out.path)):
        p.error(f"--out {args.out}: the folder {os.path.dirname(out.path)} does not exist")
    check_access(args.data, must_exist=True, expect="folder")
    from genai.data.image_dataset import load_image_arrays
    from genai.eval.digits import ClassifierError, accuracy, save_classifier, train_classifier

    train_x, train_y = load_image_arrays(args.data, "train", limit=args.limit)
    val_x, val_y = load_image_arrays(args.data, "val", limit=args.limit)
    if len(val_x) == 0:
        raise ClassifierError(f"{args.data}: the val split is empty, nothing to measure accuracy on")
    t0 = time.time()
    model = train_classifier(train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    acc = accuracy(model, val_x, val_y)
    save_classifier(model, args.out, {"accuracy": acc, "dataset": args.data, "epochs": args.epochs,
                                      "train_images": len(train_x), "val_images": len(val_x), "seed": args.seed})
    print(f"classifier: val accuracy {100 * acc:.2f}% on {len(val_x)} images after {args.epochs} epochs on "
          f"{len(train_x)} ({time.time() - t0:.0f} s) -> {out.uri}", flush=True)
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
