"""Checks of error and warning messages: they name the key (the offending obs/obsm/layers key,
argument or file, written as in the message) and the essential words of the fix, in any order
and any case, without pinning the sentence around them."""

from __future__ import annotations

import contextlib
import warnings

import pytest


def message_of(err: BaseException) -> str:
    """The message of ``err`` (a KeyError's own text, not its repr)."""
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def assert_names(message: str, key: str, *fix: str) -> None:
    """``message`` holds ``key`` as written and every word of ``fix`` (case-insensitive)."""
    assert key in message, f"the key {key!r} is not named in: {message}"
    lowered = message.lower()
    missing = [word for word in fix if word.lower() not in lowered]
    assert not missing, f"the fix {missing} is not named in: {message}"


@contextlib.contextmanager
def raises_naming(error, key: str, *fix: str):
    """``pytest.raises(error)`` whose message names ``key`` and ``fix``."""
    with pytest.raises(error) as info:
        yield info
    assert_names(message_of(info.value), key, *fix)


@contextlib.contextmanager
def warns_naming(category, key: str, *fix: str):
    """A warning of ``category`` whose message names ``key`` and ``fix``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    messages = [str(w.message) for w in caught if issubclass(w.category, category)]
    assert messages, f"no {category.__name__} was issued"
    for message in messages:
        try:
            assert_names(message, key, *fix)
            return
        except AssertionError:
            continue
    assert_names(" | ".join(messages), key, *fix)  # fails, showing every message
