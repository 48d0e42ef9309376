"""Which lm-eval tasks can run on this machine, offline, decided before any model work.

`grape eval --tasks arc_easy` used to run the whole perplexity pass and only then find that
arc_easy's dataset is not on the machine. This module answers from the task YAML files and the
local Hugging Face caches alone, in about a second:

    check_tasks(["local", "arc_easy"], task_paths, domains)    # UnavailableTaskError, one line
    available_tasks(task_paths, domains)                       # what `grape eval --list-tasks` prints

A task can run offline when its data is local: `dataset_path: json|csv|parquet|...` with
`data_files` that exist, a local directory, or a Hub dataset already in the Hugging Face
caches (HF_HUB_CACHE or HF_DATASETS_CACHE). Groups and tags are expanded to their tasks.

The YAML files are read directly (a text scan, then a YAML parse of the few files that mention a
name) rather than through lm-eval's TaskManager, whose full index takes about 10 s to build;
the TaskManager is consulted only to confirm a name really is unknown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from grape.errors import DataError
from grape.evaluation.lmeval_tasks import LOCAL_TASKS, build_local_tasks, quiet_lm_eval, task_name

# dataset_path values that name a file format: their data is the `data_files` they list
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"}


class UnavailableTaskError(DataError):
    """Requested lm-eval tasks that are unknown here or whose data is not on this machine."""


# -- where things are ---------------------------------------------------------------------------
def builtin_task_dir() -> Path | None:
    """lm-eval's own task folder, or None when lm-eval is not installed (found without
    importing lm-eval, which is slow to import)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def cache_roots() -> tuple[Path, Path]:
    """(hub cache, datasets cache): grape.models.files.hf_cache_roots."""
    from grape.models.files import hf_cache_roots

    return hf_cache_roots()


def hub_dataset_cached(repo: str) -> bool:
    """A Hub dataset with files in the hub cache or a prepared copy in the datasets cache."""
    hub, datasets = cache_roots()
    snapshots = hub / f"datasets--{repo.replace('/', '--')}" / "snapshots"
    prepared = datasets / repo.replace("/", "___")
    return (snapshots.is_dir() and any(snapshots.iterdir())) or prepared.is_dir()


def cached_hub_datasets() -> set[str]:
    """Repo ids of the Hub datasets present in either cache."""
    hub, datasets = cache_roots()
    found = set()
    if hub.is_dir():
        found |= {p.name[len("datasets--"):].replace("--", "/") for p in hub.glob("datasets--*")}
    if datasets.is_dir():
        found |= {p.name.replace("___", "/") for p in datasets.iterdir() if "___" in p.name}
    return {repo for repo in found if hub_dataset_cached(repo)}


