"""What each optional ecosystem dependency adds: install size and import time.

Method. For each package (``mlflow-skinny``, ``tensorboard``, ``flwr-datasets`` by
default; ``--packages`` names others) the script walks the installed distributions'
requirements (``importlib.metadata``; markers evaluated, extras followed only where a
requirement names them) to find the package's dependency closure, and removes every
distribution that fedgraft's default install already needs (the closure of
``fedgraft``'s own requirements, no extras). What is left is what installing the
package adds; its size is the sum of the sizes of those distributions' installed
files (``RECORD``; byte-compiled caches written later are not counted).

Import time is measured in fresh interpreters, ``--repeats`` times each, median
reported: ``cold`` imports the module alone; ``on_top`` first imports what a
fedgraft coordinator already holds (``torch``, ``transformers``, ``flwr``, ``peft``)
and times only the module's import after it: the time the tracking or partitioning
code adds to a run. The module imported is the one fedgraft imports
(``mlflow.tracking``, ``torch.utils.tensorboard``, ``flwr_datasets.partitioner``).

Import times depend on how busy the machine is: each object also carries the 1-minute
load average before and after its timings (``load_average``).

Output: one JSON object per package on stdout (``package``, ``module``,
``added_distributions``, ``added_bytes``, ``added_megabytes``,
``import_seconds_cold``, ``import_seconds_on_top``, ``repeats``, ``load_average``,
``command``). Run
from the repository root, in the virtual environment that has the extras::

    .venv/bin/python benchmarks/dependency_cost.py
    .venv/bin/python benchmarks/dependency_cost.py --repeats 5 --packages mlflow-skinny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: The package, the module fedgraft imports from it.
DEFAULT_PACKAGES = {
    "mlflow-skinny": "mlflow.tracking",
    "tensorboard": "torch.utils.tensorboard",
    "flwr-datasets": "flwr_datasets.partitioner",
}
#: What a coordinator process has imported before any tracking starts.
BASELINE_IMPORTS = ("torch", "transformers", "flwr", "peft")


def _requirements(name: str, extras: Iterable[str]) -> list[str]:
    """Installed requirements of distribution ``name`` with ``extras`` enabled."""
    try:
        declared = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    wanted = []
    for text in declared:
        requirement = Requirement(text)
        environments = [{**default_environment(), "extra": e} for e in ("", *extras)]
        if requirement.marker is None or any(
            requirement.marker.evaluate(env) for env in environments
        ):
            wanted.append(text)
    return wanted


def closure(name: str, extras: Iterable[str] = ()) -> set[str]:
    """Canonical names of ``name`` and every installed distribution it needs."""
    seen: set[str] = set()
    pending = [(name, tuple(extras))]
    while pending:
        current, current_extras = pending.pop()
        key = canonicalize_name(current)
        if key in seen:
            continue
        try:
            metadata.distribution(current)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for text in _requirements(current, current_extras):
            requirement = Requirement(text)
            pending.append((requirement.name, tuple(requirement.extras)))
    return seen


def installed_bytes(name: str) -> int:
    """Bytes of distribution ``name``'s installed files (from its RECORD)."""
    files = metadata.distribution(name).files or []
    total = 0
    for file in files:
        path = file.locate()
        if path.is_file():
            total += path.stat().st_size
    return total


def _timed_import(module: str, baseline: Iterable[str]) -> float:
    program = (
        "import time\n"
        + "".join(f"import {name}\n" for name in baseline)
        + f"start = time.perf_counter()\nimport {module}\n"
        + "print(time.perf_counter() - start)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    return float(finished.stdout.strip().splitlines()[-1])


def measure(package: str, module: str, repeats: int) -> dict[str, object]:
    """Install size and import times of ``package`` (see the module docstring)."""
    added = sorted(closure(package) - closure("fedgraft"))
    size = sum(installed_bytes(name) for name in added)
    load_before = os.getloadavg()[0]
    cold = [_timed_import(module, ()) for _ in range(repeats)]
    on_top = [_timed_import(module, BASELINE_IMPORTS) for _ in range(repeats)]
    return {
        "package": package,
        "version": metadata.version(package),
        "module": module,
        "added_distributions": added,
        "added_bytes": size,
        "added_megabytes": round(size / 1e6, 1),
        "import_seconds_cold": round(statistics.median(cold), 3),
        "import_seconds_on_top": round(statistics.median(on_top), 3),
        "repeats": repeats,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    """Print one JSON object per package."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--packages",
        default=",".join(DEFAULT_PACKAGES),
        help="comma-separated distribution names (modules for the defaults are "
        "known; another package's module is its name with - as _)",
    )
    args = parser.parse_args()
    command = " ".join(["python", *sys.argv])
    for package in args.packages.split(","):
        module = DEFAULT_PACKAGES.get(package, package.replace("-", "_"))
        row = measure(package, module, args.repeats)
        print(json.dumps({**row, "command": command}), flush=True)


if __name__ == "__main__":
    main()
