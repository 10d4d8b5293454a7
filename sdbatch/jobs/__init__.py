"""Job files: YAML with line marks (yamlmarks), range syntax (ranges), one parser per recipe field
(fields), and the job itself with its expansion into recipes (job)."""

from .fields import MODEL, PARAMS, YAML_DEFAULTS, RandomSeeds
from .job import AXES, MAX_TASKS, Job, Run, Task, draw_randoms, load_job, parse_job
from .ranges import MAX_AXIS_VALUES, RangeError, parse_range
from .yamlmarks import JobError, Problem

__all__ = [
    "AXES",
    "MAX_AXIS_VALUES",
    "MAX_TASKS",
    "MODEL",
    "PARAMS",
    "YAML_DEFAULTS",
    "Job",
    "JobError",
    "Problem",
    "RandomSeeds",
    "RangeError",
    "Run",
    "Task",
    "draw_randoms",
    "load_job",
    "parse_job",
    "parse_range",
]
