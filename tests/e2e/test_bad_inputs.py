"""Bad input of every kind: one clear message, the right exit code, no traceback, nothing half-written.

Most cases fail before any worker starts, so they run in this process through
``launcher.cli.main`` (milliseconds each). The few that only a worker can find
(an unreadable image, a job's constructor that raises) start real workers.

Exit codes: 2 for a bad command line, config or run directory; 1 for a failure
at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from tests.support.helpers import run_launch
from tests.support.job import JOB_NAME

NOT_A_JOB = f"{Path(__file__).resolve()}:Case"  # a class, but not a Job


def write_images(root: Path, split: str, counts: dict[str, int]) -> None:
    from PIL import Image

    for name, count in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (12, 12), color=(40 * i % 255, 90, 200)).save(folder / f"{i}.png")


def image_data(root: Path, train=None, val=None) -> None:
    write_images(root, "train", {"cat": 2, "dog": 2} if train is None else train)
    write_images(root, "val", {"cat": 1, "dog": 1} if val is None else val)


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # {tmp} is the test's folder; {good} a valid config; {img} an imagefolder config
    code: int
    fragment: str
    setup: Callable[[Path], None] = field(default=lambda tmp: None)


def _write(path: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / path).write_text(text)


def _existing_run(tmp: Path) -> None:
    """A run directory as `launch local` leaves it, with batch_size 8."""
    from ddp.config import dump_yaml, load_config

    run_dir = tmp / "runs" / "good"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(tmp / "good.yaml")))


CASES = [
    # -- the command line ------------------------------------------------------------------------------
    Case("nproc-zero", ["local", "--cpu", "--nproc", "0", "{good}"], 2,
         "the number of workers must be at least 1, got 0"),
    Case("nproc-negative", ["local", "--cpu", "--nproc", "-2", "{good}"], 2, "must be at least 1, got -2"),
    Case("nproc-not-a-number", ["local", "--cpu", "--nproc", "two", "{good}"], 2,
         "argument --nproc: invalid int value: 'two'"),
    Case("gpus-on-a-cpu-machine", ["local", "--gpus", "2", "{good}"], 2,
         "--gpus 2 asked for GPUs but this machine has none; use --cpu --nproc N"),
    Case("cpu-and-gpus", ["local", "--cpu", "--gpus", "1", "{good}"], 2, "--cpu and --gpus exclude each other"),
    Case("nodes-without-endpoint", ["local", "--cpu", "--nnodes", "2", "{good}"], 2,
         "several nodes need --rdzv-endpoint HOST:PORT"),
    Case("bad-endpoint", ["local", "--cpu", "--nnodes", "2", "--rdzv-endpoint", "headnode", "{good}"], 2,
         "--rdzv-endpoint must be HOST:PORT"),
    Case("bad-endpoint-one-node", ["local", "--cpu", "--rdzv-endpoint", "localhost:99999", "{good}"], 2,
         "--rdzv-endpoint must be HOST:PORT with a port in 1..65535, got 'localhost:99999'"),
    Case("node-rank-out-of-range", ["local", "--cpu", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint",
                                    "h:29500", "{good}"], 2, "--node-rank must be in 0..1, got 2"),
    Case("negative-restarts", ["local", "--cpu", "--max-restarts", "-1", "{good}"], 2,
         "--max-restarts must be 0 or more, got -1"),
    Case("debug-steps-zero", ["debug", "--steps", "0", "{good}"], 2, "--steps must be at least 1, got 0"),
    Case("debug-cuda-on-a-cpu-machine", ["debug", "--device", "cuda", "{good}"], 2,
         "--device cuda but this machine has no CUDA GPU; use --device cpu"),
    Case("cuda-config-on-cpu", ["local", "--cpu", "{good}", "train.device=cuda"], 2,
         "train.device=cuda but the launch runs on the CPU"),
    Case("unknown-command", ["train", "{good}"], 2,
         "unknown command 'train'; the commands are local, debug, resume, slurm, status, cancel, ls"),
    Case("missing-config-argument", ["local", "--cpu"], 2,
         "give what to run: CONFIG [KEY=VALUE ...] | script.py [ARGS ...] | -m package.module [ARGS ...]"),
    # -- the config ------------------------------------------------------------------------------------
    Case("missing-config-file", ["local", "--cpu", "{tmp}/nope.yaml"], 2, "config file not found: {tmp}/nope.yaml"),
    Case("config-is-a-folder", ["local", "--cpu", "{tmp}"], 2,
         "'{tmp}' is none of these by its name (a config must end in .yaml or .yml, a script in .py)"),
    Case("config-is-a-folder-named-yaml", ["local", "--cpu", "{tmp}/configs.yaml"], 2,
         "{tmp}/configs.yaml is a directory, not a config file; give a YAML file",
         lambda tmp: (tmp / "configs.yaml").mkdir()),
    Case("invalid-yaml", ["local", "--cpu", "{tmp}/broken.yaml"], 2,
         "broken.yaml: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'",
         _write("broken.yaml", "run: {name: [unclosed\n")),
    Case("yaml-top-level-list", ["local", "--cpu", "{tmp}/list.yaml"], 2,
         "list.yaml: the top level must be a mapping of sections (job:, data:, ...), got list",
         _write("list.yaml", "- a\n- b\n")),
    Case("yaml-python-tag", ["local", "--cpu", "{tmp}/tag.yaml"], 2, "refused a YAML tag that is not plain data",
         _write("tag.yaml", "run: !!python/object/apply:os.getcwd []\n")),
    Case("unknown-section", ["local", "--cpu", "{good}", "trainer.epochs=3"], 2,
         "unknown key trainer; valid keys in the config: job, run, data"),
    Case("unknown-key", ["local", "--cpu", "{good}", "data.batchsize=3"], 2,
         "unknown key data.batchsize; valid keys in data: batch_size"),
    Case("wrong-type", ["local", "--cpu", "{good}", "data.batch_size=abc"], 2,
         "data.batch_size must be an integer, got 'abc' (str)"),
    Case("bool-for-int", ["local", "--cpu", "{good}", "train.epochs=true"], 2, "train.epochs must be an integer"),
    Case("negative-batch-size", ["local", "--cpu", "{good}", "data.batch_size=-8"], 2,
         "data.batch_size must be >= 1, got -8"),
    Case("zero-learning-rate", ["local", "--cpu", "{good}", "optim.lr=0"], 2,
         "optim.lr must be > 0 and <= 1000, got 0.0"),
    Case("unknown-optimizer", ["local", "--cpu", "{good}", "optim.name=adam"], 2,
         "optim.name must be one of sgd, adamw, got 'adam' (str)"),
    Case("unknown-precision", ["local", "--cpu", "{good}", "train.precision=fp8"], 2,
         "train.precision must be one of fp32, fp16, bf16"),
    Case("override-without-equals", ["local", "--cpu", "{good}", "data.batch_size"], 2,
         "override 'data.batch_size' is not of the form section.key=value"),
    Case("override-empty-key", ["local", "--cpu", "{good}", "=3"], 2, "override '=3' is not of the form"),
    Case("override-into-a-value", ["local", "--cpu", "{good}", "data.batch_size.x=1"], 2,
         "data.batch_size must be an integer, got {'x': 1} (dict)"),
    Case("zero-keep-last", ["local", "--cpu", "{good}", "checkpoint.keep_last=0"], 2,
         "checkpoint.keep_last must be >= 1, got 0"),
    Case("zero-max-steps", ["local", "--cpu", "{good}", "train.max_steps=0"], 2, "train.max_steps must be >= 1, got 0"),
    Case("negative-watchdog", ["local", "--cpu", "{good}", "watchdog.timeout_s=-5"], 2,
         "watchdog.timeout_s must be > 0, got -5.0"),
    Case("zero-collective-timeout", ["local", "--cpu", "{good}", "ddp.timeout_s=0"], 2,
         "ddp.timeout_s must be >= 10 and <= 604800, got 0.0"),
    Case("run-name-with-slash", ["local", "--cpu", "{good}", "run.name=a/b"], 2,
         "run.name must be a plain folder name (no '/', not '.' or '..'); put the parent folder in run.dir, "
         "got 'a/b'"),
    # -- the job ---------------------------------------------------------------------------------------
    Case("unknown-job-module", ["local", "--cpu", "{good}", "job.name=no_such_package.jobs:Train"], 2,
         "job.name 'no_such_package.jobs:Train': cannot import no_such_package.jobs"),
    Case("job-file-not-found", ["local", "--cpu", "{good}", "job.name={tmp}/nope.py:Train"], 2,
         "job.name: file not found: {tmp}/nope.py"),
    Case("job-name-without-class", ["local", "--cpu", "{good}", "job.name=resnet"], 2,
         "job.name 'resnet' is neither a built-in job (image_classification) nor of the form"),
    Case("job-class-not-a-job", ["local", "--cpu", "{good}", f"job.name={NOT_A_JOB}"], 2,
         "has no Job subclass named Case"),
    Case("unknown-job-key", ["local", "--cpu", "{img}", "job.modle=resnet18"], 2,
         "unknown key job.modle; valid keys in job: model"),
    Case("bad-job-value", ["local", "--cpu", "{img}", "job.label_smoothing=1.5"], 2,
         "job.label_smoothing must be >= 0 and < 1, got 1.5"),
    Case("unknown-dataset", ["local", "--cpu", "{img}", "job.dataset=imagenet"], 2,
         "job.dataset must be one of digits, fake, imagefolder, cifar10, mnist"),
    # -- the data --------------------------------------------------------------------------------------
    Case("imagefolder-without-data-dir", ["local", "--cpu", "{img}", "job.data_dir=null"], 2,
         "the imagefolder dataset needs job.data_dir"),
    Case("missing-dataset-folder", ["local", "--cpu", "{img}", "job.data_dir={tmp}/no_data"], 2,
         "dataset folder {tmp}/no_data does not exist"),
    Case("dataset-without-val", ["local", "--cpu", "{img}"], 2, "{tmp}/data has no val/ folder",
         lambda tmp: write_images(tmp / "data", "train", {"cat": 1})),
    Case("empty-dataset", ["local", "--cpu", "{img}"], 2, "{tmp}/data/train is empty: it has no class folders",
         lambda tmp: [(tmp / "data" / split).mkdir(parents=True) for split in ("train", "val")]),
    Case("class-folder-without-images", ["local", "--cpu", "{img}"], 2,
         "class folder {tmp}/data/train/dog has no images (classes: dog)",
         lambda tmp: (image_data(tmp / "data", train={"cat": 2}), (tmp / "data/train/dog").mkdir(),
                      (tmp / "data/train/dog/notes.txt").write_text("no image here"))),
    Case("val-without-images", ["local", "--cpu", "{img}"], 2, "{tmp}/data/val has no images",
         lambda tmp: (image_data(tmp / "data", val={}), (tmp / "data/val/cat").mkdir(parents=True))),
    Case("digits-with-image-size", ["local", "--cpu", "{img}", "job.dataset=digits", "job.image_size=32"], 2,
         "the digits images are 8x8; unset job.image_size"),
    Case("fewer-classes-than-the-data", ["local", "--cpu", "{img}", "job.num_classes=1"], 2,
         "job.num_classes=1 but the imagefolder dataset has 2 classes", lambda tmp: image_data(tmp / "data")),
    # -- the environment and the run directory ------------------------------------------------------------
    Case("run-dir-under-a-file", ["local", "--cpu", "{good}", "run.dir={tmp}/afile/runs"], 2,
         "cannot create the run directory {tmp}/afile/runs/good: {tmp}/afile is a file; choose another run.dir",
         _write("afile", "not a folder")),
    Case("run-dir-not-writable", ["local", "--cpu", "{good}", "run.dir=/proc/runs"], 2,
         "cannot write to the run directory /proc/runs/good: No such file or directory; choose another run.dir"),
    Case("existing-run-other-config", ["local", "--cpu", "{good}", "data.batch_size=16"], 2,
         "{tmp}/runs/good already holds a run with a different config (differs in data.batch_size). Continue "
         "that run with the change: `launch resume {tmp}/runs/good data.batch_size=16`",
         _existing_run),
    Case("resume-non-run-dir", ["resume", "{tmp}"], 2,
         "{tmp} is not a run directory (no launch.json or config.yaml); give the folder a run was launched into"),
    Case("resume-missing-dir", ["resume", "{tmp}/runs/nothing"], 2, "{tmp}/runs/nothing is not a run directory"),
    Case("resume-renaming-the-run", ["resume", "{tmp}/runs/good", "run.name=other"], 2,
         "run.name cannot be changed on resume: the run is the directory {tmp}/runs/good; copy the folder to "
         "continue it elsewhere", _existing_run),
    Case("resume-with-bad-override", ["resume", "{tmp}/runs/good", "data.batch_size=0"], 2,
         "data.batch_size must be >= 1, got 0", _existing_run),
]


def snapshot(root: Path) -> dict:
    """Every file with its size and modification time, and every folder. (A folder's own timestamp is not
    compared: a launch takes the run directory's lock, lock.json, before it may refuse, then releases it.)"""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"run": {"name": "good", "dir": str(tmp_path / "runs")}, "data": {"batch_size": 8, "num_workers": 0},
            "train": {"progress_bar": False, "max_steps": 2}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({**base, "job": {"name": JOB_NAME}}))
    (tmp_path / "img.yaml").write_text(yaml.safe_dump(
        {**base, "job": {"name": "image_classification", "dataset": "imagefolder", "model": "small_mlp",
                         "data_dir": str(tmp_path / "data"), "image_size": 8}}))
    return tmp_path


def fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{good}", str(tmp / "good.yaml")).replace(
        "{img}", str(tmp / "img.yaml"))


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_message(case, world, capsys):
    case.setup(world)
    before = snapshot(world)
    try:
        code = main([fill(arg, world) for arg in case.argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert fill(case.fragment, world) in err
    assert "Traceback" not in out + err
    # A message, not a page (argparse's usage lines aside).
    assert len([line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]) <= 2
    assert snapshot(world) == before  # no run directory, no config written, nothing touched


# -- what only a worker can find --------------------------------------------------------------------------

WORKER_CASES = [
    Case("job-constructor-raises", ["local", "--cpu", "--nproc", "2", "{good}", "job.fail_in_constructor=true"], 1,
         f"error: job {JOB_NAME} failed in its constructor: ValueError: the job's own constructor "
         "failed on purpose"),
    Case("unreadable-image", ["local", "--cpu", "--nproc", "1", "{img}", "data.num_workers=1"], 1,
         "error: cannot read image {tmp}/data/train/dog/broken.png (UnidentifiedImageError",
         lambda tmp: (image_data(tmp / "data"), (tmp / "data/train/dog/broken.png").write_bytes(b"not a png"))),
    Case("empty-training-set", ["local", "--cpu", "--nproc", "1", "{good}", "job.samples=0"], 1,
         "error: the training set is empty: TestJob.build_datasets() returned no samples"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", WORKER_CASES, ids=[case.id for case in WORKER_CASES])
def test_a_worker_failure_is_one_clear_message(case, world):
    case.setup(world)
    result = run_launch(*[fill(arg, world) for arg in case.argv], cwd=world, timeout=100)
    assert result.returncode == case.code
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert message and message[0].startswith(fill(case.fragment, world)), result.stderr
    assert "Traceback" not in result.stderr
    run_dir = world / "runs" / "good"
    assert "Traceback" in (run_dir / "logs" / "rank_0.log").read_text()  # the details are in the log
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.glob("checkpoints/*.pt"))