# -- reading task YAML --------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """lm-eval YAML: `!function module.name` tags are kept as text, never imported."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _parse(path: Path, seen: frozenset = frozenset()) -> dict[str, Any]:
    """A task YAML with its `include:` chain merged (the file's own keys win), like lm-eval."""
    if path in seen:
        return {}
    with open(path, "rb") as handle:
        cfg = yaml.load(handle, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    if not isinstance(cfg, dict):
        return {}
    includes = cfg.pop("include", None) or []
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if inc_path.is_file():
            merged.update({k: v for k, v in _parse(inc_path, seen | {path}).items() if k != "task_list"})
    merged.update(cfg)
    return merged


_DECLARED = re.compile(r"^(?:task|group):[ \t]*[\"']?([^\s\"'#]+)", re.M)
_INCLUDE = re.compile(r"^include:[ \t]*[\"']?([^\s\"'#]+)", re.M)


class TaskFiles:
    """The task YAML files under some folders, read as text once and indexed by the names they
    declare (`task: NAME`, `group: NAME`) and by what they include; parsed only when needed."""

    def __init__(self, roots: Iterable[Path]):
        self.texts: dict[Path, str] = {}
        for root in roots:
            for f in [root] if root.is_file() else sorted(root.glob("**/*.yaml")):
                try:
                    self.texts[f] = f.read_text(encoding="utf-8", errors="ignore")
                except OSError:
                    continue
        self.declared: dict[str, list[Path]] = {}
        self.includers: dict[Path, list[Path]] = {}
        for path, text in self.texts.items():
            for name in _DECLARED.findall(text):
                self.declared.setdefault(name, []).append(path)
            for inc in _INCLUDE.findall(text):
                self.includers.setdefault(path.parent / inc, []).append(path)
        self._cfgs: dict[Path, dict] = {}

    def cfg(self, path: Path) -> dict[str, Any]:
        if path not in self._cfgs:
            try:
                self._cfgs[path] = _parse(path)
            except (OSError, yaml.YAMLError):
                self._cfgs[path] = {}
        return self._cfgs[path]

    def mentioning(self, word: str) -> list[Path]:
        """Files whose text contains `word`, plus the files that include them (their keys are
        inherited: arc_challenge.yaml includes arc_easy.yaml, and so its tag)."""
        found = [p for p, text in self.texts.items() if word in text]
        queue, seen = list(found), set(found)
        while queue:
            for p in self.includers.get(queue.pop(), []):
                if p not in seen:
                    seen.add(p)
                    queue.append(p)
                    found.append(p)
        return found

    def resolve(self, name: str) -> list[dict] | None:
        """The leaf task configs `name` stands for (a task, a group or a tag); None if unknown."""
        leaves: list[dict] = []
        known = False
        # a task or group names itself on one line; a tag needs the slower text search
        for path in self.declared.get(name) or self.mentioning(name):
            cfg = self.cfg(path)
            tags = cfg.get("tag") or []
            if cfg.get("group") == name:
                known = True
                leaves += self._members(cfg.get("task"))
            elif cfg.get("task") == name or name in ([tags] if isinstance(tags, str) else tags):
                known = True
                leaves.append(cfg)
        return leaves if known else None

    def _members(self, task_field: Any) -> list[dict]:
        """The leaf configs of a group's `task:` list: names, inline configs, nested groups."""
        items = task_field if isinstance(task_field, list) else [task_field] if task_field else []
        leaves: list[dict] = []
        for item in items:
            if isinstance(item, dict) and "group" in item:
                leaves += self._members(item.get("task"))
            elif isinstance(item, dict) and "dataset_path" in item:
                leaves.append(item)
            else:
                name = item.get("task") if isinstance(item, dict) else item
                found = self.resolve(name) if isinstance(name, str) else None
                leaves += found if found is not None else [{"task": name, "unknown": True}]
        return leaves


# -- is the data here? --------------------------------------------------------------------------
def _files(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        return [f for v in data_files.values() for f in _files(v)]
    if isinstance(data_files, (list, tuple)):
        return [f for v in data_files for f in _files(v)]
    return []


def missing_data(cfg: Mapping[str, Any]) -> str | None:
    """Why this task's data is not on the machine, or None when it is (or cannot be known:
    Python-defined tasks and custom loaders are given the benefit of the doubt)."""
    if cfg.get("unknown"):
        return "not found"
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or "class" in cfg or "custom_dataset" in cfg:
        return None
    if path in FILE_BUILDERS:
        kwargs = cfg.get("dataset_kwargs") or {}
        absent = [f for f in _files(kwargs.get("data_files")) if not Path(f).expanduser().exists()]
        return f"data file {absent[0]} is not here" if absent else None
    if Path(path).expanduser().exists():
        return None
    if hub_dataset_cached(path):
        return None
    return f"dataset {path} is not in the local Hugging Face cache"


# -- the checks ---------------------------------------------------------------------------------
def local_task_names(domains: Iterable[str], kinds: Sequence[str]) -> list[str]:
    return [task_name(kind, domain) for kind in kinds for domain in domains]


def _roots(task_paths: Sequence[str | os.PathLike]) -> list[Path]:
    roots = [Path(p).expanduser() for p in task_paths]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise DataError(f"lm-eval task path {missing[0]} does not exist; pass a directory (or YAML "
                        "file) holding lm-eval task configs")
    builtin = builtin_task_dir()
    return roots + ([builtin] if builtin is not None else [])


def _known_to_lm_eval(names: Sequence[str], task_paths: Sequence[str | os.PathLike]) -> set[str]:
    """Names lm-eval's own index knows (slow, ~10 s: used only before refusing a name)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return set()
    with quiet_lm_eval():
        manager = TaskManager(include_path=[str(p) for p in task_paths] or None)
    return {n for n in names if n in manager.all_tasks}


def check_tasks(names: Sequence[str], task_paths: Sequence[str | os.PathLike] = ()) -> None:
    """Raise UnavailableTaskError, in one line naming every problem task, unless each of `names`
    ('local' aside) is known and has its data on this machine. No model, no lm-eval run."""
    if names and builtin_task_dir() is None:
        raise UnavailableTaskError(f"lm-eval tasks ({', '.join(names)}) need lm-eval, which is not "
                                   "installed: pip install 'grape-moe[eval]'")
    wanted = [n for n in dict.fromkeys(names) if n != LOCAL_TASKS]
    if not wanted:
        return
    files = TaskFiles(_roots(task_paths))
    problems: dict[str, str] = {}
    for name in wanted:
        leaves = files.resolve(name)
        if leaves is None:
            problems[name] = "unknown"
            continue
        reasons = [(leaf.get("task"), missing_data(leaf)) for leaf in leaves]
        bad = [(task, why) for task, why in reasons if why]
        if bad:
            task, why = bad[0]
            problems[name] = why if task == name else \
                f"{len(bad)} of its {len(leaves)} tasks cannot, e.g. {task}: {why}"
    unknown = [n for n, why in problems.items() if why == "unknown"]
    for name in _known_to_lm_eval(unknown, task_paths) if unknown else ():
        del problems[name]  # defined in a way the text scan does not see; let lm-eval run it
    if problems:
        listed = "; ".join(f"{n} ({'not an lm-eval task here' if why == 'unknown' else why})"
                           for n, why in problems.items())
        raise UnavailableTaskError(
            f"cannot run lm-eval task(s) offline: {listed}. See `grape eval --list-tasks`; use "
            "'local', tasks under --task-path, or download the data first")


def check_eval_tasks(config, docs: Mapping[str, Sequence[str]]) -> None:
    """Everything EvalConfig.tasks needs, checked before the model runs: named tasks known and
    their data here (check_tasks), and local tasks buildable from `docs` (a dry build, cheap)."""
    if not config.tasks:
        return
    check_tasks(config.tasks, config.task_paths)
    if LOCAL_TASKS in config.tasks:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="grape-tasks-check-") as tmp:
            build_local_tasks(docs, tmp, config.local_task_examples, config.seed,
                              config.local_task_kinds)


def available_tasks(task_paths: Sequence[str | os.PathLike], domains: Iterable[str],
                    kinds: Sequence[str]) -> dict[str, list[str]]:
    """What can run here, by source: {'local': [...], 'task path': [...], 'cached': [...]}."""
    roots = _roots(task_paths)
    mine = TaskFiles(roots[:len(task_paths)])
    user = sorted({n for p in mine.texts for n in _names(mine.cfg(p)) if not missing_data(mine.cfg(p))})
    builtin = TaskFiles(roots[len(task_paths):])
    cached: set[str] = set()
    for repo in cached_hub_datasets():
        for path in builtin.mentioning(repo):
            cfg = builtin.cfg(path)
            if cfg.get("dataset_path") == repo and "task" in cfg and not missing_data(cfg):
                cached |= set(_names(cfg))
    return {"local": local_task_names(domains, kinds), "task path": user, "cached": sorted(cached)}


def _names(cfg: Mapping[str, Any]) -> list[str]:
    name = cfg.get("group") or cfg.get("task")
    return [name] if isinstance(name, str) else []


__all__ = ["UnavailableTaskError", "available_tasks", "cache_roots", "check_eval_tasks", "check_tasks",
           "local_task_names", "missing_data"]
