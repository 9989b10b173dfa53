"""`tsotsa eval run`: lm-eval tasks through the swarm, the shipped ones and those of `--include-path`.

Tasks are found in the project's own task directory (tsotsa/evaluation/tasks) and the directories given,
without indexing lm-eval's thousands of built-in tasks (a built-in task's name is looked up only when no
local task has it), so that local tasks run offline and start in a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tsotsa.errors import TsotsaError

TASKS_DIR = Path(__file__).with_name("tasks")


@dataclass
class EvalOptions:
    tasks: list[str]
    include_paths: list[Path] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None

    def __post_init__(self) -> None:  # before any connection is made
        if not self.tasks:
            raise TsotsaError("--tasks names no task")
        for path in self.include_paths:
            if not Path(path).is_dir():
                raise TsotsaError(f"--include-path {path} is not a directory")


def task_manager(include_paths: list[Path], builtin: bool = False):
    """lm-eval's TaskManager over the shipped tasks and `include_paths`; with `builtin`, lm-eval's own
    tasks too (indexing them takes a while)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=builtin)


def evaluate(lm, options: EvalOptions) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on the options' tasks; its results dict."""
    import lm_eval

    manager = checked_tasks(options)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are not the user's business
    with _quiet_git():
        return lm_eval.simple_evaluate(model=lm, tasks=options.tasks, task_manager=manager, limit=options.limit,
                                       num_fewshot=options.num_fewshot, log_samples=False, bootstrap_iters=1000)


def checked_tasks(options: EvalOptions):
    """The TaskManager that knows every task of `options`; one error line naming those none knows."""
    manager = task_manager(options.include_paths)
    unknown = [name for name in options.tasks if name not in manager.all_tasks]
    if unknown:
        manager = task_manager(options.include_paths, builtin=True)
        still = [name for name in unknown if name not in manager.all_tasks]
        if still:
            raise TsotsaError(f"no task named {', '.join(still)} (shipped: {', '.join(shipped_tasks())})")
    return manager


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    """lm-eval records the git commit of the working directory by running `git describe`, whose "fatal: not
    a git repository" goes straight to the terminal outside a checkout. Outside one, git is left off the
    PATH for the evaluation: lm-eval then reads no hash, silently."""
    if shutil.which("git") is None or _inside_git_checkout(Path.cwd()):
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join(p for p in saved.split(os.pathsep) if not (Path(p) / "git").exists())
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _inside_git_checkout(directory: Path) -> bool:
    return any((parent / ".git").exists() for parent in [directory, *directory.parents])


def shipped_tasks() -> list[str]:
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def write_results(results: dict, path: Path) -> None:
    path.write_text(json.dumps({"results": results["results"], "versions": results.get("versions", {}),
                                "n-samples": results.get("n-samples", {})}, indent=2, default=str) + "\n")
