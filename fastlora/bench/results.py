"""Results of ``python -m fastlora bench``: one flat row per measurement, appended to a results folder.

A row is a dict with the keys of :data:`KEYS`. Suites fill ``op``, ``provider``, ``role``, ``shape``,
``dtype``, ``metric``, ``value``, ``unit`` (and ``device`` when it is not this CPU, ``extra`` for anything
else, JSON-able); :func:`stamp` adds the suite, fastlora's version, the git commit of the checkout
("unknown" outside one), the run id and the time. ``role`` says what the provider is in the comparison:
"fastlora", "reference" (the torch reference) or "peer" (what users run today: bitsandbytes, PEFT,
transformers, torch's own bf16 linear); the speedup charts divide each peer time by each fastlora time of the
same op, shape, dtype and device.

The folder holds ``results.csv`` (appended, header written once; ``extra`` as a JSON string) and
``results.json`` (``{"rows": [...]}``, rewritten with the new rows appended).
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess

KEYS = ("run_id", "time", "suite", "op", "provider", "role", "shape", "dtype", "device", "metric", "value", "unit",
        "fastlora_version", "git_commit", "extra")
ROLES = ("fastlora", "reference", "peer")
CSV_NAME = "results.csv"
JSON_NAME = "results.json"


@functools.cache
def git_commit() -> str:
    """The commit of the git checkout fastlora is imported from, or "unknown" (an installed wheel, no git)."""
    here = pathlib.Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and len(commit) == 40 else "unknown"


def cpu_name() -> str:
    return f"cpu ({platform.machine() or 'unknown'})"


def row(op: str, provider: str, role: str, shape: str, dtype: str, metric: str, value: float, unit: str, *,
        device: str | None = None, **extra) -> dict:
    """One measurement as a suite reports it (not yet stamped)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {"op": op, "provider": provider, "role": role, "shape": shape, "dtype": dtype,
            "device": device or cpu_name(), "metric": metric, "value": float(value), "unit": unit, "extra": extra}


def stamp(rows: list[dict], suite: str) -> list[dict]:
    """``rows`` completed with the common keys, in :data:`KEYS` order."""
    import fastlora

    now = datetime.datetime.now(datetime.timezone.utc)
    common = {"run_id": now.strftime("%Y%m%dT%H%M%S.%fZ"), "time": now.isoformat(timespec="seconds"),
              "suite": suite, "fastlora_version": fastlora.__version__, "git_commit": git_commit()}
    out = []
    for r in rows:
        full = {**common, "device": cpu_name(), "extra": {}, **r}
        missing = [k for k in KEYS if k not in full]
        if missing:
            raise ValueError(f"result row lacks {missing}: {r}")
        out.append({k: full[k] for k in KEYS})
    return out


def check_folder(folder: pathlib.Path) -> str | None:
    """None when results can be written under ``folder`` (it, or the folder it would be created in, is a
    writable directory), else why not. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"results folder {str(folder)!r} cannot be created: {str(existing)!r} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"results folder {str(folder)!r} cannot be written: no write permission on {str(existing)!r}"
    return None


def append(folder: pathlib.Path, rows: list[dict]) -> None:
    """Append stamped ``rows`` to the folder's CSV and JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / CSV_NAME
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KEYS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, "extra": json.dumps(r["extra"], sort_keys=True)})
    json_path = folder / JSON_NAME
    old = load_json(json_path) if json_path.exists() else []
    json_path.write_text(json.dumps({"rows": old + rows}, indent=1) + "\n")


def load_json(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def load_csv(path: pathlib.Path) -> list[dict]:
    """Rows of a results CSV with ``value`` as float and ``extra`` decoded."""
    with path.open(newline="") as f:
        return [{**r, "value": float(r["value"]), "extra": json.loads(r["extra"] or "{}")} for r in csv.DictReader(f)]


def load(folder: pathlib.Path) -> list[dict]:
    """Every row of the folder (from its JSON, else its CSV); [] when it holds none."""
    if (folder / JSON_NAME).exists():
        return load_json(folder / JSON_NAME)
    if (folder / CSV_NAME).exists():
        return load_csv(folder / CSV_NAME)
    return []


def speedups(rows: list[dict]) -> list[dict]:
    """For every time measurement ("ms") of a fastlora provider with a peer of the same suite, run, op,
    shape, dtype and device: {"op", "label", "fastlora", "peer", "speedup" = peer ms / fastlora ms}."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["unit"] != "ms":
            continue
        key = (r["suite"], r["run_id"], r["op"], r["shape"], r["dtype"], r["device"])
        groups.setdefault(key, {}).setdefault(r["role"], []).append(r)
    out = []
    for (suite, _, op, shape, dtype, device), by_role in groups.items():
        for fast in by_role.get("fastlora", []):
            for peer in by_role.get("peer", []):
                if fast["value"] > 0:
                    out.append({"suite": suite, "op": op, "shape": shape, "dtype": dtype, "device": device,
                                "fastlora": fast["provider"], "peer": peer["provider"],
                                "speedup": peer["value"] / fast["value"]})
    return out
