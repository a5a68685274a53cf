"""Checks of configuration fields, shared by the dataclasses that validate themselves (``LGVQConfig``,
``training.config``): each raises :class:`lgvq_fast.errors.ConfigError` naming the field as ``section.field``."""
import math

from lgvq_fast.errors import ConfigError


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def are_numbers(value, n):
    return isinstance(value, (tuple, list)) and len(value) == n and all(is_number(v) for v in value)


def check_ints(obj, section, names, least):
    """Each field of ``names`` is an integer >= ``least`` (1: a count; 0: an interval where 0 turns it off)."""
    for name in names:
        value = getattr(obj, name)
        if not is_int(value) or value < least:
            what = "a positive integer" if least == 1 else "an integer >= 0 (0 turns it off)"
            raise ConfigError(f"{section}.{name} must be {what}, got {value!r}")


def check_range(obj, section, names, low, high, what):
    """Each field of ``names`` is a finite number in [low, high]; ``what`` words the range in the message."""
    for name in names:
        value = getattr(obj, name)
        if not (is_number(value) and low <= value <= high):
            raise ConfigError(f"{section}.{name} must be {what}, got {value!r}")


def check_choice(obj, section, name, choices, what=None):
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be {what or ', '.join(map(str, choices[:-1])) + ' or ' + str(choices[-1])}"
                          f", got {value!r}")
