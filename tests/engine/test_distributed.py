"""Distributed training and evaluation on the CPU: docs/getting_started.md's multi-process and
multi-machine commands, run as users run them (``train_net.py`` in subprocesses, gloo), are the same training
and the same evaluation as one process; so are the cluster launchers' (torchrun on one machine and
on two, torch elastic restarting a killed worker, a SLURM job through submitit preempted and
requeued).

The generated COCO panoptic sample (tests/coco_panoptic_sample.py) stands in for COCO:
``DETECTRON2_DATASETS`` points at a folder laid out as detectron2 expects COCO panoptic (train2017
and val2017 both the sample), so the configs' ``coco_2017_*_panoptic`` datasets are the sample.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from skips import require, require_detectron2

require_detectron2()
require("panopticapi", "COCOPanopticEvaluator needs panopticapi installed")

import torch  # noqa: E402
from d2_helpers import (  # noqa: E402
    CONFIGS,
    PERMISSIVE_SCORES,
    ROOT,
    assert_identical,
    finish,
    free_port,
    lay_out_test_dev,
    load_checkpoint,
    make_cfg,
    register_sample,
    write_own_predictions_as_ground_truth,
)
from detectron2.modeling import build_model  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from overfit_sample import SMALL_MODEL  # noqa: E402

CONFIG = str(CONFIGS[0].parent / "r50.yaml")
# tools/overfit_sample.py's small model (a ResNet-18 with GroupNorm from scratch, a narrow
# head, dropout 0), short side 160 and no augmentation: each image is the same tensor however
# the batch is split (both sample images pad to 160 x 256), so splitting cannot change the
# result.
SMALL = [
    *SMALL_MODEL,
    "INPUT.MIN_SIZE_TRAIN", "(160,)",
    "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "160",
    "INPUT.MAX_SIZE_TEST", "256",
    "INPUT.RANDOM_FLIP", "none",
    "INPUT.CROP.ENABLED", "False",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BACKBONE_MULTIPLIER", "1.0",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TRAIN", "('coco_2017_train_panoptic',)",
    "DATASETS.TEST", "()",
    "SEED", "0",
]  # fmt: skip
# one plain gradient step: SGD without momentum history, clipping or weight decay, so the
# update is the learning rate times the averaged gradient
ONE_SGD_STEP = [
    "SOLVER.MAX_ITER", "1",
    "SOLVER.OPTIMIZER", "SGD",
    "SOLVER.BASE_LR", "0.01",
    "SOLVER.WEIGHT_DECAY", "0.0",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
    # Both images padded to one size, in one process or in two, so that only DDP differs: at
    # the default divisibility 1 one process would pad the smaller image to the larger and two
    # would pad neither, and the backbone sees padding near a padded image's border.
    "INPUT.SIZE_DIVISIBILITY", "32",
]  # fmt: skip
TIMEOUT = 600
TORCHRUN = ["-m", "torch.distributed.run"]
STANDALONE = [*TORCHRUN, "--standalone", "--nproc-per-node", "2"]
ONE_AND_TWO = (("one", "1"), ("two", "2"))  # output folder, processes


def lay_out_coco(root, sample, ground_truth):
    """Makes ``root`` a DETECTRON2_DATASETS folder whose COCO panoptic splits are the images of
    the COCO panoptic sample in folder ``sample`` with the given ground truth: ``{split: (panoptic
    PNG folder, panoptic json)}`` (instances jsons: the sample's own); returns ``root``."""
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split, (panoptic, panoptic_json) in ground_truth.items():
        (coco / split).symlink_to(sample / "images")
        (coco / f"panoptic_{split}").symlink_to(panoptic)
        (coco / "annotations" / f"panoptic_{split}.json").symlink_to(panoptic_json)
        (coco / "annotations" / f"instances_{split}.json").symlink_to(sample / "instances.json")
    return root


def ground_truth_of(folder):
    """(panoptic PNG folder, panoptic json) of the COCO panoptic dataset in ``folder``."""
    return folder / "panoptic", folder / "panoptic.json"


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory, coco_panoptic_sample):
    """A DETECTRON2_DATASETS folder whose COCO panoptic train2017 and val2017 are the sample."""
    truth = ground_truth_of(coco_panoptic_sample)
    root = tmp_path_factory.mktemp("datasets")
    return lay_out_coco(root, coco_panoptic_sample, {"train2017": truth, "val2017": truth})


