"""A queue's settings as one JSON object: how the stores keep QueueSettings in a column.

Only the settings that differ from their default are written, so a queue with default
settings is stored as None (SQL NULL) and a setting added later reads as its default from
rows written before it existed. Reading is strict about what it finds: a value of the
wrong type or out of bounds is damage, not a default.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from qm_server.lifecycle import DEFAULT_SETTINGS, QueueSettings, RetryPolicy, check_settings

_DEFAULTS: dict[str, Any] = dataclasses.asdict(DEFAULT_SETTINGS)


def settings_to_json(settings: QueueSettings) -> str | None:
    """The settings that differ from the defaults, as JSON; None when none does."""
    if settings.is_default:
        return None
    fields = dataclasses.asdict(settings)
    changed = {name: value for name, value in fields.items() if value != _DEFAULTS[name]}
    return json.dumps(changed, sort_keys=True, separators=(",", ":"))


def settings_from_json(text: str | None) -> QueueSettings:
    """The settings written by settings_to_json. ValueError for anything it did not write."""
    if text is None:
        return DEFAULT_SETTINGS
    fields = json.loads(text)
    if not isinstance(fields, dict) or not set(fields) <= set(_DEFAULTS):
        raise ValueError(f"not queue settings: {text!r}")
    retry = fields.pop("retry", None)
    if retry is not None:
        if not isinstance(retry, dict) or not set(retry) <= set(_DEFAULTS["retry"]):
            raise ValueError(f"not a retry policy: {text!r}")
        multiplier = retry.get("multiplier", DEFAULT_SETTINGS.retry.multiplier)
        if isinstance(multiplier, int) and not isinstance(multiplier, bool):
            retry["multiplier"] = float(multiplier)  # JSON writes 3.0 as 3 in some hands
        fields["retry"] = RetryPolicy(**retry)
    settings = dataclasses.replace(DEFAULT_SETTINGS, **fields)
    _check_types(settings, DEFAULT_SETTINGS, text)
    _check_types(settings.retry, DEFAULT_SETTINGS.retry, text)
    try:
        check_settings(settings)
    except Exception as exc:
        raise ValueError(f"queue settings out of bounds ({exc}): {text!r}") from exc
    return settings


def _check_types(found: Any, default: Any, text: str) -> None:
    for field in dataclasses.fields(found):
        value, kind = getattr(found, field.name), type(getattr(default, field.name))
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"queue setting {field.name} is not a {kind.__name__}: {text!r}")
