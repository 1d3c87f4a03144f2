"""Downstream tasks through lm-evaluation-harness (`pip install hf_dynorm[eval]`): the numbers users compare models by.

A task is an lm-eval task name (HellaSwag, ARC, MMLU, LAMBADA: their data come from the Hub, as usual), a path to a
task YAML with local data, or a task hf_dynorm ships (`SHIPPED`: wiki-cloze, built from the embedded text, needs no
network). The already-loaded model runs through lm-eval's HF model class, so a converted model needs neither
trust_remote_code nor a second load.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

SHIPPED = {"wiki-cloze": ("wiki_cloze.yaml", "wiki_cloze")}  # name -> (the shipped YAML, its lm-eval task name)


def _resolve(task: str) -> tuple[str, str | None]:
    """(lm-eval task name, a folder lm-eval must read task YAMLs from, or None)."""
    if task in SHIPPED:
        yaml, name = SHIPPED[task]
        return name, str(importlib.resources.files("hf_dynorm.tasks"))
    path = Path(task)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"task file {task} does not exist")
        import yaml

        name = yaml.safe_load(path.read_text().replace("!function", "")).get("task")
        if not name:
            raise ValueError(f"{task} has no `task:` name; lm-eval task YAMLs need one")
        return name, str(path.parent.resolve())
    return task, None


def task_label(task: str) -> str:
    """A task as cards name it: a task file by its stem, anything else as given."""
    return Path(task).stem if task.endswith((".yaml", ".yml")) else task


def check_tasks(tasks: list[str]) -> None:
    """Fail before any model loads: lm-eval missing, or a task file that is not there."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError("downstream tasks need lm-evaluation-harness: pip install 'hf_dynorm[eval]' "
                          "(or lm-eval)") from error
    for task in tasks:
        _resolve(task)


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...]):
    """lm-eval's index of every task it knows (~12 s to build here), built once per process: the main job and
    `hf-dynorm eval --reference` score two models."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int = 1) -> dict:
    """{task: {metric: value}} for `model` (already loaded), metric names as lm-eval names them without their
    filter suffix (``acc``, ``acc_stderr``, ``perplexity``)."""
    check_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, folders = zip(*(_resolve(task) for task in tasks))
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    manager = _task_manager(tuple(sorted({folder for folder in folders if folder})))
    output = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False,
                             bootstrap_iters=0, verbosity="ERROR")
    results = {}
    for task, name in zip(tasks, names):
        metrics = output["results"][name]
        results[task] = {key.split(",")[0]: value for key, value in metrics.items()
                         if isinstance(value, (int, float)) and key.split(",")[0] not in ("alias", "sample_len")}
    return results