def start(script, datasets_root, output_dir, *args, threads=None, launcher=(), env=None):
    """``python <launcher> <script> --config-file r50.yaml <args> SMALL... OUTPUT_DIR
    output_dir`` (``launcher``: e.g. ``-m torch.distributed.run ...``), with ``env`` added to the
    environment."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets_root), **(env or {})}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, *launcher, str(script), "--config-file", CONFIG, *args[:-1]]
    command += [*SMALL, *args[-1], "OUTPUT_DIR", str(output_dir)]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def train_net(datasets_root, runs, opts, threads=None, launchers=None):
    """Runs train_net.py once per ``{output folder: flags}`` of ``runs`` (under the launcher
    ``launchers`` gives a folder, if any), all at the same time (each run sets its own number
    of threads, so running them together changes no result, and their start-ups overlap);
    returns their outputs."""
    script = ROOT / "train_net.py"
    launchers = launchers or {}
    started = [
        start(script, datasets_root, output_dir, *flags, opts, threads=threads, launcher=launcher)
        for output_dir, flags in runs.items()
        for launcher in [launchers.get(output_dir, ())]
    ]
    return [finish(process, TIMEOUT) for process in started]


def load_weights(path):
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """The small model's random initialisation as a checkpoint every run starts from."""
    torch.manual_seed(0)
    model = build_model(make_cfg(CONFIG, *SMALL))
    path = tmp_path_factory.mktemp("init") / "init.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def relative_difference(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_two_processes_train_like_one_process_with_both_images(
    tmp_path, datasets_root, initial_weights
):
    # 1 process x 2 images, and 2 processes x 1 image (DDP on gloo), spawned by train_net.py
    # or started by torchrun (whose processes join its group): one SGD step each
    opts = [*ONE_SGD_STEP, "MODEL.WEIGHTS", str(initial_weights)]
    runs = {tmp_path / "one": ["--num-gpus", "1"], tmp_path / "two": ["--num-gpus", "2"]}
    runs[tmp_path / "torchrun"] = []
    train_net(datasets_root, runs, opts, launchers={tmp_path / "torchrun": STANDALONE})
    start_ = load_weights(initial_weights)
    one = load_weights(tmp_path / "one" / "model_final.pth")
    trained = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], start_[k])]
    assert len(trained) > 100  # the step moved (nearly) every tensor: the test is not vacuous
    for run in ("two", "torchrun"):
        two = load_weights(tmp_path / run / "model_final.pth")
        assert one.keys() == two.keys() == start_.keys()
        floats = [k for k in one if one[k].is_floating_point()]
        weights = max(relative_difference(two[k], one[k]) for k in floats)
        step_one = torch.cat([(one[k] - start_[k]).flatten() for k in trained])
        step_two = torch.cat([(two[k] - start_[k]).flatten() for k in trained])
        step = relative_difference(step_two, step_one)
        print(f"{run}: relative difference: weights {weights:.2e}, update {step:.2e}")
        assert weights < 1e-5, run
        # the update itself (gradient averaging, the all-reduced thing / stuff counts behind
        # lambda_things, lambda_stuff and the loss normalisers); a missing all-reduce moves it
        # by more than 10 %
        assert step < 1e-4, run
    # and the loss detectron2 logs (averaged over processes) is the one-process loss
    losses = [
        json.loads((tmp_path / run / "metrics.json").read_text().splitlines()[0])["total_loss"]
        for run in ("one", "two", "torchrun")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, datasets_root):
    """20 iterations on two "machines" of one process each, meeting on loopback (docs/getting_started.md's
    multi-machine command); returns the output folder and the two processes' outputs."""
    output_dir = tmp_path_factory.mktemp("two_machines")
    url = f"tcp://127.0.0.1:{free_port()}"
    opts = ["SOLVER.MAX_ITER", "20", "SOLVER.BASE_LR", "0.0004"]
    script = ROOT / "tests" / "engine" / "train_net_reporting.py"
    flags = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", url]
    # two "machines" on this one: a thread each (a real machine would use all its cores)
    ranks = [
        start(script, datasets_root, output_dir, *flags, "--machine-rank", str(r), opts, threads=1)
        for r in (0, 1)
    ]
    outputs = [finish(process, TIMEOUT) for process in ranks]
    return output_dir, outputs


