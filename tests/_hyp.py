"""Example counts for tests that set their own ``max_examples``.

A test whose examples are expensive asks for fewer than the profile's default
(60); ``examples(n)`` scales that count with the loaded profile, so the
``explore`` profile (docs/development.md) explores those tests too.
"""

from __future__ import annotations

from hypothesis import settings

_DEFAULT_EXAMPLES = 60


def examples(n: int) -> int:
    """``n`` examples under the default profile, proportionally more under ``explore``."""
    return max(n, round(n * settings.default.max_examples / _DEFAULT_EXAMPLES))
