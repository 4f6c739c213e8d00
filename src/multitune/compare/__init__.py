"""`multitune compare CONFIG`: the multi-task model against one model per task (run.py), each training in its
own process (processes.py), over several seeds with their mean and spread (seeds.py)."""

from multitune.compare.run import Budget, compare, compare_run, delta_m, delta_m_tasks, single_task_config
from multitune.compare.seeds import aggregate, format_seeds, task_verdict

__all__ = [
    "Budget",
    "aggregate",
    "compare",
    "compare_run",
    "delta_m",
    "delta_m_tasks",
    "format_seeds",
    "single_task_config",
    "task_verdict",
]