def test_two_machines_train_in_step(two_machines):
    output_dir, _ = two_machines
    reports = [json.loads((output_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["iterations"] for r in reports] == [20, 20]
    # both ranks hold the same loss at every iteration and end with identical weights
    assert reports[0]["losses"] == reports[1]["losses"]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    # the loss the main process logged (the median of the 20 iterations) is that averaged loss
    (logged,) = [
        json.loads(line)["total_loss"]
        for line in (output_dir / "metrics.json").read_text().splitlines()
        if "total_loss" in line
    ]
    assert logged == pytest.approx(statistics.median(reports[0]["losses"]), rel=1e-5)
    # and training lowered it
    assert reports[0]["losses"][-1] < 0.8 * reports[0]["losses"][0]


def test_two_processes_evaluate_exactly_like_one(tmp_path, two_machines, coco_panoptic_sample):
    # coco_2017_val_panoptic: the sample with its own ground truth; coco_2017_train_panoptic:
    # the sample with the model's own one-process predictions as ground truth, so stuff PQ is
    # close to 100 and any image lost, repeated or mixed up between the processes lowers it;
    # both with Boundary PQ. coco_2017_test-dev_panoptic: the sample's images, written as a
    # submission
    weights = two_machines[0] / "model_final.pth"
    own = tmp_path / "own"
    cfg = make_cfg(CONFIG, *SMALL, *PERMISSIVE_SCORES, "MODEL.WEIGHTS", str(weights))
    sample = register_sample(
        "psf_test_distributed_sample", coco_panoptic_sample, coco_panoptic_sample / "images"
    )
    segments_per_image = write_own_predictions_as_ground_truth(cfg, sample, own)
    assert len(segments_per_image) == 2 and all(segments_per_image)
    datasets = lay_out_coco(
        tmp_path / "datasets",
        coco_panoptic_sample,
        {"val2017": ground_truth_of(coco_panoptic_sample), "train2017": ground_truth_of(own)},
    )
    lay_out_test_dev(datasets, coco_panoptic_sample)

    test_sets = ["coco_2017_val_panoptic", "coco_2017_train_panoptic"]
    test_dev = "coco_2017_test-dev_panoptic"
    opts = [
        *PERMISSIVE_SCORES,
        "MODEL.WEIGHTS", str(weights),
        "DATASETS.TEST", str((*test_sets, test_dev)),
        "TEST.BOUNDARY_PQ", "True",
    ]  # fmt: skip
    runs = {tmp_path / run: ["--eval-only", "--num-gpus", gpus] for run, gpus in ONE_AND_TWO}
    # one thread per process in both runs: on some CPUs (seen on an AVX-512 Xeon) oneDNN's
    # convolutions round differently with 1 and 2 threads, and what is tested here is the split
    # of the images between processes and the gathering of their results
    train_net(datasets, runs, opts, threads=1)
    results = [
        json.loads((tmp_path / run / "inference" / "results.json").read_text())
        for run in ("one", "two")
    ]
    # PQ, SQ, RQ (all, things, stuff), Boundary PQ and COCO AP of masks and boxes: exactly
    assert results[0] == results[1]
    own = results[0]["coco_2017_train_panoptic"]
    # the model's own segments are found, the added person is missed
    assert own["panoptic_seg"]["PQ_st"] > 90 and 0 < own["panoptic_seg"]["PQ_th"] < 100
    assert own["boundary_panoptic_seg"]["PQ_st"] > 90
    assert 0 < own["boundary_panoptic_seg"]["PQ_th"] <= own["panoptic_seg"]["PQ_th"]
    # the test-dev submission: the same json and PNGs, byte for byte
    submission = Path("inference") / test_dev / "panoptic_test-dev2017_PanopticSegFormer_results"
    written = [
        {path.name: path.read_bytes() for path in (tmp_path / run / submission).iterdir()}
        for run in ("one", "two")
    ]
    assert sorted(written[0]) == ["000000142238.png", "000000439180.png"]
    assert written[0] == written[1]
    contents = [
        (tmp_path / run / submission).with_suffix(".json").read_text() for run in ("one", "two")
    ]
    assert len(json.loads(contents[0])["annotations"]) == 2 and contents[0] == contents[1]
    for dataset in test_sets:
        path = Path("inference") / dataset / "predictions.json"
        predictions = [
            sorted(
                json.loads((tmp_path / run / path).read_text())["annotations"],
                key=lambda a: a["image_id"],
            )
            for run in ("one", "two")
        ]
        assert len(predictions[0]) == 2 and predictions[0] == predictions[1]


# --- on clusters: torch elastic restarts, SLURM through submitit -----------------------------

# Five AdamW iterations, two images a process a batch, a checkpoint after iteration 2. Each
# process's batch is two draws from its share of the sampler's stream, so a resumed run whose
# stream started again (rather than going on) trains on the images in another order.
FIVE_ITERATIONS = [
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.MAX_ITER", "5",
    "SOLVER.CHECKPOINT_PERIOD", "3",
]  # fmt: skip
REPORTING = ROOT / "tests" / "engine" / "train_net_reporting.py"


def submit_preempted_job(job_dir, datasets_root):
    """Submits the five iterations as a job of 2 tasks through submitit's local executor
    (``tools/submit.py``'s code, processes on this machine); rank 1 sends itself SLURM's warning
    signal after iteration 1. Returns the job, or None without submitit."""
    if importlib.util.find_spec("submitit") is None:
        return None
    import submit
    import train_net_reporting

    flags = ["--config-file", CONFIG, "--cluster", "local", "--job-dir", str(job_dir)]
    flags += ["--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout", "10"]
    args = submit.get_parser().parse_args([*flags, *SMALL, *FIVE_ITERATIONS])
    # the tasks inherit this environment: they unpickle the job (submit, train_net_reporting)
    path = [str(ROOT / "tools"), str(REPORTING.parent), os.environ.get("PYTHONPATH", "")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
        patch.setenv("DETECTRON2_DATASETS", str(datasets_root))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("PSF_TEST_SIGNAL", "SIGUSR2:1:1")
        return submit.submit(args, main=train_net_reporting.main)


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory, datasets_root):
    """The five iterations in two processes of one thread, launched three ways at once:

    * ``agents``: two torchrun agents of one process each, c10d rendezvous on loopback (the
      docs/getting_started.md's multi-node torchrun command);
    * ``killed``: the same with ``--max-restarts 1``, and rank 1 SIGKILLed after iteration 3;
    * ``preempted``: a SLURM job through submitit (its local executor), sent SLURM's warning
      after iteration 1 (absent without submitit).

    Returns ``{name: (output folder, output)}``; the checkpoints go afterwards.
    """
    folders = {name: tmp_path_factory.mktemp(name) for name in ("agents", "killed")}

    def two_agents(name, *flags, env=None):
        endpoint = f"127.0.0.1:{free_port()}"
        launcher = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", *flags]
        launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", name]
        options = {"threads": 1, "launcher": launcher, "env": env}
        return [
            start(REPORTING, datasets_root, folders[name], FIVE_ITERATIONS, **options)
            for _ in range(2)
        ]

    started = {
        "agents": two_agents("agents"),
        "killed": two_agents(
            "killed", "--max-restarts", "1", env={"PSF_TEST_SIGNAL": "SIGKILL:1:3"}
        ),
    }
    job = submit_preempted_job(tmp_path_factory.mktemp("jobs"), datasets_root)
    runs = {
        name: (folders[name], "".join(finish(process, TIMEOUT) for process in processes))
        for name, processes in started.items()
    }
    if job is not None:
        job.results()  # raises with a task's traceback when the job failed
        folder = job.paths.folder
        runs["preempted"] = (folder, "".join(path.read_text() for path in folder.glob("*_log.*")))
    yield runs
    for folder, _ in runs.values():
        for path in folder.glob("*.pth*"):
            path.unlink()  # about 170 MB each


def uninterrupted(cluster_runs):
    """The final checkpoint of the two agents' run."""
    return load_checkpoint(cluster_runs["agents"][0] / "model_final.pth")


def test_two_torchrun_agents_train_in_step(cluster_runs):
    folder, _ = cluster_runs["agents"]
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["iterations"] for r in reports] == [5, 5]
    # both ranks hold the same loss at every iteration and end with identical weights
    assert reports[0]["losses"] == reports[1]["losses"]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    assert uninterrupted(cluster_runs)["iteration"] == 4


def test_a_killed_worker_costs_nothing_but_time(cluster_runs):
    folder, output = cluster_runs["killed"]
    # torch elastic restarted the group (both agents' processes), which resumed from the
    # checkpoint of iteration 2
    assert "the group was restarted: resuming from the last checkpoint" in output
    assert f"Loading trainer from {folder / 'model_0000002.pth'}" in output
    assert "Starting training from iteration 3" in output
    # and ended with the uninterrupted run's model, AdamW state, scheduler and iteration, bit
    # for bit (the same arithmetic in the same threads, on the same images in the same order)
    assert_identical(load_checkpoint(folder / "model_final.pth"), uninterrupted(cluster_runs))


def test_a_preempted_slurm_job_requeues_and_resumes(cluster_runs):
    require("submitit", "SLURM jobs go through submitit: pip install -e '.[cluster]'")
    folder, output = cluster_runs["preempted"]
    # SLURM's warning: the iteration in progress (1) was checkpointed, the job requeued itself
    # and resumed from that checkpoint
    assert "SIGUSR2 received: checkpointing iteration 1 and stopping" in output
    assert "Requeued job" in output
    assert f"Loading trainer from {folder / 'model_0000001.pth'}" in output
    assert "Starting training from iteration 2" in output
    assert_identical(load_checkpoint(folder / "model_final.pth"), uninterrupted(cluster_runs))
