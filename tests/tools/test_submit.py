"""tools/submit.py: the sbatch script of a dry run, the time limits, the jobs it refuses, and the
job it requeues. (A job run through submitit's local executor, preempted and requeued, is in
tests/engine/test_distributed.py.)"""

import shlex

import pytest
from skips import require, require_detectron2

require_detectron2()
require("submitit", "SLURM jobs go through submitit: pip install -e '.[cluster]'")

from d2_helpers import CONFIGS, ROOT  # noqa: E402

R50 = str(CONFIGS[0].parent / "r50.yaml")


@pytest.fixture(scope="module")
def submit(load_tool):
    return load_tool("submit")


def sbatch_lines(capsys, submit, *flags):
    """The ``#SBATCH`` lines (without the prefix) and the other lines a dry run prints."""
    assert submit.main(["--config-file", R50, "--dry-run", *flags]) is None
    lines = capsys.readouterr().out.splitlines()
    options = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    return options, [line for line in lines if not line.startswith("#SBATCH")]


def test_the_dry_run_prints_the_sbatch_parameters(capsys, submit, tmp_path):
    flags = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "P", "--timeout", "72:00:00"]
    flags += ["--job-dir", str(tmp_path / "jobs"), "--slurm", "account=abc", "--slurm", "exclusive"]
    options, others = sbatch_lines(capsys, submit, *flags, "SOLVER.IMS_PER_BATCH", "16")
    job = tmp_path / "jobs" / "%j"
    assert sorted(options) == sorted(
        [
            "--nodes=2",
            "--ntasks-per-node=8",  # one task per GPU
            "--gpus-per-node=8",
            "--cpus-per-task=5",  # the config's 4 data-loading workers and the task
            "--partition=P",
            "--time=4320",
            "--signal=USR2@120",  # SLURM's warning, two minutes ahead
            "--requeue",
            "--job-name=panoptic_segformer",
            "--account=abc",
            "--exclusive",
            f"--output={job}/%j_0_log.out",
            f"--error={job}/%j_0_log.err",
            "--open-mode=append",
            "--wckey=submitit",
        ]
    )
    # the tasks import train_net from this checkout, through srun
    assert f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}" in others
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in others)
    assert not (tmp_path / "jobs").exists()  # nothing submitted


def test_a_cpu_job_asks_for_no_gpu(capsys, submit):
    flags = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout", "30"]
    options, _ = sbatch_lines(capsys, submit, *flags, "MODEL.DEVICE", "cpu")
    assert "--ntasks-per-node=2" in options and "--time=30" in options
    assert not [option for option in options if option.startswith("--gpus")]


@pytest.mark.parametrize(
    "timeout, minutes",
    [("90", 90), ("72:00:00", 4320), ("1-00:00:00", 1440), ("0:30:30", 31), ("2-03:04:05", 3065)],
)
def test_time_limits_are_read_in_slurms_formats(submit, timeout, minutes):
    assert submit.minutes(timeout) == minutes


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--timeout", "3h"], "--timeout '3h': give minutes, H:MM:SS or D-HH:MM:SS"),
        (["--timeout", "0:00:00"], "--timeout '0:00:00': the job needs at least a minute"),
        (["--num-gpus", "2"], "--num-gpus 2: the job's processes are --nodes x --tasks-per-node"),
        (["--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--gpus-per-node", "0"], r"--tasks-per-node \(default: --gpus-per-node\) must be at "
         "least 1, got 0"),
        (["--tasks-per-node", "4"], "MODEL.DEVICE 'cuda' runs one task per GPU, but "
         "--tasks-per-node is 4 and --gpus-per-node 8"),
        (["--nodes", "3"], "SOLVER.IMS_PER_BATCH 8 does not split over the job's 24 processes "
         r"\(--nodes 3 x --tasks-per-node 8\)"),
        (["--cluster", "local", "--nodes", "2"], "--cluster local runs on this machine only"),
        (["--slurm", "qos="], "--slurm 'qos=': give OPTION=VALUE"),
    ],
)  # fmt: skip
def test_jobs_that_cannot_run_are_refused_by_name(submit, flags, message):
    args = submit.get_parser().parse_args(["--config-file", R50, "--dry-run", *flags])
    with pytest.raises(ValueError, match=message):
        submit.submit(args)


def test_the_command_line_reports_a_refused_job(capsys, submit):
    with pytest.raises(SystemExit) as exited:
        submit.main(["--config-file", R50, "--nodes", "0", "--dry-run"])
    assert exited.value.code == 2
    assert "error: --nodes must be at least 1, got 0" in capsys.readouterr().err


def test_the_requeued_job_resumes(submit):
    args = submit.get_parser().parse_args(
        ["--config-file", R50, "--nodes", "2", "MODEL.DEVICE", "cpu"]
    )
    job = submit.TrainingJob(submit.training_args(args), main=print)
    # train_net's arguments, one process each: the job's tasks are the processes
    assert (job.args.num_gpus, job.args.num_machines, job.args.machine_rank) == (1, 1, 0)
    assert job.args.opts == ["MODEL.DEVICE", "cpu"] and not job.args.resume
    requeued = job.checkpoint()
    assert isinstance(requeued.function, submit.TrainingJob)
    assert requeued.function.args.resume and requeued.function.main is print
    assert not job.args.resume
    assert submit.TrainingJob(job.args).main is submit.train_net.main  # by default
