"""Loading task records: local JSONL files, or Hugging Face Hub datasets that fail fast offline.

Why the care for the Hub (docs/software_stack.md#hugging-face-hub-offline): without network,
`datasets.load_dataset` retries for ~23 s before failing with an opaque ConnectionError. We probe the host
first and, when it is unreachable, only look in the local cache, then name the recipe field and a local
alternative.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from spo_cli.errors import SpoUserError

_DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def load_jsonl_records(path: str | os.PathLike, field: str) -> list[dict]:
    """All records of a JSONL file (one JSON object per line; blank lines skipped).

    `field` is the recipe field that named the file (e.g. "task.train_file"), quoted in errors.
    Raises SpoUserError for a missing/unreadable file or a line that is not a JSON object ("file:line").
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_lines = f.readlines()
    except FileNotFoundError:
        raise SpoUserError(f"`{field}`: file not found: {path}") from None
    except OSError as e:
        raise SpoUserError(f"`{field}`: cannot read {path}: {e.strerror or e}") from None
    records = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            # json.loads on bytes detects UTF-8/16/32, so decoding errors land here too.
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            message = f"{path}:{lineno}: invalid JSON ({e}) in the file named by `{field}`"
            raise SpoUserError(message) from None
        if not isinstance(record, dict):
            raise SpoUserError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__} "
                f"(file named by `{field}`)"
            )
        records.append(record)
    return records


def text_field(row: dict, name: str, where: str, numbers: bool = False) -> str:
    """`row[name]`, a string; SpoUserError starting with `where` (e.g. "data.jsonl: record 3") when the field is missing
    or holds another type. `numbers`: an int or float is read as its decimal text (AIME answers such as 25)."""
    value = row.get(name)
    if value is None:
        keys = ", ".join(sorted(row)) or "none"
        raise SpoUserError(f"{where} has no field {name!r} (it has: {keys})")
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    expected = "a string or a number" if numbers else "a string"
    raise SpoUserError(f"{where}: field {name!r} holds {type(value).__name__} {shown}, expected {expected}")


def _hub_host_port() -> tuple[str, int]:
    url = urlsplit(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    return host, url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub host ($HF_ENDPOINT or huggingface.co) opens within `timeout` s.

    Only a probe (DNS + connect), no HTTP; meant to skip the Hub clients' long retry loops when offline.
    """
    host, port = _hub_host_port()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # includes socket.gaierror (DNS) and TimeoutError
        return False


def _offline_env() -> bool:
    return any(
        os.environ.get(name, "").upper() in _TRUE_VALUES for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force datasets/huggingface_hub offline for the duration (cache-only lookups).

    Both libraries read HF_HUB_OFFLINE into module constants at import time, so setting the env var
    now would do nothing; patch the constants and restore them. Not thread-safe (module globals).
    """
    import datasets.config
    import huggingface_hub.constants

    targets = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in targets if hasattr(module, name)]
    try:
        for module, name, _ in saved:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def load_hub_records(
    dataset_name: str, config: str | None, split: str, field: str, local_hint: str
) -> list[dict]:
    """All records of one split of a Hub dataset, via `datasets.load_dataset`.

    When offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or `hub_reachable()` false) only the
    local HF cache is tried. Failure raises SpoUserError naming `field` (the recipe field holding
    the dataset name) and `local_hint` (a suggested local-file setting, e.g.
    "task.train_file: ../shared/data/gsm8k/train.jsonl").
    """
    import datasets

    if _offline_env():
        online, reason = False, "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    else:
        online = hub_reachable()
        host, port = _hub_host_port()
        reason = f"no connection to {host}:{port}"
    try:
        if online:
            dataset = datasets.load_dataset(dataset_name, config, split=split)
        else:
            with _hub_offline():
                dataset = datasets.load_dataset(dataset_name, config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        if online:
            raise SpoUserError(
                f"could not load dataset '{dataset_name}' (from `{field}`): {type(e).__name__}: {e}; "
                f"a local JSONL file also works, e.g. `{local_hint}`"
            ) from None
        raise SpoUserError(
            f"cannot reach the Hugging Face Hub to load dataset '{dataset_name}' (from `{field}`); "
            f"use a local JSONL file instead, e.g. `{local_hint}` ({reason}; not in the local HF cache)"
        ) from None
    return dataset.to_list()
