"""Registered tasks. Importing this package registers the built-in ones."""

from bench.tasks import fashion_mnist, imdb_lora, text  # noqa: F401  (text: imdb, rotten-tomatoes)
from bench.tasks.base import TASKS, Task, TaskData, TrainRecipe, register_task

__all__ = ["TASKS", "Task", "TaskData", "TrainRecipe", "register_task"]
