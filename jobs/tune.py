"""Hyperparameter sweeps with Ray Tune; every trial is a distributed Ray Train + DeepSpeed run.

    python jobs/tune.py --sweep sweeps/nlg-lr-width.yaml [--storage s3://runs/] [--resume]

Prints a results table at the end and writes, under <storage>/<sweep name>/: results.csv, the best
trial's config as best-recipe.yaml (ready for jobs/train_nlg.py or jobs/train_gan.py --recipe), and each trial's run
(checkpoints, TensorBoard, export) in trials/<trial>.
"""

from __future__ import annotations

import csv
import io
import math

import _cli
import yaml

from cluster.launch import error_cause, fit, parquet_datasets, wait_for_resources
from cluster.ray_env import connect
from cluster.storage import check_access, resolve
from cluster.tune import fit_reporting_to_tune, read_pointer, run_sweep
from genai.config import apply_overrides, json_value, load_sweep, recipe_to_yaml, validate_recipe
from genai.run import RECIPE_FILE, TENSORBOARD_DIR, run_location
from genai.train.tracking import write_hparams


def trial_recipe(base: dict, params: dict):
    overrides = [f"{k}={json_value(v)}" for k, v in params.items()]
    return validate_recipe(apply_overrides(yaml.safe_load(yaml.safe_dump(base)), overrides))


