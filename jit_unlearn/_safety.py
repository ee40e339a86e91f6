"""What keeps a model safe while a method runs: a snapshot that puts it back bitwise when anything fails
(a KeyboardInterrupt included), `protected`, which makes committing the result the last thing a
method does, one-sync NaN/inf checks, and `BatchChecks` for the data and labels read batch by batch."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from . import _checks as checks
from ._utils import ModelState, logits_of

__all__ = ["Snapshot", "protected", "all_finite", "BatchChecks", "LabelTap"]

T = TypeVar("T")
_FUSED_CHECK_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def all_finite(
    tensors: Iterable[torch.Tensor | None], found: torch.Tensor | None = None, one: torch.Tensor | None = None
) -> bool:
    """True when no element of `tensors` (None entries skipped) is inf or NaN; one host sync.
    `found` / `one`: float32 [1] buffers on the tensors' device to reuse (found must be 0)."""
    tensors = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return True
    device = tensors[0].device
    if all(t.device == device and t.dtype in _FUSED_CHECK_DTYPES for t in tensors):
        # One fused pass over every tensor: torch's foreach inf/NaN check (the AMP grad-scaler's),
        # with the scale 1.0, which leaves every value bitwise as it was.  A device or dtype that
        # kernel does not cover (e.g. bfloat16 on some backends) takes the generic path below.
        found = torch.zeros(1, dtype=torch.float32, device=device) if found is None else found
        one = torch.ones(1, dtype=torch.float32, device=device) if one is None else one
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
            return not bool(found.item())
        except (RuntimeError, NotImplementedError):
            pass
    # max |t| is inf or NaN exactly when some element is (amax propagates NaN)
    maxima = [t.abs().amax().to(device, torch.float32) for t in tensors]
    return bool(torch.isfinite(torch.stack(maxima)).all())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of its element size (bitwise comparison: -0.0 != 0.0,
    equal NaNs are equal)."""
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])
    return t


class Snapshot:
    """A copy of what a method may change: every parameter and buffer value, each parameter's `.grad`
    (the caller's tensor itself), each module's train/eval flag, the grad mode, and optionally a
    caller's optimizer state.  `restore()` puts all of it back bitwise.  Costs one copy of the
    model's state.

    Args:
        model: the model.  state: its ModelState, when the caller has one already.
        optimizer: a torch.optim.Optimizer whose state (momentum, moments, step counts) is restored too.
    """

    def __init__(
        self, model: torch.nn.Module, state: ModelState | None = None, optimizer: torch.optim.Optimizer | None = None
    ):
        self.model = model
        self.state = ModelState(model) if state is None else state
        tensors = itertools.chain(self.state.params, self.state.buffers)
        self.saved = [(t, t.detach().clone()) for t in tensors]
        self.grads = [(p, p.grad) for p in self.state.params]
        self.training = [m.training for m in self.state.modules]
        self.grad_enabled = torch.is_grad_enabled()
        self.optimizer = optimizer
        self.optimizer_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())

    def restore(self) -> None:
        """Put everything back.  A KeyboardInterrupt that arrives meanwhile (a second Ctrl-C) does not
        stop it half-way: the restore starts over and completes (it is idempotent)."""
        while True:
            try:
                self._restore()
                return
            except KeyboardInterrupt:
                continue

    def _restore(self) -> None:
        torch.set_grad_enabled(self.grad_enabled)
        with torch.no_grad():
            for t, saved in self.saved:
                t.copy_(saved)
        for p, g in self.grads:
            p.grad = g
        for m, flag in zip(self.state.modules, self.training):
            m.training = flag
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)

    def changed(self) -> bool:
        """True when some parameter differs bitwise from its value at the snapshot (one host sync)."""
        params = self.saved[: len(self.state.params)]
        if not params:
            return False
        flags = [torch.ne(_bits(t.detach()), _bits(s)).any() for t, s in params if t.numel()]
        return bool(torch.stack([f.to(flags[0].device) for f in flags]).any()) if flags else False

    def _names(self) -> dict[int, str]:
        named = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        return {id(t): n for n, t in named}

    def newly_non_finite(self) -> list[str]:
        """Names of the floating parameters and buffers in which an element that was finite at the
        snapshot is NaN or inf now (one host sync when there is none)."""
        floating = [(t, s) for t, s in self.saved if t.is_floating_point()]
        if all_finite(t for t, _ in floating):
            return []
        names = self._names()
        return [
            names.get(id(t), "?")
            for t, s in floating
            if bool((~torch.isfinite(t.detach()) & torch.isfinite(s.to(t.device))).any())
        ]

    def check_finite(self, method: str, hint: str | Callable[[], str] = "") -> None:
        """Raise FloatingPointError when the run wrote NaN or inf where the model held finite values;
        `hint` (or what it returns, when callable) ends the message."""
        bad = self.newly_non_finite()
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            hint = hint() if callable(hint) else hint
            raise FloatingPointError(
                f"{method}: the run wrote non-finite values (NaN or inf) into {bad[:5]}{more}; the model was restored"
                + (hint and f"; {hint}")
            )


def protected(
    model: torch.nn.Module,
    body: Callable[[Snapshot], T],
    *,
    method: str,
    state: ModelState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    hint: str | Callable[[], str] = "",
    check_finite: bool = True,
) -> T:
    """Run `body(snapshot)` on `model` and commit its result, or put the model back.

    The body does all the work, the report included; then the parameters and buffers are checked
    for values that turned NaN or inf (FloatingPointError, with `hint` appended).  If the body or
    the check raises anything (KeyboardInterrupt included), the snapshot is restored and the
    exception re-raised.  Returning the body's result from inside the guarded block is the commit:
    nothing can be interrupted after it in this frame, so a caller that writes
    `return protected(...)` never lets an exception out with a modified model.

    Args:
        model, state, optimizer: what the Snapshot saves.  method: the name in error messages.
        check_finite: False skips the NaN/inf check (for a body that changes no value).
    Returns:
        what `body` returned.
    """
    grad_enabled, snapshot = torch.is_grad_enabled(), None
    try:
        snapshot = Snapshot(model, state, optimizer)
        result = body(snapshot)
        if check_finite:
            snapshot.check_finite(method, hint)
        return result
    except BaseException:
        if snapshot is None:  # interrupted while copying (torch's copies toggle the grad mode)
            torch.set_grad_enabled(grad_enabled)
        else:
            snapshot.restore()
        raise


class BatchChecks:
    """The value checks of the batches a method reads from one data argument: inputs without NaN or
    inf, and class-index labels in [0, K).  A CPU batch is checked at once; a batch on another
    device is checked without a host sync (its flag is kept, its labels clamped into range so no
    out-of-range index reaches a kernel), and `verify()` raises for the first bad batch.

    Args:
        name: the data argument, as error messages call it ("forget", "retain", ...).
        defer: defer the value checks of every batch (True), of none (False), or of the batches
            not on the CPU (None, the default).
    """

    def __init__(self, name: str, *, defer: bool | None = None):
        self.name = name
        self.defer = defer
        self._pending: list[tuple[int, str, torch.Tensor]] = []

    def _deferred(self, t: torch.Tensor) -> bool:
        return t.device.type != "cpu" if self.defer is None else self.defer

    def inputs(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """`x` (a batch's inputs), after checking that a floating input holds no NaN or inf."""
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and not x.is_meta:
            ok = torch.isfinite(x).all()
            if self._deferred(x):
                self._pending.append((batch, "inputs", ok))
            elif not bool(ok):
                raise ValueError(self._nan_message(batch))
        return x

    def labels(self, y, batch: int, batch_size: int, num_classes: int | None) -> torch.Tensor:
        """The labels of a batch as int64 [B], checked by `_checks.labels` (see there); deferred
        labels come back clamped into [0, num_classes)."""
        defer = isinstance(y, torch.Tensor) and self._deferred(y)
        y, ok = checks.labels(y, self.name, batch=batch, batch_size=batch_size, num_classes=num_classes, defer=defer)
        if ok is not None:
            self._pending.append((batch, f"labels:{num_classes}", ok))
        return y

    def _nan_message(self, batch: int) -> str:
        return f"{checks.batch_name(self.name, batch)} holds NaN or inf in its inputs; clean the data first"

    def verify(self) -> None:
        """Raise ValueError for the first batch whose deferred check failed (one host sync per device)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list] = {}
        for item in pending:
            by_device.setdefault(item[2].device, []).append(item)
        failures = []
        for items in by_device.values():
            oks = torch.stack([ok for _, _, ok in items]).tolist()
            failures += [(batch, what) for (batch, what, _), ok in zip(items, oks) if not ok]
        if not failures:
            return
        batch, what = min(failures)
        if what == "inputs":
            raise ValueError(self._nan_message(batch))
        k = what.split(":")[1]
        raise ValueError(
            f"{checks.batch_name(self.name, batch)} has labels outside [0, {k}) for a model with {k} outputs "
            "(ignore_index labels are not supported: drop those samples)"
        )


class LabelTap:
    """Checks a batch's labels against the logits of the model's forward on that batch's inputs, from a
    forward hook, so the check comes before a loss written elsewhere (a `FinetuneObjective`) reads
    them.  `expect(x, y, data, index)` registers a batch; `remove()` takes the hook off.

    Args:
        model: the model whose top-level forward is watched.
    """

    def __init__(self, model: torch.nn.Module):
        self._expected: dict[int, tuple] = {}
        self._handle = model.register_forward_hook(self._hook)

    def expect(self, x: torch.Tensor, y: torch.Tensor, data: BatchChecks, index: int) -> None:
        """Check `y` when the model next runs on `x` (the same tensor object)."""
        self._expected[id(x)] = (x, y, data, index)

    def _hook(self, module, args, output) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        entry = self._expected.get(id(args[0]))
        if entry is None or entry[0] is not args[0]:
            return
        x, y, data, index = entry
        logits = logits_of(output)
        if isinstance(logits, torch.Tensor) and logits.dim() == 2:
            data.labels(y, index, x.shape[0], logits.shape[1])

    def remove(self) -> None:
        self._handle.remove()
        self._expected.clear()
