"""Inject a KeyboardInterrupt at the k-th step of a call, the way a Ctrl-C arrives: at a line of
jit_unlearn's own code or of contextlib (where context managers enter and exit), or on entry to any
Python function (torch's included).  Used by tests/test_hardening_interrupts.py."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import jit_unlearn

_WATCHED = (os.path.dirname(jit_unlearn.__file__) + os.sep, contextlib.__file__)
# torch.func keeps a stack of transforms in C++ that its Python code pushes and pops; an interrupt
# there breaks that stack for the rest of the process (a torch limitation), so the injection skips
# everything that runs inside a torch.func call.
_UNSAFE = (os.sep + os.path.join("torch", "_functorch") + os.sep,)


class _Injector:
    """A trace function that counts events and raises KeyboardInterrupt at event number `at`
    (never, when `at` is None).  Python turns tracing off after a trace function raises, so one
    run gets one interrupt."""

    def __init__(self, at: int | None):
        self.at, self.count, self.where = at, 0, None

    def _event(self, frame) -> None:
        self.count += 1
        if self.count == self.at:
            self.where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            raise KeyboardInterrupt(f"injected at {self.where}")

    @staticmethod
    def _unsafe(frame) -> bool:
        # inside a call of torch.func's code (its transforms run the function they wrap inside it)
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in _UNSAFE):
                return True
            frame = frame.f_back
        return False

    def __call__(self, frame, event, arg):
        if event == "call":
            if not self._unsafe(frame):
                self._event(frame)
            return self if frame.f_code.co_filename.startswith(_WATCHED) else None
        if event == "line" and not self._unsafe(frame):
            self._event(frame)
        return self


def count_events(call: Callable[[], object]) -> int:
    """Events of one uninterrupted run of `call`."""
    injector = _Injector(None)
    sys.settrace(injector)
    try:
        call()
    finally:
        sys.settrace(None)
    return injector.count


def interrupted(call: Callable[[], object], at: int) -> tuple[object, str | None]:
    """Run `call` with an interrupt at event `at`: (its result, None), or (None, where it was
    interrupted) when it raised KeyboardInterrupt."""
    injector = _Injector(at)
    sys.settrace(injector)
    try:
        result = call()
    except KeyboardInterrupt:
        return None, injector.where
    finally:
        sys.settrace(None)
    return result, None


def points(total: int, *, tail: int = 200, stride: int = 1) -> list[int]:
    """Events to interrupt at: every `stride`-th of the run, and every one of its last `tail` (where
    the result is committed)."""
    return sorted(set(range(1, total + 1, stride)) | set(range(max(1, total - tail + 1), total + 1)))


class InterruptingBatches:
    """A data source of known length (that of `batches`) that hands out `batches` three times over
    and raises KeyboardInterrupt instead of the one at position `at` (0-based): a Ctrl-C in the
    middle of a run's data loading."""

    def __init__(self, batches: list, at: int):
        self.batches, self.at = batches, at

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches * 3):
            if i == self.at:
                raise KeyboardInterrupt
            yield b