def run_trial(params: dict, base: dict, trials_storage: str, keep_all_checkpoints: bool) -> None:
    """Tune's trainable: one trial = one TorchTrainer run, each result forwarded to Tune with its checkpoint.

    A trial's run folder is trials/<trial id>. When PBT restarts a trial from another trial's checkpoint,
    it trains on in a new run folder, trials/<trial id>-from-<other trial>-step<N>, started from that
    checkpoint with the trial's new parameters."""
    from ray import tune

    from genai.train.loop import FAMILIES, train_loop_per_worker

    recipe = trial_recipe(base, params)
    trial = tune.get_context().get_trial_id()
    run_name, init_checkpoint, cloned_from = trial, None, ""
    pointer = read_pointer()
    if pointer and pointer["trial"] == trial:
        run_name, cloned_from = pointer["run"], pointer.get("cloned_from", "")
    elif pointer:  # PBT exploit: continue from the other trial's checkpoint
        run_name = f"{trial}-from-{pointer['trial']}-step{pointer['step']}"
        init_checkpoint = run_location(trials_storage, pointer["run"]).join(pointer["checkpoint"]).uri
        cloned_from = f"{pointer['trial']}@{pointer['step']}"
    plan = FAMILIES[recipe.kind].plan(recipe, log=lambda *_: None)
    c = recipe.cluster
    run = run_location(trials_storage, run_name)
    run.join(RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    loop_config = dict(plan.loop_config(run.uri), init_checkpoint=init_checkpoint)
    # PBT may clone any trial's checkpoint after its owner has moved on: keep them all.
    keep = None if keep_all_checkpoints else recipe.train.keep_checkpoints
    fit_reporting_to_tune(
        lambda callbacks: fit(train_loop_per_worker, loop_config, datasets=parquet_datasets(plan.dataset_uris()),
                              num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker,
                              storage=trials_storage, name=run_name, max_failures=c.max_failures,
                              keep_checkpoints=keep, callbacks=callbacks, placement=c.placement),
        pointer={"trial": trial, "run": run_name, "cloned_from": cloned_from})


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="sweep YAML file (see sweeps/)")
    p.add_argument("--storage", help="folder or URI for the sweep (overrides the sweep's storage)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name and storage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base recipe (repeatable)")
    args = p.parse_args()
    sweep, base_recipe = load_sweep(args.sweep, args.overrides)
    storage = args.storage or sweep.storage or base_recipe.cluster.storage
    check_access(storage, expect="folder")
    from genai.train.loop import FAMILIES  # torch and the models: only once the sweep has passed

    root = resolve(storage).join(sweep.name)
    trials_storage = root.join("trials").uri
    base = base_recipe.model_dump(mode="json")
    FAMILIES[base_recipe.kind].plan(base_recipe)  # checks the data (preparing it once) before any trial starts

    from ray import tune

    c = base_recipe.cluster
    where = connect(cpus_needed=sweep.max_concurrent_trials * c.num_workers * c.cpus_per_worker)
    wait_for_resources(c.num_workers, c.cpus_per_worker, c.use_gpu, c.resource_wait_s if where == "cluster" else 0)
    pbt = sweep.scheduler.type == "pbt"
    trial_fn = tune.with_parameters(run_trial, base=base, trials_storage=trials_storage, keep_all_checkpoints=pbt)
    results = run_sweep(trial_fn, sweep.parameters, name=sweep.name, storage=storage, metric=sweep.metric,
                        mode=sweep.mode, num_samples=sweep.num_samples,
                        max_concurrent_trials=sweep.max_concurrent_trials, scheduler=sweep.scheduler,
                        max_t=base_recipe.train.max_steps, checkpoint_interval=base_recipe.train.checkpoint_interval,
                        resume=args.resume, search=sweep.search, seed=sweep.seed)
    rows = []
    for r in results:
        metrics = r.metrics or {}
        df = r.metrics_dataframe
        history = list(df[sweep.metric].dropna()) if df is not None and sweep.metric in df else []
        best = (min(history) if sweep.mode == "min" else max(history)) if history else None
        step = metrics.get("step")
        status = "ERROR" if r.error else ("DONE" if step == base_recipe.train.max_steps else "STOPPED")
        trial = metrics.get("trial_id") or r.path.rstrip("/").split("/")[-1]
        run_name = metrics.get("run", trial)  # its current run folder (see run_trial)
        rows.append({"trial": trial, **{k: r.config.get(k) for k in sweep.parameters}, "step": step,
                     f"final_{sweep.metric}": metrics.get(sweep.metric), f"best_{sweep.metric}": best,
                     "status": status, "run": run_location(trials_storage, run_name).uri,
                     "cloned_from": metrics.get("cloned_from", ""),
                     "error": error_cause(r.error)[:200] if r.error else ""})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    root.join("results.csv").write_text(buf.getvalue())
    for row in rows:  # TensorBoard's HParams view: one run per trial under <sweep>/tensorboard/
        write_hparams(root.join(TENSORBOARD_DIR, row["trial"]).uri, {k: row[k] for k in sweep.parameters},
                      {k: row[k] for k in (f"final_{sweep.metric}", f"best_{sweep.metric}", "step")})
    key = f"final_{sweep.metric}"
    print(f"\nsweep {sweep.name}: {len(rows)} trials ({sum(r['status'] == 'ERROR' for r in rows)} failed)")
    def order(row):
        value = row[key]
        missing = not isinstance(value, float) or math.isnan(value)
        return (missing, 0.0 if missing else (value if sweep.mode == "min" else -value))

    for row in sorted(rows, key=order):
        params = " ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in sweep.parameters)
        value = f"{row[key]:.4f}" if isinstance(row[key], float) else "-"
        print(f"  {row['trial']:<28} {params:<40} step {row['step'] or '-':>5}  {sweep.metric} {value}  {row['status']}")
    done = [r for r in rows if r["status"] == "DONE" and isinstance(r[key], float)]
    if not done:
        return _cli.fail(f"no trial of sweep {sweep.name} finished; see {root.uri}/results.csv", _cli.EXIT_FAILED)
    best = (min if sweep.mode == "min" else max)(done, key=lambda r: r[key])
    recipe = trial_recipe(base, {k: best[k] for k in sweep.parameters})
    root.join("best-recipe.yaml").write_text(recipe_to_yaml(recipe))
    print(f"best: {best['trial']} {sweep.metric} {best[key]:.4f}")
    print(f"  results:  {root.join('results.csv').uri}")
    print(f"  recipe:   {root.join('best-recipe.yaml').uri}  (python {FAMILIES[recipe.kind].job} --recipe <it>)")
    print(f"  generate: python jobs/generate.py --checkpoint {best['run']}")
    print(f"  curves:   tensorboard --logdir {root.uri}   (trials side by side; HParams tab)")
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
