"""Methods, declared once, and the pipelines they form.

A method is a `Method` value: its name, its pipeline, a params dataclass (its options and their
defaults, in one place), how it computes a `RunResult`, and which of its params go into the run
key. Packages register methods through the `workbench.methods` entry-point group, whose entries
name an iterable of `Method` values:

    [project.entry-points."workbench.methods"]
    my_methods = "my_package.methods:METHODS"

The workbench itself registers `workbench.pipelines.*` this way, so the library never imports a
pipeline by name; the executors, the run keys, the command line (`workbench run PIPELINE`, one
subcommand per pipeline, its options generated from the params dataclasses) and the demo all
read this registry. No torch here: the CLI builds its help from it without loading a model.
"""

import dataclasses
import importlib.metadata
import logging
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from workbench.errors import BadInput

if TYPE_CHECKING:
    from workbench.models.base import LoadedModel
    from workbench.results import RunResult
    from workbench.tasks.spec import Task

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "workbench.methods"


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Iterable[str] | None = None,
) -> Any:
    """A params field: its default, its help text, and optionally the CLI flag (default: the
    field name with dashes; list fields are repeatable flags) and allowed values."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Planned:
    """One run a method makes on a checkpoint and task, as `Method.runs` returns it (the
    method's `plan`, else one run of its params).

    - `params`: what `Method.compute` gets for this run: the method's params, or a value its
      `plan` made of them (one component, one SAE to train or load);
    - `key`: the parameters recorded in `runs.params` and, with the pipeline, method,
      checkpoint and task, hashed into the run key (`workbench.jobs.run_key`), JSON values;
      read by the executor before the run computes, to skip one a done run has the key of.
    """

    params: Any
    key: dict[str, Any]


@dataclass
class RunInputs:
    """What a method computes from. The executor makes it for a checkpoint and a task (the local
    one once for all the jobs on them, a Ray worker once per job) and hands it to every method's
    `plan` and `compute` on them.

    - `loaded`: the checkpoint, loaded once (the model, its tokenizer and provenance);
    - `task`: the task, loaded for that model (its prompt pairs and metric);
    - `max_batch`, `batch_tokens`: `--max-batch` and `--batch-tokens`, read when the batches
      are made (and by a method that batches data of its own, such as an SAE's corpus);
    - `cache`: what methods on this checkpoint and task share, filled and read by them (the
      SAE planner keeps its planned runs, with their loaded corpus) and by `baseline`;
    - `batches`, `baseline`, `model` (properties): the task's prompt batches on the model's
      device and the metric on the clean and corrupt prompts, each made on first use; the
      `HookedTransformer`.
    """

    loaded: "LoadedModel"
    task: "Task"
    max_batch: int = 64
    batch_tokens: int | None = None
    _batches: list | None = None  # type: ignore[type-arg]
    # what methods on this checkpoint x task share (e.g. a planner's loaded corpus)
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> Any:
        """The task's metric on the clean and corrupt prompts (`Baseline`), computed once."""
        if "baseline" not in self.cache:
            from workbench.attribution.baseline import compute_baseline

            self.cache["baseline"] = compute_baseline(self.loaded.model, self.batches)
        return self.cache["baseline"]

    @property
    def model(self) -> Any:
        """The loaded `HookedTransformer`."""
        return self.loaded.model

    @property
    def batches(self) -> list:  # type: ignore[type-arg]
        """The task's prompt batches (`PromptBatch`), on the model's device, made once."""
        if self._batches is None:
            from workbench.attribution.batches import make_batches, model_device

            model = self.loaded.model
            self._batches = make_batches(
                self.task,
                max_batch=self.max_batch,
                device=model_device(model),
                model=model,
                max_tokens=self.batch_tokens,
            )
        return self._batches


@dataclass
class PlanContext:
    """What a method's `plan` may read besides its `RunInputs`, made by the executor (the local
    one once per invocation, a Ray worker once per job).

    - `store`: the store's reads (`StoreReader`): the live session, or on a Ray worker a
      snapshot taken when the job was sent;
    - `db`: the database as given (`--db`; None: the default), for files kept beside it (the
      trained SAEs' directory).
    """

    store: "StoreReader"
    db: str | None


class StoreReader(Protocol):
    """The store's reads a planner or an executor may make: the live `StoreSession`, or a
    snapshot of it shipped to a remote worker (`workbench.executor_ray.Snapshot`)."""

    def latest_saes(self, checkpoint_id: str) -> list[tuple[str, str]]:
        """(sae_id, directory or pretrained spec) of the SAEs stored for the checkpoint, the
        newest per hook (read by `sae_attr`'s plan)."""
        ...

    def done_run(self, run_key: str) -> str | None:
        """The id of the done run with this run key, or None (read by the executor before it
        computes a run)."""
        ...


def _no_check(params: Any) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A method, declared once by the package that registers it; the command line, planning,
    the executors and `workbench demo` read it from the registry (`pipelines()`).

    - `name`, `pipeline`: `workbench run PIPELINE --method NAME`; stored in `runs.method` and
      `runs.pipeline`, and part of the run key;
    - `params`: a dataclass whose fields (each with a default, made with `option()`) are the
      method's options: the command line makes its flags and help from them, planning makes a
      value of them from the options given (`make_params`), and a `Job` carries it as a dict;
    - `compute(inputs, params)`: the computation, called by the executor for each planned run
      with the `RunInputs` and that run's `Planned.params`, returning a `RunResult`; an
      exception is a failed run (stored with its error), except BadInput, which stops the
      command;
    - `key(params)`: the params recorded in `runs.params` and hashed into the run key (JSON
      values; leave out what does not change the result), read as each run is planned;
    - `plan(params, inputs, ctx)`: for a method that makes several runs per call (one per
      component, one per SAE), its `Planned` runs, called by the executor once the checkpoint
      and the task are loaded, before any run computes; None: one run keyed by `key`;
    - `check(params)`: BadInput for bad params, called while the jobs are planned (and while
      `workbench watch` reads its config), before any model loads;
    - `default`: among the pipeline's methods when no `--method` is given;
    - `summary`: the method's line in `workbench run PIPELINE --help`;
    - `demo`, `demo_params`: how `workbench demo` runs it on the zoo: on `"all"` checkpoints,
      the `"latest"` only, or not at all (None), with these option values;
    - `after`: methods of the same pipeline whose stored results this one reads (`sae_attr`
      reads the SAEs `sae_features` trains): an executor that runs jobs at once (Ray) starts
      it only after theirs are stored.
    """

    name: str
    pipeline: str
    params: type
    compute: Callable[[RunInputs, Any], "RunResult"]
    key: Callable[[Any], dict[str, Any]]
    plan: Callable[[Any, RunInputs, PlanContext], list[Planned]] | None = None
    check: Callable[[Any], None] = _no_check
    default: bool = True
    summary: str = ""
    demo: str | None = "all"
    demo_params: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()

    def make_params(self, values: dict[str, Any]) -> Any:
        """The params of this method from `values` (fields it lacks are ignored)."""
        names = {f.name for f in dataclasses.fields(self.params)}
        return self.params(**{k: v for k, v in values.items() if k in names})

    def runs(self, params: Any, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
        """The runs one call of the method makes: its `plan`, else one run keyed by `key`."""
        if self.plan is not None:
            return self.plan(params, inputs, ctx)
        return [Planned(params, self.key(params))]

    @property
    def option_names(self) -> set[str]:
        """The names of the params' fields."""
        return {f.name for f in dataclasses.fields(self.params)}


@dataclass(frozen=True)
class Pipeline:
    """The methods that name one pipeline, in registration order: `pipelines()` makes it from the
    registered methods (no package declares one). `workbench run NAME` is its subcommand, with
    the options of all its methods; methods that share an option name declare it alike."""

    name: str
    methods: tuple[Method, ...]

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    @property
    def default_methods(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods if m.default)

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        # "an sae method": an acronym spelled letter by letter takes the article of its sound
        vowel_sound = self.name[0] in "aeiou" or self.name in ("sae", "mlp", "rnn")
        article = "an" if vowel_sound else "a"
        raise BadInput(
            f"--method {name}: not {article} {self.name} method "
            f"(choose from {', '.join(self.method_names)})"
        )

    def options(self) -> dict[str, dataclasses.Field]:  # type: ignore[type-arg]
        """Every option of the pipeline's methods, by field name, in declaration order."""
        out: dict[str, dataclasses.Field] = {}  # type: ignore[type-arg]
        for m in self.methods:
            for f in dataclasses.fields(m.params):
                out.setdefault(f.name, f)
        return out

    def option_type(self, name: str) -> Any:
        for m in self.methods:
            hints = typing.get_type_hints(m.params)
            if name in hints:
                return hints[name]
        raise KeyError(name)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points of every installed distribution. Read distribution by
    distribution: a stale metadata directory of the same project earlier on `sys.path` (an
    `.egg-info` left in a source checkout) must not hide the installed one's entries."""
    seen: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=_ep_order)


def methods_from_entry_points() -> list[Method]:
    found: list[Method] = []
    for ep in _entry_points():
        loaded = ep.load()
        items = loaded() if callable(loaded) else loaded
        for item in items:
            if not isinstance(item, Method):
                raise TypeError(f"entry point {ep.name} ({ep.value}) lists {item!r}, not a Method")
            found.append(item)
    return found


# the workbench's own pipelines first, in their documented order; others after, by name
_BUILTIN_ORDER = ("heads", "patching", "edges", "sae")


def _ep_order(ep: importlib.metadata.EntryPoint) -> tuple[int, str]:
    return (_BUILTIN_ORDER.index(ep.name) if ep.name in _BUILTIN_ORDER else 99, ep.name)


@cache
def pipelines() -> dict[str, Pipeline]:
    """Every registered pipeline with its methods, in registration order."""
    return build_pipelines(methods_from_entry_points())


def build_pipelines(methods: Iterable[Method]) -> dict[str, Pipeline]:
    grouped: dict[str, list[Method]] = {}
    seen: set[tuple[str, str]] = set()
    for m in methods:
        if (m.pipeline, m.name) in seen:
            raise ValueError(f"method {m.name} of pipeline {m.pipeline} is registered twice")
        seen.add((m.pipeline, m.name))
        if not dataclasses.is_dataclass(m.params):
            raise TypeError(f"method {m.name}: params must be a dataclass, not {m.params!r}")
        grouped.setdefault(m.pipeline, []).append(m)
    result = {name: Pipeline(name, tuple(ms)) for name, ms in grouped.items()}
    for p in result.values():
        _check_shared_options(p)
    return result


def _check_shared_options(p: Pipeline) -> None:
    """Methods of one pipeline that share an option name share its default and type."""
    first: dict[str, tuple[Any, Any, str]] = {}
    for m in p.methods:
        hints = typing.get_type_hints(m.params)
        for f in dataclasses.fields(m.params):
            default = _default(f)
            if f.name in first and first[f.name][:2] != (default, hints[f.name]):
                raise ValueError(
                    f"option {f.name} of pipeline {p.name}: method {m.name} declares it "
                    f"differently from method {first[f.name][2]}"
                )
            first.setdefault(f.name, (default, hints[f.name], m.name))


def _default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def pipeline(name: str) -> Pipeline:
    known = pipelines()
    if name not in known:
        raise BadInput(f"unknown pipeline {name!r} (choose from {', '.join(known)})")
    return known[name]


def method(pipeline_name: str, name: str) -> Method:
    return pipeline(pipeline_name).method(name)


def is_list_type(tp: Any) -> bool:
    """list[...] or list[...] | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(is_list_type(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) is list
