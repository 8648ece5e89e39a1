"""Which escape for which stall, escalation, budget, cooldown, back-off and stopping (pure logic).

Each diagnosis kind has a ladder of escape steps. The first escape from a stall takes the first rung
whose step can act here; each failed escape (rolled back) moves one rung up, and past the top the
ladder starts again with every step made stronger. After ``max_failures`` consecutive failed escapes
from the same point the policy concludes that the run sits in the best basin it can find and stops
escaping there (the stopping rule of Jin et al. 2017), until the run improves by itself.

Every failed escape also makes the next one wait: ``cooldown_steps`` after the first failure, twice
that after the second, and so on, until an escape is kept. A run that no escape helps (a healthy one,
or one stuck beyond reach) therefore pays at most ``1 + log2(T / cooldown_steps + 1)`` failed
trials in ``T`` steps, however often it stalls: its waste grows like ``log(T)``, not like ``T``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_escape._validation import check_nonnegative_int, check_positive_int
from lightning_escape.coordinates import PerCoordinateSteps
from lightning_escape.escapes import (
    BatchSizeChange,
    EscapeContext,
    EscapeStep,
    GradientNoise,
    LRKick,
    NegativeCurvatureStep,
    OrthogonalRecurrence,
    Perturb,
    Restandardize,
    TrustRatioStep,
)

__all__ = ["ESCAPABLE", "EscapePolicy", "check_ladders", "default_ladders"]

#: Kinds an escape can answer (``healthy`` needs none; ``diverging`` is rolled back instead).
ESCAPABLE = (
    "plateau",
    "saddle",
    "local_minimum",
    "symmetric_units",
    "dead_units",
    "vanishing_gradient",
)


def default_ladders(probation_steps: int = 200) -> dict[str, list[EscapeStep]]:
    """The default escape ladder of each kind, most targeted first.

    Calibrated on the constructed problems (``benchmarks/efficacy.py``): a negative-curvature step
    goes straight down a saddle; a perturbation at the scale of a standard initialisation leaves a
    small-initialisation plateau fastest; local minima need jumps the size of the basin, tried at
    two sizes and judged by rollback (basin hopping); exact unit symmetry breaks with any
    asymmetric push; a moderate jump revives dead ReLU units where a large one blows the run up;
    a contracting recurrence is made orthogonal, the initialisation that trains such networks;
    a signal that fades through a deep stack is restandardized layer by layer (each step is
    passed over where it cannot act: no vanilla RNN, or no hidden layer).

    Under SGD, a stall where the gradients of the weight tensors differ in scale by decades (at
    least ``min_spread``, 100: the largest RMS over the smallest) is first given per-coordinate
    step sizes (:class:`~lightning_escape.coordinates.PerCoordinateSteps`), for the rest of the run
    and judged after ``4 * probation_steps``: the stall of attention under SGD, whose query and key
    weights get gradients hundreds of times smaller than its output layer's, which Adam's step
    sizes leave and no window of another escape does. On the other stalls of the benchmark these
    ladders answer (saddles, small-initialisation plateaus, poor basins) the scales span at most
    2.7x, or there is one weight tensor, and the rung is passed over, as it is under any other
    optimizer.

    On a plateau or a saddle that the perturbation does not leave, per-layer trust ratios
    (:class:`~lightning_escape.escapes.TrustRatioStep`) come before isotropic noise and a global
    learning-rate kick, which move the wrong layers when the layers' gradient-to-weight ratios
    span decades. The rung acts only on that evidence (a spread of at least ``min_spread``) and is
    passed over otherwise: one parameter tensor, balanced layers. It comes after the perturbation,
    not before: on the vanishing-signal benchmark (a deep tanh network from a small
    initialisation, ratios spanning several hundredfold) a trust-ratio window tried first helps and
    is kept, but the run then misses the target within the budget, which it reaches after the
    perturbation.

    Args:
        probation_steps: How long noise and batch-size changes last (they act during probation);
            kicks and trust-ratio windows last a quarter of it, and per-coordinate step
            sizes are judged after four times it.

    Returns:
        Fresh step instances, keyed by diagnosis kind.

    Example:
        >>> for step in default_ladders()["saddle"]:
        ...     print(step.describe())
        PerCoordinateSteps(step_size=0.002, decay=0.999, eps=1e-08, min_spread=100.0, probation=800)
        NegativeCurvatureStep(scale=1.0, max_evals=24)
        Perturb(radius=0.5, scale='auto', seed=0)
        TrustRatioStep(trust=0.01, steps=50, min_spread=100.0)
        GradientNoise(eta=0.01, gamma=0.55, steps=200, seed=0)
        >>> [type(step).__name__ for step in default_ladders()["plateau"]]
        ['PerCoordinateSteps', 'Perturb', 'TrustRatioStep', 'GradientNoise', 'LRKick', 'BatchSizeChange']
    """
    kick = max(1, probation_steps // 4)
    return {
        "saddle": [
            PerCoordinateSteps(probation=4 * probation_steps),
            NegativeCurvatureStep(),
            Perturb(radius=0.5),
            TrustRatioStep(trust=0.01, steps=kick),
            GradientNoise(eta=0.01, gamma=0.55, steps=probation_steps),
        ],
        "plateau": [
            PerCoordinateSteps(probation=4 * probation_steps),
            Perturb(radius=0.5),
            TrustRatioStep(trust=0.01, steps=kick),
            GradientNoise(eta=0.01, gamma=0.55, steps=probation_steps),
            LRKick(factor=10.0, steps=kick),
            BatchSizeChange(factor=0.5, steps=probation_steps),
        ],
        "local_minimum": [
            PerCoordinateSteps(probation=4 * probation_steps),
            Perturb(radius=0.5),
            Perturb(radius=1.0),
            LRKick(factor=10.0, steps=kick),
        ],
        "symmetric_units": [
            Perturb(radius=0.2),
            GradientNoise(eta=0.01, gamma=0.55, steps=probation_steps),
        ],
        "dead_units": [
            Perturb(radius=0.3),
            Perturb(radius=0.6),
            LRKick(factor=10.0, steps=kick),
        ],
        "vanishing_gradient": [
            OrthogonalRecurrence(),
            Restandardize(),
            Perturb(radius=0.5),
        ],
    }


def check_ladders(ladders: Any) -> dict[str, list[EscapeStep]]:
    """``ladders`` as lists, or a ``ValueError`` that names the kind, the rung and the value.

    Every escape acts with a fresh copy of its rung, ``type(step)(**step.config())``, so a step
    must be rebuilt whole from its ``config()``: a plain subclass that takes constructor arguments
    and leaves ``config()`` to the base class would act with its defaults instead, silently.

    Example:
        >>> check_ladders({"plateau": [Perturb(0.2)]})
        {'plateau': [Perturb(radius=0.2, scale='auto', seed=0)]}
        >>> check_ladders({"plateau": [Perturb(0.2), "Perturb"]})
        Traceback (most recent call last):
        ...
        ValueError: `ladders['plateau'][1]` must be an EscapeStep, got 'Perturb'.
    """
    if not isinstance(ladders, Mapping):
        raise ValueError(f"`ladders` must be a mapping of kind to escape steps, got {ladders!r}.")
    checked = {}
    for kind, ladder in ladders.items():
        if kind not in ESCAPABLE:
            raise ValueError(
                f"`ladders` keys can be {', '.join(map(repr, ESCAPABLE))}, got {kind!r}."
            )
        # A generator would be spent by the check and leave an empty ladder: lists and tuples only.
        if isinstance(ladder, (EscapeStep, str)) or not isinstance(ladder, Sequence):
            raise ValueError(f"`ladders[{kind!r}]` must be a list of EscapeStep, got {ladder!r}.")
        for rung, step in enumerate(ladder):
            _check_step(f"`ladders[{kind!r}][{rung}]`", step)
        checked[kind] = list(ladder)
    return checked


def _check_step(where: str, step: Any) -> None:
    if not isinstance(step, EscapeStep):
        raise ValueError(f"{where} must be an EscapeStep, got {step!r}.")
    name = type(step).__name__
    if type(step).apply is EscapeStep.apply:
        raise ValueError(f"{where} {name} does not implement `apply(ctx)`, which acts once.")
    if not dataclasses.is_dataclass(step) and type(step).config is EscapeStep.config:
        arguments = [
            p.name
            for p in inspect.signature(type(step)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if arguments:
            raise ValueError(
                f"{where} {name} takes {', '.join(arguments)} but does not define `config()`: "
                f"each escape acts with a fresh copy, {name}(**step.config()), which would have "
                "its defaults. Return the arguments from `config()`, or make it a dataclass."
            )
    try:
        copy = type(step)(**step.config())
    except TypeError as err:
        raise ValueError(
            f"{where} {name} cannot be rebuilt from its `config()` {step.config()!r}: {err}"
        ) from err
    # A subclass of a dataclass step with an `__init__` of its own keeps settings the fields
    # (and so `config()`) do not list: the copy must hold every public attribute alike.
    lost = [
        f"{key}={value!r} (a copy has {getattr(copy, key, None)!r})"
        for key, value in vars(step).items()
        if not key.startswith("_") and not _alike(getattr(copy, key, _MISSING), value)
    ]
    if lost:
        raise ValueError(
            f"{where} {name} is not rebuilt whole from its `config()` {step.config()!r}: "
            f"{', '.join(lost)}. Each escape acts with such a copy: list every setting in "
            "`config()` (or as a dataclass field)."
        )


_MISSING = object()


def _alike(a: Any, b: Any) -> bool:
    if a is b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        return True  # NaN is a setting like any other
    try:
        return bool(a == b)
    except Exception:  # tensors, arrays: compared by identity only
        return False


def _copy(step: EscapeStep, strength: int) -> EscapeStep:
    out = type(step)(**step.config())
    for _ in range(strength):
        out = out.stronger()
    return out


class EscapePolicy:
    """Chooses escape steps by diagnosis, escalates after failures, and knows when to stop.

    Args:
        ladders: Escape steps per diagnosis kind, tried in order; ``None`` for :func:`default_ladders`.
        max_escapes: Escapes allowed in the whole run.
        max_failures: Consecutive failed escapes after which the policy stops escaping from the
            current point (until the run improves by itself).
        cooldown_steps: Optimizer steps after an accepted escape before the next one; after the
            ``k``-th failed escape since the last accepted one, the next waits
            ``cooldown_steps * 2 ** (k - 1)`` steps.

    Example:
        >>> import torch
        >>> policy = EscapePolicy(None, max_escapes=5, max_failures=2, cooldown_steps=10)
        >>> ctx = EscapeContext(torch.nn.Linear(2, 1), step=100)
        >>> step, why = policy.choose("local_minimum", ctx)
        >>> step.describe(), policy.position("local_minimum")
        ("Perturb(radius=0.5, scale='auto', seed=0)", (1, 0))
        >>> policy.rejected("local_minimum", step=100)
        110
        >>> policy.choose("local_minimum", ctx)
        (None, 'backing off after 1 failed escape until step 110')
        >>> policy.choose("local_minimum", EscapeContext(ctx.module, step=110))[0].describe()
        "Perturb(radius=1.0, scale='auto', seed=0)"
        >>> policy.rejected("local_minimum", step=120)
        140
        >>> policy.choose("local_minimum", ctx)
        (None, 'stopped after 2 consecutive failed escapes from this point: it is the best basin found')
    """

    def __init__(
        self,
        ladders: Mapping[str, Sequence[EscapeStep]] | None = None,
        *,
        max_escapes: int = 10,
        max_failures: int = 5,
        cooldown_steps: int = 200,
    ) -> None:
        self.ladders = check_ladders(default_ladders() if ladders is None else ladders)
        self.max_escapes = check_nonnegative_int("max_escapes", max_escapes)
        self.max_failures = check_positive_int("max_failures", max_failures)
        self.cooldown_steps = check_nonnegative_int("cooldown_steps", cooldown_steps)
        self.used = 0
        self.failures = 0
        self.concluded = False
        self.cooldown_until = 0
        self.backoff = 0  # failed escapes since the last accepted one
        self._positions: dict[str, tuple[int, int]] = {}
        # Rungs whose step turned out not to act in this run (withdrawn), and why.
        self._void: dict[tuple[str, int], str] = {}

    def position(self, kind: str) -> tuple[int, int]:
        """(rung, strength) the next escape from a ``kind`` stall starts at."""
        return self._positions.get(kind, (0, 0))

    def make(self, kind: str, rung: int, strength: int) -> EscapeStep:
        """A fresh instance of rung ``rung`` of ``kind``'s ladder, made stronger ``strength`` times."""
        return _copy(self.ladders[kind][rung], strength)

    def choose(self, kind: str, ctx: EscapeContext) -> tuple[EscapeStep | None, str]:
        """The next escape for a ``kind`` stall, or None and why not.

        Rungs whose step cannot act in ``ctx`` are passed over (they do not count as failures).
        The chosen rung is remembered: :meth:`rejected` moves past it.
        """
        if kind not in ESCAPABLE:
            return None, f"no escape answers {kind!r}"
        if self.concluded:
            return None, (
                f"stopped after {self.failures} consecutive failed escapes from this point: "
                "it is the best basin found"
            )
        if self.used >= self.max_escapes:
            return None, f"the budget of {self.max_escapes} escapes is spent"
        if ctx.step < self.cooldown_until:
            if self.backoff:
                failed = f"{self.backoff} failed escape" + ("s" if self.backoff > 1 else "")
                return None, f"backing off after {failed} until step {self.cooldown_until}"
            return None, f"cooling down until step {self.cooldown_until}"
        ladder = self.ladders.get(kind, [])
        if not ladder:
            return None, f"the ladder for {kind!r} is empty"
        rung, strength = self.position(kind)
        skipped: list[str] = []
        for _ in range(len(ladder)):
            step = self.make(kind, rung, strength)
            why = self._void.get((kind, rung)) or step.unavailable(ctx)
            if why is None:
                self._positions[kind] = (rung, strength)
                return step, (f"skipped {'; '.join(skipped)}" if skipped else "")
            skipped.append(f"{step.describe()} ({why})")
            rung, strength = self._advance(kind, rung, strength)
        return None, "no step of the ladder can act here: " + "; ".join(skipped)

    def _advance(self, kind: str, rung: int, strength: int) -> tuple[int, int]:
        rung += 1
        if rung >= len(self.ladders[kind]):
            rung, strength = 0, strength + 1
        return rung, strength

    def started(self) -> None:
        """Count an escape against the budget."""
        self.used += 1

    def withdrawn(self, kind: str, rung: int, why: str) -> None:
        """The escape of rung ``rung`` never acted (``why``): not counted, and passed over from now.

        Its step found after :meth:`~lightning_escape.escapes.EscapeStep.apply` that its change
        cannot come in force in this run (a dataloader that ignores the batch size): any copy of
        it, stronger or not, would fare the same.
        """
        self.used = max(0, self.used - 1)
        self._void[kind, rung] = why

    def accepted(self, kind: str, step: int) -> None:
        """The escape helped: start over at the bottom of the ladder, after a cooldown."""
        self.failures = 0
        self.backoff = 0
        self._positions.pop(kind, None)
        self.cooldown_until = step + self.cooldown_steps

    def rejected(self, kind: str, step: int, escape: EscapeStep | None = None) -> int:
        """The escape was rolled back at ``step``: escalate, back off, stop after ``max_failures``.

        A step whose class is :attr:`~lightning_escape.escapes.EscapeStep.once_per_run` is passed
        over in every ladder from then on (kept without credit, too: it failed all the same).

        Args:
            kind: The diagnosis it answered.
            step: The optimizer step of the verdict.
            escape: The step that failed; None for the rung the policy chose last (a trial
                resumed with other ladders may be of a rung they no longer have).

        Returns:
            The first step at which another escape may start.
        """
        self.failures += 1
        self.backoff += 1
        rung, strength = self.position(kind)
        ladder = self.ladders.get(kind, [])
        failed = escape if escape is not None else ladder[rung] if rung < len(ladder) else None
        if failed is not None and failed.once_per_run:
            # Every ladder's rung of that class, any strength: the change would be the same.
            for other, rungs in self.ladders.items():
                for i, candidate in enumerate(rungs):
                    if type(candidate) is type(failed):
                        self._void[other, i] = f"failed once in this run (at step {step})"
        self._positions[kind] = self._advance(kind, rung, strength)
        if self.failures >= self.max_failures:
            self.concluded = True
        self.cooldown_until = step + self.cooldown_steps * 2 ** (self.backoff - 1)
        return self.cooldown_until

    def reset(self) -> None:
        """Forget the budget spent, the failures and the positions on the ladders."""
        self.used = 0
        self.failures = 0
        self.concluded = False
        self.cooldown_until = 0
        self.backoff = 0
        self._positions = {}
        self._void = {}

    def improved(self) -> None:
        """The run improved by itself: it left the point the stopping rule was about.

        The back-off stays: a run that improves slowly by itself and keeps stalling is exactly the
        healthy run whose waste it bounds.
        """
        self.concluded = False
        self.failures = 0
        self._positions.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain values that resume the policy exactly."""
        return {
            "used": self.used,
            "failures": self.failures,
            "concluded": self.concluded,
            "cooldown_until": self.cooldown_until,
            "backoff": self.backoff,
            "positions": {k: list(v) for k, v in self._positions.items()},
            "void": [[kind, rung, why] for (kind, rung), why in self._void.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.used = int(state["used"])
        self.failures = int(state["failures"])
        self.concluded = bool(state["concluded"])
        self.cooldown_until = int(state["cooldown_until"])
        self.backoff = int(state.get("backoff", 0))
        # A run resumed with other ladders starts a kind whose rung it no longer has at the bottom.
        self._positions = {
            k: (int(v[0]), int(v[1]))
            for k, v in state["positions"].items()
            if int(v[0]) < len(self.ladders.get(k, []))
        }
        self._void = {
            (str(kind), int(rung)): str(why)
            for kind, rung, why in state.get("void", [])
            if int(rung) < len(self.ladders.get(kind, []))
        }
